"""Pretraining a compact DINOv2-architecture backbone offline (``scicevpr pretrain-backbone``).

Meta's DINOv2 weights cannot be had offline, and a randomly initialised ViT gives the offline
notebooks features that hardly separate places. This module trains the backbone itself, on
synthetic renders of streets that the benchmark's val and test splits never show
(``scicevpr synth --preset pretrain``; ``scicevpr.offline.synthetic.PRETRAIN_NOTE`` says why they
are disjoint), and exports it as one fp16 state dict in DINOv2's official parameter names that
loads through the ``weights=`` door like Meta's files.

The backbone is :class:`~scicevpr.backbone.DinoVisionTransformer` itself, sized by
:class:`~scicevpr.config.BackboneConfig` (default ``offline.config.OFFLINE_BACKBONE``: ViT-S/14 widths,
4 blocks, position table learned at 112 px). Four objectives, so that they can be measured, each
defined with its heads, teachers and losses in :mod:`scicevpr.offline.objectives`:
``"dino"`` (DINO + iBOT + KoLeo self-distillation: a student and its EMA teacher ``g_t``),
``"supervised"`` (``L_MS`` on place batches), ``"distil"`` (the ViT learns the feature map and
descriptor of a small convnet, :class:`~scicevpr.offline.objectives.LayoutCNN`) and ``"cnn"``
(that convnet trained with ``L_MS``). :mod:`scicevpr.offline.augment` decodes the images once and
draws their views and masks.

This module is the loop that every objective shares. A step (:meth:`Run.step`): the global
batch's images from the in-memory cache, the objective's views and losses
(:data:`~scicevpr.offline.objectives.STEP_LOSSES`), backward, AdamW, DINO's EMA teacher
``theta_t <- m theta_t + (1 - m) theta_s`` (``m`` following a cosine from ``momentum`` to
``momentum_end``) and its centers; every ``log_every`` steps a log row. AdamW: the learning
rate warms up linearly over ``warmup_fraction`` of the steps and then follows a cosine to
``min_lr``; the weight decay a cosine from ``weight_decay`` to ``weight_decay_end`` (biases and
norms none); gradients clipped to ``clip_grad`` (:func:`schedule`).

The teacher is exported: DINO's teacher is the better model throughout training (Caron et al.
2021, Sec. 5.2) and it is the one the DINO and DINOv2 releases hold.

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
from tqdm.auto import tqdm

from .._lazy import moved_attributes
from ..backbone import DinoVisionTransformer
from ..config import BackboneConfig
from .augment import load_image_cache, resolve_data_root, view_specs
from .config import PLACE_OBJECTIVES, PretrainConfig
from .objectives import (
    CNN_MANIFEST_FORMAT,
    STEP_LOSSES,
    Batch,
    LayoutCNN,
    Student,
    Teacher,
    load_teacher,
    update_centers,
)
from ..data.gsv import GSVCitiesDataset
from ..data.transforms import normalize_uint8_batch
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
from ..precision import autocast, describe, resolve_amp
from ..runtime import Dist, resolve_device, rng_state, set_rng_state, setup_distributed
from ..train import PlaceBatchSampler, refuse_config_changes
from ..weights import MANIFEST_FORMAT, check_manifest, file_sha256, manifest_path

PathLike = str | os.PathLike

CHECKPOINT_FORMAT = "scicevpr-pretrain"
CHECKPOINT_VERSION = 1
# PretrainConfig fields that may differ when a run is resumed (they do not change its result).
RESUMABLE_CHANGES = ("resume", "max_minutes", "stop_at_step", "num_workers", "progress", "device",
                     "checkpoint_every", "checkpoint_minutes", "log_every", "val_root", "val_dataset", "val_split", "val_every")
LOG_COLUMNS = ("step", "loss", "loss_dino", "loss_ibot", "loss_koleo", "loss_ms", "loss_dense", "loss_cls", "lr",
               "weight_decay", "momentum", "teacher_temp", "images_per_s", "elapsed_s", "R@1", "R@5", "R@1_cls",
               "R@1_desc", "R@5_desc")


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
# Monitoring: place retrieval with the last block's features
# --------------------------------------------------------------------------------------------


class RetrievalCheck:
    """A VG-layout split decoded once at the model's size, and Recall@N of a model on it.

    :meth:`recalls` scores any ``embed`` (uint8 images -> named unit descriptors), with exact L2
    search and hits as every recall in scicevpr (:func:`scicevpr.evaluate.search`,
    :func:`scicevpr.evaluate.recall_at_n`). :func:`vit_descriptors` gives a ViT's: the mean of the
    last block's patch tokens after the final norm, its CLS token and, given the objective's
    ``describe`` (:meth:`~scicevpr.offline.objectives.Student.describe`), the descriptor the
    objective trains, pooled from the same tokens; ``objective="cnn"`` scores
    :class:`~scicevpr.offline.objectives.LayoutCNN`'s descriptor.
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
            supervised, distil: the trained backbone; cnn: the trained
            :class:`~scicevpr.offline.objectives.LayoutCNN`), in eval mode, on the CPU.
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


class Run:
    """State and one optimisation step of a pretraining run (every objective). The objective's
    losses of a step (:data:`~scicevpr.offline.objectives.STEP_LOSSES`) read its state: config,
    device, amp, ddp, model (the student, DDP-wrapped under torchrun), student, teacher, cnn, ms,
    the view specs and DINO's centers."""

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
            self.cnn, self.data_info["distil_teacher"] = load_teacher(config.distil_teacher, config)
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
                        Student(config, self.cnn.channels) if self.cnn is not None else Student(config)).to(device)
        self.teacher = Teacher(self.student).to(device) if config.objective == "dino" else None
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
        mine = self._share(len(idx))
        batch = Batch(images=self.cache[torch.as_tensor(idx[mine], device=dev)],  # (b, 3, S, S) uint8
                      labels=labels, gen=self._generator(step), n=len(idx), mine=mine, sched=sched)
        out = STEP_LOSSES[c.objective](self, batch)  # the objective draws its views and computes its losses
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
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
                update_centers(self.center, self.patch_center, *out.teacher_logits, out.masked, c.center_momentum)
        return {"loss": out.loss.detach(), **out.parts, **sched}  # losses stay on the device: no sync per step

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
    run = Run(config, device, ddp, amp)
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
    """A ``"cnn"`` run's network: its fp32 state dict (what
    :meth:`~scicevpr.offline.objectives.LayoutCNN.load` and ``distil_teacher`` read) and a
    manifest beside it."""
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
        A ``"cnn"`` run has no ViT: its :class:`~scicevpr.offline.objectives.LayoutCNN` is written
        instead (fp32 state dict, default name ``layout_cnn_<size>px.pt``, the ``distil_teacher``
        of a distil run).
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


# The views and masks moved to scicevpr.offline.augment, the objectives to scicevpr.offline.objectives;
# their names still import from here (and from scicevpr.pretrain).
__getattr__ = moved_attributes(__name__, {
    "scicevpr.offline.augment": ("CropSpec", "MultiCropAugment", "random_masks"),
    "scicevpr.offline.objectives": ("DINOHead", "dino_losses", "distil_losses", "distil_targets", "koleo_loss"),
})
