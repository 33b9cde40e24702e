"""The backbone checkpoint format: a failed write names the file and leaves the previous checkpoint intact."""

from __future__ import annotations

import pytest
import torch

from muscle_ext.networks import build_backbone, load_backbone_checkpoint, save_backbone


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "models" / "backbone.pt"
    save_backbone(path, build_backbone("resnet18"), "resnet18", {"imagenet_stem": True}, {"epoch": 1})

    def full_disk(obj, f, *args, **kwargs):  # what torch raises when the disk fills mid-write
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6420224 vs 6420120")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"backbone\.pt: could not write the backbone checkpoint \(\d+ MB free"):
        save_backbone(path, build_backbone("resnet18"), "resnet18", {"imagenet_stem": True}, {"epoch": 2})
    monkeypatch.undo()

    assert sorted(p.name for p in path.parent.iterdir()) == ["backbone.pt"]  # no half-written .tmp left behind
    assert load_backbone_checkpoint(path)["source"]["epoch"] == 1
