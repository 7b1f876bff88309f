"""The two training stages (docs/method.md, "Training"), one loop for both.

- **Stage 1** (:func:`train_teacher`): Super-CricaVPR learns ``L_MS`` on GSV-Cities batches of
  P = 72 places x K = 4 images; the DINOv2 backbone is frozen; the fusion conv, token mixers,
  GeM p and the 2-layer cross-image encoder train. 10 epochs; Recall@N on the validation split
  after each epoch, the best checkpoint by R@5 kept. The same code trains CricaVPR
  (``model="CricaVPR"``, its adapters train) and SciceVPR alone with ``L_MS`` (``model="SciceVPR"``,
  an ablation without distillation).
- **Stage 2** (:func:`train_student`): SciceVPR takes the teacher's backbone and a frozen copy of
  its 1x1 fusion conv (:meth:`SciceVPR.from_teacher`); its token mixers, GeM p and 1-layer
  self-enhanced encoder learn ``L_T = gamma L_MS + eta L_D`` for 1 epoch, the teacher frozen in
  eval mode on the same batch. Backbone + conv are the same function for both models, so
  ``f = extract_features(x)`` is computed once per batch and fed to both heads.

With a ``cache`` passed (:class:`scicevpr.offline.cache.BackboneCache`, the offline notebooks),
a frozen backbone's output for a batch already computed on the same weights is reused: the
validation split after every epoch, and a student's epochs, which draw its teacher's first
batches (the same seed gives the same places and augmentations). The weights trained are the
same, bit for bit; without a cache nothing is hashed or kept.

Both stages: Adam, lr 1e-4, StepLR halving every 3 epochs stepped per iteration
(``step_size = 3 * iterations_per_epoch``); a run folder with ``config.json``, ``log.csv``,
``last.pt`` and ``best.pt`` (see :mod:`scicevpr.checkpoint`); ``resume=True`` continues from
``last.pt`` and gives the same weights as an uninterrupted run. A run holds its folder's lock
(:func:`scicevpr.files.lock_run_dir`) while it runs: a second training into the same folder is
refused.

Multi-GPU: launch with ``torchrun --nproc_per_node N``; each rank loads P/N places of every
global batch and runs the backbone (and everything per image) on them. The per-image outputs
(regional features) are all-gathered with gradient, and every rank runs
the batch-mixing encoder and the loss on the **global** batch, exactly as one process would
(the cross-image encoder attends across the whole batch, so gathering final descriptors would
not do). Gradients: each rank's loss is the same global loss, so the all-gather's backward sums
the ranks' gradients for the local share (N times the share's gradient) and DDP's averaging
divides by N again: the update equals a one-process update with the same global batch. Every
rank seeds torch identically, so the encoder's dropout masks match too. Only rank 0 logs,
validates and saves. (CricaVPR's adapters hold BatchNorms, which normalise over each rank's
share: for CricaVPR, N ranks are close to, not exactly, one process.)

Checkpoints store the trainable part and a reference to the frozen backbone (its weight file,
or the seed of a random one); see :mod:`scicevpr.checkpoint`. ``load_model(path)`` rebuilds a
ready-to-evaluate model from a checkpoint alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from .checkpoint import (
    check_described,
    check_finite_state,
    config_to_dict,
    load_model,
    load_trainable_state,
    read_checkpoint,
    save_checkpoint,
)
from .config import EvalConfig, LossConfig, TrainConfig
from .data.decode import check_images
from .data.gsv import CITY_ID_STRIDE, GSVCitiesDataset, list_cities
from .data.paths import data_root
from .data.transforms import train_transform
from .data.vg import load_vg_split
from ._lazy import moved_attributes
from .evaluate import FeatureCache, evaluate
from .factory import create_model
from .files import (
    append_csv_row,
    atomic_write_text,
    holds_files,
    lock_run_dir,
    read_run_config,
    resume_csv_log,
    start_csv_log,
)
from .losses import DistillationObjective, MultiSimilarityLoss
from .memory import LOADER_PREFETCH, MemoryPlan, available_memory, plan_training_memory, step_memory
from .models import SciceVPR, SuperCricaVPR, VPRModel
from .precision import autocast, model_device, resolve_amp
from .protocol import (
    OFFICIAL_CITIES,
    num_groups,
    teacher_checkpoint_name,
    utm_dtype,
)
from .runtime import Dist, gather_batch, resolve_device, rng_state, seed_everything, set_rng_state, setup_distributed
from .weights import file_sha256

PathLike = str | os.PathLike

STAGES = ("teacher", "student")
PAPER_EPOCHS = {"teacher": 10, "student": 1}
RECALL_VALUES = (1, 5, 10, 100)
# TrainConfig fields that may differ when a run is resumed: they do not change the result, except
# epochs, raised to extend a run (TrainConfig's docstring: which validations the log then holds).
RESUMABLE_CHANGES = ("resume", "epochs", "num_workers", "progress", "device", "trust_checkpoint",
                     "activation_checkpointing")


# --------------------------------------------------------------------------------------------
# Configuration and result
# --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What a training run produced.

    Attributes:
        model: the trained model, with the best validation weights (by R@5) when validation
            ran, else the final ones; in eval mode.
        teacher: stage 2: the frozen teacher it was distilled from.
        history: ``log.csv`` as a DataFrame (one row per epoch).
        run_dir, best_path, last_path: the run folder and its checkpoints.
        best_epoch, best_recalls: the epoch (1-based) and Recall@N of ``best.pt``.
        iterations_per_epoch: iterations in one epoch.
        num_dropped_places: training places left out for having fewer than K images.
        num_skipped_images: corrupt training and validation images left out (``skip_corrupt``).
    """

    model: VPRModel
    history: pd.DataFrame
    run_dir: Path
    last_path: Path
    best_path: Path | None = None
    best_epoch: int | None = None
    best_recalls: dict[int, float] | None = None
    teacher: VPRModel | None = None
    iterations_per_epoch: int = 0
    num_dropped_places: int = 0
    num_skipped_images: int = 0


