"""Native scicevpr checkpoints, and the loading door: :func:`load_model` builds the model of any
trained-model file, a native checkpoint or an authors' one.

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
  is gone or holds other weights than the recorded fingerprint's, so a checkpoint moves between
  machines that each have the weights);
- ``"random"``: a random initialisation rebuilt exactly from ``seed`` (the backbone is the
  first thing a model draws from torch's RNG after ``torch.manual_seed(seed)``);
- ``"stored"``: the parameters are in ``backbone_state`` (e.g. a backbone that came from an
  authors' full checkpoint, or ``store_backbone=True``).

This record is the backbone's ``provenance``, set when its weights are loaded
(:func:`scicevpr.weights.load_weights`). ``fingerprint`` (SHA-256 of the frozen
parameters, ``backbone.fingerprint``) is checked on load: a different weight file or a changed
random initialisation is an error, never silently another model.

Writes are atomic (:func:`scicevpr.files.save_torch_file`), so a crash during a save leaves the
previous file intact. A checkpoint holds tensors and plain Python types only (no NumPy, no other
objects), so it loads with ``torch.load(..., weights_only=True)``.

Loading: :func:`load_model` is the one door for a trained model, used by training (the stage-2
teacher, in the notebooks too), the command line and ``torch.hub``. :func:`scicevpr.files.read_model_file`
reads the file and tells a native checkpoint (rebuilt from its own record, :func:`model_from_checkpoint`)
from an authors' one (unwrapped, then loaded into :func:`scicevpr.create_model`'s model of the
class and preset the caller names, with :meth:`~scicevpr.models.VPRModel.load_official`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ._lazy import moved_attributes
from .backbone import RandomWeightsWarning
from .config import BackboneConfig, CricaVPRConfig, ModelConfig
from .factory import MODELS, create_model
from .files import NATIVE_FORMAT, read_model_file, save_torch_file
from .models import VPRModel
from .weights import resolve_weights

PathLike = str | os.PathLike

FORMAT = NATIVE_FORMAT
VERSION = 1

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


def frozen_backbone_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the frozen DINOv2 parameters (not saved in ``model_state``)."""
    return sorted("backbone." + n for n, p in model.backbone.named_parameters() if not p.requires_grad)


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


def check_finite_state(state: dict[str, Any], where: str) -> None:
    """Refuse weights that hold a NaN or an infinity (a training that diverged): every
    descriptor of such a model is NaN, and its Recall@N would be a silent 0."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{where} holds weights that are not finite (NaN or infinite in {len(bad)} of {len(state)} tensors, e.g. "
            f"{bad[0]!r}): the training that wrote it diverged. Use an earlier checkpoint, or train again with a lower "
            f"learning rate."
        )


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def checkpoint_dict(
    model: VPRModel,
    meta: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    store_backbone: bool = False,
) -> dict[str, Any]:
    """The checkpoint of ``model`` as a dict (format in the module docstring)."""
    name = type(model).__name__
    if name not in MODELS:
        raise TypeError(f"cannot checkpoint a {name}; expected one of {sorted(MODELS)}")
    source = {"source": "stored"} if store_backbone else dict(model.backbone.provenance)
    source["fingerprint"] = model.backbone.fingerprint
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
    return save_torch_file(checkpoint_dict(model, meta, training, store_backbone), path)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_checkpoint(path: PathLike, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Read a native checkpoint (on the CPU) and check its format and version (e.g. a run's
    ``last.pt`` to resume from).

    ``trust_checkpoint=True`` also loads a file that holds pickled Python objects (which runs
    code from it); see :func:`scicevpr.files.load_torch_file`.
    """
    file = read_model_file(path, trust_checkpoint)
    if not file.native:
        raise ValueError(
            f"{str(Path(path))!r} is not a scicevpr checkpoint (no format={FORMAT!r} entry). An authors' "
            f"checkpoint loads with scicevpr.load_model(path, expected=<model class>, preset=<its preset>)."
        )
    return _check_version(file.content, file.where)


def _check_version(ckpt: dict[str, Any], where: str) -> dict[str, Any]:
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{where} has checkpoint version {ckpt['version']}; this scicevpr reads <= {VERSION}. Upgrade scicevpr.")
    return ckpt


def _check_kind(found: str, found_preset: str | None, expected: str | Iterable[str] | None, where: str) -> None:
    if expected is None:
        return
    expected = (expected,) if isinstance(expected, str) else tuple(expected)
    if found not in expected:
        raise ValueError(
            f"{where} holds a {found} ({found_preset}), but a "
            f"{' or '.join(expected)} is needed here. Pass the checkpoint of the right model "
            f"(stage 1 writes SuperCricaVPR checkpoints, stage 2 SciceVPR ones)."
        )


