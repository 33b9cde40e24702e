"""Every bundle passes the model zoo's own checks offline (what the zoo's ci/verify_bundle.py runs): verify_metadata
against the zoo schema (a copy in the repository), verify_net_in_out on the standalone inference config's
`network_def`, ckpt_export of the weights file to TorchScript, a truthful large_files.yml; and each bundle has the
configs the zoo expects (train, multi_gpu_train, evaluate, inference). The downstream bundle's task models are
checked in test_downstream_skeleton.py; here the two backbone bundles."""

from __future__ import annotations

import pytest
import torch
import yaml

from muscle_ext.networks import build_backbone, save_backbone

from tests.bundle_utils import BUNDLES

BACKBONE_BUNDLES = ("muscle_pretrain", "muscle_continual")


@pytest.mark.parametrize("bundle", [*BACKBONE_BUNDLES, "downstream"])
def test_every_bundle_has_the_configs_the_zoo_expects(bundle):
    configs = BUNDLES / bundle / "configs"
    train = "common.yaml" if bundle == "downstream" else "train.yaml"
    for name in (train, "multi_gpu_train.yaml", "evaluate.yaml", "inference.yaml", "metadata.json", "logging.conf"):
        assert (configs / name).is_file(), f"{bundle}: configs/{name}"
    for name in ("LICENSE", "docs/README.md", "large_files.yml"):
        assert (BUNDLES / bundle / name).is_file(), f"{bundle}: {name}"


@pytest.mark.parametrize("bundle", BACKBONE_BUNDLES)
def test_model_zoo_checks_offline(bundle, tmp_path):
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

    configs = BUNDLES / bundle / "configs"
    meta, inference = str(configs / "metadata.json"), str(configs / "inference.yaml")
    verify_metadata(meta_file=meta, filepath=str(BUNDLES / "metadata_schema.json"))
    shape = {"_meta_#network_data_format#inputs#image#spatial_shape": [64, 64]}
    # before a backbone exists: train.yaml's architecture (`from_model` {} stands for the missing file)
    verify_net_in_out("network_def", meta_file=meta, config_file=inference, device="cpu", from_model={}, **shape)
    # with a backbone file: the architecture it records (here resnet34, 512 features as the metadata says)
    path = tmp_path / "models" / "backbone.pt"
    save_backbone(path, build_backbone("resnet34", imagenet_stem=True), "resnet34", {"imagenet_stem": True},
                  settings={"image_size": 64, "input_mean": 0.0, "input_std": 1.0})
    verify_net_in_out("network_def", meta_file=meta, config_file=inference, device="cpu", backbone_path=str(path),
                      **shape)
    ts = tmp_path / "backbone.ts"
    ckpt_export("network_def", filepath=str(ts), ckpt_file=str(path), key_in_ckpt="state_dict", meta_file=meta,
                config_file=inference, backbone_path=str(path))
    exported = torch.jit.load(str(ts))
    assert exported(torch.rand(2, 1, 64, 64)).shape == (2, 512)
    assert sum(p.numel() for p in exported.parameters()) > 20_000_000  # resnet34, as the file said (resnet18: 11 M)

    # a wrong architecture for the metadata is caught by the same check
    path50 = tmp_path / "r50" / "backbone.pt"
    save_backbone(path50, build_backbone("resnet50"), "resnet50", {"imagenet_stem": True})
    with pytest.raises(ValueError, match="output channel number `2048` doesn't match: `512`"):
        verify_net_in_out("network_def", meta_file=meta, config_file=inference, device="cpu",
                          backbone_path=str(path50), **shape)

    # large_files.yml: the zoo downloads every entry (path + https url); these bundles ship none (weights come from
    # training, as the file says), and an entry with an empty url would make the zoo's download fail
    large = yaml.safe_load((BUNDLES / bundle / "large_files.yml").read_text())
    assert isinstance(large["large_files"], list)
    for entry in large["large_files"]:
        assert entry.get("path") and str(entry.get("url", "")).startswith("https://"), entry


@pytest.mark.slow  # a training run of the exported folder (~45 s); the zoo's offline checks stay in the default suite
def test_exported_bundle_runs_with_its_vendored_muscle_ext(tmp_path, xray_root):
    """muscle_ext.zoo.export_bundle: the bundle plus muscle_ext in scripts/, run from its own folder as the zoo runs
    bundles: the configs bind the vendored copy (not the installed one), the zoo's check passes from the command
    line, and a short training run writes a backbone."""
    import json
    import subprocess
    import sys

    from muscle_ext.zoo import export_bundle

    out = export_bundle(BUNDLES / "muscle_pretrain", tmp_path / "muscle_pretrain")
    assert (out / "scripts" / "muscle_ext" / "zoo.py").is_file() and not list(out.rglob("__pycache__"))
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert "muscle-ext" not in meta["required_packages_version"] and "vendored" in meta["changelog"][meta["version"]]
    with pytest.raises(FileExistsError):
        export_bundle(BUNDLES / "muscle_pretrain", out)

    from tests.bundle_utils import bundle_env

    env = bundle_env()
    probe = ("from monai.bundle import ConfigParser; p = ConfigParser(); p.read_config('configs/inference.yaml'); "
             "p['from_model'] = {}; p.get_parsed_content('network_def'); import muscle_ext; print(muscle_ext.__file__)")
    used = subprocess.run([sys.executable, "-c", probe], cwd=out, env=env, capture_output=True, text=True, timeout=120)
    assert used.returncode == 0, used.stderr
    assert used.stdout.strip() == str(out / "scripts" / "muscle_ext" / "__init__.py")
    verify = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
              "configs/metadata.json", "--config_file", "configs/inference.yaml", "--from_model", "{}",
              "--device", "cpu"]
    checked = subprocess.run(verify, cwd=out, env=env, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and "verified with no error" in checked.stdout + checked.stderr, checked.stderr

    train = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.yaml"]
    for key, value in {"dataset_dir": xray_root, "output_dir": tmp_path / "run", "image_size": 32, "batch_size": 8,
                       "num_epochs": 1, "warmup_epochs": 0, "queue_size": 16, "train#sampler#num_samples": 16,
                       "num_workers": 0, "knn_monitor": "false", "amp": "false",
                       "use_tracking": "false"}.items():
        train += [f"--{key}", str(value)]
    trained = subprocess.run(train, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "run" / "models" / "backbone.pt").is_file()
