"""The main job (`muscle reproduce`) end to end with the synthetic preset (phantom radiographs the job writes itself;
the quick preset's stages at test size; the bundles themselves are tested on the real corpus elsewhere, and their
quick presets chained in test_quick_presets.py): every stage runs as its bundle's own command, a finished stage is
reused, a changed setting reruns what depends on it (the old folders kept), a killed job resumes, and the report is
built only from what the stages wrote. The report builder is also checked on fixed metric files, table by table."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from muscle_ext.cli import main
from muscle_ext.pipeline import PRESETS, build_report, build_stages, load_preset
from muscle_ext.settings import SettingsError

from tests.bundle_utils import REPO, bundle_env


def _preset(tmp_path: Path, **changes) -> Path:
    """The synthetic preset (phantom radiographs, written by the job itself) with ``changes`` (dotted keys)."""
    preset = yaml.safe_load((PRESETS / "synthetic.yaml").read_text())
    for dotted, value in changes.items():
        node = preset
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path = tmp_path / "phantoms.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def _reproduce(capsys, *args) -> tuple[int, str]:
    code = main(["reproduce", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# The whole synthetic preset (11 stages, 19 bundle runs: ~6 minutes here) runs with `-m slow`; the default suite runs
# the same job on the two continual variants' starts and one task (5 stages, 7 bundle runs), which keeps every part
# of the job: phantoms, pre-training, both continual variants, fine-tuning + evaluation, reuse, rerun, report, MLflow.
SMALL = {"downstream.starts": ["muscle_minus", "muscle"],
         "downstream.tasks": {"finding": {"config": "classification.yaml",
                                          "datalist": "{data}/chest_findings/datalist.json",
                                          "overrides": {"class_names": "['clear','opacity']"},
                                          "protocols": {"methods": ["knn"], "starts": ["muscle"]}}}}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("size", ["small", pytest.param("full", marks=pytest.mark.slow)])
def test_synthetic_preset_end_to_end_reuses_reruns_and_reports(tmp_path, capsys, monkeypatch, size):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "job"
    preset = "synthetic" if size == "full" else _preset(tmp_path, **SMALL)
    starts = ["Scratch", "MD-MoCo", "MUSCLE--", "MUSCLE"] if size == "full" else ["MUSCLE--", "MUSCLE"]
    tasks = 2 if size == "full" else 1
    n_tuned = len(starts) * tasks
    n_embed = len([s for s in starts if s != "Scratch"])  # a t-SNE map of each pre-trained backbone
    n_stages = 3 + n_tuned + n_embed + 1  # MD-MoCo, 2 continual, fine-tunings, embeddings, MUSCLE's kNN
    code, said = _reproduce(capsys, "--preset", preset, "--out", out)  # no data needed: the job writes phantoms
    assert code == 0, said
    last = "embed_muscle"
    assert f"[1/{n_stages}] md_moco: run" in said and f"[{n_stages}/{n_stages}] {last}: run" in said
    assert "about" in said  # time left
    assert (out / "synthetic_data" / "pretrain_datalist.json").is_file()
    report = (out / "report.md").read_text()
    assert "**SYNTHETIC PHANTOMS: these numbers show that every stage runs" in report  # said loudly
    finding = report[report.index("## finding ("):]  # the task's table (the data check's comes first)
    table = [line for line in finding.splitlines() if line.startswith("| ")]
    assert "## Data check: test splits against training and pre-training data" in report
    assert [row.split(" | ")[0][2:] for row in table[1:1 + len(starts)]] == starts, table
    aucs = [float(row.split(" | ")[1].split()[0]) for row in table[1:1 + len(starts)]]
    assert max(aucs) > 0.8, table  # the phantoms' finding is learnable: the stages learn
    assert "Does the paper's ranking hold here? " in report and "MUSCLE at least MUSCLE--: " in report
    if size == "full":
        assert "MD-MoCo above Scratch: " in report and "## lungs (segmentation, test n = 24)" in report
    assert report.count("python -m monai.bundle run") == 3 + n_tuned * 2 + n_embed + 1  # each runnable on its own
    knn = report.index("| start | fine-tuned | knn |")  # the report card: kNN beside fine-tuning
    assert report[knn:].splitlines()[2].startswith("| MUSCLE | ") and "missing" not in report[knn:].splitlines()[2]
    assert "![t-SNE maps of the backbone embeddings](figures/embeddings_tsne.png)" in report
    # training curves of every start, from the stages' own MLflow runs (tagged with their stage)
    assert "![Training curves of every start on finding: validation val_auc per epoch, training loss]" \
           "(figures/finding_curves.png)" in report
    from matplotlib.image import imread

    assert imread(out / "figures" / "finding_curves.png")[..., :3].std() > 0.05
    assert (out / "figures" / "embeddings_tsne.png").is_file() and "coloured by `body_part`" in report
    start = "scratch" if size == "full" else "muscle_minus"
    assert f"--datalist <data>/chest_findings/datalist.json --output_dir <out>/downstream/finding_{start}" in report
    assert str(tmp_path) not in report and str(REPO) not in report
    stage_files = sorted(out.rglob("stage.json"))
    assert len(stage_files) == n_stages and all(json.loads(p.read_text())["status"] == "done" for p in stage_files)

    # one store, one experiment: the job's run with the report, every bundle run of every stage nested under it
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiments = [e.name for e in client.search_experiments()]
    assert "muscle_reproduce" in experiments and "muscle_downstream" not in experiments, experiments
    job_id = json.loads((out / "job_run.json").read_text())["run_id"]
    runs = client.search_runs([client.get_experiment_by_name("muscle_reproduce").experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == job_id]
    assert len(runs) == 1 + 3 + 2 * n_tuned + n_embed + 1 and len(children) == len(runs) - 1
    job = client.get_run(job_id)
    assert job.info.status == "FINISHED" and job.data.tags[f"stage.{last}"] == "done"
    assert [a.path for a in client.list_artifacts(job_id)] == ["report.html", "report.md"]
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<table>" in page and '<img alt="' in page
    assert "<blockquote>" in page and "SYNTHETIC PHANTOMS" in page  # the warning stands out

    # the same command again: every stage reused, nothing runs
    began = time.monotonic()
    code, said = _reproduce(capsys, "--preset", preset, "--out", out)
    assert code == 0 and said.count(": reuse (") == n_stages and time.monotonic() - began < 60, said
    assert json.loads((out / "job_run.json").read_text())["run_id"] == job_id  # the same parent run, reopened

    # a changed setting of one continual variant reruns that stage and what starts from it; the old folders are kept
    changed = _preset(tmp_path, **{**({} if size == "full" else SMALL),
                                   "continual.variants.muscle_minus.steps_per_visit": 3})
    code, said = _reproduce(capsys, "--preset", changed, "--data", out / "synthetic_data", "--out", out)
    assert code == 0, said
    reruns = {"muscle_minus: rerun", "finding_muscle_minus: rerun", "embed_muscle_minus: rerun",
              *(["lungs_muscle_minus: rerun"] * (tasks > 1))}
    assert said.count(": rerun (") == len(reruns) and said.count(": reuse (") == n_stages - len(reruns), said
    assert reruns <= {line.split("] ", 1)[1].split(" (")[0] for line in said.splitlines() if line.startswith("[")}
    assert len(list((out / "superseded").iterdir())) == len(reruns)
    assert "(3 steps)" in (out / "muscle_minus" / "logs" / "1_muscle_continual.log").read_text()

    # muscle status / muscle report: the report is rebuilt from the files alone, identically
    assert main(["status", str(out)]) == 0
    assert "finding_muscle" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").read_text() == report


@pytest.mark.timeout(600)
def test_a_killed_job_resumes_its_stage(tmp_path):
    out = tmp_path / "job"  # MD-MoCo, then one fine-tuning from it: the kill lands in the first stage
    preset = _preset(tmp_path, **{"pretrain.overrides.num_epochs": 4, "pretrain.overrides.ckpt_interval": 2,
                                  "embedding_map": None,
                                  "continual.variants": {}, "downstream.starts": ["md_moco"],
                                  "downstream.tasks": {"finding": {"config": "classification.yaml",
                                                                   "datalist": "{data}/chest_findings/datalist.json"}}})
    cmd = [sys.executable, "-m", "muscle_ext.cli", "reproduce", "--preset", str(preset), "--out", str(out)]
    env = bundle_env(default_store=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    checkpoints = out / "md_moco" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("checkpoint_*.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the job and its running bundle, mid-stage
    proc.wait()
    state = json.loads((out / "md_moco" / "stage.json").read_text())
    assert state["status"] == "running"
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[1/2] md_moco: resume" in again.stdout and "[2/2] finding_md_moco: run" in again.stdout
    log = (out / "md_moco" / "logs" / "1_muscle_pretrain.log").read_text()
    assert "resuming" in log.lower() and json.loads((out / "md_moco" / "stage.json").read_text())["status"] == "done"


def test_no_data_and_unknown_presets_say_what_to_do(tmp_path, capsys, xray_root):
    assert main(["reproduce", "--out", str(tmp_path / "x")]) == 2
    assert "Point --data at a folder with the preset's datalists" in capsys.readouterr().err
    assert main(["reproduce", "--preset", "quik", "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'quik'; the presets are: full, quick, synthetic" in capsys.readouterr().err
    assert main(["reproduce", "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert f"no datalist at {tmp_path}/pretrain_datalist.json" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: {configs: [train.yaml]\n")
    assert main(["reproduce", "--preset", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert f"{bad}: not valid YAML" in capsys.readouterr().err
    bad.write_text("- pretrain\n- downstream\n")
    assert main(["reproduce", "--preset", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "a preset is a mapping of" in capsys.readouterr().err
    bad.write_text((PRESETS / "quick.yaml").read_text().replace("  overrides: {max_items: 192,",
                                                                "  overides: {max_items: 192,"))
    assert main(["reproduce", "--preset", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset keys downstream#overides" in capsys.readouterr().err  # not dropped silently
    with pytest.raises(SettingsError, match="start 'imagenet' needs a local weights file"):
        preset = load_preset("quick")
        preset["downstream"]["starts"] = ["imagenet"]
        build_stages(preset, xray_root, tmp_path)


def test_a_setting_no_bundle_has_stops_the_job_before_any_stage(tmp_path, capsys, xray_root):
    preset = PRESETS / "quick.yaml"
    typo = tmp_path / "typo.yaml"
    typo.write_text(preset.read_text().replace("memorization_weight: 0.0", "memorisation_weight: 0.0")
                    .replace("max_items: 192", "max_item: 192"))
    out = tmp_path / "job"
    for extra in (["--dry-run"], []):  # the dry run checks too; a real run stops before writing anything
        assert main(["reproduce", "--preset", str(typo), "--data", str(xray_root), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "unknown setting 'memorisation_weight' - did you mean 'memorization_weight'? (stage muscle_minus)" in err
        assert err.count("'max_item'") == 1 and "(stages pneumonia_scratch, pneumonia_md_moco" in err
        assert not out.exists()


def _write_stage(root: Path, name: str, kind: str, **extra) -> dict:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "stage.json").write_text(json.dumps({"status": "done", "wall_s": 12.5, "peak_rss_gib": 1.25,
                                                   "commands": [{"command": f"python -m monai.bundle run {name}",
                                                                 "log": "logs/1.log"}]}))
    return {"name": name, "output_dir": str(folder), "kind": kind, **extra}


def _fixed_job(tmp_path: Path) -> np.ndarray:
    """A finished job's files: three pneumonia starts, one continual variant, one embedding stage."""
    labels = [0, 1] * 10
    scores = {"scratch": [0.4, 0.6] * 10, "md_moco": [0.3, 0.7] * 10,
              "muscle": [0.2, 0.8] * 9 + [0.9, 0.1]}  # MUSCLE misranks one pair of cases
    stages = []
    for start, values in scores.items():
        stage = _write_stage(tmp_path, f"pneumonia_{start}", "downstream", task="pneumonia", start=start)
        folder = Path(stage["output_dir"])
        rows = ["index,label,score", *(f"{i},{y},{s}" for i, (y, s) in enumerate(zip(labels, values, strict=True)))]
        (folder / "per_case.csv").write_text("\n".join(rows) + "\n")
        auc = {"scratch": 1.0, "md_moco": 1.0, "muscle": 0.9}[start]
        if start == "md_moco":  # also scored at another site
            stage["external"] = "pneumonia_site2"
            (folder / "external").mkdir()
            (folder / "external" / "metrics.json").write_text(json.dumps({
                "task": "classification", "n": 75, "roc_auc": {"value": 0.62, "ci_low": 0.5, "ci_high": 0.74}}))
        (folder / "metrics.json").write_text(json.dumps({
            "task": "classification", "n": 20, "roc_auc": {"value": auc, "ci_low": auc - 0.1, "ci_high": 1.0},
            "accuracy": {"value": 0.75, "ci_low": 0.5, "ci_high": 0.9}, "sensitivity": 0.8, "specificity": None,
            "ece": 0.12}))
        stages.append(stage)
    continual = _write_stage(tmp_path, "muscle", "continual", variant="muscle")
    (Path(continual["output_dir"]) / "forgetting.json").write_text(json.dumps(
        {"summary": {"average": 0.75, "bwt": -0.05, "fwt": 0.1, "mean_forgetting": 0.02}}))
    stages.insert(0, continual)
    datalist = tmp_path / "pool.json"  # 12 images of two body parts whose embeddings form two clusters
    parts = ["chest"] * 6 + ["knee"] * 6
    items = [{"image": f"{i}.png", "body_part": part} for i, part in enumerate(parts)]
    datalist.write_text(json.dumps({"validation": items}))
    embedded = _write_stage(tmp_path, "embed_muscle", "embedding", start="muscle", datalist=str(datalist),
                            section="validation", color_by="body_part")
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (6, 16)), rng.normal(8, 1, (6, 16))]).astype(np.float32)
    np.savez(Path(embedded["output_dir"]) / "embeddings.npz", embeddings=features, index=np.arange(12))
    stages.append(embedded)
    (tmp_path / "pipeline.json").write_text(json.dumps({"preset": "fixed", "description": "fixed files",
                                                        "data_name": "xray", "seed": 0, "stages": stages}))
    return features