def model_from_checkpoint(ckpt: dict[str, Any], where: str = "checkpoint", expected: str | Iterable[str] | None = None) -> VPRModel:
    """Rebuild the model of a native checkpoint dict (see :func:`load_model`)."""
    _check_kind(ckpt["model_class"], ckpt["model_config"].get("name"), expected, where)
    name = ckpt["model_class"]
    cfg = config_from_dict(ckpt["model_config"])
    record = dict(ckpt["backbone"])
    src = record["source"]
    if src == "random":
        model = create_model(name, cfg, weights=None, seed=record["seed"])
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
        model = create_model(name, cfg, weights=weights)
        if record.get("fingerprint") and model.backbone.fingerprint != record["fingerprint"]:
            # another file at the recorded path (e.g. a relative path read from another folder):
            # the file weights='auto' finds ($SCICEVPR_WEIGHTS, ...) may be the training's
            try:
                auto = resolve_weights("auto", cfg.backbone)
            except FileNotFoundError:
                auto = None
            if auto is not None and auto.resolve() != weights.resolve():
                other = create_model(name, cfg, weights=auto)
                if other.backbone.fingerprint == record["fingerprint"]:
                    model = other
    elif src == "stored":
        if "backbone_state" not in ckpt:
            raise ValueError(f"{where} says its backbone is stored but holds no backbone_state; the file is damaged.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            model = create_model(name, cfg, weights=None)
        model.load_state_dict(ckpt["backbone_state"], strict=False)
        model.backbone.mark_stored(random_init=record.get("random_init", False))
    else:
        raise ValueError(f"{where}: unknown backbone source {src!r}")
    if record.get("fingerprint") and model.backbone.fingerprint != record["fingerprint"]:
        raise ValueError(
            f"{where}: the rebuilt DINOv2 backbone (source {src!r}) differs from the one it was trained "
            f"with (fingerprint mismatch). "
            + (
                f"The weight file {record['path']!r} (and the one weights='auto' finds, if any) is not the one used in "
                "training; point SCICEVPR_WEIGHTS at the folder of the right one, or put it at the recorded path."
                if src == "file"
                else "The random initialisation changed (another torch or scicevpr version); re-save the "
                "checkpoint with store_backbone=True where it was made."
            )
        )
    check_finite_state(ckpt["model_state"], where)
    load_trainable_state(model, ckpt["model_state"])
    if name == "SciceVPR":
        model.fusion.conv.requires_grad_(False)  # the conv copied from the teacher stays frozen
    return model


def check_described(model: VPRModel, where: str, preset: str | ModelConfig | None, overrides: dict[str, Any]) -> None:
    """``model`` (loaded from ``where``) must be the one ``preset`` and ``overrides`` describe: a
    native checkpoint records its configuration and :func:`load_model` does not use them, so a
    preset or override that differs would be ignored without a word (and recorded by a run as if
    used). For the callers that pass them as the user's request: ``--official``, a stage-2 teacher."""
    name = preset.name if isinstance(preset, ModelConfig) else preset
    differs = [f"preset={name}"] if name is not None and name != model.config.name else []
    try:
        differs += [f"{k}={v}" for k, v in overrides.items() if model.config.with_overrides(**{k: v}) != model.config]
    except (TypeError, ValueError) as e:
        differs += [f"{sorted(overrides)} ({e})"]
    if differs:
        raise ValueError(
            f"{where} holds a {type(model).__name__} ({model.config.name}) that records its configuration; "
            f"{', '.join(differs)} describes another model and would be ignored. Leave them out (command line: load a "
            f"native checkpoint with --checkpoint, or as --teacher without --preset and --set)."
        )


def load_model(
    path: PathLike,
    device: str | torch.device = "cpu",
    expected: str | Iterable[str] | None = None,
    trust_checkpoint: bool = False,
    preset: str | ModelConfig | None = None,
    **overrides: Any,
) -> VPRModel:
    """A trained model, ready to evaluate (eval mode), from any trained-model file: the loading door.

    A native scicevpr checkpoint (written by training, ``best.pt`` / ``last.pt``, or
    :func:`save_checkpoint`) records its model class and configuration and is rebuilt from them.
    An authors' checkpoint (``{"model_state_dict": ...}``, ``{"state_dict": ...}`` or a bare
    state dict, keys with or without ``module.``, in the authors' names) records neither: the
    model is built by :func:`scicevpr.create_model` from ``expected`` (one class name) and
    ``preset`` + ``overrides``, and the file, which carries the whole DINOv2, replaces its weights.

    Args:
        path: the checkpoint file.
        device: where to put the model.
        expected: model class name(s) the file must hold, e.g. ``"SuperCricaVPR"``; another
            kind raises a ValueError naming both. Required (one name) for an authors' checkpoint.
        trust_checkpoint: also load a file that holds pickled Python objects, which runs code
            from it; only for a file from a source you trust.
        preset, **overrides: the configuration of an authors' checkpoint (preset None: the
            class's default, :data:`scicevpr.factory.DEFAULT_PRESETS`). A native checkpoint is
            rebuilt from the configuration it records, and these are not used.
    """
    file = read_model_file(path, trust_checkpoint)
    if file.native:
        model = model_from_checkpoint(_check_version(file.content, file.where), file.where, expected)
        return model.to(device).eval()
    names = (expected,) if isinstance(expected, str) else tuple(expected or ())
    if len(names) != 1:
        raise ValueError(
            f"{file.where} is not a scicevpr checkpoint (no format={FORMAT!r} entry): if it is an authors' "
            f"checkpoint, say which model it holds (expected='SciceVPR' / 'SuperCricaVPR' / 'CricaVPR' and its "
            f"preset; command line: --official FILE --model NAME --preset PRESET)."
        )
    with warnings.catch_warnings():  # the authors' checkpoint replaces the random backbone
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = create_model(names[0], preset, weights=None, **overrides)
    model.load_official(file.content)
    return model.to(device).eval()


# The one door that builds a model is scicevpr.factory.create_model; the old name still imports from here.
__getattr__ = moved_attributes(__name__, {"scicevpr.factory": ("build_model=create_model",)})
