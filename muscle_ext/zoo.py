"""A bundle folder ready for the MONAI model zoo, with ``muscle_ext`` inside it.

The model zoo installs only pinned PyPI packages (``required_packages_version`` of ``metadata.json``), and a bundle's
own code lives in its ``scripts/`` folder (the zoo's convention). ``muscle-ext`` is not on PyPI, so
:func:`export_bundle` copies a bundle of this repository and vendors the installed ``muscle_ext`` package, at its
exact version, into ``scripts/muscle_ext``:

- ``scripts/__init__.py`` puts ``scripts/`` first on ``sys.path``, and every entry config's ``imports`` list starts
  with ``$import scripts``: MONAI evaluates import statements before anything else, so the configs' own
  ``$import muscle_ext`` then finds the vendored copy. Run the exported bundle from its folder, as every zoo bundle
  with ``scripts/`` is run (``python -m monai.bundle run --config_file configs/train.yaml``);
- ``muscle-ext`` leaves ``required_packages_version`` (the zoo would try to install it from PyPI) and the vendored
  version is recorded in the changelog line of the bundle's version;
- training outputs (``runs/``, ``*.pt``), caches and ``__pycache__`` stay behind: weights travel through
  ``large_files.yml``.

Why vendoring rather than a published package: the zoo's checks then run the code the bundle was tested with,
offline, with no second release to keep in step. In this repository the bundles import the installed package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

__all__ = ["SCRIPTS_INIT", "export_bundle"]

SCRIPTS_INIT = '''"""Vendored code of this bundle: scripts/ goes first on sys.path, so that `import muscle_ext` finds
the copy in scripts/muscle_ext (the configs' `imports` start with `$import scripts`). Written by
muscle_ext.zoo.export_bundle."""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)
'''
_IMPORT_LINE = "- $import scripts              # scripts/muscle_ext, vendored: run from the bundle folder\n"
_LEFT_BEHIND = shutil.ignore_patterns("runs", "__pycache__", "*.pt", "*.ts", "cache", "mlruns*", "mlflow.db", "*.pyc")


def export_bundle(bundle_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy the bundle at ``bundle_dir`` to ``out_dir`` with ``muscle_ext`` vendored in ``scripts/`` (see above).

    Args:
        bundle_dir: a bundle folder (``configs/metadata.json`` inside), e.g. ``bundles/muscle_pretrain``.
        out_dir: where the zoo-ready bundle goes; must not exist yet (nothing is overwritten).

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: ``bundle_dir`` has no ``configs/metadata.json``.
        FileExistsError: ``out_dir`` exists.
    """
    import muscle_ext

    source, out = Path(bundle_dir), Path(out_dir)
    meta_file = source / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{source}: not a bundle folder (no configs/metadata.json)")
    if out.exists():
        raise FileExistsError(f"{out} exists: give a new folder for the exported bundle")
    shutil.copytree(source, out, ignore=_LEFT_BEHIND)
    shutil.copytree(Path(muscle_ext.__file__).parent, out / "scripts" / "muscle_ext", ignore=_LEFT_BEHIND)
    (out / "scripts" / "__init__.py").write_text(SCRIPTS_INIT)

    for config in sorted((out / "configs").glob("*.yaml")):
        text = config.read_text()
        if re.search(r"^imports:\n", text, re.MULTILINE):  # an entry config (merged ones inherit its imports)
            config.write_text(re.sub(r"^imports:\n", "imports:\n" + _IMPORT_LINE, text, count=1, flags=re.MULTILINE))

    meta = json.loads((out / "configs" / "metadata.json").read_text())
    meta.get("required_packages_version", {}).pop("muscle-ext", None)
    version = meta.get("version")
    if version in meta.get("changelog", {}):
        meta["changelog"][version] += f" (muscle_ext {muscle_ext.__version__} vendored in scripts/)"
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
    return out