def loss_variant_config(student: TrainConfig, run_dir: PathLike, **loss: float) -> TrainConfig:
    """A stage-2 ablation of the run ``student``: the same student, teacher and steps with the
    loss weights in ``loss`` replaced (e.g. ``eta=0``: ``L_MS`` only; ``gamma=0``: ``L_D`` only),
    in ``run_dir``, and validated only after the last epoch (``val_every = epochs``), so that it
    keeps its weights after exactly the student's number of steps, at a fraction of the
    validation time. The notebooks' distillation ablation and ``benchmarks/world_sweep.py`` both
    build theirs here."""
    if student.teacher is None:
        raise ValueError("loss_variant_config: `student` has no teacher; pass the stage-2 (student) TrainConfig")
    return replace(student, run_dir=str(run_dir), loss=replace(student.loss, **loss),
                   val_every=student.epochs or PAPER_EPOCHS["student"])


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class PlaceBatchSampler(Sampler[list[int]]):
    """Batches of P place indices.

    ``order="default"``: all places shuffled per epoch from ``(seed, epoch)`` only; incomplete
    final batches are dropped. ``order="official"`` (the authors' ``DataLoader(shuffle=False,
    drop_last=False)`` over ``GSVCitiesDataset``, whose rows are shuffled once per city when it
    is built: SciceVPR ``train_super_cricavpr.py``, ``dataloaders/train/GSVCitiesDataset.py``):
    the places of each city, cities in the order of ``place_cities`` values (the city list's
    order), are shuffled once from ``(seed, city)``; the same order serves every epoch and the
    last partial batch is kept.

    Under DDP, global batch b is ``order[b*P : (b+1)*P]`` and rank r takes its r-th slice of
    P / N places, so the N ranks together see exactly the one-process batch. ``max_batches``
    caps an epoch.
    """

    def __init__(self, num_places: int, places_per_batch: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, max_batches: int | None = None, order: str = "default",
                 place_cities: np.ndarray | None = None) -> None:
        if order not in ("default", "official"):
            raise ValueError(f"order={order!r}: expected 'default' or 'official'")
        if places_per_batch % world_size:
            raise ValueError(
                f"places_per_batch (P) = {places_per_batch} must be divisible by the number of "
                f"processes ({world_size}); each rank loads P / {world_size} places."
            )
        if num_places < places_per_batch:
            raise ValueError(
                f"the training set has {num_places} places (with >= K images), fewer than one batch of "
                f"places_per_batch (P) = {places_per_batch}; lower places_per_batch."
            )
        self.num_places, self.P, self.seed, self.order = num_places, places_per_batch, seed, order
        self.rank, self.world_size = rank, world_size
        full = num_places // places_per_batch
        self._fixed: np.ndarray | None = None
        if order == "official":
            last = num_places % places_per_batch
            if last % world_size:
                raise ValueError(
                    f"order='official' keeps the last partial batch ({last} places), which {world_size} processes "
                    f"cannot share evenly; run on one process, or on a number of processes dividing {last}."
                )
            full += last > 0
            cities = np.zeros(num_places, np.int64) if place_cities is None else np.asarray(place_cities)
            if len(cities) != num_places:
                raise ValueError(f"place_cities has {len(cities)} entries for {num_places} places")
            parts = []
            for c in pd.unique(cities):  # cities in their order of first appearance
                idx = np.flatnonzero(cities == c)
                parts.append(idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))])
            self._fixed = np.concatenate(parts)  # one shuffle per city, for every epoch
        self.num_batches = full if max_batches is None else min(full, max_batches)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        if self._fixed is not None:
            perm = self._fixed
        else:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_places)
        for b in range(self.num_batches):
            batch = perm[b * self.P : (b + 1) * self.P]  # the last one may be partial (official)
            share = len(batch) // self.world_size
            yield batch[self.rank * share : (self.rank + 1) * share].tolist()


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _train_loader(dataset: GSVCitiesDataset, sampler: PlaceBatchSampler, config: TrainConfig,
                  device: torch.device, epoch: int) -> DataLoader:
    """A fresh loader per epoch (workers get the dataset with its epoch set); its generator is
    seeded from (seed, epoch) so it never draws from the global RNG."""
    g = torch.Generator()
    g.manual_seed(config.seed * 1_000_003 + epoch)
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.num_workers, pin_memory=device.type == "cuda",
        worker_init_fn=_seed_worker, generator=g,
    )


