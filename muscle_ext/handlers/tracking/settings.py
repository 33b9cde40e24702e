"""``python -m monai.bundle run ... --tracking <settings>``: MONAI's experiment-management settings that attach
:class:`~muscle_ext.handlers.TrackingHandler` to any bundle (ours carry their own trackers: ``--use_tracking``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["TRACKING_SETTINGS_PATH", "tracking_settings", "write_tracking_settings"]

TRACKING_SETTINGS_PATH = Path(__file__).with_name("settings.json")
"""The shipped settings file (:func:`tracking_settings` with its defaults), for ``--tracking <this path>``."""


def tracking_settings(experiment_name: str = "muscle", output_dir: str = "$@bundle_root + '/eval'") -> dict[str, Any]:
    """Settings for ``python -m monai.bundle run ... --tracking <file>`` that attach :class:`TrackingHandler`.

    Same layout as MONAI's ``DEFAULT_MLFLOW_SETTINGS``: handlers go to ``train#handlers`` (trainer),
    ``validate#handlers`` (validator) and ``handlers`` (evaluator/inference), all logging into one
    ``tracking_run`` (:class:`TrackingRun`), so the validator's metrics land in the trainer's run. Top-level items
    (``output_dir``, ``tracking_uri``, ``experiment_name``, ``run_name``, ``parent_checkpoint``) are only added
    when the bundle does not define them, so ``--tracking_uri http://host:5000`` overrides them.
    ``save_execute_config`` is off: MONAI would write the raw (unredacted) config next to the outputs; the
    handler logs a redacted copy instead.
    """
    common = {"_target_": "muscle_ext.handlers.TrackingHandler", "_disabled_": "@is_not_rank0",
              "run": "@tracking_run", "output_dir": "@output_dir"}
    return {
        "handlers_id": {
            "trainer": {"id": "train#trainer", "handlers": "train#handlers"},
            "validator": {"id": "validate#evaluator", "handlers": "validate#handlers"},
            "evaluator": {"id": "evaluator", "handlers": "handlers"},
        },
        "configs": {
            "output_dir": output_dir,
            "tracking_uri": None,
            "experiment_name": experiment_name,
            "run_name": None,
            "parent_checkpoint": None,
            "save_execute_config": False,
            "is_not_rank0": "$torch.distributed.is_available() and torch.distributed.is_initialized() "
            "and torch.distributed.get_rank() > 0",
            "tracking_run": {"_target_": "muscle_ext.handlers.TrackingRun", "tracking_uri": "@tracking_uri",
                             "experiment_name": "@experiment_name", "run_name": "@run_name"},
            "trainer": {**common, "parent_checkpoint": "@parent_checkpoint", "tag_name": "train_loss"},
            "validator": {**common, "iteration_log": False, "close_on_complete": False},
            "evaluator": {**common, "parent_checkpoint": "@parent_checkpoint", "iteration_log": False},
        },
    }


def write_tracking_settings(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write :func:`tracking_settings` as JSON (for ``--tracking <path>``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tracking_settings(**kwargs), indent=2) + "\n")
    return path
