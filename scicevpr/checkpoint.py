"""Native scicevpr checkpoints: atomic saving, and :func:`load_model` from a file alone.

A checkpoint is one ``torch.save`` dict::

    format        "scicevpr-checkpoint"
    version       1
    model_class   "SuperCricaVPR" | "SciceVPR" | "CricaVPR"
    model_config  the ModelConfig as a dict ("type" names the dataclass)
    backbone      how to rebuild the frozen DINOv2 (see below)
    model_state   the model's state dict WITHOUT the frozen DINOv2 parameters: fusion conv,
                  token mixers, GeM p, encoder (CricaVPR: its adapters, BatchNorm buffers
                  included); the student's frozen copy of the teacher's conv is kept
    backbone_state  only when the backbone cannot be rebuilt from ``backbone`` (see below)
    meta          free-form facts (stage, epoch, recalls, torch version)
    training      only in a run's ``last.pt``: optimizer, scheduler, epoch, RNG states, ...

The frozen backbone is the bulk of a model (ViT-B: 86 M parameters, 344 MB) and never changes
in training, so it is stored by reference when possible. ``backbone["source"]`` is

- ``"file"``: the DINOv2 weight file (``path``; on load ``weights="auto"`` is tried if that path
  is gone, so a checkpoint moves between machines that each have the weights);
- ``"random"``: a random initialisation rebuilt exactly from ``seed`` (the backbone is the
  first thing a model draws from torch's RNG after ``torch.manual_seed(seed)``);
- ``"stored"``: the parameters are in ``backbone_state`` (e.g. a backbone that came from an
  authors' full checkpoint, or ``store_backbone=True``).

``fingerprint`` (SHA-256 of the frozen parameters) is checked on load: a different weight file
or a changed random initialisation is an error, never silently another model.

Writes are atomic: a temporary file in the same folder, flushed to disk, then ``os.replace``,
so a crash during a save leaves the previous file intact.

A checkpoint holds tensors and plain Python types only (no NumPy, no other objects), so it loads
with ``torch.load(..., weights_only=True)``; :func:`read_checkpoint` reads it that way
(:func:`scicevpr.files.load_torch_file`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .backbone import RandomWeightsWarning, resolve_weights
from .config import BackboneConfig, CricaVPRConfig, ModelConfig
from .cricavpr import CricaVPR
from .files import load_torch_file
from .models import SciceVPR, SuperCricaVPR, VPRModel

PathLike = str | os.PathLike

FORMAT = "scicevpr-checkpoint"
VERSION = 1

MODEL_CLASSES: dict[str, type[VPRModel]] = {
    "SuperCricaVPR": SuperCricaVPR,
    "SciceVPR": SciceVPR,
    "CricaVPR": CricaVPR,
}
_CONFIG_CLASSES: dict[str, type[ModelConfig]] = {"ModelConfig": ModelConfig, "CricaVPRConfig": CricaVPRConfig}


# --------------------------------------------------------------------------------------------
# Model configs <-> plain dicts
# --------------------------------------------------------------------------------------------


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """A ModelConfig as JSON-friendly dict, ``{"type": <dataclass name>, fields...}``."""
    d = dataclasses.asdict(config)
    d["layers"] = list(config.layers)
    return {"type": type(config).__name__, **d}


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`config_to_dict`."""
    d = dict(d)
    kind = d.pop("type", "ModelConfig")
    if kind not in _CONFIG_CLASSES:
        raise ValueError(f"unknown model config type {kind!r}; expected one of {sorted(_CONFIG_CLASSES)}")
    d["backbone"] = BackboneConfig(**d["backbone"])
    d["layers"] = tuple(d["layers"])
    return _CONFIG_CLASSES[kind](**d)


# --------------------------------------------------------------------------------------------
# Building models with a reproducible backbone
# --------------------------------------------------------------------------------------------