# --------------------------------------------------------------------------------------------
# Per-stage steps
# --------------------------------------------------------------------------------------------


class MetricLearningStep(nn.Module):
    """Stage 1: ``L_MS`` on the global batch. ``forward(images, labels) -> (loss, parts)``."""

    def __init__(self, model: VPRModel, loss: LossConfig, groups: int = 1) -> None:
        super().__init__()
        self.model = model
        self.ms = MultiSimilarityLoss(loss)
        self.groups = groups  # the encoder attends within this many chunks of the global batch
        self.extract_features = model.extract_features  # fit() routes a frozen backbone through its cache, if any

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(b, 3, S, S) images and (b,) place ids of this rank's share -> (scalar ``L_MS``, its parts)."""
        f = self.extract_features(images)  # (b, C_mix, H, W)
        r = gather_batch(self.model.regional_features(f))  # (B, 14, C): per image, gathered over ranks
        loss = self.ms(self.model.encode(r, self.groups), gather_batch(labels))  # the encoder sees the global batch
        return loss, {"loss_ms": loss.detach()}


class DistillationStep(nn.Module):
    """Stage 2: ``L_T = gamma L_MS(X_S) + eta L_D(X_S, X_T)`` with one backbone pass.

    The student's backbone *is* the teacher's and its conv a frozen copy of the teacher's, so
    ``f = student.extract_features(x)`` is also the teacher's; the teacher (eval mode, no
    gradient) and the student heads both read it.
    """

    def __init__(self, student: SciceVPR, teacher: SuperCricaVPR, loss: LossConfig, target_groups: int = 1) -> None:
        super().__init__()
        self.target_groups = target_groups  # the teacher attends within this many chunks of the batch
        if student.backbone is not teacher.backbone:
            raise ValueError("the student must share the teacher's backbone (build it with SciceVPR.from_teacher)")
        if not (torch.equal(student.fusion.conv.weight, teacher.fusion.conv.weight)
                and torch.equal(student.fusion.conv.bias, teacher.fusion.conv.bias)):
            raise ValueError("the student's 1x1 fusion conv must be a copy of the teacher's (SciceVPR.from_teacher)")
        if any(p.requires_grad for p in student.fusion.conv.parameters()):
            raise ValueError("the student's 1x1 fusion conv must be frozen in stage 2")
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.objective = DistillationObjective(loss)
        self.extract_features = student.extract_features  # fit() routes it through its cache, if any

    def train(self, mode: bool = True) -> "DistillationStep":
        super().train(mode)
        self.teacher.eval()  # the teacher always runs in eval mode (no dropout)
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(b, 3, S, S) images and (b,) place ids of this rank's share -> (scalar ``L_T``, its parts:
        ``L_MS`` and ``L_D``)."""
        with torch.no_grad():
            f = self.extract_features(images)  # (b, C_mix, H, W), shared frozen backbone + conv
            t = self.teacher.encode(gather_batch(self.teacher.regional_features(f)), self.target_groups)  # (B, D)
        s = self.student.encode(gather_batch(self.student.regional_features(f)))  # (B, D)
        l_t, l_ms, l_d = self.objective(s, t, gather_batch(labels))
        return l_t, {"loss_ms": l_ms.detach(), "loss_d": l_d.detach()}


@dataclass
class _Stage:
    name: str  # "teacher" | "student"
    model: VPRModel  # trained, validated and checkpointed
    step: nn.Module  # forward(images, labels) -> (loss, parts)
    teacher: VPRModel | None = None


def _global_batch(config: TrainConfig) -> int:
    return config.places_per_batch * config.img_per_place  # P * K


def _build_teacher_stage(config: TrainConfig, device: torch.device) -> _Stage:
    model = create_model(config.model, config.model_config(), weights=config.weights, seed=config.seed).to(device)
    groups = num_groups(_global_batch(config), config.group_size("train"))
    return _Stage("teacher", model, MetricLearningStep(model, config.loss, groups))


def teacher_path(config: TrainConfig) -> Path:
    """``config.teacher`` as a file: a run folder gives its ``best.pt`` (``last.pt`` under the
    official protocol: the authors distil from the last stage-1 checkpoint)."""
    path = Path(config.teacher)
    if path.is_dir():
        name = teacher_checkpoint_name(config.protocol)
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"teacher run folder {str(path)!r} has no {name} (protocol={config.protocol!r} distils from "
                f"stage 1's {name}). Finish stage 1 in that folder, or pass a checkpoint file."
            )
        return path / name
    return path


def load_teacher(config: TrainConfig, device: torch.device | str = "cpu") -> SuperCricaVPR:
    """The stage-2 teacher from ``config.teacher``: a native checkpoint of a SuperCricaVPR or the
    authors' checkpoint (whose architecture ``config.preset`` must describe)."""
    if config.teacher is None:
        raise ValueError(
            "stage 2 needs a trained teacher: set teacher= to stage 1's checkpoint (its run folder's "
            "best.pt), or to the authors' Super-CricaVPR checkpoint."
        )
    path = teacher_path(config)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint {str(path)!r} does not exist. Train the teacher first "
            f"(train_teacher / `scicevpr train-teacher`) and pass its best.pt, or the authors' checkpoint."
        )
    teacher = load_model(path, device, expected="SuperCricaVPR", trust_checkpoint=config.trust_checkpoint,
                         preset=config.preset, **config.model_overrides)
    check_described(teacher, f"teacher checkpoint {str(path)!r}", config.preset, config.model_overrides)
    return teacher.requires_grad_(False).eval()


