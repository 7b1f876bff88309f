"""Pretraining a compact DINOv2-architecture backbone offline (``scicevpr pretrain-backbone``).

Meta's DINOv2 weights cannot be had offline, and a randomly initialised ViT gives the offline
notebooks features that hardly separate places. This module trains the backbone itself, on
synthetic renders of streets that the benchmark's val and test splits never show
(``scicevpr synth --preset pretrain``; ``scicevpr.offline.synthetic.PRETRAIN_NOTE`` says why they
are disjoint), and exports it as one fp16 state dict in DINOv2's official parameter names that
loads through the ``weights=`` door like Meta's files.

The backbone is :class:`~scicevpr.backbone.DinoVisionTransformer` itself, sized by
:class:`~scicevpr.config.BackboneConfig` (default ``config.OFFLINE_BACKBONE``: ViT-S/14 widths,
4 blocks, position table learned at 112 px). Four objectives, so that they can be measured:

``objective="dino"`` -- self-distillation in DINOv2's spirit (Caron et al. 2021, "DINO";
Zhou et al. 2022, "iBOT"; Oquab et al. 2023, "DINOv2"):

- a student ``g_s`` (backbone + :class:`DINOHead`) and a teacher ``g_t``, the exponential moving
  average of the student: ``theta_t <- m theta_t + (1 - m) theta_s``, ``m`` following a cosine
  from ``momentum`` to ``momentum_end``;
- multi-crop: 2 global crops at ``image_size`` (teacher and student) and ``local_crops`` local
  crops at ``local_size`` (student only); the ViT's position embedding is interpolated to each
  grid;
- the DINO loss between the teacher's CLS distribution on one global crop and the student's on
  every other crop: ``L_DINO = mean_{t != s} H(P_t, P_s)`` with
  ``P_t = softmax((g_t(x) - c) / tau_t)`` (centering ``c``, an EMA of the teacher's batch mean
  with ``center_momentum``; sharpening by a low ``tau_t`` warmed up from ``teacher_temp_warmup``
  to ``teacher_temp``) and ``P_s = softmax(g_s(x) / tau_s)``;
- iBOT's masked-image loss (``ibot_weight``): in a share ``mask_probability`` of the student's
  global crops a ratio in ``mask_ratio`` of the patches is replaced by the backbone's
  ``mask_token``; at those patches the student's patch distribution learns the teacher's on the
  unmasked crop (same head, its own center). Masks are drawn patch by patch rather than in
  DINOv2's blocks: on an 8 x 8 grid a block is one to three patches anyway;
- DINOv2's KoLeo regulariser on the student's global CLS features (``koleo_weight``):
  ``-1/n sum_i log min_{j != i} ||x_i - x_j||`` spreads them over the sphere, within each global
  view (two crops of one image are not each other's neighbours). ``koleo_weight`` multiplies the
  *mean* of the two views' terms, where DINOv2 sums them: 0.1 here is DINOv2's 0.05 (kept so that
  the settings recorded by earlier runs, the shipped backbone's first step among them, keep
  their meaning);
- AdamW; the learning rate warms up linearly over ``warmup_fraction`` of the steps and then
  follows a cosine to ``min_lr``; the weight decay a cosine from ``weight_decay`` to
  ``weight_decay_end`` (biases and norms none); gradients clipped to ``clip_grad``.

Left out of DINOv2's recipe (a 4-block ViT trained for minutes, not a ViT-g for days): LayerScale
starts at 1.0 (``BackboneConfig.layerscale_init``, the value Meta's released hub models are built
with; DINOv2 trains from 1e-5), and there is no stochastic depth (drop-path), no layer-wise
learning-rate decay or patch-embedding lr multiplier, and the head's last layer is not frozen
during the first epoch.

The teacher is exported: DINO's teacher is the better model throughout training (Caron et al.
2021, Sec. 5.2) and it is the one the DINO and DINOv2 releases hold.

``objective="supervised"`` -- a fallback: the same backbone trained with ``L_MS``
(:class:`~scicevpr.losses.MultiSimilarityLoss`) on P x K place batches of a GSV-Cities-layout
folder (:class:`~scicevpr.data.gsv.GSVCitiesDataset` and :class:`~scicevpr.train.PlaceBatchSampler`),
a descriptor being the L2-normalised mean (or GeM, or CLS) of the last block's tokens after the
final norm. Same optimiser and schedules; no teacher; the trained backbone is exported.

``objective="distil"`` -- the ViT learns the features of a small convolutional network trained
with ``L_MS`` (:class:`LayoutCNN`, ``objective="cnn"``), as DeiT (Touvron et al. 2021) taught ViTs
from a convnet's outputs when images are few. Both see the same random crop
of a source image (no labels are used), the ViT at ``image_size`` and the frozen network at
``distil_size``; with 112 and 64 px both grids are 8 x 8, cell for cell. Two linear heads, dropped
at export, carry the ViT's tokens to the network's spaces:
``L_dense = mean_{b, i} (1 - cos(W_p z_{b,i}, f_{b,i}))`` over the patch tokens ``z_{b,i}`` and
the network's last feature map ``f`` (pooled to the ViT's grid, standardised per channel over the
batch), and ``L_cls = mean_b (1 - cos(W_c z_{b,cls}, d_b))`` with its place descriptor ``d``
(centred over the batch); ``L = L_dense + L_cls``. Every patch token gets a target, where
``L_MS`` gives one signal per image.

``objective="cnn"`` -- no ViT: the teacher of ``"distil"`` itself, :class:`LayoutCNN` trained from
scratch with ``L_MS`` on P x K place batches as the supervised objective is (one random resized
crop per image at ``distil_size`` pixels, from pixels in [0, 1]; batch norm statistics per rank
under DDP). On the synthetic streets this network learns places that the ViT's own ``L_MS``
fine-tunes do not (``scicevpr/weights/README.md``). Its export is the network's state dict.

Data path: every image is decoded once (DataLoader workers, tqdm bar) into an in-memory uint8
tensor of ``cache_size`` pixels a side, kept on the training device (20,000 images at 160 px are
1.5 GB). Crops, flips, colour jitter, grey, blur and solarisation then run batched on that
device (:class:`MultiCropAugment`), so a GPU is never waiting for image decoding on the CPU.
All randomness of a step (which images, crops, colours, masks) is drawn from a generator seeded by
``(seed, step)``: the run is a function of its configuration, and the N ranks of a ``torchrun``
launch draw the global batch's parameters and take their share, as one process would.

Monitoring: with ``val_root`` set, every ``val_every`` steps (and at steps 0 and the last) the
exported model's last-block features retrieve the places of a VG-layout split, the benchmark's
``val`` by default (the test split stays unseen): Recall@1/5 of the L2-normalised mean of the
patch tokens (``R@1``, ``R@5``) and of the CLS token (``R@1_cls``). A collapsed DINO shows there
at once, and the objectives can be compared while they run. The supervised and distil objectives
also score the descriptor they train (``R@1_desc``, ``R@5_desc``: e.g. the regional GeMs, which a
mean over the tokens cannot show); ``"cnn"`` scores only its network's descriptor.

A run folder holds ``config.json``, ``log.csv`` (step, losses, lr, weight decay, momentum, teacher
temperature, images/s, recalls) and ``last.pt`` (student, teacher, centers, optimizer, RNG states, step),
written atomically every ``checkpoint_every`` steps or ``checkpoint_minutes``, whichever comes
first, and when the run ends or its time budget
``max_minutes`` is spent (it stops at a step boundary). ``resume=True`` continues and gives the
same weights as an uninterrupted run. :func:`export_backbone` writes the weight file and its
manifest.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import roi_align
from tqdm.auto import tqdm

from ..backbone import DinoVisionTransformer, build_backbone
from ..config import BackboneConfig
from .config import PLACE_OBJECTIVES, PretrainConfig
from ..data.decode import load_rgb
from ..data.gsv import GSVCitiesDataset
from ..data.transforms import normalize_uint8_batch, normalize_unit, resize_uint8, to_uint8_tensor
from ..files import (
    append_csv_row,
    atomic_write_text,
    holds_files,
    load_torch_file,
    lock_run_dir,
    read_run_config,
    resume_csv_log,
    save_torch_file,
    start_csv_log,
)
from ..losses import MultiSimilarityLoss
from ..pooling import MultiRegionGeM
from ..precision import autocast, describe, resolve_amp
from ..runtime import Dist, gather_batch, resolve_device, rng_state, set_rng_state, setup_distributed
from ..train import PlaceBatchSampler, refuse_config_changes
from ..weights import MANIFEST_FORMAT, check_manifest, file_sha256, load_weights, manifest_path, resolve_weights

PathLike = str | os.PathLike
GRID, GRID_DIM = (2, 4), 512  # pooling="grid": (rows, columns) of the token grid's cells, and the projection's width

CHECKPOINT_FORMAT = "scicevpr-pretrain"
CHECKPOINT_VERSION = 1
CNN_MANIFEST_FORMAT = "scicevpr-layout-cnn"  # the "format" entry of an exported LayoutCNN's manifest
# PretrainConfig fields that may differ when a run is resumed (they do not change its result).
RESUMABLE_CHANGES = ("resume", "max_minutes", "stop_at_step", "num_workers", "progress", "device",
                     "checkpoint_every", "checkpoint_minutes", "log_every", "val_root", "val_dataset", "val_split", "val_every")
LOG_COLUMNS = ("step", "loss", "loss_dino", "loss_ibot", "loss_koleo", "loss_ms", "loss_dense", "loss_cls", "lr",
               "weight_decay", "momentum", "teacher_temp", "images_per_s", "elapsed_s", "R@1", "R@5", "R@1_cls",
               "R@1_desc", "R@5_desc")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Schedules (pure functions of the step: nothing to store but the step)
# --------------------------------------------------------------------------------------------


def cosine(start: float, end: float, step: int, total: int) -> float:
    """``end + (start - end) (1 + cos(pi t)) / 2`` with ``t = step / total`` clipped to [0, 1]."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def schedule(config: PretrainConfig, step: int, steps: int) -> dict[str, float]:
    """lr, weight decay, EMA momentum and teacher temperature at ``step`` of ``steps``."""
    warm = int(round(config.warmup_fraction * steps))
    if step < warm:
        lr = config.lr * (step + 1) / warm
    else:
        lr = cosine(config.lr, config.min_lr, step - warm, steps - warm)
    t_warm = int(round(config.teacher_temp_warmup_fraction * steps))
    if step < t_warm:
        temp = config.teacher_temp_warmup + (config.teacher_temp - config.teacher_temp_warmup) * step / t_warm
    else:
        temp = config.teacher_temp
    return {
        "lr": lr,
        "weight_decay": cosine(config.weight_decay, config.weight_decay_end, step, steps),
        "momentum": cosine(config.momentum, config.momentum_end, step, steps),
        "teacher_temp": temp,
    }


