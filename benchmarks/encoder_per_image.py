"""What SciceVPR's image-by-image encoder costs: the eval forward pass with the encoder run image
by image (``SelfEnhancedEncoder`` in eval mode) against one product over the whole batch (its
training mode, the eval path before 2026-12-08; dropout 0 so that it computes the same), on random
weights, alternating the two.

    python benchmarks/encoder_per_image.py SciceVPR-S 112
    python benchmarks/encoder_per_image.py SciceVPR-B 224 --device cuda

Prints the median forward time and the median time of the encoder alone, per batch size.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import scicevpr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset")
    p.add_argument("image_size", type=int)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, said above
        m = scicevpr.SciceVPR(args.preset, weights=None, seed=0, image_size=args.image_size,
                              encoder_dropout=0.0).to(device).eval()

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    print(f"| {args.preset}, {args.image_size} px, {device} | batch | encoder | forward (ms) | encoder alone (ms) |")
    print("|---|---|---|---|---|")
    for B in args.batch_sizes:
        x = torch.randn(B, 3, args.image_size, args.image_size, device=device)
        times: dict[str, list[tuple[float, float]]] = {"image by image": [], "one product": []}
        with torch.no_grad():
            r = m.regional_features(m.extract_features(x))  # (B, 14, C_mix)
            for _ in range(args.repeats + 1):  # the first round warms up
                for name, one_product in (("image by image", False), ("one product", True)):
                    m.encoder.train(one_product)
                    times[name].append((timed(lambda: m(x)), timed(lambda: m.encode(r))))
        m.encoder.eval()
        for name, t in times.items():
            f = statistics.median(a for a, _ in t[1:]) * 1e3
            e = statistics.median(b for _, b in t[1:]) * 1e3
            print(f"| | {B} | {name} | {f:.1f} | {e:.1f} |")


if __name__ == "__main__":
    main()
