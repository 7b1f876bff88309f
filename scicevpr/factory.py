"""One door that builds any model: :func:`create_model`, in the manner of timm's ``create_model``.

::

    model = scicevpr.create_model("SciceVPR", "SciceVPR-B", weights="auto")       # DINOv2 weights
    teacher = scicevpr.create_model("SuperCricaVPR", "SciceVPR-S", weights=None, image_size=112)
    baseline = scicevpr.create_model("CricaVPR")                                 # preset "CricaVPR"

A model is a name of :data:`MODELS` (the registry), a preset (or a ModelConfig), DINOv2
``weights`` and ModelConfig overrides. The build is reproducible: every random part is drawn
from ``seed``, and the backbone records where its weights came from (its ``provenance``), so
that a checkpoint can refer to them instead of storing them. A *trained* model comes from a
file through the loading door, :func:`scicevpr.checkpoint.load_model`, which builds with this
function too.
"""

from __future__ import annotations

import os
from typing import Any

from .config import ModelConfig, get_config
from .cricavpr import CricaVPR
from .models import SciceVPR, SuperCricaVPR, VPRModel

PathLike = str | os.PathLike

MODELS: dict[str, type[VPRModel]] = {
    "SciceVPR": SciceVPR,  # the student: self-enhanced encoder, batch-independent
    "SuperCricaVPR": SuperCricaVPR,  # the teacher: cross-image encoder
    "CricaVPR": CricaVPR,  # the cross-image baseline (Lu et al., CVPR 2024)
}
"""The registry: model name -> class. Every model the package builds is one of these."""

DEFAULT_PRESETS: dict[str, str] = {"SciceVPR": "SciceVPR-B", "SuperCricaVPR": "SciceVPR-B", "CricaVPR": "CricaVPR"}
"""The preset :func:`create_model` uses when none is given (the paper's models)."""


def model_class(name: str) -> type[VPRModel]:
    """The registered class of ``name``; an unknown name is refused with the list of known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; scicevpr builds {', '.join(map(repr, MODELS))}.")
    return MODELS[name]


def create_model(
    name: str,
    preset: str | ModelConfig | None = None,
    weights: PathLike | None = "auto",
    seed: int = 0,
    **overrides: Any,
) -> VPRModel:
    """A fresh (untrained heads) model of the registry, in train mode on the CPU.

    Args:
        name: ``"SciceVPR"``, ``"SuperCricaVPR"`` or ``"CricaVPR"`` (:data:`MODELS`).
        preset: a preset name (``"SciceVPR-B"`` / ``"-L"`` / ``"-S"``, ``"CricaVPR"``,
            ``"CricaVPR-S"``) or a ModelConfig; None: the name's :data:`DEFAULT_PRESETS` entry.
        weights: DINOv2 weights: a path, ``"auto"`` (``$SCICEVPR_WEIGHTS``, the torch hub cache,
            Meta's download; a compact backbone from the package's ``weights/``) or None (a random
            initialisation). Found once, before anything is built
            (:func:`scicevpr.backbone.build_backbone`), so a wrong path fails at once.
        seed: every random part (the backbone when ``weights=None``, then the trainable heads)
            is drawn from torch's CPU generator seeded with ``seed``, in a forked RNG: the caller's RNG
            (the GPUs' included) is untouched.
        **overrides: ModelConfig fields, e.g. ``image_size=112`` or ``backbone_num_blocks=4``.
    """
    cls = model_class(name)
    cfg = get_config(DEFAULT_PRESETS[name] if preset is None else preset, **overrides)
    return cls(cfg, weights=weights, seed=seed)
