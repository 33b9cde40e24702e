"""The report card of a classification test report (issue #17): what a threshold chosen at home gives on the
evaluated split, how the model fares on a simulated site, and what recalibration on a small labelled slice of a new
site changes. ``configs/evaluate.yaml`` wires these pieces into :class:`~muscle_ext.handlers.ClassificationReport`;
the metrics are :mod:`muscle_ext.metrics.calibration`'s.

- **Operating point carried from validation** (``operating_point``): ``fixed`` keeps the model's ``threshold``
  setting; ``youden`` (Youden's J, the ROC point furthest above the diagonal; Youden, "Index for rating diagnostic
  tests", Cancer 1950) or ``sensitivity@<target>`` (the highest threshold whose sensitivity reaches the target)
  choose the threshold on the *validation* split of the task's datalist, scored by the same network with the same
  pre-processing (:class:`SplitScorer`; the images as acquired, never simulated), and the report's accuracy,
  sensitivity and specificity on the evaluated split are those at the carried threshold
  (:class:`CarriedOperatingPoint`, :func:`carry_operating_point`). Choosing on validation and reporting on test is
  how a threshold is fixed before a test set is opened (e.g. the external-validation practice of TRIPOD, Collins et
  al., BMJ 2015).
- **Simulated site** (``simulated_site``): :mod:`muscle_ext.data.simulated_site`; only a label here (``site``).
- **Recalibration** (``recalibrate_on``, ``recalibration``, ``recalibration_k``): ``k`` patients per class drawn
  from the ``validation`` section of a new site's datalist (:func:`muscle_ext.engines.draw_shots`: nested, grouped
  by patient, never an image or patient of the evaluated split), scored like the evaluated images (with the
  simulated site when one is on: then the slice is the *simulated validation split* of the task's own datalist);
  a temperature (Guo et al., ICML 2017) or Platt (Platt 1999) map is fitted on the slice
  (:func:`muscle_ext.engines.fit_operating_point`), and the report gives the evaluated split's ECE before and after
  it (95 % bootstrap CIs), ROC AUC before and after (unchanged: the map is monotone), and the threshold chosen on
  the recalibrated slice with what it gives on the evaluated split (:func:`recalibration_section`).

Labels are 0/1, shape ``(N,)``; probabilities are of label 1 (softmax of the two logits), shape ``(N,)``;
thresholds apply as ``p >= threshold``.

:func:`check_report_card` (in ``initialize``, after ``check_run``) refuses, all at once and before any data is read,
a malformed ``operating_point`` or ``simulated_site``, these settings on a task where they do not apply, and
contradictory combinations (a ``--threshold`` that the carried one would replace, ``--recalibration`` without
``--recalibrate_on``, a slice of another datalist than the simulated one, a slice drawn from the evaluated split).
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from ..engines.adaptation import decode_batches, predict_probabilities
from ..metrics import accuracy, roc_auc
from ..metrics.bootstrap import bootstrap_ci, ci_dict
from ..metrics.calibration import at_threshold, expected_calibration_error, operating_threshold
from ..settings import SettingsError

__all__ = ["OPERATING_POINT_FORMS", "TEMPERATURE_SEARCH", "CarriedOperatingPoint", "RecalibrationSlice", "SplitScorer",
           "carried_operating_point", "carry_operating_point", "check_report_card", "parse_operating_point",
           "recalibration_section", "recalibration_slice", "report_card_problems"]

logger = logging.getLogger(__name__)

OPERATING_POINT_FORMS = ("fixed", "youden", "sensitivity@<target>")
"""What ``operating_point`` may be; ``<target>`` is a sensitivity above 0 and at most 1 (e.g. ``sensitivity@0.9``)."""

RECALIBRATION_SECTION = "validation"
"""The section of ``recalibrate_on`` the slice is drawn from."""

TEMPERATURE_SEARCH = (0.05, 20.0)
"""The interval :func:`muscle_ext.metrics.calibration.fit_recalibration` searches the temperature in."""


# ------------------------------------------------------------------------------------------------- the settings
def parse_operating_point(setting: Any) -> tuple[str, float | None]:
    """``"fixed"`` -> ``("fixed", None)``, ``"youden"`` -> ``("youden", None)``, ``"sensitivity@0.9"`` ->
    ``("sensitivity", 0.9)``.

    Raises:
        SettingsError: anything else, with a message naming ``--operating_point`` and how to type it.
    """
    text = setting.strip() if isinstance(setting, str) else setting
    if text in ("fixed", "youden"):
        return text, None
    example = "type it as --operating_point youden, or --operating_point sensitivity@0.9 (the highest threshold " \
              "reaching that sensitivity on the validation split)"
    if isinstance(text, str) and text.split("@", 1)[0].strip() == "sensitivity":
        target_text = text.split("@", 1)[1].strip() if "@" in text else ""
        try:
            target = float(target_text)
        except ValueError:
            raise SettingsError(f"operating_point {text!r}: the target sensitivity after '@' must be a number above "
                                f"0 and at most 1; {example}") from None
        if not 0 < target <= 1:
            raise SettingsError(f"operating_point {text!r}: the target sensitivity must be above 0 and at most 1, got "
                                f"{target:g}; type it as e.g. --operating_point sensitivity@0.9")
        return "sensitivity", target
    close = difflib.get_close_matches(str(text), ["fixed", "youden", "sensitivity@0.9"], n=1, cutoff=0.6)
    hint = f"did you mean --operating_point {close[0]}?" if close else example
    raise SettingsError(f"operating_point must be one of {', '.join(OPERATING_POINT_FORMS)}, got {text!r}; {hint}")


def _same_file(a: Any, b: Any) -> bool:
    try:
        return os.path.realpath(str(a)) == os.path.realpath(str(b))
    except (TypeError, ValueError):
        return False


def report_card_problems(task: str, operating_point: Any = "fixed", simulated_site: Any = False,
                         recalibrate_on: Any = None, datalist: Any = None, split: str = "test",
                         given: Sequence[str] = (), operating_point_datalist: Any = None) -> list[str]:
    """One line per problem with the report-card settings (see :func:`check_report_card`); ``given``: the ids typed
    on the command line (a default value is never a problem)."""
    from ..data.simulated_site import simulated_site_name

    given = {g.lstrip("+") for g in given}
    problems: list[str] = []
    try:
        rule, _ = parse_operating_point(operating_point)
    except SettingsError as exc:
        problems.append(str(exc))
        rule = None
    try:
        site = simulated_site_name(simulated_site)
    except ValueError as exc:
        problems.append(str(exc))
        site = None
    classification = task == "classification"
    if not classification and rule not in (None, "fixed"):
        problems.append(f"--operating_point {operating_point} applies to classification only: a {task} model has "
                        "no decision threshold to carry; leave --operating_point out")
    if not classification and recalibrate_on:
        problems.append(f"--recalibrate_on applies to classification only: a {task} model has no probability to "
                        "recalibrate; leave --recalibrate_on out")
    if site is not None and task in ("segmentation", "detection"):
        problems.append(f"--simulated_site {simulated_site} applies to classification and regression only: its "
                        f"border crop moves the anatomy, so {task} labels would no longer match the image; leave "
                        "--simulated_site out")
    if classification and rule not in (None, "fixed") and "threshold" in given:
        problems.append(f"--threshold is replaced by the threshold that --operating_point {operating_point} chooses "
                        "on the validation split; leave --threshold out, or use --operating_point fixed to apply it")
    if operating_point_datalist and rule in (None, "fixed") and "operating_point_datalist" in given:
        problems.append("--operating_point_datalist names where --operating_point youden or sensitivity@<t> chooses "
                        "its threshold; with --operating_point fixed nothing is chosen: give a rule, or leave "
                        "--operating_point_datalist out")
    for name in ("recalibration", "recalibration_k"):
        if name in given and not recalibrate_on:
            problems.append(f"--{name} is read only with --recalibrate_on <datalist.json> (the new site's labelled "
                            f"slice); give --recalibrate_on, or leave --{name} out")
    if recalibrate_on and classification:
        if not os.path.isfile(str(recalibrate_on)) and "recalibrate_on" not in given:  # given: check_run says so
            problems.append(f"--recalibrate_on '{recalibrate_on}' does not exist; give the new site's datalist.json")
        same = datalist is not None and _same_file(recalibrate_on, datalist)
        if site is not None and not same:
            problems.append("--recalibrate_on with --simulated_site: the slice must come from the simulated site, "
                            "i.e. the validation split of --datalist, simulated like the test images; give "
                            f"--recalibrate_on {datalist}, or --simulated_site false to recalibrate on another site")
        if same and split == RECALIBRATION_SECTION:
            problems.append(f"--recalibrate_on: the slice is drawn from the {RECALIBRATION_SECTION} split of "
                            f"--datalist, which is the evaluated split here (--validate#split {split}); evaluate "
                            "the test split, or recalibrate on another site's datalist")
    return problems


def check_report_card(source: str, task: str, operating_point: Any = "fixed", simulated_site: Any = False,
                      recalibrate_on: Any = None, datalist: Any = None, split: str = "test",
                      argv: Sequence[str] | None = None, operating_point_datalist: Any = None) -> None:
    """The report-card settings of ``configs/evaluate.yaml``, checked in ``initialize`` before any data is read::

        - "$muscle_ext.handlers.report_card.check_report_card('downstream bundle', @task, @operating_point,
           @simulated_site, @recalibrate_on, @datalist, @validate#split)"

    ``operating_point`` and ``simulated_site`` take words that :mod:`muscle_ext.settings`' kinds cannot express
    (``sensitivity@0.9``, a preset name or a yes/no value): their form is checked here; ``recalibrate_on``,
    ``recalibration`` and ``recalibration_k`` are typed in ``typed_settings`` (``check_run``), and their
    combinations are checked here.

    Args:
        source: named in the message (the bundle).
        task: the task config's ``task``.
        operating_point, simulated_site, recalibrate_on: the settings.
        datalist: the evaluated datalist (the slice of a simulated site must come from it).
        split: the evaluated section (``validate#split``).
        argv: the command line (default ``sys.argv``): which settings were typed.
        operating_point_datalist: where the threshold is chosen (default ``datalist``; another site's evaluation
            carries the home threshold).

    Raises:
        SettingsError: every problem, one line each, naming the setting and the fix.
    """
    from ..bundle_args import split_overrides

    found = split_overrides(argv)
    given = list(found[1]) if found is not None else []
    problems = report_card_problems(task, operating_point, simulated_site, recalibrate_on, datalist, split, given,
                                    operating_point_datalist)
    if problems:
        raise SettingsError(f"{source}: {len(problems)} problem(s) with the report-card settings, nothing was run:\n"
                            + "\n".join(f"  {p}" for p in problems))


# ------------------------------------------------------------------------------------------------- the scores
class SplitScorer:
    """Positive-class probabilities of the evaluated network on datalist entries: the validator's network, device and
    inferer, through a given transform chain (the bundle's ``preprocessing`` + ``target`` + ``normalize`` +
    ``select``), in eval mode and without gradients (the network's mode is restored). The adaptation engines'
    scorer (:func:`~muscle_ext.engines.decode_batches` and :func:`~muscle_ext.engines.predict_probabilities`), a
    batch at a time, bound to the evaluator's settings.

    Args:
        network: the task model (two logits per image).
        device: where the images go.
        inferer: ``inferer(images, network)`` (the validator's; ``None``: ``network(images)``).
        batch_size, num_workers: of the DataLoader.
        image_key, label_key: keys of the transformed items.
    """

    def __init__(self, network: torch.nn.Module, device: str | torch.device = "cpu", inferer: Callable | None = None,
                 batch_size: int = 32, num_workers: int = 0, image_key: str = "image",
                 label_key: str = "label") -> None:
        self.network = network
        self.device = torch.device(device)
        self.inferer = inferer
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.image_key = image_key
        self.label_key = label_key

    def __call__(self, items: Sequence[Mapping[str, Any]], transform: Callable) -> tuple[np.ndarray, np.ndarray]:
        """``(labels (N,) int64, probabilities (N,) float64)`` of ``items`` in their order (one-hot labels as class
        indices).

        Raises:
            ValueError: no items, or items without a label.
        """
        if not items:
            raise ValueError("no entries to score")
        labels, probs = [], []
        for images, batch_labels in decode_batches(items, transform, self.batch_size, self.num_workers,
                                                   self.image_key, self.label_key):
            if batch_labels is None:
                raise ValueError(f"the transformed entries have no {self.label_key!r} to score against")
            probs.append(predict_probabilities(self.network, images, len(images), self.inferer, self.device))
            labels.append(batch_labels.numpy())
        return np.concatenate(labels), np.concatenate(probs)


def _at(labels: ArrayLike, probs: ArrayLike, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, accuracy and n of ``probs >= threshold``."""
    out = at_threshold(labels, probs, threshold)
    out["accuracy"] = accuracy(np.asarray(labels).ravel(), np.asarray(probs).ravel() >= float(threshold))
    return out


def _evaluated_key(split: str, chosen_on: str) -> str:
    return split if split != chosen_on else f"{split} (evaluated)"


def carry_operating_point(setting: str, chosen: tuple[ArrayLike, ArrayLike], evaluated: tuple[ArrayLike, ArrayLike],
                          split: str = "test", chosen_on: str = "validation") -> dict[str, Any]:
    """Choose the threshold on ``chosen = (labels, probs)`` and report what it gives there and on ``evaluated``.

    Args:
        setting: ``youden`` or ``sensitivity@<target>`` (:func:`parse_operating_point`).
        chosen: labels and probabilities of the split the threshold is chosen on (validation).
        evaluated: those of the evaluated split (test).
        split, chosen_on: the two splits' names (keys of the result).

    Returns:
        ``{"rule", "target_sensitivity" (sensitivity rule), "threshold", "chosen_on", <chosen_on>: {threshold,
        sensitivity, specificity, accuracy, n}, <split>: {...}}`` (the evaluated split's key is ``"<split>
        (evaluated)"`` when both are the same split).

    Raises:
        SettingsError: a malformed ``setting`` or ``fixed`` (nothing to choose).
        ValueError: a ``chosen`` split with one class only (no ROC curve to choose on).
    """
    rule, target = parse_operating_point(setting)
    if rule == "fixed":
        raise SettingsError("operating_point fixed: the threshold is the model's --threshold; nothing is chosen")
    labels, probs = chosen
    try:
        threshold = operating_threshold(labels, probs, rule, target if target is not None else 0.9)
    except ValueError as exc:
        raise ValueError(f"--operating_point {setting}: cannot choose a threshold on the {chosen_on} split "
                         f"({len(np.asarray(labels))} cases, labels {sorted(set(np.asarray(labels).tolist()))}): "
                         f"{exc}") from exc
    out: dict[str, Any] = {"rule": str(setting).strip(), "threshold": float(threshold), "chosen_on": chosen_on}
    if target is not None:
        out["target_sensitivity"] = float(target)
    out[chosen_on] = _at(labels, probs, threshold)
    out[_evaluated_key(split, chosen_on)] = _at(*evaluated, threshold)
    return out


def recalibration_section(method: str, slice_scores: tuple[ArrayLike, ArrayLike],
                          evaluated: tuple[ArrayLike, ArrayLike], operating_point: str = "youden",
                          n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0,
                          split: str = "test") -> dict[str, Any]:
    """Fit ``method`` (``temperature`` or ``platt``) on the slice's scores and report its effect on the evaluated
    split.

    The map is ``p' = sigmoid(scale * logit(p) + bias)`` (:class:`muscle_ext.engines.Recalibration`; temperature:
    ``scale = 1 / T``, ``bias = 0``); the threshold is chosen on the slice's recalibrated probabilities by the
    ``operating_point`` rule (Youden's J for ``fixed``).

    Returns:
        ``{"method", "scale", "bias", "temperature" (temperature only), "threshold", "threshold_rule",
        "slice": {n, n_positive, ece_before, ece_after}, "ece_before", "ece_after" ({value, ci_low, ci_high} on the
        evaluated split: stratified percentile bootstrap, ``n_resamples``, ``seed``), "roc_auc_before",
        "roc_auc_after", <split>: {threshold, sensitivity, specificity, accuracy, n} of the recalibrated
        probabilities at the slice's threshold, "warning" (only when the temperature ends at an edge of
        :data:`TEMPERATURE_SEARCH`)}``.

    Raises:
        ValueError: a slice with one class only, an unknown ``method``.
    """
    from ..engines import fit_operating_point

    rule, target = parse_operating_point(operating_point)
    slice_labels, slice_probs = (np.asarray(a) for a in slice_scores)
    labels, probs = (np.asarray(a) for a in evaluated)
    fitted = fit_operating_point(slice_labels, slice_probs, method, rule="youden")
    threshold, rule_name = fitted.threshold, "youden"
    if rule == "sensitivity":
        threshold = operating_threshold(slice_labels, fitted(slice_probs), "sensitivity", target)
        rule_name = str(operating_point).strip()
    after = fitted(probs)

    def ece(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        return ci_dict(bootstrap_ci(expected_calibration_error, y, p, n_resamples, alpha, seed, stratified=True))

    out: dict[str, Any] = {"method": method, "scale": float(fitted.scale), "bias": float(fitted.bias),
                           "threshold": float(threshold), "threshold_rule": rule_name,
                           "slice": {"n": int(slice_labels.size), "n_positive": int(slice_labels.sum()),
                                     "ece_before": expected_calibration_error(slice_labels, slice_probs),
                                     "ece_after": expected_calibration_error(slice_labels, fitted(slice_probs))},
                           "ece_before": ece(labels, probs), "ece_after": ece(labels, after),
                           "roc_auc_before": roc_auc(labels, probs), "roc_auc_after": roc_auc(labels, after)}
    if method == "temperature":
        out["temperature"] = 1.0 / float(fitted.scale)
        low, high = TEMPERATURE_SEARCH
        if not low * 1.01 < out["temperature"] < high * 0.99:
            # at the edge of the search: the slice's scores say little, the map flattens (or sharpens) them all
            out["warning"] = (f"the temperature reached the end of its search interval [{low:g}, {high:g}]: the "
                              "slice's scores carry little information about its labels, and the recalibrated "
                              "probabilities are nearly constant (or nearly 0/1); a larger slice or a better model "
                              "is needed before trusting them")
            logger.warning(f"recalibration: {out['warning']}")
    out[split] = _at(labels, after, threshold)
    return out


# ------------------------------------------------------------------------------- what evaluate.yaml wires in
class CarriedOperatingPoint:
    """The threshold chosen on the validation split and carried to the evaluated one (``operating_point``).

    The validation entries are read and scored once, the first time :meth:`threshold` or :meth:`section` is asked
    for (when the report is written: the model's weights are loaded by then).

    Args:
        setting: ``youden`` or ``sensitivity@<target>``.
        datalist: the task's datalist; its ``section`` is scored.
        scorer: a :class:`SplitScorer` (the evaluator's network).
        transform: the chain the validation images go through: the model's pre-processing and normalisation, as
            acquired (no simulated site: the threshold is chosen at home).
        section: where the threshold is chosen (``validation``).
        max_items, on_bad_data, datalist_checks: as :func:`muscle_ext.data.datalist_section`.

    Raises:
        SettingsError: a malformed ``setting`` (at construction).
    """

    def __init__(self, setting: str, datalist: str | os.PathLike, scorer: SplitScorer, transform: Callable,
                 section: str = "validation", max_items: int | None = None, on_bad_data: str = "raise",
                 datalist_checks: Mapping[str, Any] | None = None) -> None:
        self.rule, self.target = parse_operating_point(setting)
        self.setting = str(setting).strip()
        self.datalist = datalist
        self.scorer = scorer
        self.transform = transform
        self.section_name = section
        self.max_items = max_items
        self.on_bad_data = on_bad_data
        self.datalist_checks = dict(datalist_checks or {})
        self._scores: tuple[np.ndarray, np.ndarray] | None = None

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """``(labels (N,), probabilities (N,))`` of the validation entries (scored once)."""
        if self._scores is None:
            from ..data import datalist_section

            items = datalist_section(self.datalist, self.section_name, self.max_items, on_error=self.on_bad_data,
                                     **self.datalist_checks)
            logger.info(f"operating point {self.setting}: scoring {len(items)} {self.section_name} images")
            self._scores = self.scorer(items, self.transform)
        return self._scores

    def threshold(self) -> float:
        """The threshold chosen on the validation split."""
        labels, probs = self.scores()
        return carry_operating_point(self.setting, (labels, probs), (labels, probs), self.section_name,
                                     self.section_name)["threshold"]

    def section(self, labels: ArrayLike, probs: ArrayLike, split: str = "test") -> dict[str, Any]:
        """:func:`carry_operating_point` from the validation scores to ``(labels, probs)`` of ``split``."""
        from ..engines.adaptation import datalist_name  # a name, never a path (it may name a hospital's folders)

        carried = carry_operating_point(self.setting, self.scores(), (labels, probs), split, self.section_name)
        return {**carried, "chosen_on_datalist": datalist_name(self.datalist)}


def carried_operating_point(setting: str, datalist: str | os.PathLike, scorer: SplitScorer, transform: Callable,
                            **kwargs: Any) -> CarriedOperatingPoint | None:
    """``None`` for ``fixed`` (the model's ``threshold`` applies, as before), else a :class:`CarriedOperatingPoint`
    (``kwargs``: its other arguments)."""
    rule, _ = parse_operating_point(setting)
    return None if rule == "fixed" else CarriedOperatingPoint(setting, datalist, scorer, transform, **kwargs)


class RecalibrationSlice:
    """The labelled slice of a new site that a recalibration map is fitted on (``recalibrate_on``).

    Args:
        datalist: the new site's datalist; the slice comes from its ``validation`` section.
        method: ``temperature`` or ``platt``.
        k: patients per class (all their images).
        scorer: a :class:`SplitScorer`.
        transform: the chain the slice goes through: as the evaluated images (with the simulated site when on).
        exclude_datalist, exclude_section: the evaluated split; no image or patient of it is ever drawn.
        draw: which slice (seed of :func:`muscle_ext.engines.draw_shots`; nested across ``k``).
        operating_point: the rule of the slice's threshold (``fixed``: Youden's J).
        site: the simulated site's description (``None``: images as acquired).
        on_bad_data, datalist_checks: as :func:`muscle_ext.data.datalist_section`.
    """

    def __init__(self, datalist: str | os.PathLike, method: str, k: int, scorer: SplitScorer, transform: Callable,
                 exclude_datalist: str | os.PathLike | None = None, exclude_section: str = "test", draw: int = 0,
                 operating_point: str = "youden", site: str | None = None, on_bad_data: str = "raise",
                 datalist_checks: Mapping[str, Any] | None = None) -> None:
        if method not in ("temperature", "platt"):
            raise SettingsError(f"recalibration must be temperature or platt, got {method!r}")
        parse_operating_point(operating_point)
        self.datalist = datalist
        self.method = method
        self.k = k
        self.scorer = scorer
        self.transform = transform
        self.exclude_datalist = exclude_datalist
        self.exclude_section = exclude_section
        self.draw = int(draw)
        self.operating_point = operating_point
        self.site = site
        self.on_bad_data = on_bad_data
        self.datalist_checks = dict(datalist_checks or {})
        self._entries: tuple[list[dict], list[int]] | None = None
        self._scores: tuple[np.ndarray, np.ndarray] | None = None

    def entries(self) -> tuple[list[dict], list[int]]:
        """``(entries, their positions in the validation section)`` of the slice (drawn once).

        Raises:
            SettingsError: a class with fewer than ``k`` patients outside the evaluated split; names
                ``--recalibration_k``.
        """
        if self._entries is None:
            from ..data import datalist_section, load_datalist
            from ..engines import draw_shots

            pool = datalist_section(self.datalist, RECALIBRATION_SECTION, None, on_error=self.on_bad_data,
                                    **self.datalist_checks)
            exclude = load_datalist(self.exclude_datalist, self.exclude_section) if self.exclude_datalist else []
            try:
                self._entries = draw_shots(pool, self.k, self.draw, exclude=exclude)
            except SettingsError as exc:  # draw_shots speaks of adapt.yaml's --k
                raise SettingsError(str(exc).replace("--k", "--recalibration_k")) from None
        return self._entries

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """``(labels (N,), probabilities (N,))`` of the slice (scored once)."""
        if self._scores is None:
            entries, _ = self.entries()
            where = "simulated " if self.site else ""
            logger.info(f"recalibration: scoring a slice of {len(entries)} {where}{RECALIBRATION_SECTION} images "
                        f"({self.k} patients per class)")
            self._scores = self.scorer(entries, self.transform)
        return self._scores

    def section(self, labels: ArrayLike, probs: ArrayLike, split: str = "test", n_resamples: int = 1000,
                alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
        """:func:`recalibration_section` on the slice and the evaluated ``(labels, probs)``, plus where the slice came
        from: ``"slice": {"datalist" (its folder's name, never a path), "section", "k", "draw", "patients",
        "entries" (positions in the section), "site", "source"}``."""
        from ..engines import datalist_name

        entries, indices = self.entries()
        out = recalibration_section(self.method, self.scores(), (labels, probs), self.operating_point, n_resamples,
                                    alpha, seed, split)
        same = self.exclude_datalist is not None and _same_file(self.datalist, self.exclude_datalist)
        if self.site and same:
            source = f"the simulated {RECALIBRATION_SECTION} split of the task's own datalist (the same simulated site)"
        elif same:
            source = f"the {RECALIBRATION_SECTION} split of the task's own datalist, as acquired"
        else:
            source = f"the {RECALIBRATION_SECTION} split of another site's datalist, as acquired"
        out["slice"].update({"datalist": datalist_name(self.datalist), "section": RECALIBRATION_SECTION,
                             "k": int(self.k), "draw": self.draw,
                             "patients": len({e.get("patient_id") or f"#{i}" for e, i in zip(entries, indices,
                                                                                          strict=True)}),
                             "entries": list(indices), "site": self.site or "as acquired", "source": source})
        return out


def recalibration_slice(datalist: str | os.PathLike | None, method: str, k: int, scorer: SplitScorer,
                        transform: Callable, **kwargs: Any) -> RecalibrationSlice | None:
    """``None`` without ``recalibrate_on``, else a :class:`RecalibrationSlice` (``kwargs``: its other arguments) whose
    slice is drawn at once (datalists only: a ``k`` larger than a class holds stops before any image is read).

    Raises:
        SettingsError: as :meth:`RecalibrationSlice.entries`, or an unknown ``method``.
    """
    if not datalist:
        return None
    chosen = RecalibrationSlice(datalist, method, k, scorer, transform, **kwargs)
    chosen.entries()
    return chosen
