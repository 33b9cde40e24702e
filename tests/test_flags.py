"""Yes/no settings typed on the command line: `--include_patient_fields false` arrives as the string "false"."""

from __future__ import annotations

import pytest

from muscle_ext.engines import TaskSchedule
from muscle_ext.flags import as_flag
from muscle_ext.handlers import PredictionSaver, ProbabilityColumns, track_report


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), (None, False), (1, True), (0, False),
                                                 ("false", False), ("False", False), ("TRUE", True), (" yes ", True),
                                                 ("off", False), ("0", False)])
def test_flags_read_as_users_type_them(value, expected):
    assert as_flag(value) is expected


@pytest.mark.parametrize("value", ["flase", "2", 2, 0.5, [], "maybe"])
def test_anything_else_is_refused_by_name(value):
    with pytest.raises(ValueError, match="include_patient_fields must be true or false"):
        as_flag(value, "include_patient_fields")


def test_false_typed_on_the_command_line_keeps_patient_fields_out(tmp_path):
    saver = PredictionSaver(tmp_path / "p.csv", ProbabilityColumns(), include_patient_fields="false")
    assert saver.include_patient_fields is False
    saver = PredictionSaver(tmp_path / "p.csv", ProbabilityColumns(), include_patient_fields="true")
    assert saver.include_patient_fields is True
    assert track_report({"auc": 0.5}, output_dir=tmp_path, enabled="false") is None
    assert not list(tmp_path.iterdir())  # no tracking store was created
    assert TaskSchedule(["a", "b"], steps=1, reshuffle="false").order(3) == ["a", "b"]
