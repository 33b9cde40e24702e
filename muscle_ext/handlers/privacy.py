"""What experiment tracking may send out of the process: the redaction rule, config flattening, datalist hashes.

(One module of ~400 lines on purpose: the privacy rule, and everything that applies it to values, keys and log
lines, is reviewed in one place.)

Datalists and image meta data may carry patient names (in file paths, DICOM fields), so nothing from them is
logged. Config values are checked with one rule, applied before anything is flattened, logged or written:

**Redaction rule.** A config value is replaced by ``sha256:<first 12 hex of its SHA-256>`` when

1. *its key names data or identity* (the key, or any key above it: the whole subtree is hashed as one value):

   - contains ``datalist`` / ``data_list``;
   - names a data location: ``(data|dataset|image(s)|img|label(s)|mask(s)|dicom|raw|root|input)`` followed by
     ``dir|root|path(s)|folder|file(s)``, e.g. ``dataset_dir``, ``data_root``, ``root_dir``, ``image_dir``;
   - names image meta data or a DICOM identity field: ``filename_or_obj``, ``*meta_dict*``, ``patient*``,
     ``accession_number``, ``*instance_uid``, ``institution_name``, ``referring_physician_name``,
     ``study_date``/``study_time``/``study_id``, ``other_patient_ids``;
   - names a secret: ``password``, ``secret``, ``token``, ``api_key``, ``credential(s)`` (as the last word);

2. *or its value is a string that points at files outside the allowed roots* (the bundle root, the output
   directory and any ``allowed_roots`` given; symbolic links are resolved):

   - a plain string that looks like a path (contains ``/`` or ``\\``, starts with ``~``, ends with an image or
     table suffix such as ``.dcm``, ``.png``, ``.nii.gz``, ``.csv``, or names an existing file) and does not
     resolve inside an allowed root (relative paths are tried against the current directory and the bundle root);
   - a ``file://`` or ``sqlite://`` URI whose path is outside the allowed roots, or any URI with a user name or
     password in it (``http://user:pw@host``); other URIs (``http://tracking-server:5000``) are kept;
   - a config expression (``$...``) that holds a path-like string literal that is neither inside an allowed
     root nor appended to an allowed reference (``@bundle_root + '/models'`` is kept), or that refers to a
     sensitive key (``@dataset_dir``) and holds any string literal at all.

Everything else (numbers, booleans, ``@references``, class names, expressions without data paths) is kept.

**Metrics**: only scalars are logged. Names of nested metric dicts (``{"per_case": {<key>: value}}``) are
checked like keys and values above: an entry whose nested key looks like a path or file name, or names data
or identity, is skipped (per-case results keyed by file name stay out of MLflow).
When in doubt the rule hashes: a hash loses readability, never privacy. It cannot catch an identifier stored
under an innocent key with no path in it (``case: "Jane Doe"``): name such keys per rule 1.
Data kept *inside* a bundle directory counts as part of the bundle: keep patient data outside bundles.

**Logs**: MONAI's ``monai.bundle run`` prints an input summary of its command-line arguments (``> dataset_dir:
/data/<site>/...``) to stdout. :class:`InputSummaryRedactor`, installed on MONAI's ``monai.bundle.scripts`` logger
when ``muscle_ext.handlers`` is imported (every MUSCLE bundle imports it, before MONAI prints the summary), applies
the same rule to those lines: the key rule to every ``#``-separated part of the argument name, the value rule with
the ``bundle_root``/``output_dir``/``ckpt_dir``/``model_dir``/``log_dir`` arguments as allowed roots. MONAI's own
run arguments that name bundle files (``logging_file``, ``meta_file``, ``args_file``, ``tracking``) are kept.

The 12-hex hash makes runs comparable (same input, same hash) without the input being readable; it is not a
defence against someone who can guess the exact path, which is why it is only used for values, never stored
next to them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import pprint
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "REDACTED_PREFIX",
    "InputSummaryRedactor",
    "PrivacyFilter",
    "datalist_fingerprint",
    "flatten_config",
    "install_input_summary_redaction",
    "sanitize_key",
    "short_hash",
]

REDACTED_PREFIX = "sha256:"
MAX_PARAM_VALUE_LENGTH = 500  # MLflow's historic limit (3.x allows 6000): the strictest server wins
MAX_KEY_LENGTH = 250  # MLflow's limit for param, metric and tag keys

_DATA_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".nii", ".nii.gz",
                  ".mha", ".mhd", ".nrrd", ".npy", ".npz", ".h5", ".csv", ".tsv")
_SENSITIVE_KEY_PATTERNS = (
    r"data_?list",
    r"^(data|dataset|images?|img|labels?|masks?|dicom|raw|root|input)_?(dir|root|paths?|folder|files?)$",
    r"^data_?root$",
    r"filename_?or_?obj",
    r"meta_?dict",
    r"^patient",
    r"^accession_?number$",
    r"instance_?uid$",
    r"^institution_?name$",
    r"^referring_?physician",
    r"^study_?(date|time|id)$",
    r"^other_?patient",
    r"(^|_)(password|passwd|secret|token|api_?key|credentials?)$",
)
_SENSITIVE_KEY_RE = re.compile("|".join(f"(?:{p})" for p in _SENSITIVE_KEY_PATTERNS))
_CAMEL_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_URI_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://([^/]*)(.*)$")
_LITERAL_RE = re.compile(r"""'([^'\\]*(?:\\.[^'\\]*)*)'|"([^"\\]*(?:\\.[^"\\]*)*)\"""")
_REF_RE = re.compile(r"@([\w#:]+)")
_ALLOWED_PREFIX_RE = re.compile(r"@([\w#:]+)\s*\+\s*[rRbBfF]?$")
_INVALID_KEY_CHARS = re.compile(r"[^\w.\- /]")


def short_hash(value: Any, length: int = 12) -> str:
    """``sha256:<hex>`` of a value (strings by their UTF-8 bytes, anything else by its canonical JSON)."""
    text = value if isinstance(value, str) else _canonical_json(value)
    return REDACTED_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _normalize_key(key: str) -> str:
    return _CAMEL_RE.sub("_", str(key)).lower().replace("-", "_").replace(" ", "_")


class PrivacyFilter:
    """Applies the module's redaction rule to config values (see the module docstring).

    Args:
        allowed_roots: directories whose files may be named in logs (the bundle root, the output directory).
        allowed_refs: config ids whose value lies in an allowed root, so that ``@id + '/sub/path'`` is kept.
        extra_sensitive_keys: more regular expressions matched against normalised (snake_case) key names.
    """

    def __init__(
        self,
        allowed_roots: Iterable[str | os.PathLike] = (),
        allowed_refs: Iterable[str] = ("bundle_root", "output_dir", "ckpt_dir", "model_dir", "log_dir"),
        extra_sensitive_keys: Iterable[str] = (),
    ) -> None:
        self.allowed_roots = tuple(_real(r) for r in allowed_roots if r)
        self.allowed_refs = set(allowed_refs)
        extra = tuple(extra_sensitive_keys)
        self._key_re = re.compile(_SENSITIVE_KEY_RE.pattern + "".join(f"|(?:{p})" for p in extra))

    def is_sensitive_key(self, key: str | int) -> bool:
        return isinstance(key, str) and bool(self._key_re.search(_normalize_key(key)))

    def redact(self, config: Any) -> Any:
        """A copy of ``config`` (nested dicts/lists) with every value the rule flags replaced by its hash."""
        return self._redact(config, key=None)

    def _redact(self, value: Any, key: str | int | None) -> Any:
        if key is not None and self.is_sensitive_key(key):
            return short_hash(value)
        if isinstance(value, Mapping):
            return {k: self._redact(v, k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._redact(v, i) for i, v in enumerate(value)]
        if isinstance(value, str) and self.is_sensitive_value(value):
            return short_hash(value)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        # objects (tensors, transforms) reach here only from hand-built configs: log their type, not their repr
        return f"<{type(value).__name__}>"

    def is_sensitive_value(self, value: str) -> bool:
        text = value.strip()
        if not text or text.startswith("@"):
            return False
        if text.startswith("$"):
            return self._expression_is_sensitive(text)
        uri = _URI_RE.match(text)
        if uri:
            scheme, netloc, rest = uri.groups()
            if "@" in netloc:  # user name / password in the URI
                return True
            if scheme.lower() in ("file",) or scheme.lower().startswith("sqlite"):
                return not self._inside_allowed(rest if rest else netloc)
            return False
        return self.looks_like_path(text) and not self._inside_allowed(text)

    def _expression_is_sensitive(self, expr: str) -> bool:
        literals = [(m.start(), m.group(1) if m.group(1) is not None else m.group(2))
                    for m in _LITERAL_RE.finditer(expr)]
        refs = _REF_RE.findall(expr)
        if literals and any(self.is_sensitive_key(r.split("#")[-1]) for r in refs):
            return True
        for start, literal in literals:
            if not self.looks_like_path(literal):
                continue
            prefix = _ALLOWED_PREFIX_RE.search(expr[:start])
            if prefix and prefix.group(1).split("#")[-1] in self.allowed_refs and ".." not in literal:
                continue
            if os.path.isabs(os.path.expanduser(literal)) and self._inside_allowed(literal):
                continue
            return True
        return False

    @staticmethod
    def looks_like_path(text: str) -> bool:
        """Contains a path separator, starts with ``~``, ends with a data suffix, or names an existing file."""
        if "/" in text or "\\" in text or text.startswith("~"):
            return True
        if text.lower().endswith(_DATA_SUFFIXES):
            return True
        try:
            return len(text) < 4096 and os.path.exists(text)
        except (OSError, ValueError):
            return False

    def _inside_allowed(self, path: str) -> bool:
        if not self.allowed_roots:
            return False
        path = os.path.expanduser(path)
        if os.path.isabs(path):
            return self._under_root(path)
        # a relative path joined to a root is always "under" it: only an existing file there counts
        candidates = [os.path.join(os.getcwd(), path)] + [os.path.join(root, path) for root in self.allowed_roots]
        return any(os.path.exists(c) and self._under_root(c) for c in candidates)

    def _under_root(self, path: str) -> bool:
        real = _real(path)
        return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.allowed_roots)


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


class InputSummaryRedactor(logging.Filter):
    """Redacts the argument lines (``> name: value``) of MONAI's bundle input summary with the module's rule.

    A logging filter for the ``monai.bundle.scripts`` logger (see :func:`install_input_summary_redaction`). Values
    of the arguments named in ``root_keys`` are allowed roots for the lines that follow them (they are kept, as
    :class:`TrackingHandler` keeps its ``output_dir``); ``keep_keys`` are kept as they are; every other value is
    redacted when an ``#``-separated part of its name is sensitive, or when the value (a string, or strings
    inside a list or dict) points at files outside the allowed roots. A value that cannot be parsed back is
    redacted if its text looks like a path. Other records pass unchanged.
    """

    _LINE = re.compile(r"^> (?P<key>[^:\s]+): (?P<value>.*)$", re.DOTALL)
    _HEADER = "--- input summary of "

    def __init__(
        self,
        root_keys: Iterable[str] = ("bundle_root", "output_dir", "ckpt_dir", "model_dir", "log_dir"),
        keep_keys: Iterable[str] = ("logging_file", "meta_file", "args_file", "tracking", "workflow_type",
                                    "workflow_name", "run_id", "init_id", "final_id", "properties_path"),
    ) -> None:
        super().__init__()
        self.root_keys = set(root_keys)
        self.keep_keys = set(keep_keys)
        self._roots: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            if message.startswith(self._HEADER):
                self._roots = []  # a new summary: roots come from its own arguments
                return True
            match = self._LINE.match(message)
            if match is None:
                return True
            key, text = match.group("key"), match.group("value")
            redacted = self._redact(key, text)
            if redacted is not None:
                record.msg, record.args = f"> {key}: {redacted}", None
        except Exception:  # never lose a log line; but never let one through that could not be checked
            record.msg, record.args = "> (argument line withheld: it could not be checked for paths)", None
        return True

    def _redact(self, key: str, text: str) -> str | None:
        """The replacement text for the value, or None to keep the line as it is."""
        try:
            value: Any = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = None  # e.g. a long value pprint_edges cut in the middle
            parsed = False
        else:
            parsed = True
        if key in self.root_keys and parsed and isinstance(value, (str, os.PathLike)):
            self._roots.append(os.fspath(value))
            return None
        if key in self.keep_keys:
            return None
        privacy = PrivacyFilter(allowed_roots=self._roots)
        if any(privacy.is_sensitive_key(part) for part in key.split("#")):
            return short_hash(value if parsed else text)
        if not parsed:
            return short_hash(text) if privacy.looks_like_path(text) else None
        clean = privacy.redact(value)
        if _canonical_json(clean) == _canonical_json(value):
            return None
        return clean if isinstance(clean, str) else pprint.pformat(clean)


def install_input_summary_redaction(logger_name: str = "monai.bundle.scripts") -> InputSummaryRedactor:
    """Attach an :class:`InputSummaryRedactor` to MONAI's bundle-scripts logger (once); returns the filter."""
    import monai.bundle.scripts  # noqa: F401  (MONAI sets its logger up on import: create it the MONAI way first)

    target = logging.getLogger(logger_name)
    for existing in target.filters:
        if isinstance(existing, InputSummaryRedactor):
            return existing
    redactor = InputSummaryRedactor()
    target.addFilter(redactor)
    return redactor


def sanitize_key(key: str) -> str:
    """A valid MLflow key: disallowed characters become ``_``; keys over 250 characters keep a hash suffix."""
    key = _INVALID_KEY_CHARS.sub("_", key).strip("/") or "_"
    key = re.sub(r"/{2,}", "/", key)
    if len(key) > MAX_KEY_LENGTH:
        key = key[: MAX_KEY_LENGTH - 20] + "~" + short_hash(key)[len(REDACTED_PREFIX):]
    return key


def _truncate(text: str, max_length: int) -> str:
    if len(text) <= max_length:
        return text
    suffix = f"...[{short_hash(text)}]"  # the hash says which full value it was
    return text[: max_length - len(suffix)] + suffix


def flatten_config(
    config: Mapping[str, Any],
    sep: str = ".",
    max_length: int = MAX_PARAM_VALUE_LENGTH,
    privacy: PrivacyFilter | bool = True,
    prefix: str = "",
) -> dict[str, str]:
    """Flatten a nested config into MLflow params ``{"train.trainer.max_epochs": "10", ...}``.

    Args:
        config: nested dicts/lists, e.g. ``ConfigParser.get()`` (expressions stay as their text).
        sep: joins nested keys; MONAI's ``#`` is not a valid MLflow key character.
        max_length: longer values are cut and end with ``...[sha256:<12 hex>]`` of the full value.
        privacy: ``True`` redacts with a default :class:`PrivacyFilter`, a filter redacts with it, ``False`` keeps
            values as they are (only for configs known to hold no paths).
        prefix: prepended to every key (e.g. ``"config."``).
    """
    if privacy is True:
        privacy = PrivacyFilter()
    if isinstance(privacy, PrivacyFilter):
        config = privacy.redact(config)
    flat: dict[str, str] = {}

    def _walk(value: Any, path: list[str]) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                _walk(v, path + [str(k)])
        elif isinstance(value, (list, tuple)) and value:
            for i, v in enumerate(value):
                _walk(v, path + [str(i)])
        else:
            text = ("{}" if isinstance(value, Mapping) else "[]") if isinstance(value, (Mapping, list, tuple)) else str(
                value
            )
            flat[sanitize_key(prefix + sep.join(path))] = _truncate(text, max_length)

    _walk(config, [])
    return flat


def _count_items(data: Any) -> int:
    if isinstance(data, Mapping):  # decathlon style: {"training": [...], "validation": [...], "name": ...}
        lists = [v for v in data.values() if isinstance(v, (list, tuple))]
        return sum(len(v) for v in lists) if lists else 1
    if isinstance(data, (list, tuple)):
        return len(data)
    return 1


def datalist_fingerprint(datalist_or_path: Any, key: str | None = None) -> dict[str, Any]:
    """``{"sha256": <64 hex>, "count": <items>}`` of a datalist; the datalist's content is never returned.

    Args:
        datalist_or_path: a path to a JSON/YAML datalist (hashed by its parsed, canonical content, so formatting
            does not change the hash and a file and its loaded list hash the same), a CSV/TSV/text file (hashed
            by its bytes, count = data rows), a list of items, a decathlon dict, or a dataset with a ``data``
            attribute (MONAI ``Dataset``).
        key: for a decathlon dict/file, the section to fingerprint (``"training"``); default all of it
            (count = items over all list sections).
    """
    data = datalist_or_path
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.suffix.lower() in (".json", ".yaml", ".yml"):
            from monai.bundle import ConfigParser

            data = ConfigParser.load_config_file(path)
        else:
            raw = path.read_bytes()
            lines = [ln for ln in raw.splitlines() if ln.strip()]
            header = 1 if path.suffix.lower() in (".csv", ".tsv") and lines else 0
            return {"sha256": hashlib.sha256(raw).hexdigest(), "count": len(lines) - header}
    elif hasattr(data, "data") and not isinstance(data, (Mapping, Sequence)):
        data = data.data
    if key is not None and isinstance(data, Mapping):
        data = data[key]
    if not isinstance(data, (Mapping, list, tuple)):
        data = list(data)
    digest = hashlib.sha256(_canonical_json(data).encode("utf-8")).hexdigest()
    return {"sha256": digest, "count": _count_items(data)}