# --------------------------------------------------------------------------------------------
# Data: decode once into memory, augment in batches on the device
# --------------------------------------------------------------------------------------------


def resolve_data_root(data: PathLike | None) -> tuple[Path, dict[str, Any]]:
    """The GSV-Cities folder under ``data`` and what the synthetic generator recorded about it
    (preset, seed) when it made it ({} otherwise)."""
    if data is None:
        raise ValueError(
            "no pretraining data: set data= (--data) to a folder made by `scicevpr synth --preset pretrain "
            "--seed 1 --splits train --out <folder>`, or to any GSV-Cities-layout folder."
        )
    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"pretraining data folder {str(root)!r} does not exist. Generate it with `scicevpr synth --preset pretrain "
            f"--seed 1 --splits train --out {root}`, or point data= at a GSV-Cities-layout folder."
        )
    gsv = root / "gsv_cities" if (root / "gsv_cities").is_dir() else root
    info: dict[str, Any] = {"root": str(root.resolve())}
    for folder in (gsv, gsv.parent):
        m = folder / "manifest.json"
        if m.is_file():
            try:
                found = json.loads(m.read_text())
            except ValueError:
                continue
            if found.get("generator") == "scicevpr.offline.synthetic":
                info.update(generator=found["generator"], preset=found.get("preset", {}).get("name"),
                            seed=found.get("seed"), format_version=found.get("format_version"))
                break
    return gsv, info


class _DecodeDataset(Dataset):
    """Item i: image i as a (3, S, S) uint8 tensor, hard-resized (antialiased) to S."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = to_uint8_tensor(load_rgb(self.paths[i])).unsqueeze(0)  # (1, 3, H, W)
        return resize_uint8(x, self.size)[0]  # (3, S, S)


def load_image_cache(paths: list[Path], size: int, num_workers: int = 4, progress: bool = True) -> torch.Tensor:
    """Decode every image once: (N, 3, size, size) uint8 on the CPU (``N * 3 * size^2`` bytes)."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    loader = DataLoader(_DecodeDataset(paths, size), batch_size=64, num_workers=num_workers, shuffle=False)
    i = 0
    for batch in tqdm(loader, desc=f"decoding {len(paths)} images at {size} px", disable=not progress, leave=False):
        out[i : i + len(batch)] = batch
        i += len(batch)
    return out


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


@dataclass(frozen=True)
class CropSpec:
    """How one kind of view is made (DINO's ``DataAugmentationDINO``, sizes relative to 224 px)."""

    size: int  # output side
    scale: tuple[float, float]  # area range of the random resized crop
    flip: float = 0.5  # probabilities ...
    jitter: float = 0.8  # colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1)
    gray: float = 0.2
    blur: float = 0.0  # Gaussian blur, sigma in [0.1, 2] px at 224 px, scaled to ``size``
    solarize: float = 0.0


def view_specs(config: PretrainConfig) -> tuple[tuple[CropSpec, CropSpec], CropSpec, CropSpec]:
    """The views of a run: DINO's two global crops and its local crop, and the supervised crop.
    ``config.colour_augment=False`` turns off colour jitter, grey and solarisation in all of them."""
    specs = (
        CropSpec(config.image_size, config.global_scale, blur=1.0),
        CropSpec(config.image_size, config.global_scale, blur=0.1, solarize=0.2),
        CropSpec(config.local_size, config.local_scale, blur=0.5),
        CropSpec(config.image_size, config.supervised_scale, flip=0.0, gray=0.0),
    )
    if not config.colour_augment:
        specs = tuple(dataclasses.replace(s, jitter=0.0, gray=0.0, solarize=0.0) for s in specs)
    return specs[:2], specs[2], specs[3]


