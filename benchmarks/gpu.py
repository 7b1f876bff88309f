"""GPU throughput and agreement of scicevpr's fast path against the fp32 reference path.

One run measures, on one GPU:

1. descriptors from tensors already on the GPU (SciceVPR-B, 224 px): the reference path (fp32,
   eager, plain "math" attention, batch 128, as the authors run it) and the fast path (bf16
   autocast, fused SDPA attention, ``torch.compile`` of the per-image part); images/s, peak
   memory, and the minimum cosine between fast and fp32 descriptors;
2. JPEG files on disk -> descriptors (reading in DataLoader workers, batched nvJPEG decoding),
   fast path;
3. one stage-2 distillation step (72 places x 4 images): reference (fp32, the backbone run
   twice, once for the teacher and once for the student, as the official code does) and fast
   (one shared backbone pass, bf16); images/s, and the loss curves of a few steps of both paths
   from the same initial weights on the same synthetic batches;
4. Recall@1/5/10 on the synthetic benchmark through ``evaluate`` with ``fast=False`` and
   ``fast=True``.

Weights are random (DINOv2 weights cannot be downloaded where this runs); throughput does not
depend on them. The table is printed and written as Markdown (``--out``).

    python benchmarks/gpu.py --out benchmarks/RESULTS.md            # on a GPU machine, ~5 min
    python benchmarks/gpu.py --device cpu --quick --out /tmp/r.md   # check the script on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scicevpr  # noqa: E402
from scicevpr.config import EvalConfig
from scicevpr.evaluate import compute_descriptors, evaluate, per_image_function
from scicevpr.config import LossConfig
from scicevpr.precision import autocast  # noqa: E402
from scicevpr.train import DistillationStep  # noqa: E402

warnings.filterwarnings("ignore", category=scicevpr.RandomWeightsWarning)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def reference_context():
    """fp32 eager with plain (math) attention, as the authors' code runs."""
    return sdpa_kernel([SDPBackend.MATH])


def descriptors_benchmark(args, device, rows):
    torch.manual_seed(0)
    model = scicevpr.SciceVPR(args.preset, weights=None, image_size=args.image_size).to(device).eval()
    n = args.agree_images
    x_all = torch.randn(n, 3, args.image_size, args.image_size, device=device)
    # reference descriptors for the agreement check
    with torch.no_grad(), reference_context():
        ref = torch.cat([model(x_all[i : i + args.ref_batch]) for i in range(0, n, args.ref_batch)])

    x_ref = torch.randn(args.ref_batch, 3, args.image_size, args.image_size, device=device)
    reset_peak(device)
    with torch.no_grad(), reference_context():
        t = timed(lambda: model(x_ref), device, args.warmup, args.iters)
    ref_ips = args.ref_batch / t
    rows.append(("descriptors, reference (fp32, eager, math attention)", args.ref_batch, ref_ips, 1.0, peak_mb(device), 1.0))

    cfg = EvalConfig(batch_size=args.fast_batch, fast=True)
    features = per_image_function(model, cfg, device)
    def fast_forward(x):
        with autocast(device, True):
            return model.encode(features(x))

    x_fast = torch.randn(args.fast_batch, 3, args.image_size, args.image_size, device=device)
    with torch.no_grad():
        fast = torch.cat([fast_forward(x_all[i : i + args.fast_batch]) for i in range(0, n, args.fast_batch)])
        cos = F.cosine_similarity(fast.float(), ref.float(), dim=1).min().item()
        reset_peak(device)
        t = timed(lambda: fast_forward(x_fast), device, args.warmup, args.iters)
    fast_ips = args.fast_batch / t
    compiled = "compiled" if device.type == "cuda" else "eager (no compile off CUDA)"
    rows.append((f"descriptors, fast (bf16, SDPA, {compiled})", args.fast_batch, fast_ips, fast_ips / ref_ips, peak_mb(device), cos))
    return model


def jpeg_benchmark(args, device, model, rows):
    from PIL import Image

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        base = rng.integers(0, 255, size=(60, 80, 3), dtype=np.uint8)
        for i in range(args.jpeg_images):
            img = np.roll(base, i, axis=1)
            p = Path(tmp) / f"@{i:.2f}@0.00@.jpg"
            Image.fromarray(img).resize((640, 480), Image.BILINEAR).save(p, quality=90)
            paths.append(p)
        cfg = EvalConfig(batch_size=args.fast_batch, fast=True, num_workers=args.workers, progress=False)
        compute_descriptors(model, paths[: args.fast_batch * 2], cfg)  # warm up (compile, workers)
        sync(device)
        t0 = time.perf_counter()
        compute_descriptors(model, paths, cfg)
        sync(device)
        ips = len(paths) / (time.perf_counter() - t0)
    rows.append((f"JPEG 640x480 files -> descriptors, fast, {args.workers} workers", args.fast_batch, ips, float("nan"), float("nan"), float("nan")))


