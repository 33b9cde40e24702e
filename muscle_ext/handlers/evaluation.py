"""Test-set reports: the paper's metrics with bootstrap confidence intervals, written as ``metrics.json`` plus
figures, by an Ignite handler attached to an evaluator.

A report collects one (prediction, label) pair per item of the evaluator's decollated output, after
post-processing. When the evaluation epoch ends it writes ``<output_dir>/metrics.json`` and PNG figures under
``<output_dir>/<figure_dir>/``, and puts the scalar metrics (``<prefix><name>``, ``..._ci_low``, ``..._ci_high``)
into ``engine.state.metrics`` so that ``StatsHandler`` prints them and ``TrackingHandler`` logs them; list the JSON
and the figure folder in ``TrackingHandler(artifacts=...)`` to upload them.

Per image, a report writes only ``<output_dir>/per_case.csv`` (one row per evaluated item in the loader's order,
``index`` = row number among the evaluated items, then the task's scores, e.g. label and positive-class
probability; ``metrics.json`` names it) for paired comparisons of two models on the same split, and the overlay
figures. No file names: reports stay free of patient identifiers.

Subgroups: with ``subgroups`` (datalist fields, e.g. ``dataset``, ``sex``, ``view``) and the evaluated ``items``, the
report also holds ``subgroups``: per field and value, the task's summary metrics with their CIs computed on that
value's items alone (the same computation as on a datalist filtered to them), ``n``, and a warning where ``n`` is
below ``min_group_size`` (too few to say anything). Fields that identify patients or files are refused.

Report card (``configs/evaluate.yaml``; :mod:`muscle_ext.handlers.report_card`): ``site`` labels the report, its
figures and its log line when the evaluated images went through a simulated site
(:mod:`muscle_ext.data.simulated_site`); a classification report also takes ``operating_point`` (the threshold chosen
on the validation split replaces ``threshold``; ``metrics.json`` gets ``operating_point`` and
``per_case_validation.csv`` the validation scores) and ``recalibration`` (``metrics.json`` gets ``recalibration``:
the map fitted on a new site's labelled slice, ECE before and after on the evaluated split, the slice's threshold;
``per_case_recalibration_slice.csv`` the slice's scores).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Engine, Events

from muscle_ext.metrics import (
    binary_classification_report,
    per_image_means,
    regression_report,
    segmentation_report,
    segmentation_scores,
    to_positive_prob,
)
from muscle_ext.metrics._arrays import to_numpy
from muscle_ext.metrics.bootstrap import bootstrap_ci, ci_dict
from muscle_ext.metrics.calibration import expected_calibration_error, reliability_curve
from muscle_ext.metrics.report import write_case_scores, write_report
from muscle_ext.settings import SettingsError

from .privacy import PrivacyFilter

__all__ = ["ClassificationReport", "EvaluationReport", "RegressionReport", "SegmentationReport"]

logger = logging.getLogger(__name__)


def _items(output: Any) -> list[Mapping]:
    if isinstance(output, Mapping):  # an engine run with decollate=False
        from monai.data import decollate_batch

        return decollate_batch(output)
    return list(output or [])


class EvaluationReport:
    """Base class: collects predictions and labels, writes the report when the evaluation epoch completes.

    Args:
        output_dir: where ``filename`` and ``figure_dir`` go.
        filename: the JSON report.
        figure_dir: sub-folder of ``output_dir`` for the PNG figures.
        pred_key, label_key: keys of the post-processed output items.
        split: name of the evaluated split, recorded in the report.
        n_resamples, alpha, seed: percentile bootstrap settings (``1 - alpha`` intervals, paired across metrics).
        metric_prefix: prefix of the scalars put into ``engine.state.metrics``.
        per_case_filename: the per-image scores (``None``: not written), for tasks that define them.
        subgroups: datalist fields to report metrics by (one table per field, a row per value; an item without the
            field counts as ``missing``).
        items: the evaluated datalist entries, in the evaluator's order (needed with ``subgroups``).
        min_group_size: a subgroup smaller than this gets a warning in its row and in the log.
        site: what the evaluated images look like, when not as acquired (e.g. ``"simulated (default: ...)"``):
            written as ``site`` into the report and shown in its figure titles and log line.
        operating_point, recalibration: classification only (see :class:`ClassificationReport`); ``None`` here.

    Raises:
        SettingsError: a subgroup field that identifies patients or files (``patient_id``, ``image``, ...) or the
            label; ``operating_point`` or ``recalibration`` on a task without a decision threshold.
        ValueError: ``subgroups`` without ``items``.
    """

    task = "generic"
    summary_metrics: Sequence[str] = ()

    def __init__(self, output_dir: str | os.PathLike, filename: str = "metrics.json", figure_dir: str = "figures",
                 pred_key: str = "pred", label_key: str = "label", split: str = "test", n_resamples: int = 1000,
                 alpha: float = 0.05, seed: int = 0, metric_prefix: str = "test_",
                 per_case_filename: str | None = "per_case.csv", subgroups: Sequence[str] = (),
                 items: Sequence[Mapping] | None = None, min_group_size: int = 30, site: str | None = None,
                 operating_point: Any = None, recalibration: Any = None) -> None:
        self.output_dir = Path(output_dir)
        self.filename = filename
        self.figure_dir = figure_dir
        self.pred_key = pred_key
        self.label_key = label_key
        self.split = split
        self.n_resamples = int(n_resamples)
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.metric_prefix = metric_prefix
        self.per_case_filename = per_case_filename
        self.subgroups = [str(k) for k in subgroups]
        self.items = None if items is None else list(items)
        self.min_group_size = int(min_group_size)
        privacy = PrivacyFilter()
        refused = [k for k in self.subgroups if privacy.is_sensitive_key(k) or k in ("image", label_key, pred_key)]
        if refused:
            raise SettingsError(f"--subgroups: {', '.join(refused)} would name patients, files or labels in the "
                                "report; group by a field such as dataset, sex, view or age_band")
        if self.subgroups and self.items is None:
            raise ValueError("subgroups need the evaluated datalist entries (items)")
        for name, value in (("operating_point", operating_point), ("recalibration", recalibration)):
            if value is not None and self.task != "classification":
                raise SettingsError(f"--{name} applies to classification reports only, not to {self.task}; leave "
                                    f"--{name} out")
        self.site = site or None
        self.operating_point = operating_point
        self.recalibration = recalibration
        self.report: dict[str, Any] | None = None
        self.reset()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        # EPOCH_COMPLETED, not COMPLETED: tracking handlers log state.metrics at the end of the epoch
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.preds: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def collect(self, engine: Engine) -> None:
        for item in _items(engine.state.output):
            self.add(item)

    def add(self, item: Mapping) -> None:
        self.preds.append(to_numpy(item[self.pred_key], np.float32))
        self.labels.append(to_numpy(item[self.label_key], np.float32))

    def compute(self) -> dict[str, Any]:
        raise NotImplementedError

    def figures(self, report: Mapping[str, Any], folder: Path) -> list[Path]:
        return []

    def card(self) -> dict[str, Any]:
        """Sections computed once on the whole evaluated split (never per subgroup) and added to the report: the
        classification report card (operating point, recalibration); ``{}`` here."""
        return {}

    def split_label(self) -> str:
        """The split's name for titles: ``test``, or ``test, simulated site``."""
        return f"{self.split}, simulated site" if self.site else self.split

    def per_case(self) -> dict[str, np.ndarray]:
        """Columns of ``per_case.csv``, one value per collected item; empty: the task has no per-image scores."""
        return {}

    def write_per_case(self) -> Path | None:
        if self.per_case_filename is None:
            return None
        path = self.output_dir / self.per_case_filename
        columns = self.per_case()
        if not columns:
            path.unlink(missing_ok=True)  # never leave an earlier run's scores next to this report
            return None
        return write_case_scores(path, columns)

    def write(self, engine: Engine) -> dict[str, Any]:
        if not self.preds:
            raise RuntimeError(f"{type(self).__name__}: the evaluator produced no predictions (empty {self.split} "
                               "split?)")
        report = self.compute()
        if self.subgroups:
            report["subgroups"] = self.subgroup_tables()
        report.update(self.card())
        folder = self.output_dir / self.figure_dir
        folder.mkdir(parents=True, exist_ok=True)
        figures = [p.relative_to(self.output_dir).as_posix() for p in self.figures(report, folder)]
        per_case = self.write_per_case()
        site = {"site": self.site} if self.site else {}  # absent: the images as acquired
        payload = {"task": self.task, "split": self.split, **site, "confidence_level": 1 - self.alpha,
                   "bootstrap": {"method": "percentile", "resamples": self.n_resamples, "seed": self.seed},
                   **report, "figures": figures, "per_case": per_case.name if per_case else None}
        path = write_report(self.output_dir / self.filename, payload)  # NaN (undefined metric) as null
        self.report = payload
        engine.state.metrics.update(self.scalars(report))
        where = f" (site: {self.site})" if self.site else ""
        logger.info(f"{self.task} report on {report.get('n')} {self.split} images{where} written to {path}")
        return payload

    def subgroup_tables(self) -> dict[str, list[dict[str, Any]]]:
        """``{field: [{"value", "n", <summary metric>: {value, ci_low, ci_high}, ..., "warning"}]}``, each row
        computed by :meth:`compute` on that value's items only, rows in order of decreasing ``n``."""
        if len(self.items) != len(self.preds):
            raise RuntimeError(f"subgroups: {len(self.preds)} items were evaluated but the datalist has "
                               f"{len(self.items)}: subgroups need one process evaluating the split in datalist order")
        preds, labels = self.preds, self.labels
        tables: dict[str, list[dict[str, Any]]] = {}
        try:
            for field in self.subgroups:
                values = [str(item.get(field, "missing")) for item in self.items]
                rows = []
                for value in sorted(set(values), key=lambda v: (-values.count(v), v)):
                    chosen = [i for i, v in enumerate(values) if v == value]
                    self.preds, self.labels = [preds[i] for i in chosen], [labels[i] for i in chosen]
                    try:
                        metrics = self.compute()
                    except ValueError as exc:  # e.g. a group with one class: say so in its row
                        metrics = {"error": str(exc)}
                    row = {"value": value, "n": len(chosen),
                           **{k: metrics[k] for k in self.summary_metrics if k in metrics}}
                    if "error" in metrics:
                        row["error"] = metrics["error"]
                    if len(chosen) < self.min_group_size:
                        row["warning"] = f"n = {len(chosen)} < {self.min_group_size}: too few to compare"
                        logger.warning(f"subgroup {field} = {value}: only {len(chosen)} {self.split} items")
                    rows.append(row)
                tables[field] = rows
        finally:
            self.preds, self.labels = preds, labels
        return tables

    def scalars(self, report: Mapping[str, Any]) -> dict[str, float]:
        out = {}
        for name in self.summary_metrics:
            entry = report[name]
            out[f"{self.metric_prefix}{name}"] = entry["value"]
            out[f"{self.metric_prefix}{name}_ci_low"] = entry["ci_low"]
            out[f"{self.metric_prefix}{name}_ci_high"] = entry["ci_high"]
        return out


