"""kNN on a frozen backbone (the report card's third protocol): the module's vote equals the reference kNN, the
backbone never trains, and knn.yaml scores a real split like a fine-tuned model."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from muscle_ext.engines import KNNClassifier
from muscle_ext.metrics.embedding import knn_scores
from muscle_ext.networks import build_backbone


def test_knn_classifier_votes_as_the_reference_knn_and_keeps_the_backbone_frozen():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", imagenet_stem=True)
    model = KNNClassifier(backbone, num_classes=2, k=5, temperature=0.1)
    with pytest.raises(RuntimeError, match="fit"):
        model(torch.rand(2, 1, 32, 32))
    images, labels = torch.rand(12, 1, 32, 32), torch.tensor([0, 1] * 6)
    model.fit([{"image": images[:6], "label": labels[:6]}, {"image": images[6:], "label": labels[6:]}])
    queries = torch.rand(4, 1, 32, 32)
    model.train()  # an evaluator may switch modes: batch norm stays in eval, nothing has gradients
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    with torch.no_grad():
        expected = knn_scores(backbone(images), labels, backbone(queries), 2, k=5, temperature=0.1)
    assert torch.allclose(torch.softmax(model(queries), dim=1), expected, atol=1e-5)
    with pytest.raises(ValueError, match="0..1"):
        KNNClassifier(backbone, num_classes=2).fit([{"image": images[:2], "label": torch.tensor([0, 2])}])


def test_knn_config_scores_the_test_split_like_a_fine_tuned_model(tmp_path, xray_root):
    from tests.bundle_utils import run_bundle

    out = tmp_path / "knn"
    run_bundle("downstream", ["common.yaml", "classification.yaml", "knn.yaml"],
               {"dataset_dir": xray_root, "output_dir": out, "init": "scratch", "image_size": 32, "max_items": 24,
                "num_workers": 0, "n_bootstrap": 20, "use_tracking": False, "knn_k": 5})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == 24 and 0 <= metrics["roc_auc"]["value"] <= 1
    rows = (out / "per_case.csv").read_text().splitlines()
    assert rows[0] == "index,label,score" and len(rows) == 25
    assert not (out / "models").exists() or not any((out / "models").iterdir())  # nothing trained, nothing saved


def test_knn_config_refuses_a_segmentation_task(tmp_path, xray_root):
    from tests.bundle_utils import bundle_command, bundle_env

    proc = subprocess.run(bundle_command("downstream", ["common.yaml", "segmentation.yaml", "knn.yaml"],
                                         {"dataset_dir": xray_root, "output_dir": tmp_path / "out", "init": "scratch",
                                          "use_tracking": False}),
                          capture_output=True, text=True, timeout=300, env=bundle_env())
    assert proc.returncode != 0 and "knn.yaml scores classification tasks" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
