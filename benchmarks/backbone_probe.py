"""How far can a head get on a frozen backbone? A fast ceiling for a pretrained backbone, before
any SciceVPR training.

Every image of a GSV-layout training split and of the synthetic test split is encoded once by the
frozen backbone; each block gives its class token and the means of its patch tokens over 2 x 2
regions of the patch grid (each part L2-normalised, all concatenated: 4 blocks x 5 x 384 = 7,680
dimensions for the offline backbone). Then a linear head (7,680 -> 1,024) is trained with
``L_MS`` on those cached features, in batches of P places x K = 4 images, and both the raw
features and the head are scored on the test split with bootstrap intervals. Training the head
takes seconds per hundred steps, so the number of training places and steps can be far larger
than the notebooks' CPU recipe affords: the result says what the backbone's features hold, not
what the notebooks' 100 iterations reach.

    python benchmarks/backbone_probe.py --train-root data/synthetic/pretrain/gsv_cities [--weights auto|none|PATH]
        [--test-root VG_ROOT] [--places N] [--batch-places P] [--steps S] [--lr LR] [--device auto|cpu|cuda]
        [--csv OUT.csv]

The training split must share no street with the test split: the ``pretrain`` preset
(``scicevpr synth --preset pretrain --seed 0 --splits train``) or the ``small`` preset's own
training split (80 places). The test split is the ``small`` preset's (``--test-root``, default
``$SCICEVPR_DATA/synthetic/small/vg``). Run it with the pinned kernels (``make`` exports them);
on a GPU (``--device cuda``) encoding and the head take seconds (``benchmarks/device_pretrain.sh``
probes every export this way).
Measured (2 CPU cores, AMD EPYC, fp32; 2026-11-28) for the shipped backbone, on the ``small``
test split (500 queries, chance R@1 1.6): see ``scicevpr/weights/README.md``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import pandas as pd
import torch
import torch.nn.functional as F

from scicevpr.lab.analysis import patch_maps
from scicevpr.backbone import DinoVisionTransformer, build_backbone
from scicevpr.offline.config import OFFLINE_BACKBONE
from scicevpr.data.gsv import GSVCitiesDataset
from scicevpr.offline.synthetic import default_synthetic_dir
from scicevpr.data.transforms import normalize_uint8_batch
from scicevpr.data.vg import load_vg_split
from scicevpr.config import EvalConfig
from scicevpr.evaluate import chance_recall, score
from scicevpr.losses import MultiSimilarityLoss
from scicevpr.precision import model_device
from scicevpr.offline.augment import load_image_cache
from scicevpr.runtime import resolve_device

IMAGE_SIZE = 112
RECALLS = (1, 5, 10)


@torch.no_grad()
def block_features(backbone: DinoVisionTransformer, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> (N, L * 5 * C) float32 on the CPU: per block, the class token and the
    2 x 2 region means of the patch tokens, each L2-normalised; encoded on the backbone's device."""
    device = model_device(backbone)
    layers = list(range(backbone.config.depth))
    grid = backbone.grid_size(IMAGE_SIZE, IMAGE_SIZE)
    out = []
    for i in range(0, len(images), batch):
        x = normalize_uint8_batch(images[i : i + batch].to(device), IMAGE_SIZE)  # (B, 3, S, S) float
        parts = []
        for tokens in backbone.get_intermediate_layers(x, layers):  # each (B, 1 + H*W, C)
            regions = F.adaptive_avg_pool2d(patch_maps(tokens, grid), 2).flatten(2)  # (B, C, H, W) -> (B, C, 4)
            parts.append(torch.cat([tokens[:, 0, :, None], regions], 2))  # (B, C, 5)
        out.append(F.normalize(torch.stack(parts, 1), dim=2).flatten(1).float().cpu())  # (B, L, C, 5) -> (B, L * C * 5)
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-root", required=True, help="a GSV-layout folder (Dataframes/ + Images/)")
    p.add_argument("--weights", default="auto", help="auto (the shipped backbone), none (random) or a path")
    p.add_argument("--places", type=int, default=None, help="use only the first N training places")
    p.add_argument("--batch-places", type=int, default=128, help="P places per batch (K = 4 images each)")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--test-root", default=None, help="VG root of the synthetic test split (default: the small preset's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when there is one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="processes decoding the JPEGs")
    p.add_argument("--csv", default=None, help="also write the result rows (recalls with intervals) to this CSV")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")

    weights = None if args.weights == "none" else args.weights
    backbone = build_backbone(OFFLINE_BACKBONE, weights=weights).eval().to(device)
    split = load_vg_split(args.test_root or default_synthetic_dir("small") / "vg", "synthetic", "test")
    t0 = time.time()
    test = block_features(backbone, load_image_cache(split.all_paths, IMAGE_SIZE, args.workers, progress=False))
    train_set = GSVCitiesDataset(args.train_root, img_per_place=4, image_size=IMAGE_SIZE)
    frame = train_set.dataframe
    if args.places is not None:
        frame = frame[frame["place_id"].isin(train_set.place_ids[: args.places])]
    train = block_features(backbone, load_image_cache(frame["path"].tolist(), IMAGE_SIZE, args.workers, progress=False))
    labels = torch.as_tensor(frame["place_id"].to_numpy())
    print(f"features: {len(train)} training images of {labels.unique().numel()} places, {len(test)} test images, "
          f"{train.shape[1]} dims, {time.time() - t0:.0f} s")

    centre = train.mean(0)
    train, test = train - centre, test - centre
    config = EvalConfig(recall_values=RECALLS)
    chance = chance_recall(split.num_database, split.positives, RECALLS)
    print("chance: " + ", ".join(f"R@{n} {v:.1f}" for n, v in chance.items()))

    tables = []

    def report(name: str, head) -> None:
        with torch.no_grad():
            d = F.normalize(head(test.to(device)), dim=-1).cpu().numpy()
        result = score(None, split, d[: split.num_database], d[split.num_database :], config, name=name)
        tables.append(result.table(intervals=True))
        print(tables[-1].to_string(index=False))

    report("raw features", lambda x: x)
    head = torch.nn.Linear(train.shape[1], 1024).to(device)  # initialised on the CPU: the same head on any device
    optimiser = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=1e-2)
    loss_fn = MultiSimilarityLoss()
    places = [torch.nonzero(labels == p).flatten() for p in labels.unique()]  # on the CPU, as the sampling
    train, labels = train.to(device), labels.to(device)
    P, K = min(args.batch_places, len(places)), 4
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        chosen = torch.randperm(len(places), generator=gen)[:P]
        idx = torch.cat([places[c][torch.randperm(len(places[c]), generator=gen)[:K]] for c in chosen])  # (P * K,)
        idx = idx.to(device)
        loss = loss_fn(F.normalize(head(train[idx]), dim=-1), labels[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % max(1, args.steps // 4) == 0:
            print(f"step {step}: L_MS {loss.item():.3f} ({time.time() - t0:.0f} s)")
    report(f"linear head, {len(places)} places, {args.steps} steps of {P} x {K}", head)
    if args.csv:
        table = pd.concat(tables, ignore_index=True)
        table.insert(1, "weights", args.weights)
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