def _teacher_record(config: TrainConfig) -> dict[str, str]:
    """What a student run records of its teacher (``config.json``): the file and its SHA-256."""
    path = teacher_path(config)
    return {"teacher_file": str(path), "teacher_sha256": file_sha256(path)}


def _check_same_teacher(run_dir: Path, then: str | None, config: TrainConfig) -> None:
    """A student run resumes only on the teacher it started with (``then``: the SHA-256 its
    ``config.json`` recorded): its frozen 1x1 conv (in ``last.pt``) is a copy of that teacher's,
    and the teacher reads the features it makes. The same path can hold another file by then
    (e.g. stage 1 was extended, rewriting its checkpoints). A run recorded before the teacher's
    SHA-256 was kept (``then`` None) is not checked."""
    now = _teacher_record(config)
    if then is not None and then != now["teacher_sha256"]:
        raise ValueError(
            f"cannot resume {str(run_dir)!r}: its teacher {now['teacher_file']!r} has changed since the run started "
            f"(sha256 {then[:12]}... then, {now['teacher_sha256'][:12]}... now). The student's frozen conv is a copy of "
            f"the first teacher's: start a new run_dir on the new teacher, or put the first teacher's file back."
        )


def _build_student_stage(config: TrainConfig, device: torch.device) -> _Stage:
    teacher = load_teacher(config, device)
    student = SciceVPR.from_teacher(teacher, seed=config.seed)
    target_groups = num_groups(_global_batch(config), config.group_size("targets"))
    return _Stage("student", student, DistillationStep(student, teacher, config.loss, target_groups), teacher=teacher)


# --------------------------------------------------------------------------------------------
# Run folder: config, log, checkpoints
# --------------------------------------------------------------------------------------------

LOG_COLUMNS = ("epoch", "iteration", "loss", "loss_ms", "loss_d", "lr", "images_per_s", "train_s") + tuple(
    f"R@{n}" for n in RECALL_VALUES
) + ("best",)


