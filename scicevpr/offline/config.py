"""The configurations of the offline world: its model (:data:`OFFLINE_BACKBONE`,
:data:`OFFLINE_MODEL_OVERRIDES`) and training recipe (:func:`offline_train_config`), and its jobs,
:class:`PretrainConfig` (``scicevpr pretrain-backbone``, :mod:`scicevpr.offline.pretrain`) and
:class:`ClaimsConfig` (``scicevpr claims``, :mod:`scicevpr.offline.claims`). Like
:mod:`scicevpr.config`, which holds the paper's, this module imports neither torch nor NumPy
(the command line builds its options from it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import BACKBONE_ARCHS, BackboneConfig, LossConfig, TrainConfig, check_number_fields, check_seed

PathLike = str | os.PathLike

# The compact backbone this project pretrains itself (``scicevpr pretrain-backbone``): DINOv2's
# ViT-S/14 architecture and parameter names cut to its first 4 blocks (7.4 M parameters, 15 MB in
# fp16), its position embedding learned at 112 px (8 x 8 patches), the offline image size.
OFFLINE_BACKBONE = BackboneConfig(arch="vits14", num_blocks=4, pretrain_img_size=112)

# The offline model: SciceVPR-S at 112 px on OFFLINE_BACKBONE with all four of its blocks fused
# (M = 4, as in the paper, but blocks 0-3 of a 4-block network): ModelConfig fields.
OFFLINE_MODEL_OVERRIDES: dict[str, Any] = {
    "image_size": 112, "layers": (0, 1, 2, 3),
    "backbone_num_blocks": OFFLINE_BACKBONE.num_blocks, "backbone_pretrain_img_size": OFFLINE_BACKBONE.pretrain_img_size,
}

OBJECTIVES = ("dino", "supervised", "distil", "cnn")  # pretraining objectives
PLACE_OBJECTIVES = ("supervised", "cnn")  # those trained with L_MS on P x K place batches
POOLINGS = ("mean", "gem", "cls", "regions", "grid")  # pretraining's pooling for the supervised objective
# The recipes that made the shipped backbone's two later steps (scicevpr/weights/README.md), for
# the objectives that DINO's defaults do not suit: with DINO's weight decay (0.04 -> 0.4) and
# gradient clipping, L_MS collapses the small CNN. PretrainConfig.recipe(objective) starts from
# them; the command line does so for --objective cnn and distil.
OBJECTIVE_RECIPES: dict[str, dict[str, Any]] = {
    "cnn": dict(distil_size=64, batch_size=256, img_per_place=4, steps=1500, lr=1e-3, min_lr=0.0,
                warmup_fraction=0.1333, weight_decay=1e-4, weight_decay_end=1e-4, clip_grad=0.0,
                supervised_scale=(0.6, 1.0), colour_augment=False),
    "distil": dict(batch_size=128, steps=1061, lr=5e-4, weight_decay=0.05, weight_decay_end=0.05,
                   supervised_scale=(0.6, 1.0), colour_augment=False),
}



@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run. Defaults: the offline backbone (``OFFLINE_BACKBONE``) with DINO;
    :meth:`recipe` gives the ``"cnn"`` and ``"distil"`` runs their own (:data:`OBJECTIVE_RECIPES`).

    Objective and data:
        objective: ``"dino"`` (self-distillation, DINO + iBOT + KoLeo), ``"supervised"``
            (``L_MS`` on place batches), ``"distil"`` (the ViT learns a trained convolutional
            network's features, crop by crop: ``distil_teacher``) or ``"cnn"`` (no ViT: that
            network, :class:`~scicevpr.offline.objectives.LayoutCNN`, trained with ``L_MS`` on place
            batches at ``distil_size`` pixels; its export is the teacher of ``"distil"``).
        data: a synthetic benchmark folder (holding ``gsv_cities/``) or a GSV-Cities-layout folder
            (``Dataframes/``, ``Images/``); ``scicevpr synth --preset pretrain --seed 1`` makes one.
        cities: city names, or None for all.
        cache_size: side (pixels) at which every image is kept in memory; crops are cut from it.
        init_weights: a backbone weight file to start from (e.g. a DINO run's export, fine-tuned
            with ``objective="supervised"``); its manifest is checked and recorded in the export's.
            None: a random initialisation.
    Backbone (``BackboneConfig(arch, num_blocks=num_blocks, pretrain_img_size=image_size)``):
        arch: the DINOv2 architecture whose widths are used (``"vits14"``: C = 384, 6 heads).
        num_blocks: transformer blocks (4: 7.4 M parameters, 15 MB in fp16).
        image_size: side of the global crops and of the position table (112 -> 8 x 8 patches).
    Multi-crop (DINO):
        local_size: side of the local crops (56 -> 4 x 4 patches).
        local_crops: local crops per image.
        global_scale, local_scale: area ranges of the random resized crops.
        colour_augment: DINO's colour augmentations (jitter of brightness, contrast, saturation and
            hue with probability 0.8, grey 0.2, solarisation of one global crop 0.2; the supervised
            crop: jitter 0.8). False keeps each view's colours: crops, flips and blur only. DINO
            made its views differ in colour so that crops could not be matched by their colour
            histograms; on the synthetic streets, whose facades are flat colours, those
            histograms identify places (``lab.baselines.colour_baseline_result``).
    DINO / iBOT / KoLeo:
        head_hidden, head_bottleneck, prototypes: DINO head C -> hidden -> hidden -> bottleneck,
            then ``K = prototypes`` weight-normalised prototypes.
        student_temp: ``tau_s``.
        teacher_temp_warmup, teacher_temp, teacher_temp_warmup_fraction: ``tau_t`` rises linearly
            from the first to the second over that share of the steps, then stays.
        center_momentum: EMA momentum of the centers.
        momentum, momentum_end: teacher EMA momentum ``m``, cosine from the first to the second.
        ibot_weight: weight of the masked-patch loss (0 turns it off).
        mask_ratio: range of the share of patches masked in a masked crop.
        mask_probability: share of the student's global crops that are masked.
        koleo_weight: weight of the mean of the two global views' KoLeo terms (0 turns it off;
            DINOv2 weights their sum, so 0.1 here is DINOv2's 0.05).
    Supervised (and ``"cnn"``):
        img_per_place: K; a step holds ``batch_size / K`` places (P).
        pooling: ``"mean"`` of the patch tokens, ``"gem"`` (GeM, learnable p), ``"cls"``, or
            ``"regions"``: the 14 regional GeMs of SciceVPR's aggregator (whole map, 2 x 2, 3 x 3),
            concatenated, so that the descriptor keeps where each feature lies; ``"grid"``: the patch
            tokens averaged over a 2 x 4 grid (2 rows, 4 columns) and projected to 512 dimensions by a
            linear layer trained with them and dropped at export (the head of
            :class:`~scicevpr.offline.objectives.LayoutCNN`).
        supervised_scale: area range of the single random resized crop per image (also the
            crop of ``objective="distil"`` and ``"cnn"``).
        loss: ``L_MS`` hyper-parameters (the paper's).
    Distillation from a convolutional network:
        distil_teacher: the teacher of ``"distil"``: the state dict of a trained
            :class:`~scicevpr.offline.objectives.LayoutCNN` (``objective="cnn"``'s export, a ``.pt`` file), or
            a backbone weight file with its manifest (a ``.pth`` exported by this command, of the
            same architecture), whose last block's patch tokens after the final norm are the map
            to learn (:class:`~scicevpr.offline.objectives.ViTMapTeacher`); required by ``"distil"``.
        distil_size: side (pixels) of the network's input, a multiple of 8: for ``"distil"`` the
            same crop as the ViT's, resized (64: the teacher's 8 x 8 map lies on the ViT's 8 x 8
            patches; a ViT teacher takes ``image_size``); for ``"cnn"`` the side at which it is trained.
        distil_class_token: ``"distil"``: the CLS token also learns the network's place descriptor
            (``W_c z_cls`` against ``d``). False: no token has a place objective of its own; only
            the patch tokens learn the teacher's map, and the CLS token keeps what self-supervision
            and the shared blocks give it (a ViT teacher has no place descriptor: False).
    Monitoring:
        val_root, val_dataset, val_split: ``load_vg_split(val_root, val_dataset, val_split)``, e.g.
            the synthetic benchmark's ``vg`` folder, ``"synthetic"``, ``"val"``; None: no monitoring.
        val_every: steps between two retrieval checks (also at step 0 and at the end).
    Optimisation:
        steps: optimisation steps (the schedules span them); None fits them to ``max_minutes``
            from the measured speed of the first steps (then recorded, so a resume keeps them).
        batch_size: images per step over all ranks (DINO: source images, each giving
            2 + ``local_crops`` crops; supervised: P x K).
        lr, min_lr, warmup_fraction: AdamW learning rate (peak), its cosine floor, warm-up share.
        weight_decay, weight_decay_end: cosine weight-decay schedule.
        clip_grad: global gradient-norm clip (0: none).
    Run:
        run_dir: the run folder; None means ``runs/pretrain-<objective>``.
        resume: continue from ``run_dir/last.pt``. Without it an existing run folder is an error.
        max_minutes: wall-clock budget of this call (from its start, data loading included); the
            run stops at a step boundary with a checkpoint before exceeding it. None: no budget.
        stop_at_step: end this call after that step (checkpointed), keeping the schedules of
            ``steps``: a run done in parts, or a test of resume.
        seed: seeds initialisation, data order and every augmentation.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        amp: bf16 autocast; None: :mod:`scicevpr.precision` decides (CUDA: on; a CPU: only where
            bf16 is native), False: fp32.
        num_workers: DataLoader workers that decode the images (per rank).
        checkpoint_every, log_every: steps between checkpoints / log rows.
        checkpoint_minutes: also write the checkpoint once this many minutes have passed since the
            last one (a slow CPU run loses at most that much when killed); None: steps only.
        progress: tqdm bars.
    """

    objective: str = "dino"
    data: str | None = None
    cities: tuple[str, ...] | None = None
    cache_size: int = 160
    init_weights: str | None = None
    arch: str = "vits14"
    num_blocks: int = 4
    image_size: int = 112
    local_size: int = 56
    local_crops: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    colour_augment: bool = True
    head_hidden: int = 2048
    head_bottleneck: int = 256
    prototypes: int = 8192
    student_temp: float = 0.1
    teacher_temp_warmup: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_fraction: float = 0.3
    center_momentum: float = 0.9
    momentum: float = 0.992
    momentum_end: float = 1.0
    ibot_weight: float = 1.0
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    koleo_weight: float = 0.1
    img_per_place: int = 4
    pooling: str = "mean"
    supervised_scale: tuple[float, float] = (0.5, 1.0)
    loss: LossConfig = field(default_factory=LossConfig)
    distil_teacher: str | None = None
    distil_size: int = 64
    distil_class_token: bool = True
    val_root: str | None = None
    val_dataset: str = "synthetic"
    val_split: str = "val"
    val_every: int = 500
    steps: int | None = 1000
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_fraction: float = 0.1
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    run_dir: str | None = None
    resume: bool = False
    max_minutes: float | None = None
    stop_at_step: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    num_workers: int = 4
    checkpoint_every: int = 500
    checkpoint_minutes: float | None = 10.0
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            object.__setattr__(self, "loss", LossConfig(**self.loss))
        if isinstance(self.cities, str):  # one name is one city, not its letters
            object.__setattr__(self, "cities", (self.cities,))
        for name in ("cities", "global_scale", "local_scale", "mask_ratio", "supervised_scale"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}: expected one of {OBJECTIVES}.")
        check_number_fields(self)
        check_seed(self.seed)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: expected one of {POOLINGS}.")
        if self.arch not in BACKBONE_ARCHS:
            raise ValueError(f"arch={self.arch!r}: expected one of {sorted(BACKBONE_ARCHS)}.")
        for name in ("cache_size", "image_size", "local_size", "head_hidden", "head_bottleneck", "prototypes",
                     "batch_size", "img_per_place", "checkpoint_every", "log_every", "num_blocks", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_workers < 0 or self.local_crops < 0:
            raise ValueError("num_workers and local_crops must be >= 0")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            raise ValueError(f"checkpoint_minutes must be > 0 or None, got {self.checkpoint_minutes!r}")
        p = 14  # checked again by BackboneConfig; named here for the message
        for name in ("image_size", "local_size"):
            if getattr(self, name) % p:
                v = getattr(self, name)
                raise ValueError(f"{name}={v} is not a multiple of the patch size {p}; use {max(p, v // p * p)} or {(v // p + 1) * p}.")
        for name in ("global_scale", "local_scale", "mask_ratio", "supervised_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a range (lo, hi) with 0 < lo <= hi <= 1.")
        for name in ("teacher_temp_warmup_fraction", "warmup_fraction", "mask_probability", "center_momentum"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.momentum <= self.momentum_end <= 1:
            raise ValueError(f"need 0 <= momentum ({self.momentum}) <= momentum_end ({self.momentum_end}) <= 1.")
        for name in ("student_temp", "teacher_temp", "teacher_temp_warmup", "lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if min(self.min_lr, self.weight_decay, self.weight_decay_end, self.clip_grad, self.ibot_weight, self.koleo_weight) < 0:
            raise ValueError("min_lr, weight decays, clip_grad and loss weights must be >= 0")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, or None to fit them to max_minutes; got {self.steps}")
        if self.steps is None and self.max_minutes is None:
            raise ValueError("steps=None fits the schedule to a time budget: give max_minutes too (or give steps).")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 (or None), got {self.max_minutes}")
        if self.stop_at_step is not None and self.stop_at_step < 0:
            raise ValueError(f"stop_at_step must be >= 0 (or None), got {self.stop_at_step}")
        if self.objective in PLACE_OBJECTIVES:
            if self.img_per_place < 2:
                raise ValueError("img_per_place (K) must be >= 2: L_MS needs positive pairs within a place.")
            if self.batch_size % self.img_per_place:
                raise ValueError(
                    f"batch_size={self.batch_size} must be a multiple of img_per_place (K) = {self.img_per_place} "
                    f"(a step holds P = batch_size / K places); use e.g. {self.batch_size // self.img_per_place * self.img_per_place or self.img_per_place}."
                )
        if self.objective in ("distil", "cnn") and (self.distil_size < 8 or self.distil_size % 8):
            raise ValueError(f"distil_size={self.distil_size} must be a positive multiple of 8 (the network's stride).")
        if self.objective == "distil" and self.distil_teacher is None:
            raise ValueError("objective='distil' needs distil_teacher: the .pt file of a trained LayoutCNN "
                             "(scicevpr pretrain-backbone --objective cnn ... --export cnn.pt writes one).")
        if self.objective == "cnn" and self.init_weights is not None:
            raise ValueError("init_weights is a ViT backbone file; objective='cnn' trains a LayoutCNN from scratch: "
                             "leave init_weights unset.")
        if self.objective == "dino" and self.batch_size < 2 and self.koleo_weight > 0:
            raise ValueError("KoLeo needs at least 2 images per step: raise batch_size or set koleo_weight=0.")
        self.backbone_config()  # validates arch / num_blocks / image_size together

    def backbone_config(self) -> BackboneConfig:
        """The backbone trained and exported."""
        return BackboneConfig(arch=self.arch, num_blocks=self.num_blocks, pretrain_img_size=self.image_size)

    @property
    def places_per_batch(self) -> int:  # P (supervised)
        return self.batch_size // self.img_per_place

    def replace(self, **changes: Any) -> "PretrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def recipe(cls, objective: str = "dino", **changes: Any) -> "PretrainConfig":
        """A run of ``objective`` with the recipe measured for it (:data:`OBJECTIVE_RECIPES`: the
        CNN teacher's and the distillation's of the shipped backbone; the dataclass defaults,
        DINO's, for the others), ``changes`` on top, e.g. ``PretrainConfig.recipe("cnn", data=...)``."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}: expected one of {OBJECTIVES}.")
        return cls(objective=objective, **{**OBJECTIVE_RECIPES.get(objective, {}), **changes})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PretrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class ClaimsConfig:
    """What ``scicevpr claims`` trains and measures (:mod:`scicevpr.offline.claims`).

    Attributes:
        preset: the synthetic benchmark (``scicevpr synth --preset``), generated when missing.
        seeds: training seeds (>= 3 for a verdict over seeds; fewer run, and the table says so).
        out: folder of ``claims.md``, ``claims.csv`` and ``claims_runs.csv``.
        runs: folder of the trained models, ``<runs>/<preset>/seed-<s>/<model>/``.
        data: the benchmark's folder; None: ``$SCICEVPR_DATA/synthetic/<preset>``.
        weights: the backbone (``"auto"``: the shipped offline backbone; None: random).
        stage1_epochs, stage2_epochs: None: the offline recipe's (10 and 6).
        max_iters_per_epoch: cap on iterations per epoch (quick runs); None: the whole split.
        batch_sizes, num_orders: the query batchings of the stability sweep.
        num_samples: bootstrap resamples.
        threads: torch CPU threads (2, as the offline notebooks).
        num_workers: DataLoader workers in training.
        cache_bytes: the backbone cache (:class:`scicevpr.offline.cache.BackboneCache`); 0 turns it off.
        progress: tqdm bars.
    """

    preset: str = "small"
    seeds: tuple[int, ...] = (0, 1, 2)
    out: str = "figures"
    runs: str = "runs/claims"
    data: str | None = None
    weights: str | None = "auto"
    stage1_epochs: int | None = None
    stage2_epochs: int | None = None
    max_iters_per_epoch: int | None = None
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    num_orders: int = 3
    num_samples: int = 2000
    threads: int = 2
    num_workers: int = 2
    cache_bytes: int = 2 * 2**30
    progress: bool = True

    def __post_init__(self) -> None:
        check_number_fields(self)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds!r}")
        for name in ("stage1_epochs", "stage2_epochs", "max_iters_per_epoch"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 (or None for the recipe's), got {v!r}")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.num_orders < 1:
            raise ValueError(f"batch_sizes must be >= 1 and num_orders >= 1, got {self.batch_sizes!r}, {self.num_orders!r}")


def offline_train_config(
    gsv_root: PathLike,
    vg_root: PathLike,
    run_dir: PathLike,
    stage: str = "teacher",
    teacher: PathLike | None = None,
    dataset: str = "synthetic",
    **overrides: Any,
) -> TrainConfig:
    """The fast offline configuration: SciceVPR-S on the compact backbone this project pretrained
    (:data:`OFFLINE_BACKBONE`, the file in ``scicevpr/weights/``: ViT-S/14 widths, 4 blocks,
    112 px, trained on synthetic streets, not Meta's DINOv2 weights) and the synthetic ``small``
    benchmark, sized for a 2-core CPU (fp32, ``OMP_WAIT_POLICY=PASSIVE``).

    It keeps the paper's recipe (frozen backbone, P x K batches with K = 4, Adam at lr 1e-4, the
    lr halved every 3 epochs stepped per iteration, ``L_MS`` then ``L_T`` with gamma = eta = 1,
    validation each epoch, best by R@5, 10 epochs for stage 1) and changes only what the CPU
    needs:

    - 112 px (an 8 x 8 patch grid), in fp32 (``amp=False``): bf16 is emulated, about 7x slower
      than fp32, on CPUs without native bf16, and fp32 gives the same numbers on every CPU
      kind (with the kernels pinned, :data:`scicevpr.precision.PINNED_CPU_KERNELS`);
    - a 4-block backbone whose four blocks are all fused (``layers=(0, 1, 2, 3)``, M = 4 as in
      the paper, but the blocks of a 4-block network rather than blocks 8-11 of 12): a third of
      the compute of ViT-S/14;
    - P = 8 places (an epoch is the training split's places / 8 iterations: 10 on ``small``);
    - stage 2 for 6 epochs instead of 1: one epoch is only a few iterations here.

    ``weights=None`` (``SCICEVPR_WEIGHTS=random`` in the notebooks) gives the same model with a
    random backbone, one setting away.

    Args:
        gsv_root, vg_root: the synthetic benchmark's ``.gsv_root`` and ``.vg_root``.
        run_dir: the run folder.
        stage: ``"teacher"`` or ``"student"``.
        teacher: stage 2: the teacher checkpoint (stage 1's ``best.pt``).
        dataset: the validation dataset name under ``vg_root``.
        **overrides: any TrainConfig field; ``model_overrides`` are merged with the ones above.
    """
    from ..train import STAGES

    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: expected one of {STAGES}")
    base = dict(
        model="SuperCricaVPR",
        preset="SciceVPR-S",
        model_overrides=dict(OFFLINE_MODEL_OVERRIDES),
        weights="auto",
        gsv_root=str(gsv_root),
        places_per_batch=8,
        img_per_place=4,
        num_workers=2,
        lr=1e-4,
        epochs=10 if stage == "teacher" else 6,
        val_root=str(vg_root),
        val_dataset=dataset,
        val_split="val",
        eval_batch_size=16,
        run_dir=str(run_dir),
        device="cpu",
        amp=False,
        teacher=None if teacher is None else str(teacher),
    )
    model_overrides = {**base["model_overrides"], **(overrides.pop("model_overrides", None) or {})}
    base.update(overrides, model_overrides=model_overrides)
    return TrainConfig(**base)