def test_report_tables_from_fixed_files(tmp_path):
    features = _fixed_job(tmp_path)
    report = build_report(tmp_path, n_resamples=200).read_text().splitlines()
    page = (tmp_path / "report.html").read_text()
    assert page.count("<table>") == 4 and '<img alt="ROC curves of every start' in page and "<h2>pneumonia" in page
    assert page.count('src="data:image/png;base64,') == 2 and 'src="figures/' not in page  # figures inline
    start = report.index("## pneumonia (classification, test n = 20)")
    assert report[start + 2:start + 7] == [
        "| start | roc_auc | accuracy | sensitivity | specificity | ece | Δ roc_auc vs Scratch | "
        "Δ roc_auc vs MD-MoCo |",
        "|---|---|---|---|---|---|---|---|",
        "| Scratch | 1.000 [0.900, 1.000] | 0.750 [0.500, 0.900] | 0.800 | n/a | 0.120 |  | 0.000 [0.000, 0.000] |",
        "| MD-MoCo | 1.000 [0.900, 1.000] | 0.750 [0.500, 0.900] | 0.800 | n/a | 0.120 | 0.000 [0.000, 0.000] |  |",
        report[start + 6],
    ]
    external = report.index("| start | internal roc_auc | external roc_auc | change |")
    assert report[external - 2].startswith("Another site: the same models, unchanged, on the `pneumonia_site2` test "
                                           "split (n = 75)")
    assert report[external + 2] == "| MD-MoCo | 1.000 [0.900, 1.000] | 0.620 [0.500, 0.740] | -0.380 |"
    assert report[external + 3] == "" and report[external + 4].startswith("## Continual stage")  # one start had it
    muscle_row = report[start + 6].split(" | ")
    assert muscle_row[0] == "| MUSCLE" and muscle_row[1] == "0.900 [0.800, 1.000]"
    # paired, from the per-case files (not from the reported 0.900): 81 of 100 pairs ranked right, AUC 0.81
    assert muscle_row[6].startswith("-0.190 [") and muscle_row[7].startswith("-0.190 [")
    verdict = report[start + 8]
    assert verdict.startswith("Does the paper's ranking hold here? MD-MoCo above Scratch: no (0.000 [0.000, 0.000]; "
                              "the interval includes 0: cannot tell)")
    assert report[start + 10] == "![ROC curves of every start on the pneumonia test set](figures/pneumonia_roc.png)"
    from matplotlib.image import imread

    figure = imread(tmp_path / "figures" / "pneumonia_roc.png")
    assert figure.shape[0] > 200 and figure[..., :3].std() > 0.05  # drawn, not blank
    forgetting = report.index("## Continual stage: forgetting")
    assert report[forgetting + 4] == "| MUSCLE | 0.750 | -0.050 | 0.100 | 0.020 | missing |"
    assert "| pneumonia_scratch | done | 12.5 | 1.25 | [1](pneumonia_scratch/logs/1.log) |" in report
    maps = report.index("## Backbone embeddings")
    assert "`validation` images of `pool.json`, mapped to 2-D by t-SNE and coloured by `body_part`" in report[maps + 2]
    assert report[maps + 4] == "![t-SNE maps of the backbone embeddings](figures/embeddings_tsne.png)"
    from muscle_ext.metrics import embedding_map_2d

    points = embedding_map_2d(features)
    centres = [points[:6].mean(0), points[6:].mean(0)]  # the two body parts stay apart on the map
    assert np.linalg.norm(centres[0] - centres[1]) > 3 * max(points[:6].std(0).max(), points[6:].std(0).max())
    assert imread(tmp_path / "figures" / "embeddings_tsne.png")[..., :3].std() > 0.05


