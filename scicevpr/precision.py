"""Numerical precision: the one place that decides when bf16 autocast is used (and on which
device: :func:`model_device`).

Policy (``amp=None``, "auto"):

* **CUDA**: bf16 autocast where the GPU supports bf16 (Ampere and newer), else fp32.
* **CPU**: bf16 autocast only where the CPU computes bf16 natively (AMX or AVX512-BF16, e.g.
  Intel Sapphire Rapids and newer). Elsewhere (AVX2-only AMD and Intel, Apple silicon, ...)
  bf16 on the CPU is emulated and much *slower* than fp32: SciceVPR-S at 112 px, batch 16,
  forward pass on an AMD EPYC with AVX2 only: 50.6 images/s in fp32, 6.6 with bf16 autocast.
  So the CPU runs fp32 there.

``amp=True`` asks for bf16 and gets it on CUDA and on a CPU with native bf16; on a CPU without
it the request is refused with a warning and fp32 is used (never a 7x slowdown by surprise).
``amp=False`` is fp32 everywhere.

Every autocast of the package's training and evaluation goes through :func:`autocast`, so
that this policy holds on every code path (a test patches :func:`cpu_has_native_bf16` and
checks that no CPU path enables bf16 without it).
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from functools import lru_cache

import torch

# CPU feature flags (Linux /proc/cpuinfo names) that make bf16 matrix products native.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")

# Environment that limits the fp32 kernels to AVX2 on every x86-64 CPU: ATen's vectorised ops,
# oneDNN (convolutions, bf16 matmul), MKL (fp32 GEMM, conditional numerical reproducibility) and
# FAISS's distance code (which otherwise takes AVX-512 where it can: on an Intel Xeon with AMX its
# AVX512_SPR level ranked the hue-histogram baseline's neighbours differently, R@10 44.8 against
# 44.4). Read by the libraries when they first run, so it must be set before the Python process
# starts (the Makefile exports it for `make test`, `make demo` and `make lab`; `scicevpr demo`
# passes it to the notebook kernels). On the two AMD kinds (AVX2 only; Zen 4 with AVX-512) it
# reproduces the stored notebook outputs bit for bit; on an Intel Xeon with AMX not all of them:
# MKL's AVX2 GEMM rounds some products differently there and training ends a last bit apart, so
# `make test` compares the notebooks that train within a stated tolerance (docs/precision.md).
# On an AMD EPYC with AVX-512 (Zen 4) the fp32 forward of SciceVPR-S at 112 px ran at 46 images/s
# pinned and 45 unpinned: fp32 loses nothing; only bf16 becomes emulated, so :func:`resolve_amp`
# then chooses fp32.
PINNED_CPU_KERNELS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "MKL_CBWR": "AVX2",
    "FAISS_SIMD_LEVEL": "AVX2",
}


@lru_cache(maxsize=None)
def _cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _isa_capped_below_bf16() -> bool:
    """True when oneDNN / ATen were told to use only AVX2 kernels (see :data:`PINNED_CPU_KERNELS`):
    bf16 is then emulated whatever the CPU can do."""
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    return onednn in {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2"} or aten in {"default", "avx2"}


@lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16), with kernels allowed to use it."""
    if _isa_capped_below_bf16():
        return False
    probes = []
    cpu = getattr(torch._C, "_cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, name, None)
        if fn is not None:
            try:
                probes.append(bool(fn()))
            except RuntimeError:
                pass
    if probes:
        return any(probes)
    return any(flag in _cpuinfo_flags() for flag in NATIVE_BF16_FLAGS)


def cpu_kernels_pinned() -> bool:
    """Whether this process runs with :data:`PINNED_CPU_KERNELS` (the same fp32 arithmetic on
    every x86-64 CPU kind)."""
    return all(os.environ.get(k, "").upper() == v.upper() for k, v in PINNED_CPU_KERNELS.items())


def cpu_kind() -> str:
    """A short name of the CPU's vector capability as torch uses it, e.g. ``"AVX2"``,
    ``"AVX512"``, with ``"+AMX"`` / ``"+AVX512-BF16"`` where bf16 is native."""
    kind = torch.backends.cpu.get_cpu_capability()
    flags = _cpuinfo_flags()
    if _isa_capped_below_bf16():
        return f"{kind}, kernels pinned"
    if "amx_bf16" in flags:
        kind += "+AMX"
    elif "avx512_bf16" in flags:
        kind += "+AVX512-BF16"
    return kind


def resolve_amp(device: torch.device | str, amp: bool | None = None) -> bool:
    """Whether bf16 autocast is used on ``device`` for the request ``amp`` (None: auto).

    The only function that turns a request into a decision (module docstring).
    """
    device = torch.device(device)
    if amp is False:
        return False
    if device.type == "cuda":
        if amp is None and torch.cuda.is_available():
            return bool(torch.cuda.is_bf16_supported())  # False before Ampere
        return True
    if device.type == "cpu":
        native = cpu_has_native_bf16()
        if amp and not native:
            warnings.warn(
                f"bf16 autocast was requested on a CPU without native bf16 ({cpu_kind()}): it would be emulated "
                "and about 7x slower than fp32 here, so fp32 is used. Pass amp=False (--amp false) to silence this.",
                stacklevel=2,
            )
        return native
    return bool(amp)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters are on: where its inputs go and its autocast runs."""
    return next(model.parameters()).device


def autocast(device: torch.device | str, amp: bool):
    """bf16 autocast on ``device`` when ``amp`` (already resolved by :func:`resolve_amp`),
    else a no-op context. Refuses bf16 on a CPU without native bf16."""
    device = torch.device(device)
    if not amp:
        return nullcontext()
    if device.type == "cpu" and not cpu_has_native_bf16():
        raise RuntimeError(
            f"bf16 autocast on a CPU without native bf16 ({cpu_kind()}); resolve the request with "
            "scicevpr.precision.resolve_amp first."
        )
    return torch.autocast(device.type, dtype=torch.bfloat16)


def describe(device: torch.device | str, amp: bool) -> str:
    """One line for banners and logs, e.g. ``"fp32 (CPU AVX2: bf16 not native)"``."""
    device = torch.device(device)
    if device.type == "cpu":
        native = "bf16 native" if cpu_has_native_bf16() else "bf16 not native"
        return f"{'bf16 autocast' if amp else 'fp32'} (CPU {cpu_kind()}: {native})"
    return "bf16 autocast" if amp else "fp32"