def model_class(name: str) -> type[VPRModel]:
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {name!r}; expected one of {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[name]


def build_model(
    name: str,
    preset_or_config: str | ModelConfig,
    weights: PathLike | None = "auto",
    seed: int = 0,
    **overrides: Any,
) -> VPRModel:
    """A fresh model whose initialisation depends only on ``seed``, with its backbone's origin
    recorded (``model.backbone.source``) so that checkpoints can refer to it.

    Args:
        name: ``"SuperCricaVPR"``, ``"SciceVPR"`` or ``"CricaVPR"``.
        preset_or_config: a preset name or a ModelConfig.
        weights: DINOv2 weights: a path, ``"auto"`` or None (random, reproducible from ``seed``).
        seed: seeds torch's RNG (in a forked RNG: the caller's RNG is untouched) for the random
            parts: the backbone when ``weights=None``, then the trainable heads.
    """
    cls = model_class(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(preset_or_config, weights=weights, **overrides)
    bb = model.backbone
    if bb.is_random_init:
        bb.source = {"source": "random", "seed": int(seed)}
    else:
        bb.source = {"source": "file", "path": str(bb.weights_path), "hub_name": bb.config.hub_name}
    return model


def frozen_backbone_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the frozen DINOv2 parameters (not saved in ``model_state``)."""
    return sorted("backbone." + n for n, p in model.backbone.named_parameters() if not p.requires_grad)


def backbone_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names and bytes of the frozen backbone parameters.

    Cached on the backbone until a parameter is modified in place (tensor version counters),
    so that saving a checkpoint every epoch does not re-hash the backbone.
    """
    keys = frozen_backbone_keys(model)
    state = model.state_dict()
    stamp = (tuple(keys), tuple((state[k].data_ptr(), state[k]._version) for k in keys))
    cached = getattr(model.backbone, "_fingerprint_cache", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    h = hashlib.sha256()
    for k in keys:
        t = state[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    model.backbone._fingerprint_cache = (stamp, h.hexdigest())
    return h.hexdigest()


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without the frozen DINOv2 parameters, on the CPU."""
    frozen = set(frozen_backbone_keys(model))
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``model_state`` strictly: every non-backbone key must be present, nothing else."""
    expected = set(model.state_dict()) - set(frozen_backbone_keys(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint's weights do not fit this {type(model).__name__} ({model.config.name}): "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
            f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}."
        )
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to a temporary file next to ``path``, fsync, then ``os.replace``: readers
    see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"  # same folder: os.replace is atomic
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def checkpoint_dict(
    model: VPRModel,
    meta: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    store_backbone: bool = False,
) -> dict[str, Any]:
    """The checkpoint of ``model`` as a dict (format in the module docstring)."""
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise TypeError(f"cannot checkpoint a {name}; expected one of {sorted(MODEL_CLASSES)}")
    source = dict(getattr(model.backbone, "source", None) or {"source": "stored"})
    if store_backbone:
        source = {"source": "stored"}
    source["fingerprint"] = backbone_fingerprint(model)
    source["random_init"] = bool(model.is_random_init)
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": name,
        "model_config": config_to_dict(model.config),
        "backbone": source,
        "model_state": trainable_state_dict(model),
        "meta": {"torch": str(torch.__version__), **(meta or {})},
    }
    if source["source"] == "stored":
        state = model.state_dict()
        ckpt["backbone_state"] = {k: state[k].detach().to("cpu").clone() for k in frozen_backbone_keys(model)}
    if training is not None:
        ckpt["training"] = training
    return ckpt


def save_checkpoint(
    path: PathLike,
    model: VPRModel,
    meta: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    store_backbone: bool = False,
) -> Path:
    """Write ``model`` as a native checkpoint, atomically. Returns the path."""
    return atomic_save(checkpoint_dict(model, meta, training, store_backbone), path)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def is_native_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def read_checkpoint(path: PathLike, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Read a native checkpoint (on the CPU) and check its format.

    ``trust_checkpoint=True`` also loads a file that holds pickled Python objects (which runs
    code from it); see :func:`scicevpr.files.load_torch_file`.
    """
    path = Path(path)
    obj = load_torch_file(path, "checkpoint", trust=trust_checkpoint)
    if not is_native_checkpoint(obj):
        raise ValueError(
            f"{str(path)!r} is not a scicevpr checkpoint (no format={FORMAT!r} entry). An authors' "
            f"checkpoint loads with SuperCricaVPR(...).load_official / SciceVPR(...).load_official / "
            f"CricaVPR(...).load_official."
        )
    if obj.get("version", 0) > VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint version {obj['version']}; this scicevpr reads <= {VERSION}. Upgrade scicevpr.")
    return obj


def _check_kind(ckpt: dict[str, Any], expected: str | Iterable[str] | None, where: str) -> None:
    if expected is None:
        return
    expected = (expected,) if isinstance(expected, str) else tuple(expected)
    if ckpt["model_class"] not in expected:
        raise ValueError(
            f"{where} holds a {ckpt['model_class']} ({ckpt['model_config'].get('name')}), but a "
            f"{' or '.join(expected)} is needed here. Pass the checkpoint of the right model "
            f"(stage 1 writes SuperCricaVPR checkpoints, stage 2 SciceVPR ones)."
        )


def model_from_checkpoint(ckpt: dict[str, Any], where: str = "checkpoint", expected: str | Iterable[str] | None = None) -> VPRModel:
    """Rebuild the model of a checkpoint dict (see :func:`load_model`)."""
    _check_kind(ckpt, expected, where)
    name = ckpt["model_class"]
    cfg = config_from_dict(ckpt["model_config"])
    record = dict(ckpt["backbone"])
    src = record["source"]
    if src == "random":
        model = build_model(name, cfg, weights=None, seed=record["seed"])
    elif src == "file":
        weights = Path(record["path"])
        if not weights.is_file():
            try:
                weights = resolve_weights("auto", cfg.backbone)
            except FileNotFoundError as e:
                raise FileNotFoundError(
                    f"{where} refers to the DINOv2 weights {record['path']!r}, which do not exist here, "
                    f"and weights='auto' found none: {e}"
                ) from None
        model = build_model(name, cfg, weights=weights)
    elif src == "stored":
        if "backbone_state" not in ckpt:
            raise ValueError(f"{where} says its backbone is stored but holds no backbone_state; the file is damaged.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            model = build_model(name, cfg, weights=None)
        model.load_state_dict(ckpt["backbone_state"], strict=False)
        model.backbone.is_random_init = bool(record.get("random_init", False))
        model.backbone.source = {"source": "stored"}
    else:
        raise ValueError(f"{where}: unknown backbone source {src!r}")
    fingerprint = backbone_fingerprint(model)
    if record.get("fingerprint") and fingerprint != record["fingerprint"]:
        raise ValueError(
            f"{where}: the rebuilt DINOv2 backbone (source {src!r}) differs from the one it was trained "
            f"with (fingerprint mismatch). "
            + (
                "The weight file is not the one used in training; point SCICEVPR_WEIGHTS at the right one."
                if src == "file"
                else "The random initialisation changed (another torch or scicevpr version); re-save the "
                "checkpoint with store_backbone=True where it was made."
            )
        )
    load_trainable_state(model, ckpt["model_state"])
    if name == "SciceVPR":
        model.fusion.conv.requires_grad_(False)  # the conv copied from the teacher stays frozen
    return model


def load_model(
    path: PathLike,
    device: str | torch.device = "cpu",
    expected: str | Iterable[str] | None = None,
    trust_checkpoint: bool = False,
) -> VPRModel:
    """A ready-to-evaluate model (eval mode) from a native scicevpr checkpoint alone.

    Args:
        path: a checkpoint written by training (``best.pt``, ``last.pt``) or
            :func:`save_checkpoint`.
        device: where to put the model.
        expected: model class name(s) this file must hold, e.g. ``"SuperCricaVPR"``; another
            kind raises a ValueError naming both.
        trust_checkpoint: also load a file that holds pickled Python objects, which runs code
            from it; only for a file from a source you trust.
    """
    ckpt = read_checkpoint(path, trust_checkpoint)
    model = model_from_checkpoint(ckpt, where=f"checkpoint {str(path)!r}", expected=expected)
    return model.to(device).eval()