def _run_dir(config: TrainConfig, stage: str) -> Path:
    return Path(config.run_dir or Path("runs") / stage)


def _prepare_run_dir(run_dir: Path, config: TrainConfig, stage: str) -> bool:
    """Check the run folder; returns True when there is a ``last.pt`` to resume from."""
    if not config.resume:
        if holds_files(run_dir):
            raise FileExistsError(
                f"run folder {str(run_dir)!r} already holds a run; refusing to overwrite it. Pass "
                f"resume=True (command line: --resume) to continue it, or choose another run_dir "
                f"(or delete the folder)."
            )
        return False
    resuming = (run_dir / "last.pt").is_file()
    if not resuming:
        _refuse_a_run_without_last(run_dir)
    if (run_dir / "config.json").is_file():
        old = read_run_config(run_dir, "train", "training")
        if old.get("stage") != stage:
            raise ValueError(f"run folder {str(run_dir)!r} holds a {old.get('stage')} run, not a {stage} run.")
        then = {**_FIELD_DEFAULTS, **old["train"]}  # a field added since the run started: its default
        refuse_config_changes(run_dir, then, config.to_dict(), RESUMABLE_CHANGES)
        if resuming and stage == "student":
            _check_same_teacher(run_dir, old.get("teacher_sha256"), config)
    return resuming


def _refuse_a_run_without_last(run_dir: Path) -> None:
    """``resume`` with no ``last.pt``: a run killed before its first checkpoint starts again (its
    config.json and at most the one log row of the epoch it was saving), but a run that already
    kept checkpoints (``best.pt``) or logged several epochs has lost its ``last.pt``: starting
    again would overwrite them."""
    log = run_dir / "log.csv"
    rows = max(0, len(log.read_text(errors="replace").splitlines()) - 1) if log.is_file() else 0
    if (run_dir / "best.pt").exists() or rows > 1:
        kept = "best.pt" if (run_dir / "best.pt").exists() else f"{rows} epochs in log.csv"
        raise FileNotFoundError(
            f"cannot resume {str(run_dir)!r}: its last.pt is missing, though the run got further ({kept}); starting "
            f"again would overwrite them. Put last.pt back to continue, or train in a new run_dir (nothing was changed)."
        )


def refuse_config_changes(run_dir: Path, then: dict[str, Any], now: dict[str, Any], resumable: tuple[str, ...],
                          keep_when_none: tuple[str, ...] = ()) -> None:
    """Refuse to resume ``run_dir`` when a field of its recorded configuration ``then`` differs
    from ``now``, except the ``resumable`` fields (they do not change the result) and the
    ``keep_when_none`` fields left at None now (None keeps the recorded value)."""
    diff = {k: (then.get(k), v) for k, v in now.items()
            if k not in resumable and then.get(k) != v and not (k in keep_when_none and v is None)}
    if diff:
        lines = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in sorted(diff.items()))
        raise ValueError(
            f"cannot resume {str(run_dir)!r} with another configuration ({lines}). Resume with the "
            f"run's configuration (its config.json) or start a new run_dir."
        )


_FIELD_DEFAULTS = TrainConfig().to_dict()


def _write_config(run_dir: Path, config: TrainConfig, stage: str, model: VPRModel, extra: dict) -> None:
    info = {"stage": stage, "model_class": type(model).__name__, "model_config": config_to_dict(model.config),
            "train": config.to_dict(), **extra}
    atomic_write_text(run_dir / "config.json", json.dumps(info, indent=2))


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def training_cities(config: TrainConfig) -> tuple[str, ...] | None:
    """``config.cities``; when None under the official protocol, the authors' 23 cities in their
    order (``dataloaders/GSVCities.py``) if the dataset holds them all, else every city sorted."""
    if config.cities is not None or config.protocol != "official":
        return config.cities
    root = Path(config.gsv_root) if config.gsv_root is not None else data_root() / "gsv_cities"
    present = set(list_cities(root))
    return OFFICIAL_CITIES if present.issuperset(OFFICIAL_CITIES) else None


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Adam:
    """Adam (lr ``config.lr``) over the parameters that require gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameter")
    return torch.optim.Adam(params, lr=config.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, iterations_per_epoch: int) -> torch.optim.lr_scheduler.StepLR:
    """StepLR stepped per iteration: lr x ``lr_gamma`` every ``lr_step_epochs`` epochs."""
    return torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.lr_step_epochs * iterations_per_epoch, gamma=config.lr_gamma
    )


def _validate(model: VPRModel, split, config: TrainConfig, amp: bool, cache: FeatureCache | None) -> dict[int, float]:
    """Recall@N (percent) of ``model`` on the validation split; the caller's RNG is untouched."""
    official = config.protocol == "official"
    eval_cfg = EvalConfig(batch_size=config.eval_batch_size, recall_values=RECALL_VALUES, amp=False if official else amp,
                          fast=False, num_workers=config.num_workers, progress=config.progress,
                          protocol=config.protocol, encoder_group_size=config.group_size("validation"))
    with torch.random.fork_rng(devices=[model_device(model)] if model_device(model).type == "cuda" else []):
        result = evaluate(model, split, eval_cfg, cache=cache)
    return {int(k): float(v) for k, v in result.recalls.items()}


