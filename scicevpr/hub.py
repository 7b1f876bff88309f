"""The models as ``torch.hub`` entry points (``hubconf.py`` at the repository root calls :func:`create`).

::

    model = torch.hub.load("<owner>/scicevpr", "scicevpr_b")                      # DINOv2 weights="auto"
    model = torch.hub.load("<owner>/scicevpr", "scicevpr_b", checkpoint="SciceVPR_pitts.pth")  # authors'
    model = torch.hub.load("<owner>/scicevpr", "scicevpr_s", checkpoint="runs/student/best.pt")  # native
    model = torch.hub.load("/path/to/scicevpr", "scicevpr_s", source="local", weights=None)     # random

Every entry point returns the model in eval mode; ``model(images)`` maps (B, 3, S, S) images,
hard-resized to ``model.image_size`` and ImageNet-normalised, to (B, D) unit-norm descriptors;
``model.data_config`` states S, the mean and std, D and whether descriptors depend on the batch,
and ``model.transform`` turns a PIL image into the input.

The ``*_offline`` entries (:data:`OFFLINE_ENTRY_POINTS`) need no network and no file outside the
repository: **trained** models on the shipped compact backbone, their heads read from
``scicevpr/weights/offline/`` (made by ``scicevpr train-offline --export``; see
:mod:`scicevpr.offline.models`) by :func:`create_offline`.
"""

from __future__ import annotations

import os
from typing import Any

# entry point -> (model class, preset)
ENTRY_POINTS: dict[str, tuple[str, str]] = {
    "scicevpr_b": ("SciceVPR", "SciceVPR-B"),
    "scicevpr_l": ("SciceVPR", "SciceVPR-L"),
    "scicevpr_s": ("SciceVPR", "SciceVPR-S"),
    "super_cricavpr_b": ("SuperCricaVPR", "SciceVPR-B"),
    "super_cricavpr_l": ("SuperCricaVPR", "SciceVPR-L"),
    "super_cricavpr_s": ("SuperCricaVPR", "SciceVPR-S"),
    "cricavpr": ("CricaVPR", "CricaVPR"),
    "cricavpr_s": ("CricaVPR", "CricaVPR-S"),
}

OFFLINE_ENTRY_POINTS = ("scicevpr_s_offline", "super_cricavpr_s_offline", "cricavpr_s_offline")
"""The trained offline models (:data:`scicevpr.offline.models.ENTRIES`): student, teacher, CricaVPR-S."""


def create(
    entry: str,
    checkpoint: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = "auto",
    device: str = "cpu",
    trust_checkpoint: bool = False,
    **overrides: Any,
):
    """The model of hub entry point ``entry`` (see :data:`ENTRY_POINTS`), in eval mode.

    Args:
        entry: e.g. ``"scicevpr_b"``.
        checkpoint: None, or a path to a trained model: a native scicevpr checkpoint
            (``runs/<name>/best.pt``; it must hold this entry's model class and preset) or the
            authors' checkpoint (``{"model_state_dict": ...}`` in their key names; it carries the
            whole DINOv2, so ``weights`` is not used).
        weights: DINOv2 weights when ``checkpoint`` is None or the authors': ``"auto"`` (the
            file in ``$SCICEVPR_WEIGHTS`` or the torch hub cache, else Meta's download), a path,
            or None for a random initialisation.
        device: where the model is put.
        trust_checkpoint: also load a checkpoint that holds pickled Python objects, which runs
            code from it; only for a file from a source you trust (it is otherwise read with
            ``weights_only=True``, see :func:`scicevpr.files.load_torch_file`).
        **overrides: ModelConfig fields, e.g. ``image_size=322`` (not with a native checkpoint,
            which records its own configuration).
    """
    if entry not in ENTRY_POINTS:
        raise ValueError(f"unknown scicevpr hub entry point {entry!r}; available: {sorted(ENTRY_POINTS)}")
    name, preset = ENTRY_POINTS[entry]
    from .checkpoint import load_model
    from .factory import create_model

    if checkpoint is None:
        return create_model(name, preset, weights=weights, **overrides).to(device).eval()
    model = load_model(checkpoint, device, expected=name, trust_checkpoint=trust_checkpoint, preset=preset, **overrides)
    if model.config.name != preset:  # a native checkpoint records its own preset
        fits = [e for e, (n, p) in ENTRY_POINTS.items() if n == name and p == model.config.name]
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} holds a {name} {model.config.name}, not the {preset} of hub entry "
            f"point {entry!r}; load it with {fits[0] if fits else 'scicevpr.load_model'!r} instead."
        )
    if overrides and model.config != model.config.with_overrides(**overrides):
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} records its own configuration; drop the overrides {sorted(overrides)}."
        )
    return model


def create_offline(entry: str, heads: str | os.PathLike | None = None, device: str = "cpu"):
    """The trained offline model of hub entry ``entry`` (one of :data:`OFFLINE_ENTRY_POINTS`), in
    eval mode: SciceVPR-S at 112 px on the shipped compact backbone (4 blocks; all four fused,
    CricaVPR-S pooling the last), with the heads in ``heads`` (default ``scicevpr/weights/offline/``,
    :func:`scicevpr.offline.models.load_heads`). Heads trained on another backbone are refused."""
    from .offline.models import load_heads

    if entry not in OFFLINE_ENTRY_POINTS:
        raise ValueError(f"unknown offline hub entry point {entry!r}; available: {list(OFFLINE_ENTRY_POINTS)}")
    return load_heads(entry, heads, device)
