"""Where in the backbone the pneumonia signal lives: the bundle's kNN (cosine, k = 20, Wu et al. weights) on the
average-pooled output of each ResNet stage, and the linear probe on the final features, scored on the
**validation** split only (the split settings are chosen on; the test split stays for bench_pretrain.py).

    python benchmarks/stage_knn.py --data ../shared/data/xray --result-name pretrain_sweep_validation \
        --backbone random= --backbone no_intensity_aug=/tmp/sweep/no_intensity_aug/models/backbone.pt

An empty path means the architecture at random init (the baseline every backbone is compared with). Stage 4 is
what the bundle's evaluate.yaml scores; stages 1-3 are a diagnostic, never the headline figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from muscle_ext.metrics import roc_auc
from muscle_ext.metrics.embedding import knn_scores, linear_probe_scores
from muscle_ext.networks import backbone_feature_maps, initialize_backbone

from common import load_labelled_images, write_result

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def stage_features(backbone: torch.nn.Module, images: torch.Tensor, batch: int = 128) -> list[torch.Tensor]:
    backbone.eval()
    chunks = [[m.mean(dim=(2, 3)) for m in backbone_feature_maps(backbone, images[i:i + batch])]
              for i in range(0, len(images), batch)]
    return [torch.cat([chunk[stage] for chunk in chunks]) for stage in range(len(chunks[0]))]


def score(backbone: torch.nn.Module, reference: tuple, query: tuple) -> dict:
    (ref_x, ref_y), (query_x, query_y) = reference, query
    ref_f, query_f = stage_features(backbone, ref_x), stage_features(backbone, query_x)
    y = query_y.numpy()
    result = {f"knn_auc_stage{i + 1}": roc_auc(y, knn_scores(r, ref_y, q, 2)[:, 1].numpy())
              for i, (r, q) in enumerate(zip(ref_f, query_f, strict=True))}
    result["linear_probe_auc_stage4"] = roc_auc(y, linear_probe_scores(ref_f[-1], ref_y, query_f[-1], 2)[:, 1].numpy())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/xray")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--backbone", action="append", required=True, metavar="NAME=PATH",
                        help="a backbone checkpoint to score (empty PATH: random init); repeat for several")
    parser.add_argument("--result-name", default="pretrain_sweep_validation")
    args = parser.parse_args()
    torch.set_num_threads(2)
    datalist = args.data / "pneumonia_nih" / "datalist.json"
    reference = load_labelled_images(datalist, "training", args.size)
    query = load_labelled_images(datalist, "validation", args.size)
    rows = {}
    for spec in args.backbone:
        name, _, path = spec.partition("=")
        torch.manual_seed(0)  # the random-init baseline is the same network as bench_pretrain's (seed 0)
        backbone = initialize_backbone(args.arch, init="checkpoint" if path else "scratch", weights=path or None)
        rows[name] = {"backbone": path or "random init", **score(backbone, reference, query)}
        print(name, {k: round(v, 3) for k, v in rows[name].items() if k != "backbone"}, flush=True)
    path = write_result(args.result_name, {"split": "validation", "n_reference": len(reference[1]),
                                           "n_query": len(query[1]), "image_size": args.size, "rows": rows})
    path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))


def markdown(result: dict) -> str:
    lines = [f"# Frozen-backbone kNN per ResNet stage, pneumonia_nih {result['split']} split",
             "", f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores. Commit {result['commit']}.",
             f"Command: `{result['command']}`", "",
             f"Reference: training split (n={result['n_reference']}), scored: {result['split']} "
             f"(n={result['n_query']}), {result['image_size']} px. kNN: cosine, k = 20, as evaluate.yaml; "
             "stage 4 is the backbone's output, the figure evaluate.yaml reports.", "",
             "| backbone | kNN stage 1 | kNN stage 2 | kNN stage 3 | kNN stage 4 | linear probe (stage 4) |",
             "|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        cells = [f"{row[f'knn_auc_stage{i}']:.3f}" for i in range(1, 5)] + [f"{row['linear_probe_auc_stage4']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