class ClassificationReport(EvaluationReport):
    """Binary classification: accuracy, sensitivity, specificity and ROC AUC with CIs, confusion matrix, and the
    calibration of the positive-class probability (expected calibration error ``ece`` with its CI, 10 equal-width
    bins, and the reliability curve; :mod:`muscle_ext.metrics.calibration`); figures ``roc_curve.png``,
    ``confusion_matrix.png`` and ``reliability.png``.

    Predictions are class probabilities ``(2,)`` (or the positive-class probability), labels class indices or
    one-hot vectors. ``threshold`` applies to the positive-class probability.

    Args:
        threshold: positive when P(label 1) >= threshold (replaced by the carried one with ``operating_point``).
        class_names: label 0, label 1.
        operating_point: a :class:`~muscle_ext.handlers.report_card.CarriedOperatingPoint` (``None``: ``threshold``
            applies): when the report is written, the threshold chosen on the validation split replaces
            ``threshold`` for accuracy, sensitivity, specificity, the confusion matrix and the subgroups, and the
            report gets ``operating_point`` (rule, threshold, ``chosen_on``, the validation split's and the evaluated
            split's sensitivity, specificity and accuracy at it).
        recalibration: a :class:`~muscle_ext.handlers.report_card.RecalibrationSlice` (``None``: none): the report
            gets ``recalibration`` (the fitted map, ECE before and after with CIs, ROC AUC before and after, the
            slice's threshold and what it gives on the evaluated split, where the slice came from).
        kwargs: :class:`EvaluationReport`'s.
    """

    task = "classification"
    summary_metrics = ("accuracy", "sensitivity", "specificity", "roc_auc", "ece")

    def __init__(self, output_dir: str | os.PathLike, threshold: float = 0.5,
                 class_names: Sequence[str] = ("negative", "positive"), **kwargs: Any) -> None:
        super().__init__(output_dir, **kwargs)
        self.threshold = float(threshold)
        self.class_names = [str(c) for c in class_names]

    def write(self, engine: Engine) -> dict[str, Any]:
        if self.operating_point is not None:  # chosen on validation before any metric of the evaluated split
            self.threshold = float(self.operating_point.threshold())
        return super().write(engine)

    def _side_scores(self, filename: str, scores: tuple[np.ndarray, np.ndarray] | None) -> str | None:
        """Write (or, without ``scores``, remove an earlier run's) per-case file next to ``per_case.csv``."""
        if self.per_case_filename is None:
            return None
        path = self.output_dir / filename
        if scores is None:
            path.unlink(missing_ok=True)
            return None
        return write_case_scores(path, {"label": scores[0], "score": scores[1]}).name

    def card(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        labels, probs = np.stack(self.labels), to_positive_prob(np.stack(self.preds))
        if self.operating_point is not None:
            section = self.operating_point.section(labels, probs, self.split)
            section["note"] = (f"threshold chosen on the {section['chosen_on']} split as acquired, carried unchanged "
                               f"to the {self.split} split" + (" of the simulated site" if self.site else ""))
            section["per_case"] = self._side_scores("per_case_validation.csv", self.operating_point.scores())
            out["operating_point"] = section
            logger.info(f"operating point {section['rule']}: threshold {section['threshold']:.4g} chosen on "
                        f"{section['chosen_on']}, carried to {self.split_label()}")
        else:
            self._side_scores("per_case_validation.csv", None)
        if self.recalibration is not None:
            section = self.recalibration.section(labels, probs, self.split, self.n_resamples, self.alpha, self.seed)
            section["per_case"] = self._side_scores("per_case_recalibration_slice.csv", self.recalibration.scores())
            out["recalibration"] = section
            logger.info(f"recalibration ({section['method']}) on {section['slice']['source']}: {self.split_label()} "
                        f"ECE {section['ece_before']['value']:.4f} -> {section['ece_after']['value']:.4f}")
        else:
            self._side_scores("per_case_recalibration_slice.csv", None)
        return out

    def scalars(self, report: Mapping[str, Any]) -> dict[str, float]:
        out = super().scalars(report)
        if "operating_point" in report:
            out[f"{self.metric_prefix}operating_threshold"] = report["operating_point"]["threshold"]
        if "recalibration" in report:
            out[f"{self.metric_prefix}ece_recalibrated"] = report["recalibration"]["ece_after"]["value"]
        return out

    def add(self, item: Mapping) -> None:
        label = to_numpy(item[self.label_key], np.float32).ravel()
        self.preds.append(to_numpy(item[self.pred_key], np.float32).ravel())
        self.labels.append(np.asarray(int(label.argmax()) if label.size > 1 else int(round(float(label[0])))))

    def compute(self) -> dict[str, Any]:
        probs = to_positive_prob(np.stack(self.preds))
        labels = np.stack(self.labels)
        report = binary_classification_report(labels, probs, self.threshold, self.n_resamples, self.seed, self.alpha)
        report["ece"] = ci_dict(bootstrap_ci(expected_calibration_error, labels, probs, self.n_resamples, self.alpha,
                                             self.seed, stratified=True))
        report["reliability"] = reliability_curve(labels, probs)
        report["class_names"] = self.class_names
        return report

    def per_case(self) -> dict[str, np.ndarray]:
        return {"label": np.stack(self.labels), "score": to_positive_prob(np.stack(self.preds))}

    def figures(self, report: Mapping[str, Any], folder: Path) -> list[Path]:
        from muscle_ext.metrics.plots import plot_confusion_matrix, plot_reliability, plot_roc_curve

        probs = to_positive_prob(np.stack(self.preds))
        auc = report["roc_auc"]
        paths = [plot_confusion_matrix(report["confusion_matrix"], folder / "confusion_matrix.png", self.class_names,
                                       title=f"{self.split_label()}: threshold {self.threshold:.3g}"),
                 plot_reliability(report["reliability"], folder / "reliability.png", report["ece"]["value"],
                                  title=f"Reliability ({self.split_label()})")]
        if all(math.isfinite(v) for v in (auc["value"], auc["ci_low"], auc["ci_high"])):
            paths.append(plot_roc_curve(np.stack(self.labels), probs, folder / "roc_curve.png",
                                        title=f"ROC ({self.split_label()})", auc_ci=(auc["ci_low"], auc["ci_high"])))
        else:
            logger.warning("ROC curve not drawn: the AUC is undefined (only one class in the labels)")
        return paths


class RegressionReport(EvaluationReport):
    """Regression (e.g. bone age): MAE and RMSE with CIs in the target's own unit; figure ``scatter.png``.
    Predictions and labels must already be de-normalised (post-processing)."""

    task = "regression"
    summary_metrics = ("mae", "rmse")

    def __init__(self, output_dir: str | os.PathLike, unit: str = "", **kwargs: Any) -> None:
        super().__init__(output_dir, **kwargs)
        self.unit = unit

    def add(self, item: Mapping) -> None:
        self.preds.append(to_numpy(item[self.pred_key], np.float32).reshape(-1)[:1])
        self.labels.append(to_numpy(item[self.label_key], np.float32).reshape(-1)[:1])

    def compute(self) -> dict[str, Any]:
        report = regression_report(np.concatenate(self.labels), np.concatenate(self.preds), self.n_resamples,
                                   self.seed, self.alpha)
        report["unit"] = self.unit
        return report

    def per_case(self) -> dict[str, np.ndarray]:
        return {"label": np.concatenate(self.labels), "pred": np.concatenate(self.preds)}

    def figures(self, report: Mapping[str, Any], folder: Path) -> list[Path]:
        from muscle_ext.metrics.plots import plot_regression_scatter

        mae = report["mae"]["value"]
        return [plot_regression_scatter(np.concatenate(self.labels), np.concatenate(self.preds),
                                        folder / "scatter.png",
                                        title=f"{self.split_label()}: MAE {mae:.1f} {self.unit}", unit=self.unit)]


class SegmentationReport(EvaluationReport):
    """Segmentation: Dice and mIoU with CIs, per image (foreground classes) and pooled (all classes, the paper's
    convention); overlay figures ``overlay_<k>.png`` of the first ``num_overlays`` images (prediction filled,
    ground truth outlined).

    Predictions and labels are one-hot ``(C, H, W)`` or label maps ``(1, H, W)``; ``image_key`` gives the image
    drawn under the overlays.
    """

    task = "segmentation"
    summary_metrics = ("dice", "miou", "dice_pooled", "miou_pooled")

    def __init__(self, output_dir: str | os.PathLike, num_classes: int = 2, num_overlays: int = 4,
                 image_key: str = "image", **kwargs: Any) -> None:
        super().__init__(output_dir, **kwargs)
        self.num_classes = int(num_classes)
        self.num_overlays = int(num_overlays)
        self.image_key = image_key

    def reset(self, engine: Engine | None = None) -> None:
        super().reset(engine)
        self.images: list[np.ndarray] = []

    @staticmethod
    def _label_map(x: Any) -> np.ndarray:
        array = to_numpy(x, np.float32)
        array = array.argmax(axis=0) if array.ndim == 3 and array.shape[0] > 1 else array.reshape(array.shape[-2:])
        return np.rint(array).astype(np.uint8)

    def add(self, item: Mapping) -> None:
        self.preds.append(self._label_map(item[self.pred_key]))
        self.labels.append(self._label_map(item[self.label_key]))
        if len(self.images) < self.num_overlays and self.image_key in item:
            self.images.append(to_numpy(item[self.image_key], np.float32)[0])

    def compute(self) -> dict[str, Any]:
        report = segmentation_report(np.stack(self.preds), np.stack(self.labels), self.num_classes,
                                     n_resamples=self.n_resamples, seed=self.seed, alpha=self.alpha)
        report["num_classes"] = self.num_classes
        return report

    def per_case(self) -> dict[str, np.ndarray]:
        # the per-image scores that the report's `dice` and `miou` average (foreground classes, NaN: empty mask)
        return per_image_means(segmentation_scores(np.stack(self.preds), np.stack(self.labels), self.num_classes))

    def figures(self, report: Mapping[str, Any], folder: Path) -> list[Path]:
        from muscle_ext.metrics.plots import plot_segmentation_overlay

        return [plot_segmentation_overlay(image, folder / f"overlay_{k}.png", self.preds[k], self.labels[k],
                                          title=f"{self.split} image {k}")
                for k, image in enumerate(self.images)]
