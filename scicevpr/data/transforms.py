"""Image transforms shared by every input path (paper: "Training" and "Evaluation protocol").

Evaluation: hard resize to (S, S), bilinear with antialiasing, ImageNet mean/std.
Training (GSV-Cities): the same resize, RandAugment with 3 ops, the same normalisation.

All PIL images are first turned into uint8 tensors, so the PIL path (``eval_transform``) and the
batched JPEG path (``scicevpr.data.decode``) share one resize + normalise implementation,
``normalize_uint8_batch``; they can then differ only by the JPEG decoder's rounding.

``protocol="official"`` (:mod:`scicevpr.protocol`, point 1) uses the authors' evaluation
transform instead, :class:`OfficialEvalTransform`: ToTensor -> Normalize -> bilinear resize of the
float tensor without antialiasing (their ``datasets_ws.py`` under torchvision 0.15). On a
600 x 512 photo the two 224 px inputs differ by about 9% relative L2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from ..config import check_image_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BILINEAR = T.InterpolationMode.BILINEAR


def to_uint8_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image (any mode) or (3, H, W) uint8 tensor -> (3, H, W) uint8 RGB tensor."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise TypeError(f"expected a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
        return image
    if image.mode != "RGB":
        image = image.convert("RGB")
    return TF.pil_to_tensor(image)  # (H, W, 3) bytes -> (3, H, W) uint8


def _resize_uint8(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, S, S) uint8; bilinear, antialiased (PIL-like), rounded."""
    if tuple(x.shape[-2:]) == (image_size, image_size):
        return x
    return TF.resize(x, [image_size, image_size], interpolation=_BILINEAR, antialias=True)


def resize_uint8(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, S, S) uint8: the hard, antialiased resize of every input path."""
    return _resize_uint8(x, check_image_size(image_size))


def normalize_unit(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) float in [0, 1] -> the same shape in ImageNet-normalised units (``T.Normalize``)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def _normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float32 in ImageNet-normalised units."""
    return normalize_unit(x_uint8.to(torch.float32) / 255.0)


def normalize_uint8_batch(x_uint8: torch.Tensor | Sequence[torch.Tensor], image_size: int) -> torch.Tensor:
    """Hard-resize and normalise a batch of uint8 RGB images, on whatever device they live.

    Args:
        x_uint8: (B, 3, H, W) uint8 tensor, or a sequence of B (3, H_i, W_i) uint8 tensors
            (images of different sizes, as decoded from a folder of JPEGs).
        image_size: S, the model's square input side.
    Returns:
        (B, 3, S, S) float32 tensor, ImageNet mean/std normalised, on the input's device.
    """
    image_size = check_image_size(image_size)
    if isinstance(x_uint8, torch.Tensor):
        if x_uint8.dtype != torch.uint8 or x_uint8.ndim != 4 or x_uint8.shape[1] != 3:
            raise TypeError(f"expected a (B, 3, H, W) uint8 tensor, got {tuple(x_uint8.shape)} {x_uint8.dtype}")
        return _normalize(_resize_uint8(x_uint8, image_size))
    images = list(x_uint8)
    if not images:
        raise ValueError("normalize_uint8_batch got an empty list of images")
    for im in images:
        to_uint8_tensor(im)  # validates dtype and shape
    # Resize image by image (sizes may differ), then normalise the stacked batch.
    resized = [_resize_uint8(im.unsqueeze(0), image_size) for im in images]  # each (1, 3, S, S)
    return _normalize(torch.cat(resized, dim=0))  # (B, 3, S, S)


class EvalTransform:
    """PIL image -> (3, S, S) float tensor: hard resize to (S, S), bilinear + antialias, ImageNet normalisation.

    A class rather than a lambda so that DataLoader workers can pickle it.
    """

    def __init__(self, image_size: int):
        self.image_size = check_image_size(image_size)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        x = to_uint8_tensor(image).unsqueeze(0)  # (3, H, W) -> (1, 3, H, W)
        return normalize_uint8_batch(x, self.image_size)[0]  # (3, S, S)

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size})"


