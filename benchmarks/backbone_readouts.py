"""What a backbone gives with no head and no training: per block, the class token alone, the mean
and the GeM (p = 3, of the ReLU'd tokens) of the patch tokens, each after the final norm, scored by
exact search on the synthetic test split with 95% bootstrap intervals over queries.

A backbone whose class token alone, or any pooled block, already scores as high as the trained
models would make the notebooks' heads lose to an untrained shortcut: the offline world must keep
the paper's situation (generic features from pretraining, place knowledge learned by the heads).

    python benchmarks/backbone_readouts.py [WEIGHTS.pth | auto] [--vg-root VG_ROOT] [--csv OUT.csv]
"""

from __future__ import annotations

import argparse
import warnings

import pandas as pd
import torch
import torch.nn.functional as F

from scicevpr.backbone import DinoVisionTransformer, RandomWeightsWarning, build_backbone
from scicevpr.offline.config import OFFLINE_BACKBONE
from scicevpr.offline.synthetic import default_synthetic_dir
from scicevpr.data.transforms import normalize_uint8_batch
from scicevpr.data.vg import load_vg_split
from scicevpr.evaluate import chance_recall, recall_at_n, recall_intervals, search
from scicevpr.offline.augment import load_image_cache

IMAGE_SIZE = 112


@torch.no_grad()
def readouts(backbone: DinoVisionTransformer, images: torch.Tensor, batch: int = 128) -> dict[str, torch.Tensor]:
    """(N, 3, S, S) uint8 -> {"block b, <readout>": (N, C) unit descriptors}."""
    layers = list(range(len(backbone.blocks)))
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images), batch):
        x = normalize_uint8_batch(images[i : i + batch], IMAGE_SIZE)
        for b, t in zip(layers, backbone.get_intermediate_layers(x, layers)):  # each (n, 1 + HW, C), final norm
            patches = t[:, 1:].float()  # (n, HW, C)
            parts = {"class token": t[:, 0].float(), "patch mean": patches.mean(1),
                     "patch GeM": patches.clamp(min=0).add(1e-6).pow(3).mean(1).pow(1 / 3)}
            for name, d in parts.items():
                out.setdefault(f"block {b}, {name}", []).append(F.normalize(d, dim=-1))
    return {k: torch.cat(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="?", default="auto")
    parser.add_argument("--vg-root", default=str(default_synthetic_dir("small") / "vg"))
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        backbone = build_backbone(OFFLINE_BACKBONE, weights=None if args.weights == "none" else args.weights).eval()
    split = load_vg_split(args.vg_root, "synthetic", "test")
    images = load_image_cache(split.all_paths, IMAGE_SIZE, num_workers=0, progress=False)
    n_db = split.num_database
    chance = chance_recall(n_db, split.positives, (1,))[1]
    rows = []
    for name, d in readouts(backbone, images).items():
        d = d.numpy()
        _, pred = search(d[:n_db], d[n_db:], 5)
        r, correct = recall_at_n(pred, split.positives, (1, 5))
        lo, hi = recall_intervals(correct, (1,))[1]
        rows.append({"readout": name, "R@1": round(r[1], 1), "95% interval": f"[{lo:.1f}, {hi:.1f}]", "R@5": round(r[5], 1)})
    table = pd.DataFrame(rows)
    print(f"{args.weights}: {split.num_queries} queries, {n_db} database images, chance R@1 {chance:.1f}")
    print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