def plan_memory(stage: str, config: TrainConfig, model: VPRModel, device: torch.device, amp: bool,
                world_size: int = 1) -> MemoryPlan:
    """The memory check of a run (:func:`scicevpr.memory.plan_training_memory`): the measured
    step memory of its model, preset and image size, without and with activation checkpointing
    (the same where the backbone is frozen: it keeps no graph), plus on the CPU the batches the
    loader's workers hold, against the device's free memory. Raises
    :class:`~scicevpr.memory.InsufficientMemoryError` when the batch does not fit."""
    cfg = model.config
    what = "student" if stage == "student" else config.model
    S, patch = cfg.image_size, cfg.backbone.patch_size
    plain = step_memory(what, cfg.name, False, S, patch)
    trains_backbone = any(p.requires_grad for p in model.backbone.parameters())
    checkpointed = step_memory(what, cfg.name, True, S, patch) if trains_backbone else plain
    if device.type == "cpu" and config.num_workers:  # the workers' batches lie in the same memory
        loader = config.num_workers * LOADER_PREFETCH * 3 * S * S * 4  # fp32 images, per image of a step
        plain, checkpointed = (None if r is None else r.scaled(1.0, loader) for r in (plain, checkpointed))
    what_text = f"training {type(model).__name__} ({cfg.name}, {S} px, {'bf16 autocast' if amp else 'fp32'})"
    where = "this machine's memory" if device.type == "cpu" else f"the GPU {device}"
    return plan_training_memory(plain, checkpointed, config.places_per_batch, config.img_per_place,
                                available_memory(device), config.activation_checkpointing, what_text, where, world_size)


