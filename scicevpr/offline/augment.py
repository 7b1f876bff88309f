"""The data of a pretraining run (:mod:`scicevpr.offline.pretrain`): its folder
(:func:`resolve_data_root`), its images decoded once (:func:`load_image_cache`), and the random
views and masks that the objectives (:mod:`scicevpr.offline.objectives`) draw from them.

Data path: every image is decoded once (DataLoader workers, tqdm bar) into an in-memory uint8
tensor of ``cache_size`` pixels a side, kept on the training device (20,000 images at 160 px are
1.5 GB). Crops, flips, colour jitter, grey, blur and solarisation then run batched on that
device (:class:`MultiCropAugment`), so a GPU is never waiting for image decoding on the CPU.

The views follow DINO's ``DataAugmentationDINO`` (Caron et al. 2021): two global crops at
``image_size`` and ``local_crops`` local crops at ``local_size`` (:func:`view_specs`), and one
supervised crop for the objectives that learn places or a teacher's features. iBOT's masks
(Zhou et al. 2022) choose, in a share ``mask_probability`` of the global crops, a ratio in
``mask_ratio`` of the patches (:func:`random_masks`).

Every function that draws takes a CPU ``torch.Generator``: the loop seeds one per step from
``(seed, step)`` and the objectives draw from it in a fixed order, so that a run is a function of
its configuration and the ranks of a ``torchrun`` launch draw what one process would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import roi_align
from tqdm.auto import tqdm

from ..data.decode import load_rgb
from ..data.transforms import normalize_unit, resize_uint8, to_uint8_tensor
from .config import PretrainConfig

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# The images: where they are, decoded once into memory
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


# --------------------------------------------------------------------------------------------
# Views: random crops and colours, computed in batches on the images' device
# --------------------------------------------------------------------------------------------


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
        ImageNet-normalised (``normalise=False``: pixels in [0, 1], for :class:`~scicevpr.offline.objectives.LayoutCNN`)."""
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
