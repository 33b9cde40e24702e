"""Adaptation curves: every method of :mod:`muscle_ext.engines.adaptation` at every ``k`` over several k-shot draws,
scored on the new site's test split and on the old site's (issue #20).

:func:`adaptation_curves` takes one trained two-class model and images decoded once, and returns, per method and
``k``, the new-site ROC AUC (mean over draws, 95 % percentile interval from resampling test cases, stratified, and
draws together) and the old site's ROC AUC after adaptation (what adapting costs at home), plus sensitivity and
specificity at each draw's threshold. It is what ``bundles/downstream/configs/adapt_curves.yaml`` and the main job's
adaptation stage run, and what ``benchmarks/bench_site_adaptation.py`` measures with.

Methods without labels (``none``, ``adabn``) make one model; their draws differ only in the recalibration fitted on
the shots. Head methods change only the linear head: the frozen backbone's features of both test splits are computed
once per label-free model.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..metrics import runs_mean_ci, sensitivity, specificity
from ..metrics.report import write_report
from ..networks import adapt_batchnorm, find_backbone
from ..settings import SettingsError
from .adaptation import (
    ADAPTATION_METHODS,
    AdaptationConfig,
    adapt_model,
    draw_shots,
    load_images,
    predict_probabilities,
)

__all__ = ["LabelledImages", "adaptation_curves", "best_methods", "check_curve_settings",
           "write_adaptation_curves"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledImages:
    """A datalist section decoded once: its ``items`` (entries), ``images`` ``(N, C, H, W)`` pre-processed and
    normalised as the model expects, and ``labels`` ``(N,)`` 0/1."""

    items: Sequence[dict]
    images: torch.Tensor
    labels: np.ndarray

    @classmethod
    def load(cls, items: Sequence[dict], transform: Callable, batch_size: int = 32,
             num_workers: int = 0) -> LabelledImages:
        """Decode ``items`` through ``transform`` (:func:`~muscle_ext.engines.adaptation.load_images`).

        Raises:
            ValueError: no items, or an item without a label."""
        images, labels = load_images(items, transform, batch_size, num_workers)
        if labels is None:
            raise ValueError("adaptation curves need labelled items (a 'label' in every entry)")
        return cls(list(items), images, labels.numpy().astype(int))


def _mean_auc(labels: np.ndarray, scores: np.ndarray, n_resamples: int, seed: int) -> dict[str, Any]:
    """:func:`~muscle_ext.metrics.runs_mean_ci` of the draws' ROC AUCs (``scores (D, N)``, a row per draw) as
    ``{"value", "ci_low", "ci_high", "per_draw"}``."""
    result = runs_mean_ci("roc_auc", scores, labels, n_resamples, seed)
    return {"value": result["value"], "ci_low": result["ci_low"], "ci_high": result["ci_high"],
            "per_draw": result["per_run"]}


def _at_thresholds(labels: np.ndarray, scores: np.ndarray, thresholds: Sequence[float]) -> dict[str, float]:
    """Mean sensitivity and specificity over draws, each draw at its own threshold."""
    sens = [sensitivity(labels, s >= t) for s, t in zip(scores, thresholds, strict=True)]
    spec = [specificity(labels, s >= t) for s, t in zip(scores, thresholds, strict=True)]
    return {"sensitivity": float(np.mean(sens)), "specificity": float(np.mean(spec)),
            "threshold": float(np.mean(thresholds))}


@torch.no_grad()
def _pooled_features(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    backbone = find_backbone(model).eval()
    return torch.cat([backbone(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def adaptation_curves(model: nn.Module, methods: Sequence[str], ks: Sequence[int], draws: int,
                      pool: LabelledImages, target_test: LabelledImages, source_test: LabelledImages,
                      config: AdaptationConfig | None = None, n_resamples: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """Adapt ``model`` with every method, ``k`` and draw; score each adapted model on both test splits.

    Args:
        model: the trained source model (a :class:`~muscle_ext.networks.BackboneClassifier` with two outputs); it
            is not changed (every method works on a copy).
        methods: names of :data:`~muscle_ext.engines.adaptation.ADAPTATION_METHODS`.
        ks: labelled patients per class, e.g. ``(5, 10, 20)``; the shots of a draw are nested across ``k``.
        draws: k-shot draws per ``k`` (draw ``d`` is :func:`~muscle_ext.engines.adaptation.draw_shots` seed ``d``).
        pool: the new site's ``training`` split: shots come from it, AdaBN uses all of its images without labels.
        target_test: the new site's test split (no shot ever shares a patient or image with it).
        source_test: the old site's test split (what adapting costs at home).
        config: how the head and fine-tuning train and how recalibration is fitted.
        n_resamples: bootstrap resamples of each interval.

    Returns:
        ``{"methods": {method: {str(k): {"target_auc", "source_auc"`` (``{"value", "ci_low", "ci_high",
        "per_draw"}``: the mean over draws with a 95 % interval over test cases and draws,
        :func:`~muscle_ext.metrics.runs_mean_ci`)``,
        "target_at_threshold", "epochs", "stopped_early", "seconds_per_draw"}}}, "seconds", "n_target_test",
        "n_source_test", "n_pool", "ks", "draws"}``.

    Raises:
        ValueError: an unknown method, ``draws < 1``, a ``k`` larger than the pool allows (from ``draw_shots``).
    """
    unknown = [m for m in methods if m not in ADAPTATION_METHODS]
    if unknown:
        raise ValueError(f"unknown adaptation method(s) {unknown}; known: {', '.join(ADAPTATION_METHODS)}")
    if int(draws) < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    config = config or AdaptationConfig()
    model = copy.deepcopy(model).eval()
    started = time.perf_counter()
    predict = {"target": lambda m: predict_probabilities(m, target_test.images, config.batch_size),
               "source": lambda m: predict_probabilities(m, source_test.images, config.batch_size)}
    label_free = {"none": model}
    if any(m.startswith("adabn") for m in methods):
        batches = [pool.images[i:i + config.batch_size] for i in range(0, len(pool.images), config.batch_size)]
        label_free["adabn"] = adapt_batchnorm(copy.deepcopy(model), batches).eval()
    scores_of = {base: {s: f(m) for s, f in predict.items()} for base, m in label_free.items()}
    features: dict[str, dict[str, torch.Tensor]] = {}
    cells: dict[str, dict[int, dict[str, list]]] = {m: {} for m in methods}
    for k in ks:
        for draw in range(int(draws)):
            _, indices = draw_shots(pool.items, int(k), draw, exclude=target_test.items)
            shots = (pool.images[indices], torch.as_tensor(pool.labels[indices]))
            groups = [pool.items[i].get("patient_id") for i in indices]
            for method in methods:
                t0 = time.perf_counter()
                base = "adabn" if method.startswith("adabn") else "none"
                rest = method.removeprefix("adabn").lstrip("+") or "none"
                if rest in ("none", "recalibrate"):  # the weights stay those of the label-free model
                    result = adapt_model(label_free[base], rest, shots, groups=groups, config=config)
                    scores = {s: p if result.recalibration is None else result.recalibration(p)
                              for s, p in scores_of[base].items()}
                elif rest == "head":
                    result = adapt_model(copy.deepcopy(label_free[base]), rest, shots, groups=groups, config=config)
                    if base not in features:
                        features[base] = {"target": _pooled_features(label_free[base], target_test.images),
                                          "source": _pooled_features(label_free[base], source_test.images)}
                    with torch.no_grad():
                        scores = {s: torch.softmax(result.model.head(f), dim=1)[:, 1].numpy().astype(float)
                                  for s, f in features[base].items()}
                else:
                    result = adapt_model(copy.deepcopy(label_free[base]), rest, shots, groups=groups, config=config)
                    scores = {s: f(result.model) for s, f in predict.items()}
                cell = cells[method].setdefault(int(k), {"target": [], "source": [], "threshold": [], "epochs": [],
                                                         "stopped_early": [], "seconds": []})
                cell["target"].append(scores["target"])
                cell["source"].append(scores["source"])
                cell["threshold"].append(result.threshold)
                cell["epochs"].append(result.history.get("epochs"))
                cell["stopped_early"].append(result.history.get("stopped_early"))
                cell["seconds"].append(time.perf_counter() - t0)
        logger.info(f"adaptation curves: k = {k} done ({len(methods)} methods x {draws} draws, "
                    f"{time.perf_counter() - started:.0f} s so far)")
    out: dict[str, Any] = {"methods": {}, "ks": [int(k) for k in ks], "draws": int(draws)}
    for method, by_k in cells.items():
        out["methods"][method] = {}
        for k, cell in by_k.items():
            target, source = np.stack(cell["target"]), np.stack(cell["source"])
            out["methods"][method][str(k)] = {
                "target_auc": _mean_auc(target_test.labels, target, n_resamples, seed),
                "source_auc": _mean_auc(source_test.labels, source, n_resamples, seed),
                "target_at_threshold": _at_thresholds(target_test.labels, target, cell["threshold"]),
                "epochs": cell["epochs"], "stopped_early": cell["stopped_early"],
                "seconds_per_draw": round(float(np.mean(cell["seconds"])), 2)}
    out.update(seconds=round(time.perf_counter() - started, 1), n_target_test=int(len(target_test.labels)),
               n_source_test=int(len(source_test.labels)), n_pool=int(len(pool.labels)))
    return out


def best_methods(curves: dict[str, Any]) -> list[dict[str, Any]]:
    """Per ``k`` of :func:`adaptation_curves`' result, the method with the highest mean new-site AUC: ``[{"k",
    "method", "target_auc", "source_auc", "before_target", "before_source"}]`` (``before_*``: method ``none``, or
    ``None`` when it was not run)."""
    rows = []
    methods = curves["methods"]
    none = methods.get("none")
    for k in curves["ks"]:
        cells = {m: by_k[str(k)] for m, by_k in methods.items() if str(k) in by_k}
        best = max(cells, key=lambda m: cells[m]["target_auc"]["value"])
        rows.append({"k": int(k), "method": best, "target_auc": cells[best]["target_auc"],
                     "source_auc": cells[best]["source_auc"],
                     "before_target": none[str(k)]["target_auc"] if none else None,
                     "before_source": none[str(k)]["source_auc"] if none else None})
    return rows


def check_curve_settings(methods: Sequence[str], ks: Sequence[int], pool: Sequence[dict],
                         exclude: Sequence[dict] = ()) -> None:
    """Stop before any image is decoded when the sweep cannot run.

    Raises:
        SettingsError: an unknown method (``--methods``, with the closest name), a ``k`` that a class of ``pool``
            (outside ``exclude``) cannot give, or ``finetune_l2sp`` with ``k < 2`` (it holds a patient per class out
            for early stopping): each names the setting and the fix.
    """
    problems = []
    for method in methods:
        if method not in ADAPTATION_METHODS:
            close = difflib.get_close_matches(str(method), ADAPTATION_METHODS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"--methods: unknown method {method!r}; {hint}known: {', '.join(ADAPTATION_METHODS)}")
    if any("finetune" in str(m) for m in methods) and min(ks) < 2:
        problems.append(f"--ks {list(ks)}: finetune_l2sp holds one patient per class out for early stopping, so "
                        "every k must be at least 2; raise the smallest k or drop finetune_l2sp from --methods")
    for k in sorted(set(ks)):
        try:
            draw_shots(pool, int(k), 0, exclude=exclude)
        except SettingsError as error:
            problems.append(str(error).replace("--k", "--ks", 1))
            break  # a larger k fails too
    if problems:
        raise SettingsError("adaptation curves: " + "; ".join(problems))


def write_adaptation_curves(output_dir: str | os.PathLike, curves: dict[str, Any],
                            record: dict[str, Any]) -> Path:
    """Write ``<output_dir>/adaptation_curves.json`` (``record``, e.g. the source model and site names, plus the
    curves and the best method per k) and ``<output_dir>/figures/adaptation_curves.png``; returns the JSON path."""
    from ..metrics.plots import plot_adaptation_curves

    output_dir = Path(output_dir)
    path = write_report(output_dir / "adaptation_curves.json", {**record, **curves, "best": best_methods(curves)})
    target = record.get("target_datalist", "the new site")
    plot_adaptation_curves({str(record.get("source_datalist", "source")) + " model": curves},
                           output_dir / "figures" / "adaptation_curves.png", title=f"Adapting to {target}")
    for row in best_methods(curves):
        logger.info(f"k = {row['k']}: best {row['method']}, new-site ROC AUC {row['target_auc']['value']:.3f} "
                    f"[{row['target_auc']['ci_low']:.3f}, {row['target_auc']['ci_high']:.3f}], old site "
                    f"{row['source_auc']['value']:.3f}")
    return path