def fit(stage: str, config: TrainConfig, build: Callable[[TrainConfig, torch.device], _Stage],
        cache: FeatureCache | None = None) -> RunResult:
    """The training loop shared by both stages.

    ``build(config, device)`` returns the stage: the model to train and its step module
    (``forward(images, labels) -> (loss, parts)``). Everything else (data, optimiser, schedule,
    validation, logging, checkpoints, resume, DDP) is common. ``cache``: a
    :class:`~scicevpr.evaluate.FeatureCache` that a frozen backbone's outputs go through, in
    training and validation (None: none).
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: expected one of {STAGES}")
    device = resolve_device(config.device)
    ddp = setup_distributed(device)
    try:
        with lock_run_dir(_run_dir(config, stage)) if ddp.main else contextlib.nullcontext():
            return _fit(stage, config, build, device, ddp, cache)
    finally:
        if ddp.created:
            dist.destroy_process_group()


def _fit(stage: str, config: TrainConfig, build, device: torch.device, ddp: Dist,
         cache: FeatureCache | None) -> RunResult:
    run_dir = _run_dir(config, stage)
    resuming = _prepare_run_dir(run_dir, config, stage)
    if ddp.enabled:
        dist.barrier()  # every rank has checked the folder before rank 0 writes to it
    epochs = config.epochs or PAPER_EPOCHS[stage]
    amp = resolve_amp(device, config.use_amp())

    seed_everything(config.seed)
    st = build(config, device)
    model = st.model.to(device)
    dataset = GSVCitiesDataset(config.gsv_root, cities=training_cities(config), img_per_place=config.img_per_place,
                               seed=config.seed, transform=train_transform(model.image_size, config.randaugment_ops),
                               drop_small_places=config.drop_small_places, skip_corrupt=config.skip_corrupt,
                               check_files=ddp.main)  # the same files on every rank: rank 0 reads their ends
    sampler = PlaceBatchSampler(len(dataset), config.places_per_batch, config.seed, ddp.rank, ddp.world_size,
                                config.max_iters_per_epoch, order=config.protocol,
                                place_cities=dataset.place_ids // CITY_ID_STRIDE)
    ipe = len(sampler)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, ipe)
    val_split = None
    if config.val_dataset is not None and ddp.main:
        val_split = load_vg_split(config.val_root, config.val_dataset, config.val_split,
                                  utm_dtype=utm_dtype(config.protocol, type(model).__name__),
                                  skip_corrupt=config.skip_corrupt)
        if not config.skip_corrupt:  # validated every epoch: a damaged file is refused now, not after epoch 1
            check_images(val_split.all_paths, f"the validation split {config.val_dataset}/{config.val_split}")
    data_report = {"num_dropped_places": dataset.num_dropped_places,
                   "num_skipped_images": len(dataset.skipped) + (len(val_split.skipped) if val_split is not None else 0)}

    start_epoch, iteration, best = 0, 0, {"r5": -math.inf, "epoch": None, "recalls": None}
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if resuming:
        ckpt = read_checkpoint(last_path, config.trust_checkpoint)
        if ckpt["model_class"] != type(model).__name__:
            raise ValueError(f"{str(last_path)!r} holds a {ckpt['model_class']}, this run trains a {type(model).__name__}.")
        check_finite_state(ckpt["model_state"], repr(str(last_path)))
        tr = ckpt["training"]
        if tr["iterations_per_epoch"] != ipe:
            raise ValueError(
                f"cannot resume {str(run_dir)!r}: it ran {tr['iterations_per_epoch']} iterations per epoch, "
                f"now {ipe} (dataset, places_per_batch or max_iters_per_epoch changed)."
            )
        load_trainable_state(model, ckpt["model_state"])
        optimizer.load_state_dict(tr["optimizer"])
        scheduler.load_state_dict(tr["scheduler"])
        set_rng_state(tr["rng"])
        start_epoch, iteration, best = tr["epoch"], tr["iteration"], tr["best"]
    # Before anything is written or trained: does the step fit the device's memory, and with
    # activation checkpointing? (A finished run that is only read back is not checked.)
    memory = (plan_memory(stage, config, model, device, amp, ddp.world_size) if start_epoch < epochs
              else MemoryPlan(bool(config.activation_checkpointing)))
    model.set_activation_checkpointing(memory.checkpointing)
    if resuming:
        if ddp.main:
            resume_csv_log(run_dir / "log.csv", "iteration", iteration, LOG_COLUMNS)
    elif ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        start_csv_log(run_dir / "log.csv")
        extra = {"world_size": ddp.world_size, "iterations_per_epoch": ipe, "epochs": epochs,
                 "random_backbone": model.is_random_init, "amp": amp, "device": str(device), **data_report,
                 "activation_checkpointing": memory.checkpointing, "memory": memory.record(),
                 **(_teacher_record(config) if stage == "student" else {})}
        _write_config(run_dir, config, stage, model, extra)

    step = st.step
    frozen_backbone = not any(p.requires_grad for p in model.backbone.parameters())
    if ddp.enabled:
        step = nn.parallel.DistributedDataParallel(st.step, device_ids=[device.index] if device.type == "cuda" else None)
    meta_base = {"stage": stage, "world_size": ddp.world_size}
    if cache is not None and frozen_backbone:
        # A batch that a run on these weights already drew (the same seed: a student's epochs are
        # its teacher's first) is not recomputed. The weights are hashed once, after train(), in the
        # mode every epoch runs in.
        step.train()
        st.step.extract_features = cache.extractor(model)

    for epoch in range(start_epoch, epochs):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        step.train()
        sums: dict[str, float] = {}
        lr_used = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        loader = _train_loader(dataset, sampler, config, device, epoch)
        bar = tqdm(loader, total=ipe, desc=f"{stage} epoch {epoch + 1}/{epochs}",
                   disable=not (config.progress and ddp.main), leave=False)
        for images, labels in bar:
            P_local, K = labels.shape
            x = images.to(device, non_blocking=True).reshape(P_local * K, *images.shape[2:])  # (P, K, 3, S, S) -> (P*K, 3, S, S)
            y = labels.to(device, non_blocking=True).reshape(P_local * K)  # (P, K) -> (P*K,)
            with autocast(device, amp):
                loss, parts = step(x, y)
            if not torch.isfinite(loss.detach()):  # before backward: the weights are still finite
                raise TrainingDivergedError(_diverged_message(
                    f"the loss is {float(loss.detach())}", epoch, iteration + 1, last_path, config))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr_used = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            iteration += 1
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{lr_used:.2e}")
        bar.close()
        train_s = time.perf_counter() - t0
        n_images = ipe * config.places_per_batch * config.img_per_place
        row: dict[str, Any] = {"epoch": epoch + 1, "iteration": iteration, "lr": lr_used,
                               "images_per_s": round(n_images / train_s, 2), "train_s": round(train_s, 2)}
        row.update({k: v / ipe for k, v in sums.items()})
        bad = non_finite_parameters(model)
        if bad:  # a finite loss, then a step that overflowed: nothing of this epoch is saved
            raise TrainingDivergedError(_diverged_message(
                f"{len(bad)} trainable tensor(s) are no longer finite (e.g. {bad[0]!r})", epoch, iteration, last_path,
                config))

        if ddp.main:
            last_epoch = epoch + 1 == epochs
            if val_split is not None and ((epoch + 1) % config.val_every == 0 or last_epoch):
                recalls = _validate(model, val_split, config, amp, cache)
                model.train()
                row.update({f"R@{n}": v for n, v in recalls.items()})
                if recalls[5] > best["r5"]:
                    best = {"r5": recalls[5], "epoch": epoch + 1, "recalls": recalls}
                    row["best"] = True
                    save_checkpoint(best_path, model, meta={**meta_base, "epoch": epoch + 1, "recalls": recalls},
                                    store_backbone=config.store_backbone)
            append_csv_row(run_dir / "log.csv", row, LOG_COLUMNS)
            training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                        "iteration": iteration, "iterations_per_epoch": ipe, "rng": rng_state(), "best": best}
            save_checkpoint(last_path, model, meta={**meta_base, "epoch": epoch + 1}, training=training,
                            store_backbone=config.store_backbone)
        if ddp.enabled:
            dist.barrier()

    if ddp.enabled:  # every rank learns the best epoch from the file rank 0 wrote
        obj = [best]
        dist.broadcast_object_list(obj, src=0)
        best = obj[0]
    has_best = best["epoch"] is not None
    if has_best:
        load_trainable_state(model, read_checkpoint(best_path)["model_state"])
    history = pd.read_csv(run_dir / "log.csv") if (run_dir / "log.csv").is_file() else pd.DataFrame(columns=LOG_COLUMNS)
    return RunResult(
        model=model.eval(), history=history, run_dir=run_dir, last_path=last_path,
        best_path=best_path if has_best else None, best_epoch=best["epoch"],
        best_recalls=best["recalls"], teacher=st.teacher, iterations_per_epoch=ipe, **data_report,
    )


class TrainingDivergedError(RuntimeError):
    """The loss or the weights of a training became NaN or infinite; nothing of the epoch in which
    it happened is saved (``best.pt`` and ``last.pt`` keep their last finite weights)."""


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of ``model`` that hold a NaN or an infinity."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p.detach()).all())]


def _diverged_message(what: str, epoch: int, iteration: int, last_path: Path, config: TrainConfig) -> str:
    """Why a training stopped (:class:`TrainingDivergedError`): the step, and the last good checkpoint."""
    if last_path.is_file():
        good = f"the last good checkpoint is {str(last_path)!r} (epoch {epoch}), best.pt beside it is untouched"
    else:
        good = "no checkpoint was written before it"
    return (f"training diverged at epoch {epoch + 1}, iteration {iteration}: {what}. It stopped there and saved "
            f"nothing of this epoch; {good}. Lower the learning rate (lr={config.lr:g}) or check the loss weights "
            f"(gamma={config.loss.gamma:g}, eta={config.loss.eta:g}), and train again in a new run_dir.")


def train_teacher(config: TrainConfig, cache: FeatureCache | None = None) -> RunResult:
    """Stage 1: train ``config.model`` (Super-CricaVPR by default) with ``L_MS``. ``cache``: see :func:`fit`."""
    return fit("teacher", config, _build_teacher_stage, cache)


def train_student(config: TrainConfig, cache: FeatureCache | None = None) -> RunResult:
    """Stage 2: distil the teacher (``config.teacher``) into SciceVPR with ``L_T``. ``cache``: see :func:`fit`."""
    return fit("student", config, _build_student_stage, cache)


# The offline recipe moved to scicevpr.offline.config, the process helpers to scicevpr.runtime; their
# names still import from here.
__getattr__ = moved_attributes(__name__, {"scicevpr.offline.config": ("offline_train_config",),
                                          "scicevpr.runtime": ("is_main_process",)})