class OfficialEvalTransform:
    """The authors' evaluation transform: PIL -> ToTensor -> Normalize -> ``resize([S, S])`` of
    the normalised float tensor, bilinear, **not** antialiased -> (3, S, S) float32.

    shuimushan/SciceVPR and Lu-Feng/CricaVPR ``datasets_ws.py`` (``base_transform`` then
    ``transforms.functional.resize(img, self.resize)``); torchvision 0.15, their pin, does not
    antialias tensor resizes. Equal to ``T.Resize((S, S), antialias=False)`` after
    ``T.ToTensor(), T.Normalize(...)`` (tested).
    """

    def __init__(self, image_size: int):
        self.image_size = check_image_size(image_size)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        x = normalize_unit(to_uint8_tensor(image).to(torch.float32).div(255.0))  # ToTensor, Normalize: (3, H, W)
        if tuple(x.shape[-2:]) == (self.image_size, self.image_size):
            return x
        return TF.resize(x, [self.image_size, self.image_size], interpolation=_BILINEAR, antialias=False)  # (3, S, S)

    def __repr__(self) -> str:
        return f"OfficialEvalTransform(image_size={self.image_size})"


class TrainTransform:
    """GSV-Cities training augmentation: resize (S, S) bilinear, RandAugment(num_ops), normalise.

    Uses torch's global RNG (as torchvision's RandAugment does); ``GSVCitiesDataset`` seeds it per
    sample so that augmentations are reproducible.
    """

    def __init__(self, image_size: int, randaugment_ops: int = 3):
        self.image_size = check_image_size(image_size)
        self.randaugment_ops = int(randaugment_ops)
        self.randaugment = T.RandAugment(num_ops=self.randaugment_ops, interpolation=_BILINEAR)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        x = _resize_uint8(to_uint8_tensor(image).unsqueeze(0), self.image_size)  # (1, 3, S, S) uint8
        if self.randaugment_ops > 0:
            x = self.randaugment(x)
        return _normalize(x)[0]  # (3, S, S)

    def __repr__(self) -> str:
        return f"TrainTransform(image_size={self.image_size}, randaugment_ops={self.randaugment_ops})"


def eval_transform(image_size: int, protocol: str = "default") -> EvalTransform | OfficialEvalTransform:
    """The evaluation transform: PIL -> normalised (3, S, S) tensor (hard resize, no crop).
    ``protocol="official"``: the authors' non-antialiased resize (:class:`OfficialEvalTransform`)."""
    from ..protocol import check_protocol

    if check_protocol(protocol) == "official":
        return OfficialEvalTransform(image_size)
    return EvalTransform(image_size)


def data_config(image_size: int, descriptor_dim: int, batch_dependent: bool) -> dict:
    """A model's input and output as one dict (``VPRModel.data_config``): the evaluation
    transform's parameters (``input_size`` (3, S, S), hard resize without crop, bilinear with
    antialiasing, ImageNet ``mean`` / ``std``, the names timm's ``resolve_data_config`` uses),
    ``descriptor_dim`` and ``batch_dependent`` (descriptors depend on the rest of the batch)."""
    s = int(image_size)  # the model's, checked by its ModelConfig
    return {"input_size": (3, s, s), "interpolation": "bilinear", "antialias": True, "crop_pct": 1.0,
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "descriptor_dim": int(descriptor_dim),
            "batch_dependent": bool(batch_dependent)}


def transform_from_data_config(config: dict) -> EvalTransform:
    """The evaluation transform (:class:`EvalTransform`) of a :func:`data_config` dict; a dict
    asking for a preprocessing that :class:`EvalTransform` does not do is refused."""
    want = data_config(config["input_size"][-1], config.get("descriptor_dim", 0), config.get("batch_dependent", False))
    keys = ("input_size", "interpolation", "antialias", "crop_pct", "mean", "std")
    diff = [k for k in keys if k in config and tuple(np.atleast_1d(config[k])) != tuple(np.atleast_1d(want[k]))]
    if diff:
        raise ValueError(f"no scicevpr transform for the data config {config!r}: {', '.join(diff)} differ from the "
                         f"evaluation transform's ({', '.join(f'{k}={want[k]!r}' for k in diff)}).")
    return EvalTransform(want["input_size"][-1])


def transform_size(image_size: int | None, transform, default: int | None = None) -> int | None:
    """The side S a dataset yields: ``transform``'s own when one is given (a different
    ``image_size`` beside it is refused), else ``image_size`` (or ``default``), checked."""
    if transform is None:
        return check_image_size(default if image_size is None else image_size)
    own = getattr(transform, "image_size", None)
    if image_size is not None and own is not None and image_size != own:
        raise ValueError(f"image_size={image_size} but the transform resizes to {own}: pass one of them "
                         f"(the transform alone is enough)")
    return own if own is not None else image_size


def train_transform(image_size: int, randaugment_ops: int = 3) -> TrainTransform:
    """The official training augmentation: resize, RandAugment(num_ops=3), normalise."""
    return TrainTransform(image_size, randaugment_ops)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the normalisation, for display: (..., 3, H, W) float -> same shape in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)
