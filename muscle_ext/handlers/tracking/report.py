"""Tracking for a bundle run without a training loop (an evaluation or inference config)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from muscle_ext.flags import as_flag

from .describe import default_run_name, describe_run, scalar_metrics
from .run import TrackingRun

__all__ = ["track_report"]


def track_report(report: Mapping[str, Any], output_dir: str | os.PathLike | None = None,
                 artifacts: Sequence[str | os.PathLike] = (), experiment_name: str = "muscle",
                 tracking_uri: str | None = None, parent_checkpoint: str | os.PathLike | None = None,
                 workflow: str = "evaluate", enabled: bool = True,
                 config: Mapping[str, Any] | None = None) -> str | None:
    """Track one run of a config with no engine: the scalars of ``report`` become metrics (step 0), ``artifacts`` are
    uploaded, and the run is described as an engine's (:func:`~.describe.describe_run`: the config being run, or
    ``config``; versions, datalist hashes, lineage of ``parent_checkpoint``) under the same privacy rule. An
    unreachable store only warns. Returns the run id (``None`` when disabled, on ranks > 0, or not logged).

    Raises:
        ValueError: ``enabled`` is not a flag (``true``/``false``).
    """
    if not as_flag(enabled, "use_tracking"):
        return None
    if config is None:
        from muscle_ext.bundle_args import command_line_config

        config = command_line_config()
    with TrackingRun(tracking_uri, experiment_name) as run:
        if not run.start(default_run_name(config, workflow)):
            return None
        description = describe_run(config, workflow, [output_dir] if output_dir else [],
                                   parent_checkpoint=parent_checkpoint)
        run.set_tags(description.tags)
        run.log_params(description.params)
        if description.config is not None:
            run.log_json(description.config, "config.json", "config")
        run.log_metrics(dict(scalar_metrics(report)), step=0)
        for path in artifacts:
            if os.path.isfile(path):
                run.log_artifact(path)
            else:
                run.count_dropped("artifacts")
        return run.run_id
