"""Can the synthetic world be learned at all? A small CNN trained from scratch, on a CPU, with
``L_MS`` on places of another world, scored on the ``small`` test split.

A ceiling check for the offline world rather than a model of this project: if a network with
no pretraining reaches a recall far above the baselines without learning (raw pixels, hue
histograms), the places carry a signal that training can find, and a backbone that stays below it
is under-trained rather than the world unlearnable. The network is
:class:`scicevpr.offline.objectives.LayoutCNN` (four convolution stages, 32 -> 64 -> 128 -> 256 channels,
batch norm, ReLU; 8 x 8 maps at 64 px, averaged over a 2 x 4 grid, where each feature lies:
above/below, four vertical strips, and projected to 512 dimensions), trained by
``scicevpr pretrain-backbone --objective cnn`` (resumable, CSV log, DDP; its export is also the
teacher of ``--objective distil``). This script scores such a network: Recall@1/5/10 on the val and
test splits, the test split's with 95 % bootstrap intervals over queries and R@1 by condition, and
the chance level from the split's positives.

    scicevpr pretrain-backbone --objective cnn --data data/synthetic/pretrain0 --export runs/cnn.pt ...
    python benchmarks/cnn_learnability.py runs/cnn.pt [--test-root VG_ROOT] [--size 64] [--threads 2]

The training data must share no street with the test split (``scicevpr synth --preset pretrain
--seed 0 --splits train``: 4,000 places, 20,082 images). The exact training command and what it
measured (2 CPU cores, AMD EPYC): ``scicevpr/weights/README.md``; ``data/README.md``, "Learnable".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from scicevpr.config import EvalConfig
from scicevpr.offline.synthetic import default_synthetic_dir
from scicevpr.data.vg import load_vg_split
from scicevpr.evaluate import EvalResult, chance_recall, recall_by_condition, score
from scicevpr.offline.augment import load_image_cache
from scicevpr.offline.objectives import LayoutCNN

RECALLS = (1, 5, 10)
EVAL = EvalConfig(recall_values=RECALLS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("network", help="a LayoutCNN state dict (.pt), e.g. the export of pretrain-backbone --objective cnn")
    p.add_argument("--test-root", default=None, help="VG root of the synthetic val/test splits (default: the small preset's)")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: the manifest's image_size beside the file, else 64)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not Path(args.network).is_file():
        p.error(f"{args.network!r} does not exist; train a network with `scicevpr pretrain-backbone --objective cnn "
                "... --export runs/cnn.pt`")
    try:
        args.net = LayoutCNN.load(args.network)  # verified against its manifest, when it has one
    except ValueError as e:
        p.error(str(e))
    if args.size is None:
        args.size = (args.net.manifest or {}).get("image_size", 64)
    if args.size < 32 or args.size % 8:
        p.error(f"--size {args.size}: give a multiple of 8, at least 32")
    return args


def main(args: argparse.Namespace) -> dict[str, EvalResult]:
    torch.set_num_threads(args.threads)
    test_root = args.test_root or default_synthetic_dir("small") / "vg"
    results, splits = {}, {}
    for s in ("val", "test"):
        splits[s] = split = load_vg_split(test_root, "synthetic", s)
        images = load_image_cache(split.all_paths, args.size, num_workers=0, progress=False)  # (N, 3, S, S) uint8
        with torch.no_grad():
            d = torch.cat([args.net(images[i : i + 256]) for i in range(0, len(images), 256)]).numpy()  # (N, 512)
        results[s] = res = score(None, split, d[: split.num_database], d[split.num_database :], EVAL, name="LayoutCNN")
        line = ", ".join(f"R@{n} {v:.1f}" for n, v in res.recalls.items())
        chance = ", ".join(f"R@{n} {v:.1f}" for n, v in chance_recall(split.num_database, split.positives, RECALLS).items())
        print(f"{s} ({split.num_queries} queries, {split.num_database} database images): {line} (chance {chance})")
    test, res = splits["test"], results["test"]
    table = recall_by_condition(res.correct, test.query_conditions, RECALLS, intervals=True)
    iv = table.iloc[-1]  # "all"
    print("test, 95% intervals: " + ", ".join(
        f"R@{n} {iv[f'R@{n}']:.1f} [{iv[f'R@{n} lo']:.1f}, {iv[f'R@{n} hi']:.1f}]" for n in RECALLS))
    print("test R@1 by condition: " + ", ".join(
        f"{c} {v:.1f}" for c, v in zip(table["condition"], table["R@1"]) if c != "all"))
    return results


if __name__ == "__main__":
    main(parse_args())
