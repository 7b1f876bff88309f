"""Measure the memory one training step adds, for the table in ``scicevpr/memory.py``.

Each configuration runs in a fresh Python process: the model is built (random DINOv2 weights,
the preset's image size), then one training step runs on a random batch of P x K images (the
batch, the forward pass with its autograd graph, backward, one Adam step). The step's memory is
the process's peak resident set (``ru_maxrss``) minus its resident set just before the batch was
made. That is the quantity :func:`scicevpr.memory.step_memory` predicts; two batch sizes
per configuration give its line ``need(B) = base + per_image * B``.

    python benchmarks/train_memory.py --stage CricaVPR --preset CricaVPR --batches 2x4,4x4
    python benchmarks/train_memory.py --stage CricaVPR --preset CricaVPR --batches 8x4,16x4 --checkpointing

The measuring processes run with ``MALLOC_MMAP_THRESHOLD_=131072`` (unless set): at the paper's
batch every activation tensor (288 x 257 x 768 fp32 = 227 MB and more) lies above glibc's
largest dynamic mmap threshold (32 MiB), so it is mapped and unmapped, and freed memory leaves
the resident set at once; at the few images measured here the same tensors are smaller and by
default come from the heap, whose freed chunks stay resident. The fixed threshold gives the small
batches the large batch's behaviour. (CricaVPR-B, 4 images, checkpointed: 0.46 GiB by default,
0.19 GiB with it; the tensors the graph keeps, 0.10 GiB.)

Before the larger batch runs, its peak is predicted from the smaller one and the run is skipped
when the prediction exceeds ``--max-gib`` (6 by default: the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

GIB = 2**30


def _rss_bytes() -> int:
    """The resident set of this process now (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_one(stage: str, preset: str, P: int, K: int, checkpointing: bool, amp: bool) -> dict:
    """One training step in this process; returns what it measured."""
    import torch

    from scicevpr import RandomWeightsWarning
    from scicevpr.config import LossConfig
    from scicevpr.factory import create_model
    from scicevpr.models import SciceVPR
    from scicevpr.precision import autocast
    from scicevpr.train import DistillationStep, MetricLearningStep

    warnings.simplefilter("ignore", RandomWeightsWarning)
    torch.manual_seed(0)
    if stage == "student":
        teacher = create_model("SuperCricaVPR", preset, weights=None, seed=0).requires_grad_(False).eval()
        model = SciceVPR.from_teacher(teacher, seed=0)
        step = DistillationStep(model, teacher, LossConfig())
    else:
        model = create_model(stage, preset, weights=None, seed=0)
        step = MetricLearningStep(model, LossConfig())
    model.set_activation_checkpointing(checkpointing)
    step.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    S = model.image_size
    device = torch.device("cpu")
    before = _rss_bytes()
    t0 = time.perf_counter()
    x = torch.randn(P * K, 3, S, S)  # (P*K, 3, S, S), as fit() reshapes a loader batch
    y = torch.arange(P).repeat_interleave(K)  # (P*K,) place ids
    with autocast(device, amp):
        loss, _ = step(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"stage": stage, "preset": preset, "P": P, "K": K, "images": P * K, "image_size": S,
            "checkpointing": checkpointing, "amp": amp, "rss_before_gib": round(before / GIB, 3),
            "peak_gib": round(peak / GIB, 3), "step_gib": round((peak - before) / GIB, 3),
            "seconds": round(seconds, 1), "loss": float(loss.detach())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True, choices=["SuperCricaVPR", "CricaVPR", "SciceVPR", "student"],
                    help="the stage-1 model trained, or 'student' (stage 2: SciceVPR distilled from Super-CricaVPR)")
    ap.add_argument("--preset", required=True)
    ap.add_argument("--batches", default="8x4,16x4", help="P x K batches, smaller first (default 8x4,16x4)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the backbone blocks")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--max-gib", type=float, default=6.0, help="skip a batch predicted to need more (default 6)")
    ap.add_argument("--out", help="append the results as JSON lines to this file")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one "PxK" in this process
    args = ap.parse_args()
    if args.one:
        P, K = map(int, args.one.split("x"))
        print(json.dumps(measure_one(args.stage, args.preset, P, K, args.checkpointing, args.amp)))
        return
    results: list[dict] = []
    for batch in args.batches.split(","):
        P, K = map(int, batch.split("x"))
        if results:
            r = results[-1]
            per_image = r["step_gib"] / r["images"]  # an upper bound from one point (base >= 0)
            predicted = r["rss_before_gib"] + per_image * P * K
            if predicted > args.max_gib:
                print(f"skip {batch}: about {predicted:.1f} GiB predicted > --max-gib {args.max_gib}", file=sys.stderr)
                continue
        cmd = [sys.executable, __file__, "--stage", args.stage, "--preset", args.preset, "--one", batch]
        cmd += ["--checkpointing"] * args.checkpointing + ["--amp"] * args.amp
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        per_image = (b["step_gib"] - a["step_gib"]) / (b["images"] - a["images"])
        base = a["step_gib"] - per_image * a["images"]
        print(f"fit: step = {base:.3f} GiB + {per_image * 1024:.1f} MiB x images "
              f"({base + per_image * 288:.1f} GiB at 72 x 4)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