def _curves(values: dict[str, list[float]], ks: tuple[int, ...] = (5, 20)) -> dict:
    """adaptation_curves.json with new-site AUCs per method (one per k) and the old site at 0.7."""
    def cell(v: float) -> dict:
        return {"value": v, "ci_low": v - 0.1, "ci_high": min(v + 0.1, 1.0), "per_draw": [v, v]}

    return {"ks": list(ks), "draws": 2, "n_target_test": 75, "n_source_test": 160, "n_pool": 350,
            "methods": {m: {str(k): {"target_auc": cell(v), "source_auc": cell(0.7)} for k, v in zip(ks, vs,
                                                                                                   strict=True)}
                        for m, vs in values.items()}}


def test_report_shows_the_adaptation_curves_with_the_best_method_per_start_and_k(tmp_path):
    _fixed_job(tmp_path)
    pipeline = json.loads((tmp_path / "pipeline.json").read_text())
    for start, values in {"md_moco": {"none": [0.3, 0.3], "head": [0.8, 0.9], "adabn": [0.5, 0.5]},
                          "muscle": {"none": [0.4, 0.4], "head": [0.85, 0.88], "adabn": [0.6, 0.95]}}.items():
        stage = _write_stage(tmp_path, f"adapt_pneumonia_{start}", "adaptation", task="pneumonia", start=start,
                             external="pneumonia_site2")
        (Path(stage["output_dir"]) / "adaptation_curves.json").write_text(json.dumps(_curves(values)))
        pipeline["stages"].append(stage)
    (tmp_path / "pipeline.json").write_text(json.dumps(pipeline))
    report = build_report(tmp_path, n_resamples=50).read_text().splitlines()
    start = report.index("### Adapting the pneumonia models to `pneumonia_site2`")
    header = report.index("| start | k | best method | new-site ROC AUC | as it came | own site after | own site "
                          "before |")
    assert start < header < report.index("## Continual stage: forgetting")
    assert report[header + 2:header + 6] == [
        "| MD-MoCo | 5 | head | 0.800 [0.700, 0.900] | 0.300 | 0.700 [0.600, 0.800] | 0.700 |",
        "| MD-MoCo | 20 | head | 0.900 [0.800, 1.000] | 0.300 | 0.700 [0.600, 0.800] | 0.700 |",
        "| MUSCLE | 5 | head | 0.850 [0.750, 0.950] | 0.400 | 0.700 [0.600, 0.800] | 0.700 |",
        "| MUSCLE | 20 | adabn | 0.950 [0.850, 1.000] | 0.400 | 0.700 [0.600, 0.800] | 0.700 |"]
    assert "(n = 75; mean over draws" in report[start + 2] and "2 k-shot draws per k" in report[start + 2]
    assert report[header + 7] == ("![pneumonia models adapted to pneumonia_site2: new-site ROC AUC against k, a line "
                                  "per method](figures/pneumonia_adaptation.png)")
    from matplotlib.image import imread

    figure = imread(tmp_path / "figures" / "pneumonia_adaptation.png")
    assert figure.shape[1] > figure.shape[0] and figure[..., :3].std() > 0.05  # two panels side by side, drawn