def distillation_benchmark(args, device, rows, loss_rows):
    P, K = args.places, 4
    S = args.image_size
    torch.manual_seed(0)
    teacher = scicevpr.SuperCricaVPR(args.preset, weights=None, image_size=S).to(device).eval()
    student = scicevpr.SciceVPR.from_teacher(teacher)
    init = {k: v.clone() for k, v in student.state_dict().items()}
    labels = torch.arange(P, device=device).repeat_interleave(K)
    gen = torch.Generator(device="cpu").manual_seed(1)
    protos = torch.randn(P, 3, S, S, generator=gen)

    def batch(step):
        g = torch.Generator(device="cpu").manual_seed(100 + step)
        x = protos.repeat_interleave(K, 0) + 0.5 * torch.randn(P * K, 3, S, S, generator=g)
        return x.to(device)

    def make_step():
        student.load_state_dict(init)
        st = DistillationStep(student, teacher, LossConfig()).train()
        opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-4)
        return st, opt

    def reference_step(st, opt, x):
        """The official way: teacher and student each run the whole model on the batch."""
        with reference_context():
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            loss, _, _ = st.objective(s, t, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    def fast_step(st, opt, x):
        with autocast(device, True):
            loss, _ = st(x, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    results = {}
    for name, fn in (("reference", reference_step), ("fast", fast_step)):
        torch.manual_seed(0)
        st, opt = make_step()
        losses = [fn(st, opt, batch(i)).item() for i in range(args.loss_steps)]
        loss_rows.append((name, losses))
        x = batch(0)
        reset_peak(device)
        t = timed(lambda: fn(st, opt, x), device, 1, args.train_iters)
        results[name] = (P * K / t, peak_mb(device))
    ref_ips = results["reference"][0]
    rows.append(("stage-2 step, reference (fp32, backbone twice)", P * K, ref_ips, 1.0, results["reference"][1], float("nan")))
    rows.append(("stage-2 step, fast (bf16, one shared backbone pass)", P * K, results["fast"][0],
                 results["fast"][0] / ref_ips, results["fast"][1], float("nan")))


def recall_benchmark(args, device, recall_rows):
    from scicevpr.offline.synthetic import generate
    from scicevpr.data.vg import load_vg_split

    bench = generate(Path(args.data) / args.synthetic, preset=args.synthetic, seed=0, progress=False)
    split = load_vg_split(bench.vg_root, bench.dataset, "test")
    torch.manual_seed(0)
    model = scicevpr.SciceVPR(args.preset, weights=None, image_size=args.image_size).to(device).eval()
    for fast in (False, True):
        cfg = EvalConfig(fast=fast, num_workers=args.workers, progress=False)
        ctx = reference_context() if not fast else contextlib.nullcontext()
        with ctx:
            r = evaluate(model, split, cfg).recalls
        recall_rows.append(("fast" if fast else "reference", r))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="SciceVPR-B")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--ref-batch", type=int, default=128)
    p.add_argument("--fast-batch", type=int, default=256)
    p.add_argument("--agree-images", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--jpeg-images", type=int, default=4096)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--places", type=int, default=72)
    p.add_argument("--loss-steps", type=int, default=10)
    p.add_argument("--train-iters", type=int, default=5)
    p.add_argument("--data", default="data")
    p.add_argument("--synthetic", default="small")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script itself")
    p.add_argument("--skip", default="", help="comma list of: descriptors,jpeg,train,recall")
    p.add_argument("--out", help="write the Markdown table here")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.image_size, args.ref_batch, args.fast_batch = "SciceVPR-S", 112, 4, 8
        args.agree_images, args.warmup, args.iters, args.jpeg_images = 8, 1, 1, 16
        args.workers, args.places, args.loss_steps, args.train_iters, args.synthetic = 0, 4, 2, 1, "tiny"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
        torch.backends.cudnn.allow_tf32 = False
    skip = set(args.skip.split(",")) - {""}
    rows, loss_rows, recall_rows = [], [], []
    model = None
    t0 = time.perf_counter()

    def progress(part: str, first_row: int) -> None:
        """Each measurement as soon as it is made: a run stopped later still leaves them."""
        for name, b, ips, sp, mem, cos in rows[first_row:]:
            print(f"[{time.perf_counter() - t0:6.1f} s] {name}: batch {b}, {ips:,.0f} images/s, speed-up {sp:.2f}, "
                  f"peak {mem:,.0f} MiB, min cosine {cos:.6f}", flush=True)
        print(f"[{time.perf_counter() - t0:6.1f} s] {part} done", flush=True)

    if "descriptors" not in skip:
        n = len(rows)
        model = descriptors_benchmark(args, device, rows)
        progress("descriptors", n)
    if "jpeg" not in skip:
        if model is None:
            model = scicevpr.SciceVPR(args.preset, weights=None, image_size=args.image_size).to(device).eval()
        n = len(rows)
        jpeg_benchmark(args, device, model, rows)
        progress("jpeg", n)
    if "train" not in skip:
        n = len(rows)
        distillation_benchmark(args, device, rows, loss_rows)
        progress("train", n)
    if "recall" not in skip:
        recall_benchmark(args, device, recall_rows)
        progress(f"recall {recall_rows}", len(rows))

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [
        f"## {datetime.date.today().isoformat()}: {card}, torch {torch.__version__}, "
        f"{args.preset} at {args.image_size} px, random weights",
        "",
        "| path | batch | images/s | speed-up | peak MiB | min cosine vs fp32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    def fmt(v: float, spec: str, suffix: str = "") -> str:
        return "-" if v != v else f"{v:{spec}}{suffix}"  # NaN -> "-"

    for name, b, ips, sp, mem, cos in rows:
        lines.append(f"| {name} | {b} | {fmt(ips, ',.0f')} | {fmt(sp, '.2f', 'x')} | {fmt(mem, ',.0f')} | {fmt(cos, '.6f')} |")
    if loss_rows:
        lines += ["", "Stage-2 loss L_T over the first steps (same init, same batches):", ""]
        for name, losses in loss_rows:
            lines.append(f"- {name}: " + ", ".join(f"{v:.4f}" for v in losses))
    if recall_rows:
        lines += ["", f"Recall on the synthetic `{args.synthetic}` test split (random backbone):", ""]
        for name, r in recall_rows:
            lines.append(f"- {name}: " + ", ".join(f"R@{k} {v:.2f}" for k, v in r.items()))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
