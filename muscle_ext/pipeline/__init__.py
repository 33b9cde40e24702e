"""The main job (``muscle reproduce``): the bundles' stages in order, reused when finished, and the report built from
what they wrote. The top layer of ``muscle_ext``: it runs the bundles (which import the layers below) as processes."""

from .plan import PRESETS, build_stages, load_preset
from .report import build_report
from .runner import BundleCommand, Stage, StageFailed, StageRunner, bundle_command, printable, run_command

__all__ = [
    "PRESETS",
    "BundleCommand",
    "Stage",
    "StageFailed",
    "StageRunner",
    "build_report",
    "build_stages",
    "bundle_command",
    "load_preset",
    "printable",
    "run_command",
]
