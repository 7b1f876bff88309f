"""Can the synthetic world be learned at all? A small CNN trained from scratch, on a CPU, with
``L_MS`` on places of another world, scored on the ``small`` test split.

A ceiling check for the offline world rather than a model of this project: if a network with
no pretraining reaches a recall far above the baselines without learning (raw pixels, hue
histograms), the places carry a signal that training can find, and a backbone that stays below it
is under-trained rather than the world unlearnable. The network:
:class:`scicevpr.pretrain.LayoutCNN` (four convolution stages, 32 -> 64 -> 128 -> 256 channels,
batch norm, ReLU; 8 x 8 maps at 64 px, averaged over a 2 x 4 grid, where each feature lies:
above/below, four vertical strips, and projected to 512 dimensions); ``--save`` keeps it as the
teacher of ``scicevpr pretrain-backbone --objective distil --distil-teacher net.pt``. Training:
P = 64 places x K = 4 images a step, one random resized crop per image (area 0.6-1, aspect
0.8-1.25), no flips and no colour augmentation, AdamW (lr 1e-3, weight decay 1e-4, 200 warm-up
steps, cosine), ``L_MS`` with the paper's hyper-parameters. Recall on the val and test splits
every ``--eval-every`` steps; the last step's test recall, with bootstrap intervals, is the
result (no step is chosen on the test split).

    python benchmarks/cnn_learnability.py --train-root data/synthetic/pretrain0/gsv_cities
        [--test-root VG_ROOT] [--size 64] [--steps 1500] [--stop-at-step N] [--eval-every 250] [--save net.pt]

The training split must share no street with the test split (``scicevpr synth --preset pretrain
--seed 0 --splits train``: 4,000 places, 20,082 images). Measured (2 CPU cores, AMD EPYC,
2026-11-28): ``data/README.md``, "Learnable".
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from scicevpr.config import EvalConfig
from scicevpr.data.gsv import _read_city, _resolve_files, list_cities
from scicevpr.data.synthetic import default_synthetic_dir
from scicevpr.data.vg import load_vg_split
from scicevpr.evaluate import EvalResult, chance_recall, recall_by_condition, score
from scicevpr.files import save_torch_file
from scicevpr.losses import MultiSimilarityLoss
from scicevpr.pretrain import LayoutCNN

RECALLS = (1, 5, 10)
EVAL = EvalConfig(recall_values=RECALLS)


def _load(args: tuple[Path, int]) -> np.ndarray:
    path, size = args
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR, reducing_gap=2.0))


def load_images(paths, size: int, workers: int = 2) -> torch.Tensor:
    """(N, 3, size, size) uint8, decoded in ``workers`` processes."""
    with Pool(workers) as pool:
        return torch.from_numpy(np.stack(pool.map(_load, [(p, size) for p in paths], chunksize=64))).permute(0, 3, 1, 2).contiguous()


def random_resized_crops(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One crop per image (area 0.6-1, aspect 0.8-1.25), resized back to the input size."""
    S = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(len(x)):
        s = torch.empty(1).uniform_(0.6, 1.0, generator=g).item()
        r = math.exp(torch.empty(1).uniform_(math.log(0.8), math.log(1.25), generator=g).item())
        w, h = min(S, int(round(S * math.sqrt(s * r)))), min(S, int(round(S * math.sqrt(s / r))))
        x0, y0 = int(torch.randint(0, S - w + 1, (1,), generator=g)), int(torch.randint(0, S - h + 1, (1,), generator=g))
        crop = x[i : i + 1, :, y0 : y0 + h, x0 : x0 + w].float()
        out[i] = F.interpolate(crop, size=(S, S), mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)[0]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-root", required=True, help="a GSV-layout folder (Dataframes/ + Images/)")
    p.add_argument("--test-root", default=None, help="VG root of the synthetic val/test splits (default: the small preset's)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--steps", type=int, default=1500, help="steps of the learning-rate schedule")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="end after this step (an evaluation and --save there), keeping the schedule of --steps")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--places-per-step", type=int, default=64, help="P of P x K (K = 4 images a place)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", default=None, help="write the network's state dict here at every evaluation and at the end (a .pt file)")
    args = p.parse_args(argv)
    if not (Path(args.train_root) / "Dataframes").is_dir():
        p.error(f"--train-root: {args.train_root!r} has no Dataframes/ folder; give a GSV-layout folder, e.g. the output "
                "of `scicevpr synth --preset pretrain --seed 0 --splits train` + /gsv_cities")
    if args.size < 32 or args.size % 8:
        p.error(f"--size {args.size}: give a multiple of 8, at least 32")
    if args.steps < 1 or args.eval_every < 1 or args.places_per_step < 2:
        p.error("--steps and --eval-every must be positive, --places-per-step at least 2")
    if args.stop_at_step is not None and not 1 <= args.stop_at_step <= args.steps:
        p.error(f"--stop-at-step {args.stop_at_step}: give a step from 1 to --steps ({args.steps})")
    return args


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    root = Path(args.train_root)
    t0 = time.time()
    paths, labels = [], []
    for c, city in enumerate(list_cities(root)):
        frame = _read_city(root, city)
        paths += _resolve_files(root, frame, city)
        labels += list(c * 100_000 + frame["place_id"].to_numpy())
    train = load_images(paths, args.size)
    _, place = np.unique(np.array(labels), return_inverse=True)
    groups = [g for g in (np.flatnonzero(place == k) for k in range(place.max() + 1)) if len(g) >= 4]
    test_root = args.test_root or default_synthetic_dir("small") / "vg"
    splits = {s: load_vg_split(test_root, "synthetic", s) for s in ("val", "test")}
    images = {s: (load_images(sp.database_paths, args.size), load_images(sp.query_paths, args.size)) for s, sp in splits.items()}
    print(f"{len(paths)} training images of {len(groups)} places, loaded in {time.time() - t0:.0f} s", flush=True)
    test = splits["test"]
    print("test chance: " + ", ".join(f"R@{n} {v:.1f}" for n, v in chance_recall(test.num_database, test.positives, RECALLS).items()))

    @torch.no_grad()
    def result(net: nn.Module, s: str) -> EvalResult:
        net.eval()
        db, q = (torch.cat([net(t[i : i + 256]) for i in range(0, len(t), 256)]).numpy() for t in images[s])
        net.train()
        return score(None, splits[s], db, q, EVAL, name="LayoutCNN")

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    net = LayoutCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1, (k + 1) / 200) * 0.5 * (1 + math.cos(math.pi * k / args.steps)))
    loss_fn = MultiSimilarityLoss()
    P, K = args.places_per_step, 4
    if P > len(groups):
        print(f"cnn_learnability.py: error: --places-per-step {P}: the training split has {len(groups)} places with 4 "
              f"images or more; give at most {len(groups)}", file=sys.stderr)
        raise SystemExit(2)
    t0 = time.time()
    last = args.steps if args.stop_at_step is None else args.stop_at_step
    for step in range(last + 1):
        if step % args.eval_every == 0 or step == last:
            val, res = result(net, "val"), result(net, "test")
            by = res.per_condition.set_index("condition")["R@1"]
            print(f"step {step} ({time.time() - t0:.0f} s): val R@1 {val.recalls[1]:.0f}, test "
                  + ", ".join(f"R@{n} {v:.1f}" for n, v in res.recalls.items()) + "; test R@1 by condition: "
                  + ", ".join(f"{c} {v:.1f}" for c, v in by.items() if c != "all"), flush=True)
            if step == last:
                iv = recall_by_condition(res.correct, test.query_conditions, RECALLS, intervals=True).iloc[-1]  # "all"
                print("test at the last step, 95% intervals: " + ", ".join(
                    f"R@{n} {iv[f'R@{n}']:.1f} [{iv[f'R@{n} lo']:.1f}, {iv[f'R@{n} hi']:.1f}]" for n in RECALLS))
                if args.save:
                    save_torch_file(net.state_dict(), args.save)
                    print(f"network written to {args.save}")
                break
            if args.save and step:  # kept at every evaluation, so that a stopped run leaves its last network
                save_torch_file(net.state_dict(), args.save)
        chosen = rng.choice(len(groups), P, replace=False)
        idx = np.concatenate([rng.choice(groups[p], K, replace=False) for p in chosen])  # (P * K,)
        loss = loss_fn(net(random_resized_crops(train[idx], g)), torch.from_numpy(np.repeat(np.arange(P), K)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"step {step}: L_MS {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main(parse_args())