@pytest.mark.parametrize(("change", "message"), [
    ({"adapt": {"k": [5]}}, "unknown preset keys downstream#tasks#pneumonia#adapt#k"),
    ({"adapt": {}, "external": None}, "lacks downstream#tasks#pneumonia#external (adapt needs another site's"),
    ({"adapt": {}, "config": "segmentation.yaml"}, "adaptation is for classification tasks"),
])
def test_a_wrong_adapt_entry_stops_the_plan_with_its_key(tmp_path, xray_root, change, message):
    preset = yaml.safe_load((PRESETS / "quick.yaml").read_text())
    preset["downstream"]["tasks"]["pneumonia"].update(change)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(preset))
    with pytest.raises(SettingsError, match=re.escape(message)):
        build_stages(load_preset(path), xray_root, tmp_path / "out")


def test_report_card_sections_from_fixed_files(tmp_path):
    """Label efficiency (mean over seeds with the job's own stage as the 100 % run), the protocols table and the
    subgroup table, from fixed per-case files."""
    from muscle_ext.metrics import mean_over_runs

    _fixed_job(tmp_path)
    pipeline = json.loads((tmp_path / "pipeline.json").read_text())
    labels = np.array([0, 1] * 10)
    rng = np.random.default_rng(0)
    for start in ("scratch", "muscle"):
        for fraction, seed in ((0.1, 0), (0.1, 1), (1.0, 1)):
            stage = _write_stage(tmp_path, f"pneumonia_{start}_fraction{100 * fraction:g}_seed{seed}",
                                 "label_efficiency", task="pneumonia", start=start, fraction=fraction, seed=seed)
            scores = labels * (0.2 if fraction < 1 else 0.6) + rng.uniform(0, 1, 20)
            rows = ["index,label,score", *(f"{i},{y},{v}" for i, (y, v) in enumerate(zip(labels, scores,
                                                                                           strict=True)))]
            (Path(stage["output_dir"]) / "per_case.csv").write_text("\n".join(rows) + "\n")
            pipeline["stages"].append(stage)
        stage = _write_stage(tmp_path, f"pneumonia_{start}_knn", "protocol", task="pneumonia", start=start,
                             protocol="knn")
        (Path(stage["output_dir"]) / "metrics.json").write_text(json.dumps(
            {"task": "classification", "n": 20, "roc_auc": {"value": 0.7, "ci_low": 0.6, "ci_high": 0.8}}))
        pipeline["stages"].append(stage)
    muscle = tmp_path / "pneumonia_muscle" / "metrics.json"
    report = json.loads(muscle.read_text())
    report["subgroups"] = {"dataset": [
        {"value": "nih", "n": 15, "roc_auc": {"value": 0.95, "ci_low": 0.85, "ci_high": 1.0}},
        {"value": "site2", "n": 5, "roc_auc": {"value": 0.5, "ci_low": 0.1, "ci_high": 0.9},
         "warning": "n = 5 < 30: too few to compare"}]}
    muscle.write_text(json.dumps(report))
    (tmp_path / "pipeline.json").write_text(json.dumps(pipeline))
    lines = build_report(tmp_path, n_resamples=100).read_text().splitlines()

    table = lines.index("| start | 10 % of labels | 100 % of labels |")
    expected = mean_over_runs([tmp_path / "pneumonia_muscle" / "per_case.csv",
                               tmp_path / "pneumonia_muscle_fraction100_seed1" / "per_case.csv"], 100)
    muscle_row = lines[table + 3].split(" | ")
    assert lines[table + 2].startswith("| Scratch | ") and muscle_row[0] == "| MUSCLE"
    assert muscle_row[2] == f"{expected['value']:.3f} [{expected['ci_low']:.3f}, {expected['ci_high']:.3f}] (2 seeds) |"
    assert "seeds 0, 1;" in lines[table - 2]
    assert (tmp_path / "figures" / "pneumonia_label_efficiency.png").stat().st_size > 5000
    protocols = lines.index("| start | fine-tuned | knn |")
    assert lines[protocols + 2] == "| Scratch | 1.000 [0.900, 1.000] | 0.700 [0.600, 0.800] |"
    assert lines[protocols + 3] == "| MUSCLE | 0.900 [0.800, 1.000] | 0.700 [0.600, 0.800] |"
    groups = lines.index("| dataset | n | MUSCLE |")
    assert lines[groups + 2:groups + 4] == ["| nih | 15 | 0.950 [0.850, 1.000] |",
                                            "| site2 | 5 ⚠ | 0.500 [0.100, 0.900] |"]