class MultiCropAugment:
    """Random views of a batch of uint8 images, computed in batches on their device.

    ``params(gen, n, spec)`` draws every random number of ``n`` views from a CPU generator (so
    they do not depend on the device or on how a batch is split over ranks); ``apply(x, p, spec)``
    renders them: (B, 3, S, S) uint8 -> (B, 3, size, size) float, ImageNet-normalised. The crop
    and resize is one ``roi_align`` whose adaptive sampling averages each output pixel's
    footprint (an antialiased resize); flips, colour jitter (brightness, contrast, saturation,
    then a hue rotation in YIQ), grey, per-image Gaussian blur (one grouped separable
    convolution) and solarisation are batched tensor operations.
    """

    jitter_strength = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue

    @staticmethod
    def params(gen: torch.Generator, n: int, spec: CropSpec) -> dict[str, torch.Tensor]:
        """Random parameters of ``n`` views (CPU tensors; boxes as fractions of the side)."""
        area = _uniform(gen, n, *spec.scale)
        log_ratio = _uniform(gen, n, math.log(3 / 4), math.log(4 / 3))
        w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
        h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
        x0 = torch.rand(n, generator=gen, dtype=torch.float64) * (1 - w)
        y0 = torch.rand(n, generator=gen, dtype=torch.float64) * (1 - h)
        b, c, s, hue = MultiCropAugment.jitter_strength
        r = torch.rand(n, 9, generator=gen, dtype=torch.float64)
        return {
            "box": torch.stack([x0, y0, x0 + w, y0 + h], dim=1),  # (n, 4) x0, y0, x1, y1 in [0, 1]
            "flip": r[:, 0] < spec.flip,
            "jitter": r[:, 1] < spec.jitter,
            "brightness": 1 - b + 2 * b * r[:, 2],
            "contrast": 1 - c + 2 * c * r[:, 3],
            "saturation": 1 - s + 2 * s * r[:, 4],
            "hue": -hue + 2 * hue * r[:, 5],
            "gray": r[:, 6] < spec.gray,
            "blur_sigma": torch.where(r[:, 7] < spec.blur, _uniform(gen, n, 0.1, 2.0) * spec.size / 224, torch.zeros(n, dtype=torch.float64)),
            "solarize": r[:, 8] < spec.solarize,
        }

    @staticmethod
    def apply(x: torch.Tensor, p: dict[str, torch.Tensor], spec: CropSpec, normalise: bool = True) -> torch.Tensor:
        """(B, 3, S, S) uint8 images and B views' parameters -> (B, 3, size, size) float32,
        ImageNet-normalised (``normalise=False``: pixels in [0, 1], for :class:`LayoutCNN`)."""
        B, _, H, W = x.shape
        dev = x.device
        max_sigma = float(p["blur_sigma"].max()) if B else 0.0  # decided on the CPU: no device sync
        p = {k: v.to(dev) for k, v in p.items()}
        x = x.float() / 255.0
        scale = torch.tensor([W, H, W, H], dtype=torch.float32, device=dev)
        boxes = torch.cat([torch.arange(B, device=dev, dtype=torch.float32)[:, None], p["box"].float() * scale], dim=1)  # (B, 5)
        x = roi_align(x, boxes, output_size=(spec.size, spec.size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        x = torch.where(p["flip"][:, None, None, None], x.flip(-1), x)  # (B, 3, s, s)

        def per_image(v: torch.Tensor) -> torch.Tensor:
            return v.float()[:, None, None, None]

        def gray(y: torch.Tensor) -> torch.Tensor:  # (B, 3, s, s) -> (B, 1, s, s), ITU-R 601 luma
            return (0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3])

        j = p["jitter"][:, None, None, None]
        y = (x * per_image(p["brightness"])).clamp(0, 1)
        m = gray(y).mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
        y = ((y - m) * per_image(p["contrast"]) + m).clamp(0, 1)
        g = gray(y)
        y = ((y - g) * per_image(p["saturation"]) + g).clamp(0, 1)
        y = _rotate_hue(y, p["hue"].float())
        x = torch.where(j, y, x)
        x = torch.where(p["gray"][:, None, None, None], gray(x).expand_as(x), x)
        if max_sigma > 0:
            x = _gaussian_blur(x, p["blur_sigma"].float(), max_sigma)
        x = torch.where(p["solarize"][:, None, None, None] & (x >= 0.5), 1.0 - x, x)
        return normalize_unit(x) if normalise else x


# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)  # once, on the CPU (an inverse on a GPU would wait for it)


def _rotate_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """(B, 3, s, s) RGB in [0, 1], (B,) hue shift in turns -> (B, 3, s, s)."""
    A, A_inv = _RGB2YIQ.to(x.device), _YIQ2RGB.to(x.device)
    theta = 2 * math.pi * hue  # (B,)
    cos, sin = torch.cos(theta), torch.sin(theta)
    R = torch.zeros(x.shape[0], 3, 3, device=x.device)
    R[:, 0, 0] = 1
    R[:, 1, 1], R[:, 1, 2], R[:, 2, 1], R[:, 2, 2] = cos, -sin, sin, cos
    M = A_inv @ R @ A  # (B, 3, 3): RGB -> YIQ -> rotate -> RGB
    return torch.einsum("bij,bjhw->bihw", M, x).clamp(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Per-image Gaussian blur: (B, 3, s, s), (B,) sigma in pixels (0: unchanged), their maximum
    -> (B, 3, s, s)."""
    B, C, H, W = x.shape
    radius = max(1, int(math.ceil(3 * max_sigma)))
    radius = min(radius, (min(H, W) - 1))  # reflect padding needs radius < side
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)  # (k,)
    s = sigma.clamp(min=1e-3)[:, None]  # (B, 1)
    k = torch.exp(-(t[None, :] ** 2) / (2 * s**2))  # (B, k); sigma ~ 0 -> a delta
    k = k / k.sum(dim=1, keepdim=True)
    k = k.repeat_interleave(C, dim=0)  # (B*3, k): one kernel per image and channel
    y = x.reshape(1, B * C, H, W)  # (B, 3, H, W) -> (1, B*3, H, W): grouped conv, one group per channel
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)  # horizontal
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)  # vertical
    return y.reshape(B, C, H, W)


def random_masks(gen: torch.Generator, n: int, num_patches: int, probability: float,
                 ratio: tuple[float, float]) -> torch.Tensor:
    """(n, num_patches) bool: a share ``probability`` of the n crops has a ratio in ``ratio``
    of its patches masked (chosen uniformly at random), the others none."""
    masked = torch.rand(n, generator=gen) < probability
    counts = torch.round(_uniform(gen, n, *ratio) * num_patches).long().clamp(1, num_patches)
    counts = torch.where(masked, counts, torch.zeros_like(counts))
    ranks = torch.rand(n, num_patches, generator=gen).argsort(dim=1).argsort(dim=1)  # a random permutation per row
    return ranks < counts[:, None]


# --------------------------------------------------------------------------------------------
# Heads, losses
# --------------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021, Sec. 3.1; DINOv2's ``dino_head.py``).

    ``C -> hidden -> hidden -> bottleneck`` MLP with GELU, L2-normalisation, then ``K``
    prototypes whose weight rows are unit vectors (weight normalisation with the norm fixed
    to 1, DINO's ``norm_last_layer``): (N, C) -> (N, K) logits, cosines in [-1, 1]. The last
    layer runs in fp32: a teacher temperature of 0.04 turns bf16 rounding of the cosines into
    visible changes of the softmax.
    """

    def __init__(self, in_dim: int, prototypes: int, hidden: int = 2048, bottleneck: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        self.last_layer = nn.Linear(bottleneck, prototypes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, K)."""
        z = self.mlp(x)  # (N, bottleneck)
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1)
            return F.linear(z, F.normalize(self.last_layer.weight.float(), dim=-1))


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Sablayrolles et al. 2019; DINOv2): (n, C) features -> ``-mean_i log min_j ||x_i - x_j||``
    on the L2-normalised features (fp32)."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    # the differences themselves: cdist's matrix-product form (used above 25 rows) loses the small
    # distances between nearly equal features, exactly where KoLeo has to push them apart
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # (n, n)
    d = d + torch.eye(len(x), device=x.device, dtype=x.dtype) * 1e4  # no self-match
    return -torch.log(d.min(dim=1).values + eps).mean()


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every rank: of rows of x (sum / count); identity without DDP."""
    total = x.sum(dim=0, dtype=torch.float32)
    count = torch.tensor([float(x.shape[0])], device=x.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return total / count.clamp(min=1)


class LayoutCNN(nn.Module):
    """A small convolutional network whose descriptor keeps where each feature lies: the teacher
    of ``objective="distil"``, trained with ``L_MS`` by ``objective="cnn"``.

    Four stages (32 -> 64 -> 128 -> 256 channels, 3 x 3 convolutions, batch norm, ReLU; stride 8
    in all: an 8 x 8 map at 64 px), the map averaged over a 2 x 4 grid (above/below, four
    vertical strips) and projected to 512 dimensions: (B, 3, S, S) -> (B, 512) unit descriptors.
    Images are uint8, or floats in [0, 1].
    """

    layout = (2, 4)  # rows x columns of the pooling grid
    channels, dim = 256, 512  # the last map's channels; the descriptor's dimension

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                                      block(32, 64), block(64, 128), block(128, self.channels))
        self.proj = nn.Linear(self.channels * self.layout[0] * self.layout[1], self.dim)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 256, S / 8, S / 8): the last stage's features ``f``."""
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return self.features((x - 0.45) / 0.25)

    def describe(self, f: torch.Tensor) -> torch.Tensor:
        """(B, 256, h, w) feature map -> (B, 512) unit descriptor ``d``."""
        cells = F.adaptive_avg_pool2d(f, self.layout)  # (B, 256, 2, 4)
        return F.normalize(self.proj(cells.flatten(1)), dim=1)  # (B, 2048) -> (B, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.describe(self.feature_map(x))

    @classmethod
    def load(cls, path: PathLike) -> "LayoutCNN":
        """A trained network from its state dict file, frozen, in eval mode. A file with a manifest
        beside it (an export of ``objective="cnn"``) must be the file the manifest describes; the
        verified manifest is kept as ``net.manifest`` (None without one)."""
        manifest = check_manifest(path, manifest_format=CNN_MANIFEST_FORMAT)
        net = cls()
        net.manifest = manifest
        state = load_torch_file(path, "LayoutCNN state dict", opt_in=None)
        try:
            net.load_state_dict(state)
        except (RuntimeError, AttributeError, TypeError) as e:
            raise ValueError(f"{str(path)!r} is not the state dict of a LayoutCNN (scicevpr pretrain-backbone "
                             f"--objective cnn ... --export cnn.pt writes one): {str(e).splitlines()[0]}") from None
        return net.eval().requires_grad_(False)


class ViTMapTeacher(nn.Module):
    """A trained backbone as the teacher of ``objective="distil"``: its last block's patch tokens
    after the final norm are the map ``f`` the student's patch tokens learn, cell for cell. It has
    no place descriptor, so the student's CLS token gets no objective (``distil_class_token=False``).

    ``feature_map``: (B, 3, S, S) uint8 or floats in [0, 1] -> (B, C, S / p, S / p).
    """

    def __init__(self, backbone: DinoVisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.channels = backbone.embed_dim  # C

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        B, _, S, _ = x.shape
        g = S // self.backbone.patch_size
        t = self.backbone.get_intermediate_layers(normalize_unit(x), [len(self.backbone.blocks) - 1])[0]  # (B, 1 + HW, C)
        return t[:, 1:].transpose(1, 2).reshape(B, self.channels, g, g)  # (B, HW, C) -> (B, C, g, g)

    def describe(self, f: torch.Tensor) -> torch.Tensor:
        raise ValueError("a ViT teacher has no place descriptor: distil with distil_class_token=False.")


@torch.no_grad()
def distil_targets(f: torch.Tensor, d: torch.Tensor | None, grid: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The network's outputs as targets (fp32): its map ``f`` (B, 256, h, w), average-pooled to the
    ViT's ``grid`` x ``grid`` patches when h differs, standardised per channel over the batch and
    the cells; its descriptors ``d`` (B, 512) centred over the batch. What every image shares (a
    ReLU map's positive mean direction, scoring cosines of about 0.5 for any prediction) is no
    target; what tells images and cells apart is. Under DDP each rank uses its own share's statistics.
    ``d`` None (no CLS objective): None."""
    f = f.float() if f.shape[-1] == grid else F.adaptive_avg_pool2d(f.float(), (grid, grid))
    f = (f - f.mean(dim=(0, 2, 3), keepdim=True)) / (f.std(dim=(0, 2, 3), keepdim=True) + 1e-6)
    return f, None if d is None else d.float() - d.float().mean(dim=0, keepdim=True)


def distil_losses(dense: torch.Tensor, cls: torch.Tensor | None, f: torch.Tensor, d: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(L_dense, L_cls)`` (fp32): ``dense`` (B, C_t, g, g) = ``W_p z`` against the target map
    ``f`` (B, C_t, g, g), cell by cell; ``cls`` (B, 512) = ``W_c z_cls`` against the target
    descriptor ``d`` (B, 512) (:func:`distil_targets`). Each is the mean of 1 - cosine; ``L_cls``
    is None without a CLS objective (``cls`` None)."""
    l_dense = (1 - F.cosine_similarity(dense.float(), f, dim=1)).mean()  # over b and the g x g cells
    l_cls = None if cls is None else (1 - F.cosine_similarity(cls.float(), d, dim=1)).mean()
    return l_dense, l_cls


class _Student(nn.Module):
    """What the optimiser trains, as one module so that one DDP forward covers a step.

    DINO: ``forward(globals, locals, masks) -> (global CLS logits, local CLS logits,
    masked-patch logits, global CLS features)``. Supervised: ``forward(images) -> descriptors``.
    Distil: ``forward(images) -> (W_p z, W_c z_cls)`` (``W_c z_cls`` None without a CLS objective);
    ``target_channels``: C_t, the channels of the teacher's map.
    """

    def __init__(self, config: PretrainConfig, target_channels: int = LayoutCNN.channels) -> None:
        super().__init__()
        self.objective = config.objective
        self.backbone = DinoVisionTransformer(config.backbone_config())  # trained here: not frozen
        if config.init_weights is not None:  # start from an exported backbone (its manifest checked)
            load_weights(self.backbone, resolve_weights(config.init_weights, self.backbone.config))
        self.grid = config.image_size // self.backbone.patch_size  # g: patches a side
        C = self.backbone.embed_dim
        last = len(self.backbone.blocks) - 1
        self.last = last
        if config.objective == "dino":
            self.head = DINOHead(C, config.prototypes, config.head_hidden, config.head_bottleneck)
        elif config.objective == "distil":
            self.backbone.mask_token.requires_grad_(False)
            self.dense_proj = nn.Linear(C, target_channels)  # W_p: patch token -> the teacher's feature at that cell
            self.cls_proj = nn.Linear(C, LayoutCNN.dim) if config.distil_class_token else None  # W_c: CLS token -> the network's place descriptor
        else:
            self.backbone.mask_token.requires_grad_(False)  # no masked patches without iBOT
            self.pooling = config.pooling
            g = self.grid
            self.pool = MultiRegionGeM((g, g)) if config.pooling in ("gem", "regions") else None
            if config.pooling == "grid":
                self.grid_proj = nn.Linear(GRID[0] * GRID[1] * C, GRID_DIM)

    def tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + HW, C): the last block's tokens after the final norm."""
        return self.backbone.get_intermediate_layers(x, [self.last], masks=masks)[0]

    def forward(self, *args: torch.Tensor):
        if self.objective == "dino":
            return self._dino(*args)
        t = self.tokens(*args)
        return self._distil(t) if self.objective == "distil" else self.describe(t)

    def _dino(self, globals_: torch.Tensor, locals_: torch.Tensor | None, masks: torch.Tensor, mask_index: torch.Tensor):
        t = self.tokens(globals_, masks)  # (2b, 1 + HW, C)
        g_cls = t[:, 0]  # (2b, C)
        g_logits = self.head(g_cls)  # (2b, K)
        patch_logits = self.head(_masked_patches(t, mask_index))  # (M, C) -> (M, K): masked patches only
        l_logits = self.head(self.tokens(locals_)[:, 0]) if locals_ is not None else None  # (Lb, K)
        return g_logits, l_logits, patch_logits, g_cls

    def _distil(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, 1 + HW, C) tokens -> (b, C_t, g, g) the patch tokens carried to the teacher's
        feature map (``W_p z``), and (b, 512) the CLS token to its descriptor (``W_c z_cls``; None
        without a CLS objective)."""
        B, N, C = t.shape
        dense = self.dense_proj(t[:, 1:]).transpose(1, 2).reshape(B, -1, self.grid, self.grid)  # (B, HW, C_t) -> (B, C_t, g, g)
        return dense, None if self.cls_proj is None else self.cls_proj(t[:, 0])

    def describe(self, t: torch.Tensor) -> torch.Tensor:
        """(b, 1 + HW, C) last-block tokens -> (b, D) the unit descriptor the objective trains
        (supervised: its ``pooling``; distil: ``W_c z_cls``, the CLS token in the network's space)."""
        if self.objective == "distil":
            if self.cls_proj is None:
                raise ValueError("a distil run without a CLS objective trains no descriptor of its own.")
            return F.normalize(self.cls_proj(t[:, 0]).float(), dim=-1)
        if self.pooling == "cls":
            d = t[:, 0]
        elif self.pooling == "mean":
            d = t[:, 1:].mean(dim=1)
        elif self.pooling == "grid":
            B, N, C = t.shape
            g = self.grid
            cells = F.adaptive_avg_pool2d(t[:, 1:].transpose(1, 2).reshape(B, C, g, g), GRID)  # (B, HW, C) -> (B, C, 2, 4)
            d = self.grid_proj(cells.flatten(1))  # (B, 8 C) -> (B, 512)
        else:
            B, N, C = t.shape
            g = self.grid
            regions = self.pool(t[:, 1:].transpose(1, 2).reshape(B, C, g, g))  # (B, HW, C) -> (B, C, g, g) -> (B, 14, C)
            d = regions[:, 0] if self.pooling == "gem" else regions.flatten(1)  # (B, C): whole map | (B, 14 C)
        return F.normalize(d.float(), dim=-1)  # (b, C) or (b, 14 C)


class _Teacher(nn.Module):
    """The EMA teacher: backbone + head, no gradient."""

    def __init__(self, student: _Student) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(student.backbone)  # theta_t = theta_s at the start
        self.head = copy.deepcopy(student.head)
        self.requires_grad_(False)
        self.last = student.last

    @torch.no_grad()
    def forward(self, globals_: torch.Tensor, mask_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(2b, 3, S, S) unmasked global crops -> (2b, K) CLS logits and (M, K) logits of the
        patches the student sees masked."""
        t = self.backbone.get_intermediate_layers(globals_, [self.last])[0]  # (2b, 1 + HW, C)
        return self.head(t[:, 0]), self.head(_masked_patches(t, mask_index))


def _masked_patches(tokens: torch.Tensor, mask_index: torch.Tensor) -> torch.Tensor:
    """(B, 1 + HW, C) tokens, (M,) flat indices into the B x HW patches -> (M, C), in crop then
    patch order. Indices computed on the CPU keep the device from waiting (boolean indexing would)."""
    B, N, C = tokens.shape
    return tokens[:, 1:].reshape(B * (N - 1), C).index_select(0, mask_index)  # (B, HW, C) -> (B*HW, C) -> (M, C)


def dino_losses(
    s_global: torch.Tensor, s_local: torch.Tensor | None, s_patch: torch.Tensor,
    t_global: torch.Tensor, t_patch: torch.Tensor, masks: torch.Tensor,
    center: torch.Tensor, patch_center: torch.Tensor, student_temp: float, teacher_temp: float,
    masked_crops: int | None = None, world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO's cross-view loss and iBOT's masked-patch loss (fp32).

    s_global (2b, K), s_local (Lb, K) or None, t_global (2b, K): CLS logits, the 2 (L) views
    stacked view-major; s_patch, t_patch (M, K): logits at the M masked patches, ``masks`` (2b, HW)
    saying which. Returns (L_DINO, L_iBOT); L_iBOT averages over each masked crop's patches, then
    over masked crops (0 when none is masked).

    Under DDP each of the ``world_size`` ranks holds its share of the crops, and DDP averages
    the ranks' gradients; ``masked_crops``, the number of masked crops in the global batch, makes
    that average the one-process L_iBOT (a rank's sum over its crops / ``masked_crops`` x
    ``world_size``) however the masked crops fall on the ranks. None: this call's own count.
    """
    n_global = 2
    b = t_global.shape[0] // n_global
    t = F.softmax((t_global.float() - center) / teacher_temp, dim=-1).chunk(n_global)  # 2 x (b, K)
    s = list(F.log_softmax(s_global.float() / student_temp, dim=-1).chunk(n_global))
    if s_local is not None and s_local.shape[0]:
        s += list(F.log_softmax(s_local.float() / student_temp, dim=-1).split(b))  # L x (b, K)
    total, terms = 0.0, 0
    for i, t_i in enumerate(t):
        for v, s_v in enumerate(s):
            if v == i:
                continue  # the same view
            total = total + (-(t_i * s_v).sum(dim=-1)).mean()
            terms += 1
    l_dino = total / terms
    if s_patch.shape[0] == 0:
        return l_dino, s_patch.sum() * 0.0  # keeps the graph (DDP) with no masked crop
    tp = F.softmax((t_patch.float() - patch_center) / teacher_temp, dim=-1)
    ce = -(tp * F.log_softmax(s_patch.float() / student_temp, dim=-1)).sum(dim=-1)  # (M,)
    per_crop = masks.sum(dim=1)  # (2b,)
    weight = (1.0 / per_crop.clamp(min=1).float()).repeat_interleave(per_crop, output_size=ce.shape[0])  # (M,): 1 / masked patches of its crop
    if masked_crops is None:
        masked_crops, world_size = int((per_crop > 0).sum()), 1
    l_ibot = (ce * weight).sum() * (world_size / max(masked_crops, 1))
    return l_dino, l_ibot


# --------------------------------------------------------------------------------------------
# Monitoring: place retrieval with the last block's features
# --------------------------------------------------------------------------------------------


class RetrievalCheck:
    """A VG-layout split decoded once at the model's size, and Recall@N of a model on it.

    :meth:`recalls` scores any ``embed`` (uint8 images -> named unit descriptors), with exact L2
    search and hits as every recall in scicevpr (:func:`scicevpr.evaluate.search`,
    :func:`scicevpr.evaluate.recall_at_n`). :func:`vit_descriptors` gives a ViT's: the mean of the
    last block's patch tokens after the final norm, its CLS token and, given the objective's
    ``describe`` (``_Student.describe``), the descriptor the objective trains, pooled from the same
    tokens; ``objective="cnn"`` scores :class:`LayoutCNN`'s descriptor.
    """

    def __init__(self, root: PathLike, dataset: str, split: str, image_size: int, device: torch.device,
                 num_workers: int = 0, progress: bool = False) -> None:
        from ..data.vg import load_vg_split

        self.split = load_vg_split(root, dataset, split)
        self.images = load_image_cache(self.split.all_paths, image_size, num_workers, progress).to(device)  # (N, 3, S, S)

    @torch.no_grad()
    def recalls(self, embed: Callable[[torch.Tensor], dict[str, torch.Tensor]], batch_size: int = 256) -> dict[str, float]:
        """``embed``: (b, 3, S, S) uint8 -> ``{"mean" | "cls" | "desc": (b, D) unit descriptors}``.
        Returns ``R@1`` and ``R@5`` of "mean", ``R@1_cls``, ``R@1_desc`` and ``R@5_desc``."""
        from ..evaluate import recall_at_n, search

        out: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(self.images), batch_size):
            for kind, d in embed(self.images[i : i + batch_size]).items():
                out.setdefault(kind, []).append(d.float())
        n_db = self.split.num_database
        result = {}
        for kind, parts in out.items():
            d = torch.cat(parts).cpu().numpy()  # (N_db + N_q, D)
            _, pred = search(d[:n_db], d[n_db:], 5)
            r, _ = recall_at_n(pred, self.split.positives, (1, 5))
            suffix = {"mean": "", "cls": "_cls", "desc": "_desc"}[kind]
            result.update({f"R@1{suffix}": r[1]} if kind == "cls" else {f"R@1{suffix}": r[1], f"R@5{suffix}": r[5]})
        return result


def vit_descriptors(backbone: DinoVisionTransformer, amp: bool,
                    describe: Callable[[torch.Tensor], torch.Tensor] | None = None
                    ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """The ``embed`` of :meth:`RetrievalCheck.recalls` for a ViT (call it in eval mode)."""

    def embed(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(x.device, amp):
            t = backbone.get_intermediate_layers(normalize_uint8_batch(x, x.shape[-1]), [len(backbone.blocks) - 1])[0]  # (b, 1 + HW, C)
        out = {"mean": F.normalize(t[:, 1:].float().mean(dim=1), dim=-1), "cls": F.normalize(t[:, 0].float(), dim=-1)}
        if describe is not None:
            with autocast(x.device, amp):
                out["desc"] = describe(t)  # (b, D), L2-normalised
        return out

    return embed


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class PretrainResult:
    """What a pretraining run produced.

    Attributes:
        backbone: the backbone that :func:`export_backbone` writes (DINO: the teacher;
            supervised, distil: the trained backbone; cnn: the trained :class:`LayoutCNN`), in
            eval mode, on the CPU.
        history: ``log.csv`` as a DataFrame.
        run_dir, last_path: the run folder and its checkpoint.
        step, steps: steps done and the schedule's length.
        stopped: why this call ended: ``"done"``, ``"time budget"`` or ``"stop_at_step"``.
    """

    backbone: nn.Module
    history: pd.DataFrame
    run_dir: Path
    last_path: Path
    step: int
    steps: int
    stopped: str


def machine_info(device: torch.device, amp: bool, world_size: int = 1) -> dict[str, Any]:
    """Where a run ran: device and CPU names, precision, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"device": device.type, "cpu": cpu, "cpu_count": os.cpu_count(), "precision": describe(device, amp),
            "torch": str(torch.__version__), "world_size": world_size}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """DINO's rule: no weight decay on biases and 1-d parameters (norms, LayerScale)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def _run_dir(config: PretrainConfig) -> Path:
    return Path(config.run_dir or Path("runs") / f"pretrain-{config.objective}")


def _check_resume(run_dir: Path, config: PretrainConfig) -> bool:
    """Check the run folder; True when there is a ``last.pt`` to resume from."""
    if not config.resume:
        if holds_files(run_dir):
            raise FileExistsError(
                f"run folder {str(run_dir)!r} already holds a run; refusing to overwrite it. Pass resume=True "
                f"(--resume) to continue it, or choose another run_dir (or delete the folder)."
            )
        return False
    if (run_dir / "config.json").is_file():
        old = read_run_config(run_dir, "pretrain", "pretraining")["pretrain"]
        # steps=None keeps the recorded schedule
        refuse_config_changes(run_dir, old, config.to_dict(), RESUMABLE_CHANGES, keep_when_none=("steps",))
    return (run_dir / "last.pt").is_file()


def _broadcast(value: Any, ddp: Dist) -> Any:
    if not ddp.enabled:
        return value
    obj = [value]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


class _Run:
    """State and one optimisation step of a pretraining run (every objective)."""

    def __init__(self, config: PretrainConfig, device: torch.device, ddp: Dist, amp: bool) -> None:
        self.config, self.device, self.ddp, self.amp = config, device, ddp, amp
        if config.batch_size % ddp.world_size:
            raise ValueError(
                f"batch_size={config.batch_size} must be divisible by the number of processes ({ddp.world_size})."
            )
        if config.objective == "dino" and config.koleo_weight > 0 and config.batch_size // ddp.world_size < 2:
            raise ValueError(
                f"KoLeo compares the images of each process: batch_size={config.batch_size} over {ddp.world_size} "
                f"processes leaves {config.batch_size // ddp.world_size}; raise batch_size to at least "
                f"{2 * ddp.world_size}, or set koleo_weight=0."
            )
        if config.objective in PLACE_OBJECTIVES and config.places_per_batch % ddp.world_size:
            raise ValueError(
                f"P = batch_size / img_per_place = {config.places_per_batch} places must be divisible by the number "
                f"of processes ({ddp.world_size})."
            )
        gsv_root, self.data_info = resolve_data_root(config.data)
        K = config.img_per_place if config.objective in PLACE_OBJECTIVES else 1
        self.dataset = GSVCitiesDataset(gsv_root, cities=config.cities, img_per_place=K, image_size=config.image_size,
                                        seed=config.seed)
        paths = self.dataset.dataframe["path"].tolist()
        self.data_info.update(images=len(paths), places=len(self.dataset), gsv_root=str(gsv_root),
                              files_sha256=hashlib.sha256("\n".join(str(Path(p).relative_to(gsv_root)) for p in paths).encode()).hexdigest())
        self.cnn = None
        if config.objective == "distil":  # the teacher read, named in every checkpoint and the export's manifest
            self.cnn, self.data_info["distil_teacher"] = _load_teacher(config.distil_teacher, config)
        if config.objective not in PLACE_OBJECTIVES:  # batches of images, not of places
            self.steps_per_epoch = len(paths) // config.batch_size
            if self.steps_per_epoch < 1:
                raise ValueError(f"the data holds {len(paths)} images, fewer than one batch (batch_size={config.batch_size}); lower batch_size.")
        else:
            if len(self.dataset) < config.places_per_batch:  # said here in this command's terms
                raise ValueError(
                    f"the data holds {len(self.dataset)} places (with >= K = {config.img_per_place} images), fewer than "
                    f"one batch of P = batch_size / img_per_place = {config.places_per_batch} places; lower batch_size."
                )
            self.sampler = PlaceBatchSampler(len(self.dataset), config.places_per_batch, config.seed)
            self.steps_per_epoch = len(self.sampler)
        self.cache = load_image_cache(paths, config.cache_size, config.num_workers, config.progress and ddp.main).to(device)
        torch.manual_seed(config.seed)
        self.student = (LayoutCNN() if config.objective == "cnn" else
                        _Student(config, self.cnn.channels) if self.cnn is not None else _Student(config)).to(device)
        self.teacher = _Teacher(self.student).to(device) if config.objective == "dino" else None
        self.cnn = self.cnn.to(device) if self.cnn is not None else None
        K_out = config.prototypes
        self.center = torch.zeros(1, K_out, device=device)
        self.patch_center = torch.zeros(1, K_out, device=device)
        self.ms = MultiSimilarityLoss(config.loss) if config.objective in PLACE_OBJECTIVES else None
        self.optimizer = torch.optim.AdamW(_param_groups(self.student), lr=config.lr, weight_decay=config.weight_decay)
        self.model = self.student
        if ddp.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None)
        self.global_specs, self.local_spec, self.supervised_spec = view_specs(config)
        if config.objective in ("distil", "cnn"):  # the supervised crop at the network's size
            self.cnn_spec = dataclasses.replace(self.supervised_spec, size=config.distil_size)
        self._epoch_cache: tuple[int, Any] | None = None
        self.check = None
        if config.val_root is not None and ddp.main:
            size = config.distil_size if config.objective == "cnn" else config.image_size
            self.check = RetrievalCheck(config.val_root, config.val_dataset, config.val_split, size,
                                        device, config.num_workers, config.progress)

    @property
    def exported(self) -> nn.Module:
        """The model :func:`export_backbone` writes by default: DINO's teacher, else the student."""
        return self.teacher if self.teacher is not None else self.student

    def validate(self) -> dict[str, float]:
        """Recall@1/5 of the exported model on the monitoring split (rank 0; see :class:`RetrievalCheck`)."""
        model = self.exported
        training = model.training
        model.eval()
        try:
            if self.config.objective == "cnn":
                return self.check.recalls(lambda x: {"desc": model(x)})  # uint8 in, unit descriptors out
            trains_descriptor = self.config.objective != "dino" and getattr(self.student, "cls_proj", True) is not None
            describe = self.student.describe if trains_descriptor else None
            return self.check.recalls(vit_descriptors(model.backbone, self.amp, describe))
        finally:
            model.train(training)

    # ---- data of a step ------------------------------------------------------------------------

    def _generator(self, step: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(int(np.random.default_rng([self.config.seed, 7, step]).integers(2**62)))
        return g

    def batch_indices(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Global batch of step ``step``: image (cache) indices, and place labels (supervised and
        cnn; DINO and distil: None, every image of the cache once an epoch in a seeded order)."""
        epoch, j = divmod(step, self.steps_per_epoch)
        c = self.config
        if c.objective not in PLACE_OBJECTIVES:
            if self._epoch_cache is None or self._epoch_cache[0] != epoch:
                self._epoch_cache = (epoch, np.random.default_rng([c.seed, epoch]).permutation(len(self.cache)))
            perm = self._epoch_cache[1]
            return perm[j * c.batch_size : (j + 1) * c.batch_size], None
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._epoch_cache = (epoch, list(self.sampler))
        places = self._epoch_cache[1][j]  # P place indices
        self.dataset.set_epoch(epoch)
        rows = np.stack([self.dataset.sample_rows(i) for i in places])  # (P, K) image indices
        labels = np.repeat(self.dataset.place_ids[places], c.img_per_place)  # (P*K,)
        return rows.reshape(-1), labels

    def _share(self, n: int) -> slice:
        """This rank's slice of a global batch of n items."""
        b = n // self.ddp.world_size
        return slice(self.ddp.rank * b, (self.ddp.rank + 1) * b)

    # ---- one step ----------------------------------------------------------------------------------

    def step(self, step: int, steps: int, update: bool = True) -> dict[str, Any]:
        """One optimisation step (``update=False``: forward and backward only, for timing). Returns
        the losses (device tensors, not synchronised) and the schedule's values."""
        c, dev = self.config, self.device
        sched = schedule(c, step, steps)
        for group in self.optimizer.param_groups:
            group["lr"] = sched["lr"]
            group["weight_decay"] = sched["weight_decay"] if group["apply_wd"] else 0.0
        idx, labels = self.batch_indices(step)
        gen = self._generator(step)
        n = len(idx)
        mine = self._share(n)
        x = self.cache[torch.as_tensor(idx[mine], device=dev)]  # (b, 3, S, S) uint8
        parts: dict[str, torch.Tensor] = {}
        if c.objective == "dino":
            views = [MultiCropAugment.params(gen, n, spec) for spec in self.global_specs]
            local_params = [MultiCropAugment.params(gen, n, self.local_spec) for _ in range(c.local_crops)]
            num_patches = self.student.grid ** 2  # HW
            masks = random_masks(gen, 2 * n, num_patches, c.mask_probability if c.ibot_weight > 0 else 0.0,
                                 c.mask_ratio).reshape(2, n, -1)  # (2, n, HW): view-major like the crops
            take = lambda p: {k: v[mine] for k, v in p.items()}  # noqa: E731
            globals_ = torch.cat([MultiCropAugment.apply(x, take(p), s) for p, s in zip(views, self.global_specs)])  # (2b, 3, S, S)
            locals_ = (torch.cat([MultiCropAugment.apply(x, take(p), self.local_spec) for p in local_params])
                       if c.local_crops else None)  # (L*b, 3, s, s)
            m_cpu = masks[:, mine].reshape(-1, num_patches)  # (2b, HW)
            m, mask_index = m_cpu.to(dev), m_cpu.flatten().nonzero().squeeze(1).to(dev)  # (2b, HW), (M,)
            with autocast(dev, self.amp):
                t_global, t_patch = self.teacher(globals_, mask_index)
                s_global, s_local, s_patch, g_cls = self.model(globals_, locals_, m, mask_index)
            l_dino, l_ibot = dino_losses(s_global, s_local, s_patch, t_global, t_patch, m, self.center,
                                         self.patch_center, c.student_temp, sched["teacher_temp"],
                                         masked_crops=int((masks.sum(dim=-1) > 0).sum()),  # over the global batch
                                         world_size=self.ddp.world_size)
            l_koleo = sum(koleo_loss(v) for v in g_cls.chunk(2)) / 2 if c.koleo_weight > 0 else torch.zeros((), device=dev)
            loss = l_dino + c.ibot_weight * l_ibot + c.koleo_weight * l_koleo
            parts = {"loss_dino": l_dino.detach(), "loss_ibot": l_ibot.detach(), "loss_koleo": l_koleo.detach()}
        elif c.objective == "distil":
            p = MultiCropAugment.params(gen, n, self.supervised_spec)
            p = {k: v[mine] for k, v in p.items()}
            images = MultiCropAugment.apply(x, p, self.supervised_spec)  # (b, 3, S, S), ImageNet-normalised
            small = MultiCropAugment.apply(x, p, self.cnn_spec, normalise=False)  # (b, 3, s, s) in [0, 1]: the same crops
            with torch.no_grad():
                f = self.cnn.feature_map(small)  # (b, C_t, h, w): CNN (b, 256, s / 8, s / 8); ViT (b, C, g, g)
                d = self.cnn.describe(f) if c.distil_class_token else None  # (b, 512)
            with autocast(dev, self.amp):
                dense, cls = self.model(images)
            l_dense, l_cls = distil_losses(dense, cls, *distil_targets(f, d, self.student.grid))
            loss = l_dense if l_cls is None else l_dense + l_cls
            parts = {"loss_dense": l_dense.detach()} if l_cls is None else {"loss_dense": l_dense.detach(), "loss_cls": l_cls.detach()}
        else:  # L_MS on place batches: the ViT (supervised) or the network (cnn, from pixels in [0, 1])
            spec = self.cnn_spec if c.objective == "cnn" else self.supervised_spec
            p = MultiCropAugment.params(gen, n, spec)
            images = MultiCropAugment.apply(x, {k: v[mine] for k, v in p.items()}, spec, normalise=c.objective != "cnn")  # (b, 3, S, S)
            y = torch.as_tensor(labels, device=dev)  # global labels
            with autocast(dev, self.amp):
                d = self.model(images)  # (b, C)
            loss = self.ms(gather_batch(d), y)  # L_MS on the global batch, as one process
            parts = {"loss_ms": loss.detach()}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not update:
            self.optimizer.zero_grad(set_to_none=True)
            return {}
        if c.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), c.clip_grad)
        self.optimizer.step()
        if self.teacher is not None:
            with torch.no_grad():
                m_ = sched["momentum"]
                t_params = [p for p in self.teacher.parameters()]
                s_params = [p for n_, p in self.student.named_parameters() if n_.split(".")[0] in ("backbone", "head")]
                torch._foreach_mul_(t_params, m_)
                torch._foreach_add_(t_params, s_params, alpha=1.0 - m_)
                cm = c.center_momentum
                self.center.mul_(cm).add_(_all_reduce_mean(t_global.float()) * (1 - cm))
                if bool(masks.any()):  # some crop of the global batch is masked (CPU tensor: no sync)
                    self.patch_center.mul_(cm).add_(_all_reduce_mean(t_patch.float()) * (1 - cm))
        return {"loss": loss.detach(), **parts, **sched}  # losses stay on the device: no sync per step

    # ---- checkpoints -------------------------------------------------------------------------------

    def state(self, step: int, steps: int, extra: dict[str, Any]) -> dict[str, Any]:
        cpu = lambda sd: {k: v.detach().to("cpu").clone() for k, v in sd.items()}  # noqa: E731
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": self.config.to_dict(),
            "backbone_config": dataclasses.asdict(self.student.backbone.config) if self.config.objective != "cnn" else None,
            "step": step, "steps": steps, "student": cpu(self.student.state_dict()),
            "teacher": cpu(self.teacher.state_dict()) if self.teacher is not None else None,
            "center": self.center.cpu(), "patch_center": self.patch_center.cpu(),
            "optimizer": self.optimizer.state_dict(), "rng": rng_state(), "data": self.data_info, **extra,
        }

    def load(self, ckpt: dict[str, Any]) -> None:
        self.student.load_state_dict(ckpt["student"])
        if self.teacher is not None:
            self.teacher.load_state_dict(ckpt["teacher"])
        self.center.copy_(ckpt["center"])
        self.patch_center.copy_(ckpt["patch_center"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])


def read_pretrain_checkpoint(path: PathLike, trust_checkpoint: bool = False) -> dict[str, Any]:
    """A pretraining checkpoint (``last.pt``) as a dict, its format checked. It is read with
    ``weights_only=True``; ``trust_checkpoint=True`` also loads pickled objects (runs code from it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"pretraining checkpoint {str(path)!r} does not exist; pass a run folder or its last.pt.")
    obj = load_torch_file(path, "pretraining checkpoint", trust=trust_checkpoint)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a pretraining checkpoint (written by scicevpr.offline.pretrain).")
    if obj.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{str(path)!r} has version {obj['version']}; this scicevpr reads <= {CHECKPOINT_VERSION}.")
    return obj


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Run (or resume) a pretraining run; see the module docstring. Multi-GPU: ``torchrun``."""
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    ddp = setup_distributed(device)
    try:
        with lock_run_dir(_run_dir(config)) if ddp.main else contextlib.nullcontext():
            return _pretrain(config, device, ddp, t_start)
    finally:
        if ddp.created:
            dist.destroy_process_group()


def _pretrain(config: PretrainConfig, device: torch.device, ddp: Dist, t_start: float) -> PretrainResult:
    run_dir = _run_dir(config)
    resuming = _check_resume(run_dir, config)
    if ddp.enabled:
        dist.barrier()
    amp = resolve_amp(device, config.amp)
    run = _Run(config, device, ddp, amp)
    last_path, log_path = run_dir / "last.pt", run_dir / "log.csv"
    budget_s = None if config.max_minutes is None else 60.0 * config.max_minutes
    machine = machine_info(device, amp, ddp.world_size)

    step, steps, images_seen, train_s, sessions = 0, config.steps, 0, 0.0, []
    if resuming:
        ckpt = read_pretrain_checkpoint(last_path)
        if ckpt["data"].get("files_sha256") != run.data_info["files_sha256"]:
            raise ValueError(
                f"cannot resume {str(run_dir)!r}: its data held {ckpt['data'].get('images')} images listed differently "
                f"from the {run.data_info['images']} found now in {run.data_info['gsv_root']!r}. Resume on the same data."
            )
        if ckpt["data"].get("distil_teacher") != run.data_info.get("distil_teacher"):
            raise ValueError(
                f"cannot resume {str(run_dir)!r}: its teacher was {ckpt['data'].get('distil_teacher')}, "
                f"{config.distil_teacher!r} is now {run.data_info.get('distil_teacher')}. Resume with the same teacher file."
            )
        run.load(ckpt)
        step, steps, images_seen = ckpt["step"], ckpt["steps"], ckpt["images_seen"]
        train_s, sessions = ckpt["train_s"], list(ckpt["sessions"])
        if ddp.main:
            resume_csv_log(log_path, "step", step, LOG_COLUMNS)
    elif ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        start_csv_log(log_path)
        info = {"pretrain": config.to_dict(), "backbone": dataclasses.asdict(config.backbone_config()),
                "data": run.data_info, "machine": machine, "amp": amp}
        atomic_write_text(run_dir / "config.json", json.dumps(info, indent=2))

    if steps is None:  # fit the schedule to the time budget from the measured speed
        for s in range(2):
            run.step(s, 1000, update=False)  # warm-up (kernels, allocator)
        _sync(device)
        t0 = time.perf_counter()
        n_cal = 3
        for s in range(n_cal):
            run.step(s, 1000, update=False)
        _sync(device)
        per_step = (time.perf_counter() - t0) / n_cal * 1.05  # + optimiser and EMA
        left = budget_s - (time.perf_counter() - t_start)
        steps = _broadcast(max(1, int(left * 0.95 / per_step)), ddp)  # room for checkpoints and checks
        if ddp.main:
            print(f"pretrain: {per_step * 1000:.0f} ms per step measured; the schedule spans {steps} steps "
                  f"to fit the {config.max_minutes} min budget")

    session = {"machine": machine, "start_step": step}
    stop_at = steps if config.stop_at_step is None else min(steps, config.stop_at_step)
    bar = tqdm(total=steps, initial=step, desc=f"pretrain {config.objective}", disable=not (config.progress and ddp.main))
    stopped = "done" if stop_at == steps else "stop_at_step"
    monitored = config.val_root is not None  # the same on every rank (run.check lives on rank 0)
    t_loop = time.perf_counter()
    acc: dict[str, Any] = {"sums": {}, "n": 0, "t": t_loop, "last": None, "validated": None}  # since the last row

    def log(at: int, validate: bool) -> None:
        """Average the accumulated losses over steps and ranks (every rank calls this), check
        retrieval (rank 0), write a log row (rank 0)."""
        now = time.perf_counter()
        row: dict[str, Any] = {"step": at}
        if acc["n"]:
            keys = sorted(acc["sums"])
            means = torch.stack([acc["sums"][k] for k in keys]) / acc["n"]
            if ddp.enabled:
                dist.all_reduce(means)
                means /= ddp.world_size
            row.update(zip(keys, means.tolist()))
            row.update({k: v for k, v in acc["last"].items() if not k.startswith("loss")})
            if config.objective != "dino":
                row.pop("momentum"), row.pop("teacher_temp")
            row.update(images_per_s=round(acc["n"] * config.batch_size / (now - acc["t"]), 2),
                       elapsed_s=round(train_s + now - t_loop, 2))
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['images_per_s']:.0f}")
        if validate:
            acc["validated"] = at
        if validate and run.check is not None:
            row.update(run.validate())
            bar.write(f"step {at}: " + ", ".join(f"{k} {row[k]:.1f}" for k in LOG_COLUMNS[LOG_COLUMNS.index("R@1"):] if k in row))
        if ddp.main and len(row) > 1:
            append_csv_row(log_path, row, LOG_COLUMNS)
        if ddp.enabled:
            dist.barrier()
        acc.update(sums={}, n=0, t=time.perf_counter())

    def save(at: int) -> None:
        if ddp.main:
            now = time.perf_counter()
            extra = {"images_seen": images_seen, "train_s": train_s + (now - t_loop),
                     "sessions": sessions + [{**session, "end_step": at, "wall_s": round(now - t_start, 2)}]}
            save_torch_file(run.state(at, steps, extra), last_path)
        saved_at[0] = time.perf_counter()
        if ddp.enabled:
            dist.barrier()

    saved_at = [time.perf_counter()]

    if step == 0 and monitored:
        log(0, validate=True)  # the random initialisation, for reference
    step_ema, start = None, step
    while step < stop_at:
        # rank 0's clock decides for every rank, in one broadcast: is the budget spent, is a checkpoint due
        now = time.perf_counter()
        need = step_ema if step_ema is not None else 0.0
        out_of_time = budget_s is not None and now - t_start + 1.5 * need > budget_s
        clock_due = config.checkpoint_minutes is not None and now - saved_at[0] > 60 * config.checkpoint_minutes
        if budget_s is not None or config.checkpoint_minutes is not None:
            out_of_time, clock_due = _broadcast((out_of_time, clock_due), ddp)
        if out_of_time:
            stopped = "time budget"
            break
        if clock_due and step != start and step % config.checkpoint_every:  # not saved at this step yet
            save(step)
        t0 = time.perf_counter()
        out = run.step(step, steps)
        step += 1
        images_seen += config.batch_size
        dt = time.perf_counter() - t0
        step_ema = dt if step_ema is None else 0.9 * step_ema + 0.1 * dt
        for k, v in out.items():
            if k.startswith("loss"):
                acc["sums"][k] = acc["sums"].get(k, 0.0) + v.float()
        acc["n"] += 1
        acc["last"] = out
        bar.update(1)
        validate = monitored and (step % config.val_every == 0 or step == stop_at)
        if step % config.log_every == 0 or step == stop_at or validate:
            log(step, validate)
        if step % config.checkpoint_every == 0 and step < stop_at:
            save(step)
    if acc["n"] or (monitored and acc["validated"] != step):  # e.g. when the time budget ran out
        log(step, validate=monitored and acc["validated"] != step)
    bar.close()
    save(step)
    if ddp.main:
        print(f"pretrain {config.objective}: step {step}/{steps} ({stopped}); run folder {run_dir}")
    history = pd.read_csv(log_path) if log_path.is_file() else pd.DataFrame(columns=LOG_COLUMNS)
    model = run.exported.to("cpu").eval()
    if config.objective == "cnn":
        backbone = model
    else:
        backbone = model.backbone
        backbone.is_random_init = False
    return PretrainResult(backbone=backbone, history=history, run_dir=run_dir, last_path=last_path, step=step,
                          steps=steps, stopped=stopped)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def describe_backbone(config: BackboneConfig, objective: str, init_objective: str | None = None,
                      short: bool = False, class_token: bool = True) -> str:
    """The line every figure and table made with a pretrained backbone carries, e.g.
    "ViT-S/14, 4 blocks at 112 px, self-supervised (DINO + iBOT) on synthetic streets (not Meta's
    DINOv2 weights)"; ``short=True``: the form that fits under a figure, e.g. "ViT-S/14
    self-supervised on synthetic streets (not Meta's DINOv2)". ``init_objective``: the objective
    of the weights the run started from; ``class_token=False``: a distil run whose CLS token had no
    objective (only the patch tokens learned the teacher's map)."""
    arch = f"ViT-{config.arch[3].upper()}/{config.patch_size}"
    if objective == "distil" and not class_token:
        objective = "distil_patches"
    if short:
        names = {"dino": "self-supervised", "supervised": "trained with L_MS", "distil": "distilled from a small CNN",
                 "distil_patches": "patch tokens distilled (no CLS objective)"}
        how = names[objective] if init_objective is None else f"{names[init_objective]}, then {names[objective]},"
        return f"{arch} {how} on synthetic streets (not Meta's DINOv2)"
    names = {"dino": "self-supervised (DINO + iBOT)", "supervised": "trained with L_MS on places",
             "distil": "distilled from a small CNN trained with L_MS",
             "distil_patches": "its patch tokens alone distilled from a teacher's feature map (no objective on the CLS token)"}
    how = names[objective] if init_objective is None else f"{names[init_objective]}, then {names[objective]}"
    blocks = f"{config.depth} block{'s' if config.depth != 1 else ''}"
    return f"{arch}, {blocks} at {config.pretrain_img_size} px, {how} on synthetic streets (not Meta's DINOv2 weights)"


def _load_teacher(path: PathLike, config: PretrainConfig) -> tuple[LayoutCNN | ViTMapTeacher, dict[str, Any]]:
    """The teacher of a distil run and its record as the run read it (kept in the checkpoint's data
    record and copied to the export's manifest): its file's name and sha256, and how it was trained
    (from its manifest). A backbone weight file with its manifest (:data:`MANIFEST_FORMAT`, the
    architecture of ``config``) gives a :class:`ViTMapTeacher`; any other file is read as a
    :class:`LayoutCNN` (:meth:`LayoutCNN.load`, which refuses a file its manifest does not describe)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"distil_teacher {str(path)!r} does not exist; train one with `scicevpr pretrain-backbone "
                                "--objective cnn ... --export cnn.pt`, or give an exported backbone (.pth with its manifest).")
    record: dict[str, Any] = {"file": path.name, "sha256": file_sha256(path)}
    vit_manifest = check_manifest(path, config.backbone_config())  # None unless a backbone manifest lies beside it
    if vit_manifest is not None:
        if config.distil_class_token:
            raise ValueError(f"distil_teacher {str(path)!r} is a ViT backbone: it has no place descriptor for the CLS token "
                             "to learn; distil with distil_class_token=False (--no-distil-class-token).")
        if config.distil_size != config.image_size:
            raise ValueError(f"a ViT teacher sees the student's crop: set distil_size={config.image_size} (the image_size), "
                             f"not {config.distil_size}.")
        net = ViTMapTeacher(build_backbone(config.backbone_config(), path))
        record["kind"] = "vit"
        record["trained"] = {k: vit_manifest.get(k) for k in ("description", "label", "objective", "init", "distil_teacher", "steps", "train_s", "machines")}
        return net, record
    net = LayoutCNN.load(path)
    if net.manifest is not None:
        record["trained"] = {k: net.manifest.get(k) for k in ("description", "data", "steps", "images_seen", "train_s", "machines")}
    return net, record


def _run_record(ckpt: dict[str, Any], cfg: PretrainConfig) -> dict[str, Any]:
    """What every export's manifest says about the run that made it."""
    sessions = ckpt["sessions"]
    return {
        "objective": cfg.objective,
        "data": {k: v for k, v in ckpt["data"].items() if k != "distil_teacher"},
        "steps": ckpt["step"],
        "schedule_steps": ckpt["steps"],
        "batch_size": cfg.batch_size,
        "images_seen": ckpt["images_seen"],
        "train_s": round(ckpt["train_s"], 1),
        "wall_s": round(sum(s["wall_s"] for s in sessions), 1),
        "machines": [s["machine"] for s in sessions],
        "sessions": [{k: s[k] for k in ("start_step", "end_step", "wall_s")} for s in sessions],
        "torch": str(torch.__version__),
        "config": ckpt["config"],
    }


def _export_path(out_path: PathLike, default_name: str) -> Path:
    """``out_path``, or ``<out_path>/<default_name>`` when it is a folder (or a new name without a suffix)."""
    out = Path(out_path)
    if out.is_dir() or (not out.suffix and not out.exists()):
        out = out / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _export_cnn(ckpt: dict[str, Any], cfg: PretrainConfig, out_path: PathLike) -> Path:
    """A ``"cnn"`` run's network: its fp32 state dict (what :meth:`LayoutCNN.load` and
    ``distil_teacher`` read) and a manifest beside it."""
    state = ckpt["student"]
    LayoutCNN().load_state_dict(state, strict=True)
    out = _export_path(out_path, f"layout_cnn_{cfg.distil_size}px.pt")
    save_torch_file(state, out)
    manifest = {
        "format": CNN_MANIFEST_FORMAT,
        "description": f"LayoutCNN at {cfg.distil_size} px trained with L_MS on synthetic streets",
        "file": out.name,
        "sha256": file_sha256(out),
        "bytes": out.stat().st_size,
        "dtype": "float32",
        "parameters": int(sum(v.numel() for v in state.values() if v.is_floating_point())),
        "image_size": cfg.distil_size,
        **_run_record(ckpt, cfg),
    }
    atomic_write_text(manifest_path(out), json.dumps(manifest, indent=2) + "\n")
    return out


def export_backbone(source: PathLike, out_path: PathLike, which: str | None = None) -> Path:
    """Write a run's backbone as one fp16 state dict in DINOv2's official names, with a manifest.

    Args:
        source: a run folder or its ``last.pt``.
        out_path: the weight file, or a folder (then ``<folder>/<hub name>_pretrain.pth``, e.g.
            ``scicevpr_vits14_4blocks_112px_pretrain.pth``, the name ``weights="auto"`` looks for).
        which: ``"teacher"`` (DINO's default: the EMA teacher is the better model and the one
            DINO releases) or ``"student"`` (the only ViT of the supervised and distil objectives).
    Returns:
        The weight file. Beside it, ``<name>.json``: objective, data preset and seed, steps,
        images seen, wall time, machines, torch version, the backbone config and the file's
        SHA-256, which loading checks (:func:`scicevpr.weights.check_manifest`).
        A ``"cnn"`` run has no ViT: its :class:`LayoutCNN` is written instead (fp32 state dict,
        default name ``layout_cnn_<size>px.pt``, the ``distil_teacher`` of a distil run).
    """
    ckpt = read_pretrain_checkpoint(source)
    cfg = PretrainConfig.from_dict(ckpt["config"])
    if cfg.objective == "cnn":
        if which not in (None, "student"):
            raise ValueError(f"which={which!r}: a cnn run has one network and no teacher; leave which unset.")
        return _export_cnn(ckpt, cfg, out_path)
    which = which or ("teacher" if ckpt["teacher"] is not None else "student")
    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r}: expected 'teacher' or 'student'.")
    models = {"teacher": ckpt["teacher"], "student": ckpt["student"]}
    if models[which] is None:
        raise ValueError(f"this {cfg.objective} run has no teacher; export which='student'.")
    bb_config = BackboneConfig(**ckpt["backbone_config"])
    state = {k[len("backbone."):]: v.half() if v.is_floating_point() else v
             for k, v in models[which].items() if k.startswith("backbone.")}
    DinoVisionTransformer(bb_config).load_state_dict(state, strict=True)  # official names, all of them
    out = _export_path(out_path, f"{bb_config.hub_name}_pretrain.pth")
    save_torch_file(state, out)
    init = None
    if cfg.init_weights is not None:  # the run started from another export: record which
        init_manifest = check_manifest(cfg.init_weights, bb_config) or {}  # verified: the recorded sha256 is the file's
        init = {"file": Path(cfg.init_weights).name, "sha256": init_manifest.get("sha256"),
                "objective": init_manifest.get("objective"), "description": init_manifest.get("description"),
                "steps": init_manifest.get("steps"), "wall_s": init_manifest.get("wall_s"),
                "machines": init_manifest.get("machines")}
    manifest = {
        "format": MANIFEST_FORMAT,
        "description": describe_backbone(bb_config, cfg.objective, init and init["objective"], class_token=cfg.distil_class_token),
        "label": describe_backbone(bb_config, cfg.objective, init and init["objective"], short=True,
                                   class_token=cfg.distil_class_token),
        "file": out.name,
        "sha256": file_sha256(out),
        "bytes": out.stat().st_size,
        "dtype": "float16",
        "backbone": ckpt["backbone_config"],
        "parameters": int(sum(v.numel() for v in state.values())),
        "objective": cfg.objective,  # in this place; the run's record repeats it
        "init": init,
        "distil_teacher": ckpt["data"].get("distil_teacher"),  # hashed when the run read it
        "model": which,
        **_run_record(ckpt, cfg),
    }
    atomic_write_text(manifest_path(out), json.dumps(manifest, indent=2) + "\n")
    check_manifest(out, bb_config)
    return out
