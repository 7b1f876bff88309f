"""What a training process needs besides the model: the process group that ``torchrun``
describes, the device, the global batch across ranks, and the random generators' state (seeded,
saved in a checkpoint, restored on resume). Used by both training stages (:mod:`scicevpr.train`)
and by the backbone's pretraining (:mod:`scicevpr.offline.pretrain`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

# --------------------------------------------------------------------------------------------
# Processes and devices
# --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in the process group (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False  # this module initialised the process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL on CUDA, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return Dist()
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created)


def resolve_device(requested: str) -> torch.device:
    """``"auto"`` (CUDA when there is one), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> the device
    to run on; under ``torchrun`` a bare ``"cuda"`` is this rank's GPU (``LOCAL_RANK``), made current."""
    name = requested
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # torch's message lists every backend it knows, not the fix
        raise ValueError(f"device={requested!r} is not a device; use 'auto' (CUDA when there is one), 'cpu', "
                         f"'cuda' or 'cuda:N'.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={requested!r} but CUDA is not available; use device='cpu'.")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) per-rank share -> (N * b, ...) global batch in rank order, with gradient
    (the backward sums every rank's gradient for this rank's share). Identity without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if x.requires_grad:
        return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def is_main_process() -> bool:
    """True outside DDP and on rank 0, also after a run has closed its process group (a
    ``torchrun`` launch names each process's rank in ``RANK``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------------------------
# Random generators
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": _numpy_rng_state(),
        "python": random.getstate(),
    }


def _numpy_rng_state() -> tuple:
    """NumPy's global RNG state in plain types (a checkpoint holds no NumPy objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return (str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(gauss))


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