def test_card_entries_plan_nested_seeded_runs_and_frozen_protocols(tmp_path, xray_root):
    preset = load_preset("quick")
    preset["downstream"]["tasks"]["pneumonia"].update(
        label_efficiency={"fractions": [0.1, 1.0], "seeds": [0, 1], "starts": ["scratch", "muscle"]},
        protocols={"starts": ["md_moco"]})
    preset["downstream"]["tasks"]["lung"]["protocols"] = {}
    stages = {s.name: s for s in build_stages(preset, xray_root, tmp_path / "out")}
    card = [n for n, s in stages.items() if s.extra["kind"] == "label_efficiency"]
    assert card == [f"pneumonia_{start}_fraction{f}_seed{seed}" for start in ("scratch", "muscle")
                    for f, seed in (("10", 0), ("10", 1), ("100", 1))]  # 100 % at seed 0 is pneumonia_<start>
    train = stages["pneumonia_muscle_fraction10_seed1"].commands[0].overrides
    assert train["label_fraction"] == 0.1 and train["seed"] == 1 and train["init"] == "checkpoint"
    assert stages["pneumonia_muscle_fraction10_seed1"].commands[1].overrides["seed"] == 1
    probe, knn = stages["pneumonia_md_moco_linear_probe"], stages["pneumonia_md_moco_knn"]
    assert probe.commands[0].overrides["freeze_backbone"] is True and len(probe.commands) == 2
    assert knn.commands[0].configs[-1] == "knn.yaml" and "num_epochs" not in knn.commands[0].overrides
    assert [n for n in stages if n.startswith("lung_") and n.endswith("_knn")] == []  # kNN is for classes
    assert "lung_muscle_linear_probe" in stages
    from muscle_ext.pipeline import StageRunner

    StageRunner.check(list(stages.values()))  # every setting is one the bundles have
    home, other, simulated = stages["pneumonia_muscle"].commands[1:]
    assert home.overrides["operating_point"] == "youden" and "operating_point_datalist" not in home.overrides
    assert other.overrides["operating_point_datalist"] == xray_root.resolve() / "pneumonia_nih" / "datalist.json"
    assert simulated.overrides["simulated_site"] is True and simulated.overrides["recalibrate_on"] == \
        home.overrides["datalist"] and simulated.overrides["output_dir"].name == "simulated"
    preset["downstream"]["tasks"]["lung"]["protocols"] = {"methods": ["knn"]}
    with pytest.raises(SettingsError, match="knn votes classes; lung uses segmentation.yaml"):
        build_stages(preset, xray_root, tmp_path / "out")
    preset["downstream"]["tasks"]["lung"]["protocols"] = {}
    preset["downstream"]["tasks"]["pneumonia"]["label_efficiency"]["fractions"] = [0, 0.5]
    with pytest.raises(SettingsError, match=re.escape("label_efficiency#fractions: shares of the training labels")):
        build_stages(preset, xray_root, tmp_path / "out")


CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH: `apt-get install chromium` (README, 'Looking at "
                                             "the report') runs this check")
@pytest.mark.timeout(300)
def test_report_html_renders_in_a_headless_browser(tmp_path):
    """The self-contained page as a browser shows it: every figure decodes, the tables render, nothing is fetched."""
    _fixed_job(tmp_path)
    build_report(tmp_path, n_resamples=50)
    page = (tmp_path / "report.html").read_text()
    probe = tmp_path / "probe.html"  # the page plus a script that records, after loading, whether each image decoded
    probe.write_text(page.replace("</body>", "<script>window.addEventListener('load', () => document.body.setAttribute("
                                             "'data-images', [...document.images].map(i => i.complete && "
                                             "i.naturalWidth > 0).join()));</script></body>"))
    (tmp_path / "figures").rename(tmp_path / "moved")  # a page that still linked its figures would now break
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert 'data-images="true,true"' in dom, dom[-2000:]  # the ROC curves and the t-SNE map, both decoded
    assert dom.count("<table>") == 4 and "<h2>pneumonia (classification, test n = 20)</h2>" in dom
    shot = tmp_path / "report.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1280,1600", (tmp_path / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1280) and pixels.std() > 0.05  # rendered, not a blank page


def test_status_flags_stages_run_with_other_code(tmp_path, capsys):
    from muscle_ext.pipeline.runner import code_fingerprint

    stages = []
    for name, code in (("md_moco", code_fingerprint()), ("muscle", "0" * 64), ("lung_scratch", None)):
        folder = tmp_path / name
        folder.mkdir()
        state = {"status": "done", "wall_s": 3.0, **({"code": code} if code else {})}  # no code: written before
        (folder / "stage.json").write_text(json.dumps(state))
        stages.append({"name": name, "output_dir": str(folder)})
    (tmp_path / "pipeline.json").write_text(json.dumps({"preset": "quick", "data_name": "xray", "seed": 0,
                                                        "stages": stages}))
    assert main(["status", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    flagged = [line.split()[0] for line in lines[1:4] if "muscle_ext changed since" in line]
    assert flagged == ["muscle"] and "1 stage(s) ran with other muscle_ext code" in lines[-1]


def test_full_preset_trains_under_torchrun_and_evaluates_in_one_process(xray_root, tmp_path, capsys):
    """The full preset's plan (nothing runs): every training command under torchrun with the bundle's multi-GPU
    config, evaluation and detection fine-tuning in one process, the report's command lines naming torchrun; the
    command line's --nproc-per-node sets every section; the settings pass the bundles' own checks."""
    from muscle_ext.pipeline import StageRunner, printable

    stages = build_stages(load_preset("full"), xray_root, tmp_path / "full")
    StageRunner.check(stages)
    assert [s.name for s in stages][:4] == ["md_moco", "muscle", "muscle_minus", "joint"] and len(stages) == 29
    adaptation = [s for s in stages if s.extra["kind"] == "adaptation"]
    assert [s.name for s in adaptation] == [f"adapt_pneumonia_{s}" for s in ("scratch", "md_moco", "muscle_minus",
                                                                             "joint", "muscle")]
    assert all(len(s.commands) == 1 and s.commands[0].nproc_per_node == 1 for s in adaptation)
    for stage in (s for s in stages if s not in adaptation):
        train, *evaluate = stage.commands
        detection = "detection.yaml" in train.configs
        assert train.nproc_per_node == (1 if detection else 4), stage.name
        assert ("multi_gpu_train.yaml" in train.configs) == (not detection)
        assert all(c.nproc_per_node == 1 and "multi_gpu_train.yaml" not in c.configs for c in evaluate)
    argv = stages[0].commands[0].argv()
    assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert printable(argv).startswith("torchrun --standalone --nproc_per_node=4 -m monai.bundle run")
    two = build_stages(load_preset("full"), xray_root, tmp_path / "full", nproc_per_node=2)
    assert {c.nproc_per_node for s in two for c in s.commands} == {1, 2}
    single = build_stages(load_preset("quick"), xray_root, tmp_path / "quick")
    assert all(c.nproc_per_node == 1 and "torch.distributed.run" not in c.argv() for s in single for c in s.commands)
    pneumonia = next(s for s in single if s.name == "pneumonia_muscle")  # quick also scores it at another site
    external = pneumonia.commands[2].overrides
    assert external["datalist"] == xray_root.resolve() / "pneumonia_site2" / "datalist.json"
    assert external["output_dir"] == pneumonia.output_dir / "external"
    assert external["model_dir"] == pneumonia.output_dir / "models" and "init" not in external
    assert pneumonia.commands[1].overrides["n_bootstrap"] == external["n_bootstrap"] == 500  # evaluate_overrides
    assert "n_bootstrap" not in pneumonia.commands[0].overrides and "max_items" not in external
    assert pneumonia.outputs == ("metrics.json", "external/metrics.json", "simulated/metrics.json")
    assert pneumonia.extra["external"] == "pneumonia_site2"
    with pytest.raises(SettingsError, match="nproc_per_node must be a whole number >= 1"):
        build_stages(load_preset("full"), xray_root, tmp_path / "full", nproc_per_node=0)
    assert main(["reproduce", "--preset", "full", "--data", str(xray_root), "--out", str(tmp_path / "dry"),
                 "--nproc-per-node", "2", "--dry-run"]) == 0
    assert "torchrun --standalone --nproc_per_node=2 -m monai.bundle run" in capsys.readouterr().out


# The full preset's own file, every size shrunk (the code path is the GPU one: torchrun, multi-GPU configs, gloo here)
TINY_FULL = {
    "pretrain.overrides": {"image_size": 32, "batch_size": 8, "num_epochs": 1, "warmup_epochs": 0, "queue_size": 32,
                           "train#sampler#num_samples": 32, "num_workers": 0, "knn_interval": 1, "monitor_size": 16},
    "continual.overrides": {"image_size": 32, "batch_size": 4, "rounds": 1, "steps_per_visit": 2, "max_items": 8,
                            "num_workers": 0, "cache": "memory"},
    "downstream.overrides": {"image_size": 32, "batch_size": 4, "num_epochs": 1, "warmup_epochs": 0, "max_items": 16,
                             "num_workers": 0, "n_bootstrap": 50},
    "downstream.starts": ["scratch", "muscle"],
    "downstream.tasks": ["pneumonia", "tb"],  # a torchrun-trained task, and detection (one process by design)
}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_full_preset_at_tiny_sizes_runs_under_torchrun_with_two_gloo_processes(xray_root, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    preset = yaml.safe_load((PRESETS / "full.yaml").read_text())
    for dotted, value in TINY_FULL.items():
        section, key = dotted.split(".")
        if key == "overrides":
            preset[section][key] = {**preset[section].get(key, {}), **value}
        elif key == "tasks":
            preset[section][key] = {name: preset[section][key][name] for name in value}
        else:
            preset[section][key] = value
    preset["downstream"]["tasks"]["pneumonia"]["adapt"] = {"methods": ["none", "head", "finetune_l2sp"], "ks": [2],
                                                           "draws": 1, "finetune_epochs": 1}
    path = tmp_path / "full_tiny.yaml"
    path.write_text(yaml.safe_dump(preset))
    out = tmp_path / "job"
    code, said = _reproduce(capsys, "--preset", path, "--data", xray_root, "--out", out, "--nproc-per-node", 2)
    assert code == 0, said
    stages = ["md_moco", "muscle", "muscle_minus", "joint", "pneumonia_scratch", "pneumonia_muscle", "tb_scratch",
              "tb_muscle", "adapt_pneumonia_muscle"]
    assert all(f"] {name}: run" in said for name in stages), said
    log = (out / "md_moco" / "logs" / "1_muscle_pretrain.log").read_text()
    parsed = [line for line in log.splitlines() if line.startswith("parsing config_file [")]
    assert len(parsed) == 2 and all("multi_gpu_train.yaml" in line for line in parsed), log[:3000]  # 2 processes
    report = (out / "report.md").read_text()
    assert report.count("torchrun --standalone --nproc_per_node=2 -m monai.bundle run") == 6  # 4 + 2 fine-tunings
    assert "## pneumonia (classification" in report and "## tb (detection" in report
    assert all(json.loads((out / p / "stage.json").read_text())["status"] == "done"
               for p in ("md_moco", "muscle", "joint", "downstream/tb_muscle"))


def test_report_shows_the_papers_published_numbers_where_the_task_names_them(tmp_path):
    """A task whose preset entry names the paper's dataset (`paper: tbx`) gets a column with the published ResNet-18
    values and the footnote on what they are; a task without it gets none."""
    from muscle_ext.pipeline.paper import PAPER

    stages = []
    for task, paper in (("tb", "tbx"), ("mine", None)):
        for start in ("md_moco", "joint", "muscle"):
            stage = _write_stage(tmp_path, f"{task}_{start}", "downstream", task=task, start=start,
                                 **({"paper": paper} if paper else {}))
            (Path(stage["output_dir"]) / "metrics.json").write_text(json.dumps(
                {"task": "detection", "n": 10, "map": {"value": 0.2, "ci_low": 0.1, "ci_high": 0.3},
                 "ap50": {"value": 0.4, "ci_low": 0.3, "ci_high": 0.5}}))
            stages.append(stage)
    (tmp_path / "pipeline.json").write_text(json.dumps({"preset": "fixed", "data_name": "xray", "seed": 0,
                                                        "stages": stages}))
    report = build_report(tmp_path, n_resamples=50).read_text().splitlines()
    tb = report.index("## tb (detection, test n = 10)")
    assert report[tb + 2].startswith("| start | map | ap50 | paper (map, ResNet-18) |")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in report[tb + 4:tb + 7]}
    assert rows["MUSCLE"][3] == f"{PAPER['tbx']['resnet18']['muscle']:.3f}" == "0.367"
    assert rows["Joint multi-task"][3] == "-"  # the paper has no joint baseline
    assert any(line.startswith("Paper column: the published ResNet-18 result (Liao et al., MICCAI 2022")
               for line in report[tb:])
    mine = report.index("## mine (detection, test n = 10)")
    assert "paper" not in report[mine + 2]
