"""The memory a training step needs, and the check made before a training starts.

A training step holds the batch, the autograd graph of the forward pass, the gradients and
Adam's state. For CricaVPR the graph runs through the whole backbone (its adapters train inside
every block), about 160 MiB per image at 224 px on ViT-B/14 in fp32: the paper's batch of
P x K = 72 x 4 needs about 45 GiB, more than a 24 GB machine has. Super-CricaVPR and SciceVPR
keep their backbone frozen (no graph through it), so theirs is small.

Before a run trains, :func:`scicevpr.train.fit` asks :func:`plan_training_memory` with the
measured line of :data:`TRAINING_MEMORY` for its model, preset and batch, and the memory the
device has free (:func:`available_memory`):

- ``activation_checkpointing=None`` (the default): the backbone's blocks are checkpointed
  (:meth:`scicevpr.models.VPRModel.set_activation_checkpointing`) exactly when the batch does
  not fit without and fits with it; the same descriptors, losses and gradients, for one more
  forward pass through the backbone.
- When it does not fit either way (or with the setting forced), the run stops before anything
  is written, with one message naming the need, what the device has, and the choices.

The choice and the estimate are recorded in the run's ``config.json``
(``activation_checkpointing``, ``memory``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 2**30
MIB = 2**20
# The share of the free memory a training may plan to use (the rest: allocator slack, the
# validation pass, what other processes start meanwhile).
HEADROOM = 0.9
MEASURED_IMAGE_SIZE = 224  # the image side of every row of TRAINING_MEMORY
LOADER_PREFETCH = 2  # batches each DataLoader worker holds ready (torch's prefetch_factor)


@dataclass(frozen=True)
class StepMemory:
    """What one training step adds to the memory of a process that holds the built model:
    ``need(B) = base + per_image * B`` for ``B`` images per process and step, in bytes."""

    base: float
    per_image: float

    def need(self, images: int) -> int:
        return int(math.ceil(self.base + self.per_image * images))

    def max_images(self, budget: float) -> int:
        """The most images per step within ``budget`` bytes (0 when not even one fits)."""
        return max(0, int((budget - self.base) // self.per_image)) if self.per_image > 0 else 0

    def scaled(self, factor: float, extra_per_image: float = 0.0) -> "StepMemory":
        """Per-image bytes times ``factor`` (another image size), plus ``extra_per_image``."""
        return StepMemory(self.base, self.per_image * factor + extra_per_image)


def _row(base_gib: float, per_image_mib: float) -> StepMemory:
    return StepMemory(base_gib * GIB, per_image_mib * MIB)


# Measured with benchmarks/train_memory.py (benchmarks/README.md, "Training memory"): random
# DINOv2 weights, 224 px, fp32, one step (batch, forward, backward, Adam step) per fresh process
# on the CPU (torch 2.14, one thread under `nice`, kernels pinned to AVX2, on a shared 2-core
# AMD EPYC with a load of about 9), its peak resident set minus the resident set before the
# batch. The paper's 72 x 4 = 288 images lie far beyond the 4-64 images measured: the lines are
# extrapolated linearly in the batch, as activations grow. Key: (what trains: a stage-1 model
# name or "student" for stage 2, the preset, activation checkpointing of the backbone blocks).
#
# - CricaVPR-B, plain: 8 and 16 images, 1.32 and 2.57 GiB (glibc's default allocator, whose
#   freed heap chunks stay resident at small batches: if anything, an overestimate).
# - CricaVPR-B, checkpointed: ONE point, 4 images, 0.185 GiB with MALLOC_MMAP_THRESHOLD_=131072
#   (the large batch's allocation behaviour, see train_memory.py); the base taken from the plain
#   line. The tensors the graph keeps were 26 MiB per image. Rerun on a quiet machine to confirm:
#   `train_memory.py --stage CricaVPR --preset CricaVPR --batches 4x4,8x4 --checkpointing`.
# - SciceVPR-B teacher (Super-CricaVPR): 32 and 64 images, 0.63 and 1.17 GiB (default allocator).
#   Its backbone is frozen and keeps no graph; the fusion (the 1x1 conv's 3072-channel input, the
#   token mixers) holds most of it. The student (stage 2) is taken to need the teacher's line (its
#   heads are smaller and the teacher runs without a graph; not measured).
# A GPU holds the same tensors (its allocator's overhead differs); bf16 autocast stores most
# activations in half the bytes: these fp32 figures are an upper bound for it (not measured).
TRAINING_MEMORY: dict[tuple[str, str, bool], StepMemory] = {
    ("CricaVPR", "CricaVPR", False): _row(0.070, 159.9),
    ("CricaVPR", "CricaVPR", True): _row(0.070, 29.4),
    ("SuperCricaVPR", "SciceVPR-B", False): _row(0.083, 17.4),
}

# What trains -> the row it shares where it has none of its own: stage-1 SciceVPR (the ablation
# without distillation) is the teacher's pipeline with a 1-layer encoder, needing a little less;
# the student's step (stage 2) likewise, with the teacher's heads run without a graph.
_SAME_AS = {"SciceVPR": "SuperCricaVPR", "student": "SuperCricaVPR"}


def step_memory(what: str, preset: str, checkpointing: bool, image_size: int = MEASURED_IMAGE_SIZE,
                patch_size: int = 14) -> StepMemory | None:
    """The measured line for training ``what`` (a stage-1 model name, or ``"student"``) on
    ``preset`` with or without checkpointing, at ``image_size`` (per-image bytes scaled with the
    number of tokens, ``1 + (S/p)^2``); None when the table has no row for it."""
    row = TRAINING_MEMORY.get((_SAME_AS.get(what, what), preset, checkpointing))
    if row is None:
        return None
    tokens = 1 + (image_size // patch_size) ** 2
    return row.scaled(tokens / (1 + (MEASURED_IMAGE_SIZE // patch_size) ** 2))


def available_memory(device: Any) -> int | None:
    """Bytes the device has free now: a GPU's free memory (``torch.cuda.mem_get_info``), or on the
    CPU ``MemAvailable`` of ``/proc/meminfo``, lowered to what a cgroup memory limit leaves;
    None where neither can be read."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    free = _meminfo_available()
    limit = _cgroup_free()
    if free is None:
        return limit
    return free if limit is None else min(free, limit)


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _cgroup_free(root: str = "/sys/fs/cgroup") -> int | None:
    """A cgroup v2 memory limit minus the group's use (None without a limit)."""
    try:
        limit = Path(root, "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path(root, "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


class InsufficientMemoryError(MemoryError):
    """A training whose estimated need exceeds what the device has; raised before it starts."""


@dataclass(frozen=True)
class MemoryPlan:
    """The memory check's outcome: whether to checkpoint, and the numbers it rests on (bytes;
    None where the table has no row or the device's memory is unknown: not checked)."""

    checkpointing: bool
    need: int | None = None
    available: int | None = None

    def record(self) -> dict[str, Any]:
        """For ``config.json``."""
        gib = (lambda b: None if b is None else round(b / GIB, 2))
        return {"need_gib": gib(self.need), "available_gib": gib(self.available), "headroom": HEADROOM,
                "source": "scicevpr.memory.TRAINING_MEMORY (measured, extrapolated in the batch)"
                if self.need is not None else "not checked (no measured row for this model, or memory unknown)"}


def plan_training_memory(plain: StepMemory | None, checkpointed: StepMemory | None, P: int, K: int,
                         available: int | None, requested: bool | None = None, what: str = "this training",
                         device: str = "the device", processes: int = 1) -> MemoryPlan:
    """Decide activation checkpointing and check the memory of a training step.

    Args:
        plain, checkpointed: the step's memory without and with checkpointing of the backbone
            blocks (:func:`step_memory`); None where not measured (then nothing is checked).
        P, K: places and images per place of the global batch; each of ``processes`` processes
            holds ``P * K / processes`` images.
        available: the device's free bytes (:func:`available_memory`); None: not checked.
        requested: ``TrainConfig.activation_checkpointing``: None chooses (on only when the
            batch fits with it and not without), True / False force it.
        what, device: named in the error.

    Returns the :class:`MemoryPlan`. Raises :class:`InsufficientMemoryError` naming the need, what
    the device has and the choices (a smaller P x K, checkpointing, bf16) when the chosen setting
    needs more than ``HEADROOM`` of ``available``.
    """
    images = P * K // processes
    row = checkpointed if requested else plain
    if row is None or available is None:
        return MemoryPlan(bool(requested))
    budget = available * HEADROOM
    if requested is None and row.need(images) > budget and checkpointed is not None and checkpointed.need(images) <= budget:
        row, requested = checkpointed, True
    need = row.need(images)
    if need <= budget:
        return MemoryPlan(bool(requested), need, available)
    choices = []
    fit_p = row.max_images(budget) * processes // K
    choices.append(f"a smaller batch: places_per_batch (P) <= {fit_p} with K = {K} fits" if fit_p >= 2 else
                   f"a smaller batch does not fit either (P = 2 places of K = {K} need about "
                   f"{row.need(2 * K // processes) / GIB:.1f} GiB)")
    if not requested and checkpointed is not None and checkpointed != plain:
        ck = checkpointed.need(images)
        fit_ck = checkpointed.max_images(budget) * processes // K
        choices.append(f"activation checkpointing of the backbone blocks (activation_checkpointing=True, "
                       f"--activation-checkpointing true): about {ck / GIB:.1f} GiB"
                       + ("" if fit_ck >= 2 else ", which does not fit either")
                       + (f", and with it P <= {fit_ck}" if 2 <= fit_ck < P else ""))
    choices.append("bf16 autocast (amp=True) on a device that computes bf16 natively: activations in half "
                   "the bytes, less than this fp32 estimate")
    raise InsufficientMemoryError(
        f"{what} on P x K = {P} x {K} images per step"
        + (f" ({images} per process)" if processes > 1 else "")
        + f" needs about {need / GIB:.1f} GiB (scicevpr.memory.TRAINING_MEMORY, measured and extrapolated in "
        f"the batch), but {device} has {available / GIB:.1f} GiB free ({HEADROOM:.0%} of it may be planned). "
        f"Choices: " + "; ".join(choices) + ". Nothing of this run was trained or written; runs already "
        f"finished are kept."
    )
