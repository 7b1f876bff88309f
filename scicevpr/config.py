"""Configuration dataclasses whose defaults are the paper's values.

Every function in the package takes one of these configs (or explicit arguments), never an
argparse namespace. The command line and the notebooks only *build* configs.

The model configs (:class:`BackboneConfig`, :class:`ModelConfig`, :class:`CricaVPRConfig`, the
presets) come first, then the configs of the jobs: :class:`LossConfig` (used by
``scicevpr.losses``), :class:`EvalConfig` (``scicevpr.evaluate``) and :class:`TrainConfig`
(``scicevpr.train``). Each is imported from here, its one path; the offline world's configs are in
:mod:`scicevpr.offline.config`. This module imports neither torch nor NumPy, so the command line
builds its options (and answers ``--help``) without loading them.

Paper symbols used throughout (docs/method.md, "Architecture"):

- ``M``      number of last DINOv2 blocks fused (``len(ModelConfig.layers)``)
- ``C``      DINOv2 embedding width (384 / 768 / 1024 / 1536 for S / B / L / g)
- ``C_mix``  width after the 1x1 channel-fusion conv (``ModelConfig.mix_dim``)
- ``r``      token-mixer MLP ratio (``ModelConfig.token_mlp_ratio``)
- ``p``      GeM exponent (``ModelConfig.gem_p``)
- ``B``      images in a batch; the cross-image encoder attends across ``B``
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ._lazy import moved_attributes
from .protocol import OFFICIAL_GROUP_SIZES, check_group_size, check_protocol

# Official DINOv2 architectures (facebookresearch/dinov2 hubconf): the key is the short name
# used by scicevpr, the value the hub name, which is also the prefix of the official weight
# file ``<hub name>_pretrain.pth``.
BACKBONE_ARCHS: dict[str, dict[str, Any]] = {
    "vits14": dict(hub_name="dinov2_vits14", embed_dim=384, depth=12, num_heads=6, ffn="mlp"),
    "vitb14": dict(hub_name="dinov2_vitb14", embed_dim=768, depth=12, num_heads=12, ffn="mlp"),
    "vitl14": dict(hub_name="dinov2_vitl14", embed_dim=1024, depth=24, num_heads=16, ffn="mlp"),
    "vitg14": dict(hub_name="dinov2_vitg14", embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}


def check_number_fields(config: Any, prefix: str = "") -> None:
    """The one type check of a config's numbers: a field annotated ``int`` holds an int (not a
    bool, a float or a string), one annotated ``float`` a finite real number, and ``... | None``
    also admits None. A wrong one raises naming the field and its default, before anything runs
    (a float epoch count would otherwise fail inside the loop, after the run folder was written).
    The ranges are each config's own checks, made after this one. ``prefix`` starts the message."""
    for f in fields(config):
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", None) or str(f.type)  # "int | None"
        kind, optional = ann.removesuffix(" | None"), ann.endswith(" | None")
        v = getattr(config, f.name)
        if kind not in ("int", "float") or (optional and v is None):
            continue
        if kind == "int":
            ok, what = not isinstance(v, bool) and isinstance(v, numbers.Integral), "an int"
        else:
            ok, what = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v), "a finite number"
        if not ok:
            example = "" if f.default in (dataclasses.MISSING, None) else f"; e.g. {f.name}={f.default!r}"
            raise ValueError(f"{prefix}{f.name} must be {what}{' or None' if optional else ''}, got {v!r} "
                             f"({type(v).__name__}){example}")


def check_seed(seed: int) -> int:
    """A run's seed: a non-negative int (NumPy draws the data order from ``[seed, epoch]``, and
    refuses negative entries; a negative seed would fail at the first batch, after the run folder
    was written)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return seed


def check_image_size(image_size: int, patch_size: int | None = None) -> int:
    """The one check of an input side ``S``: a positive int and, for a model (``patch_size`` given),
    a multiple of the patch size. Returns ``image_size``; a wrong one raises with the fix."""
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (the side S of the square model input), got {image_size!r}")
    if patch_size and image_size % patch_size:
        p = patch_size
        raise ValueError(
            f"image_size={image_size} is not a multiple of the patch size {p}; "
            f"use e.g. {max(image_size // p, 1) * p} or {(image_size // p + 1) * p}."
        )
    return int(image_size)


@dataclass(frozen=True)
class BackboneConfig:
    """DINOv2 ViT, official architecture (Oquab et al. 2023): patch 14, trained at 518 px.

    Attributes:
        arch: one of ``BACKBONE_ARCHS`` (``"vits14"``, ``"vitb14"``, ``"vitl14"``, ``"vitg14"``).
        patch_size: side of a square patch in pixels.
        pretrain_img_size: image size the position embedding was learned for (518 -> 37 x 37).
        layerscale_init: LayerScale init value (1.0 in the official hub models).
        interpolate_offset: the official ``+0.1`` in the position-embedding resize factor.
        num_blocks: keep only the first ``num_blocks`` transformer blocks of ``arch`` (a compact
            ViT with the same widths and parameter names); None: all of them (the official
            depth). Only the official configurations (``is_official``) have Meta's weights;
            a compact one is trained by :mod:`scicevpr.offline.pretrain` (see :data:`scicevpr.offline.config.OFFLINE_BACKBONE`).
    """

    arch: str = "vitb14"
    patch_size: int = 14
    pretrain_img_size: int = 518
    layerscale_init: float = 1.0
    interpolate_offset: float = 0.1
    num_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in BACKBONE_ARCHS:
            raise ValueError(
                f"Unknown DINOv2 architecture {self.arch!r}; expected one of "
                f"{sorted(BACKBONE_ARCHS)}."
            )
        check_number_fields(self)
        full = BACKBONE_ARCHS[self.arch]["depth"]
        if self.num_blocks is not None:
            if not 1 <= self.num_blocks <= full:
                raise ValueError(
                    f"num_blocks={self.num_blocks!r} must be an int in [1, {full}] for {self.arch} (the first "
                    f"blocks kept), or None for all {full}."
                )
            if self.num_blocks == full:
                object.__setattr__(self, "num_blocks", None)  # the official depth: one spelling
        if self.pretrain_img_size % self.patch_size:
            raise ValueError(
                f"pretrain_img_size={self.pretrain_img_size} is not a multiple of patch_size={self.patch_size}; "
                f"the position embedding covers a whole grid of patches (e.g. 518 = 37 x 14, 112 = 8 x 14)."
            )

    @property
    def spec(self) -> dict[str, Any]:
        return BACKBONE_ARCHS[self.arch]

    @property
    def embed_dim(self) -> int:  # C
        return self.spec["embed_dim"]

    @property
    def depth(self) -> int:  # transformer blocks actually built
        return self.num_blocks or self.spec["depth"]

    @property
    def num_heads(self) -> int:
        return self.spec["num_heads"]

    @property
    def is_official(self) -> bool:
        """True for Meta's DINOv2 configurations (all blocks, patch 14, 37 x 37 position table)."""
        return self.num_blocks is None and self.patch_size == 14 and self.pretrain_img_size == 518

    @property
    def hub_name(self) -> str:
        """Prefix of the weight file ``<hub name>_pretrain.pth``: the official hub name, or for
        a compact backbone e.g. ``scicevpr_vits14_4blocks_112px`` (weights from
        ``scicevpr pretrain-backbone``)."""
        if self.is_official:
            return self.spec["hub_name"]
        return f"scicevpr_{self.arch.replace('14', str(self.patch_size))}_{self.depth}blocks_{self.pretrain_img_size}px"


@dataclass(frozen=True)
class ModelConfig:
    """A SciceVPR / Super-CricaVPR model. Defaults: SciceVPR-B (docs/method.md, "Architecture").

    Attributes:
        name: preset name, for display and checkpoints.
        backbone: the frozen DINOv2.
        layers: 0-based indices of the fused blocks; ``M = len(layers)``.
        image_size: input side in pixels (square); must be a multiple of the patch size.
        mix_dim: ``C_mix``, output channels of the 1x1 fusion conv.
        num_token_mixers: token-mixer blocks after the channel fusion (Fig. 5b).
        token_mlp_ratio: ``r``, hidden width of a token mixer is ``HW * r``.
        gem_p, gem_eps: GeM exponent init and clamp.
        encoder_heads, encoder_ffn, encoder_dropout: ``nn.TransformerEncoderLayer`` settings.
        teacher_layers: depth of the cross-image encoder of Super-CricaVPR.
        student_layers: depth of the self-enhanced encoder of SciceVPR.
    """

    name: str = "SciceVPR-B"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    layers: tuple[int, ...] = (8, 9, 10, 11)
    image_size: int = 224
    mix_dim: int = 768
    num_token_mixers: int = 2
    token_mlp_ratio: float = 1.0
    gem_p: float = 3.0
    gem_eps: float = 1e-6
    encoder_heads: int = 16
    encoder_ffn: int = 2048
    encoder_dropout: float = 0.1
    teacher_layers: int = 2
    student_layers: int = 1

    def __post_init__(self) -> None:
        check_number_fields(self)
        depth = self.backbone.depth
        if not self.layers or any(not 0 <= i < depth for i in self.layers):
            raise ValueError(
                f"layers={self.layers} must be non-empty block indices in [0, {depth}) for "
                f"DINOv2 {self.backbone.arch}."
            )
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers={self.layers} must be strictly increasing.")
        check_image_size(self.image_size, self.backbone.patch_size)
        if self.mix_dim % self.encoder_heads:
            raise ValueError(
                f"mix_dim={self.mix_dim} (C_mix) must be divisible by encoder_heads="
                f"{self.encoder_heads}."
            )

    @property
    def num_fused_layers(self) -> int:  # M
        return len(self.layers)

    @property
    def in_channels(self) -> int:  # M * C
        return self.num_fused_layers * self.backbone.embed_dim

    @property
    def grid_size(self) -> int:  # H = W = image_size / patch_size
        return self.image_size // self.backbone.patch_size

    @property
    def num_regions(self) -> int:  # 1 + 2*2 + 3*3
        return 14

    @property
    def descriptor_dim(self) -> int:  # 14 * C_mix
        return self.num_regions * self.mix_dim

    def with_overrides(self, **overrides: Any) -> "ModelConfig":
        """A copy with some fields replaced; ``backbone_<field>=`` sets a BackboneConfig field,
        e.g. ``backbone_arch="vits14"``, ``backbone_num_blocks=4``."""
        backbone_keys = {f"backbone_{f.name}" for f in fields(BackboneConfig)}
        valid = {f.name for f in fields(self)} | backbone_keys
        unknown = set(overrides) - valid
        if unknown:
            raise ValueError(f"Unknown ModelConfig fields {sorted(unknown)}; valid: {sorted(valid)}.")
        bb = {k[len("backbone_"):]: overrides.pop(k) for k in sorted(backbone_keys & set(overrides))}
        if bb:
            overrides["backbone"] = replace(overrides.get("backbone", self.backbone), **bb)
        if "layers" in overrides:
            overrides["layers"] = tuple(overrides["layers"])
        return replace(self, **overrides)


@dataclass(frozen=True)
class CricaVPRConfig(ModelConfig):
    """CricaVPR (Lu et al., CVPR 2024), the cross-image baseline of the paper's Fig. 1-2.

    Reuses :class:`ModelConfig` with these meanings: ``layers`` is the single block whose
    output (after the final LayerNorm) is pooled, the last one; ``mix_dim`` must equal ``C``
    (no channel fusion: regional features keep DINOv2's width), so ``descriptor_dim`` is
    ``14 * C``; ``teacher_layers`` is the depth of the cross-image encoder (2).
    ``num_token_mixers``, ``token_mlp_ratio`` and ``student_layers`` are unused.

    Attributes:
        adapter_scale: weight of the adapter on the feed-forward branch (0.2).
        adapter_bn_eps: BatchNorm eps in the adapter's conv branches (1e-3).
        class_token: keep the CLS token as the 14th region (the official model); False: the 13
            GeM regions alone, ``descriptor_dim = 13 * C`` (a control: what the CLS region adds).
        adapters: insert the trainable adapters into the backbone's blocks (the official model);
            False: the backbone stays frozen and unchanged, as SciceVPR's (a control: what
            training inside the backbone adds).

    Adapter widths follow ``C`` (:attr:`adapter_channels`): official ViT-B (C = 768) is
    768 -> 384 -> 768 with branches 192; 24 -> 96 (3x3); 24 -> 96 (5x5), i.e. ``C/2``
    bottleneck, ``C/4`` and ``C/32 -> C/8`` twice. "CricaVPR-S" (ViT-S, not an official
    model) uses the same proportions: 384 -> 192 -> 384, branches 96; 12 -> 48; 12 -> 48.
    """

    name: str = "CricaVPR"
    layers: tuple[int, ...] = (11,)
    num_token_mixers: int = 0
    adapter_scale: float = 0.2
    adapter_bn_eps: float = 1e-3
    class_token: bool = True
    adapters: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        C = self.backbone.embed_dim
        if len(self.layers) != 1:
            raise ValueError(
                f"CricaVPR pools one block's output; got layers={self.layers}. Use "
                f"layers=({self.backbone.depth - 1},) (the last block, as the official model)."
            )
        if self.mix_dim != C:
            raise ValueError(
                f"CricaVPR's regional features keep DINOv2's width, so mix_dim must be "
                f"C = {C} for {self.backbone.arch}; got mix_dim={self.mix_dim}. Pass "
                f"mix_dim={C} (or use the 'CricaVPR' / 'CricaVPR-S' presets)."
            )
        if C % 32:
            raise ValueError(f"adapter widths are C/2, C/4, C/8, C/32; C = {C} is not a multiple of 32.")

    @property
    def adapter_channels(self) -> tuple[int, int, int, int, int, int]:
        """(hidden, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5) = C * (1/2, 1/4, 1/32, 1/8, 1/32, 1/8)."""
        C = self.backbone.embed_dim
        return C // 2, C // 4, C // 32, C // 8, C // 32, C // 8

    @property
    def num_regions(self) -> int:  # CLS + 2*2 + 3*3, or 13 without the CLS token
        return 14 if self.class_token else 13


PRESETS: dict[str, ModelConfig] = {
    "SciceVPR-B": ModelConfig(),
    "SciceVPR-L": ModelConfig(
        name="SciceVPR-L",
        backbone=BackboneConfig(arch="vitl14"),
        layers=(20, 21, 22, 23),
        mix_dim=1024,
    ),
    # The CPU-sized variant of the offline path: ViT-S/14, blocks 8-11, 1536 -> 384.
    "SciceVPR-S": ModelConfig(
        name="SciceVPR-S",
        backbone=BackboneConfig(arch="vits14"),
        layers=(8, 9, 10, 11),
        mix_dim=384,
    ),
    # CricaVPR, the baseline: ViT-B/14 with adapters, CLS + 13 regions, 10752-d.
    "CricaVPR": CricaVPRConfig(),
    # Its CPU-sized variant (not an official model): ViT-S/14, adapters scaled with C.
    "CricaVPR-S": CricaVPRConfig(
        name="CricaVPR-S", backbone=BackboneConfig(arch="vits14"), mix_dim=384
    ),
}


def get_config(preset_or_config: "str | ModelConfig", **overrides: Any) -> ModelConfig:
    """Resolve a preset name (``"SciceVPR-B"``, ``"SciceVPR-L"``, ``"SciceVPR-S"``,
    ``"CricaVPR"``, ``"CricaVPR-S"``) or a config.

    Keyword overrides replace fields, e.g. ``get_config("SciceVPR-S", image_size=112)``.
    """
    if isinstance(preset_or_config, ModelConfig):
        cfg = preset_or_config
    elif isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(
                f"Unknown preset {preset_or_config!r}; expected one of {sorted(PRESETS)} "
                f"or a scicevpr.ModelConfig."
            )
        cfg = PRESETS[preset_or_config]
    else:
        raise TypeError(
            f"Expected a preset name or ModelConfig, got {type(preset_or_config).__name__}."
        )
    return cfg.with_overrides(**overrides) if overrides else cfg


# --------------------------------------------------------------------------------------------
# Loss, evaluation and training
# --------------------------------------------------------------------------------------------

STAGE1_MODELS = ("SuperCricaVPR", "CricaVPR", "SciceVPR")  # what stage 1 (train_teacher) can train
@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of ``L_MS`` and ``L_T`` (official values)."""

    ms_alpha: float = 1.0
    ms_beta: float = 50.0
    ms_base: float = 0.0
    miner_epsilon: float = 0.1
    gamma: float = 1.0  # weight of L_MS in L_T
    eta: float = 1.0  # weight of L_D in L_T

    def __post_init__(self) -> None:
        check_number_fields(self, "loss ")
        for name in ("ms_alpha", "ms_beta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"loss {name} must be > 0 (the paper's: {LossConfig.__dataclass_fields__[name].default}), "
                                 f"got {getattr(self, name)!r}")
        for name in ("gamma", "eta", "miner_epsilon"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss {name} must be >= 0 (a weight; the paper's: "
                                 f"{LossConfig.__dataclass_fields__[name].default}), got {getattr(self, name)!r}")


@dataclass(frozen=True)
class EvalConfig:
    """How descriptors are computed and scored. Defaults: the VG-benchmark protocol (file
    order, batches of 16, exact L2 search) with this project's input pipeline; ``protocol=
    "official"`` is the authors' code to the detail (:mod:`scicevpr.protocol`).

    Attributes:
        batch_size: images per forward pass for the database (and queries unless
            ``query_batch_size`` is set); 16 officially (8 for CricaVPR on Pitts30k).
        query_batch_size: a different batch size for the queries, or None.
        recall_values: the N of Recall@N.
        device: None keeps the model where it is; else the model is moved there (``"auto"``:
            CUDA when there is one, as in training).
        fast: the fast path: bf16 autocast (where the device computes bf16 natively, see
            :mod:`scicevpr.precision`), batched GPU JPEG decoding and ``torch.compile`` of the
            per-image part of the model. None means on for CUDA, off for CPU;
            ``fast=False`` is the plain fp32 eager path everywhere.
        amp: bf16 autocast alone (on a CPU only where bf16 is native); None follows ``fast``.
        gpu_decode: decode JPEGs in batches on the GPU (nvJPEG) when the device is CUDA;
            None follows ``fast``.
        num_workers: DataLoader worker processes (decoding or file reading).
        pca_dim: project descriptors with a PCA of this many dimensions (fitted separately).
        progress: tqdm progress bars.
        protocol: ``"default"`` or ``"official"``: the authors' non-antialiased resize of the
            normalised tensor, fp32, PIL decoding (``fast``, ``amp`` and ``gpu_decode`` off), a
            shuffled PCA subset, CricaVPR at half the batch on Pitts30k/250k.
        encoder_group_size: the cross-image encoder attends within groups of this many images
            of each batch, as ``nn.DataParallel`` splits a batch over GPUs (a batch of B in
            ``ceil(B / g)`` chunks); None: the whole batch (the authors' ``eval.py``, one GPU).
            Their stage-1 validation ran on 2 GPUs: 8 of 16.
    """

    batch_size: int = 16
    query_batch_size: int | None = None
    recall_values: tuple[int, ...] = (1, 5, 10, 100)
    device: str | None = None
    fast: bool | None = None
    amp: bool | None = None
    gpu_decode: bool | None = None
    num_workers: int = 2
    pca_dim: int | None = None
    progress: bool = True
    protocol: str = "default"
    encoder_group_size: int | None = None

    def __post_init__(self) -> None:
        check_protocol(self.protocol, "EvalConfig.protocol")
        check_group_size(self.encoder_group_size, "EvalConfig.encoder_group_size")
        rv = self.recall_values
        object.__setattr__(self, "recall_values", (rv,) if isinstance(rv, numbers.Integral) else tuple(rv))
        if not self.recall_values or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in self.recall_values):
            raise ValueError(f"recall_values must be integers N >= 1 (Recall@N), e.g. 1,5,10,100; got {self.recall_values!r}")
        check_number_fields(self)
        for name in ("batch_size", "query_batch_size", "pca_dim"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be an integer >= 1" + (" (or None)" if name != "batch_size" else "") + f", got {v!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers!r}")
        if self.protocol == "official":
            on = [n for n in ("fast", "amp", "gpu_decode") if getattr(self, n)]
            if on:
                raise ValueError(
                    f"protocol='official' computes in fp32 with PIL decoding, as the authors do; "
                    f"{', '.join(f'{n}=True' for n in on)} contradicts it. Leave them unset, or use protocol='default'."
                )


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults: the paper's (docs/method.md, "Training").

    Model:
        model: stage-1 model class: ``"SuperCricaVPR"`` (the teacher, default), ``"CricaVPR"``
            (the baseline) or ``"SciceVPR"`` (trained alone with ``L_MS``: an ablation).
            Stage 2 always trains a SciceVPR built from the teacher.
        preset: ModelConfig preset (``"SciceVPR-B"`` / ``"-L"`` / ``"-S"``, ``"CricaVPR"``,
            ``"CricaVPR-S"``); None means ``"CricaVPR"`` for that model, else ``"SciceVPR-B"``.
            Stage 2 takes the teacher's architecture and ignores it.
        model_overrides: ModelConfig fields to replace, e.g. ``{"image_size": 112}``.
        weights: DINOv2 weights: a path, ``"auto"`` or None (random, reproducible from ``seed``).
    Data:
        gsv_root: GSV-Cities folder (``Dataframes/``, ``Images/``); None: ``$SCICEVPR_DATA/gsv_cities``.
        cities: city names, or None for all.
        places_per_batch: P (72). Under DDP the global batch; each of N ranks loads P / N places.
        img_per_place: K (4).
        randaugment_ops: RandAugment operations per training image (3); 0 turns augmentation off.
        num_workers: DataLoader workers (per rank).
        drop_small_places: True (the official loader's choice): places with fewer than K images
            are left out, and counted (``RunResult.num_dropped_places``, ``config.json``).
            False: such a place is an error naming it.
        skip_corrupt: False: every training and validation file is checked before training at
            the cost of a few bytes each (``data.decode.check_images``), and a truncated, empty or
            missing image is an error naming it; a file damaged only in its middle is an error
            when it is loaded. True: every image is test-decoded before training and the ones
            that fail are left out, and counted (``RunResult.num_skipped_images``, ``config.json``).
    Optimisation:
        lr: Adam learning rate (1e-4).
        lr_step_epochs, lr_gamma: StepLR, lr multiplied by ``lr_gamma`` every ``lr_step_epochs``
            epochs, stepped per iteration (step size ``lr_step_epochs * iterations_per_epoch``).
        epochs: None means the paper's: 10 for stage 1, 1 for stage 2. A resumed run may be given
            more (extended); it then trains as an uninterrupted run of that many epochs would, but
            with ``val_every`` > 1 the validation after its former last epoch stays in the log
            and may be the best, where the longer run would not have validated that epoch.
        max_iters_per_epoch: cap on iterations per epoch (quick runs); None: every full batch (and under
            ``protocol="official"`` the last partial one).
        loss: ``L_MS`` and ``L_T`` hyper-parameters (gamma = eta = 1).
    Validation:
        val_root, val_dataset, val_split: ``load_vg_split(val_root, val_dataset, val_split)``;
            ``val_dataset=None`` turns validation off (no ``best.pt``).
        val_every: validate every this many epochs (and after the last one).
        eval_batch_size: images per batch in validation (16, the official protocol).
    Run:
        run_dir: the run folder; None means ``runs/teacher`` or ``runs/student``.
        resume: continue from ``run_dir/last.pt``. Without it an existing run folder is an error.
        seed: seeds initialisation, data order, augmentation and dropout.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        amp: bf16 autocast; None: the precision policy (:mod:`scicevpr.precision`: on for a CUDA
            GPU with bf16, Ampere or newer, and on a CPU only where bf16 is native), False: fp32.
            ``protocol="official"``: fp32.
        activation_checkpointing: checkpoint the backbone's blocks where gradients flow through
            them (CricaVPR's adapters): the same weights, for a second forward pass through the
            backbone and a fraction of the memory. None: chosen by the memory check before the
            run starts (:mod:`scicevpr.memory`: on exactly when the batch does not fit the
            device's free memory without it and fits with it); True / False: forced. The choice
            and the estimate are in ``config.json``; a run whose batch does not fit stops before it
            starts, naming the need and the choices.
        teacher: stage 2: the teacher checkpoint, native (stage 1's ``best.pt``) or the
            authors' format (then ``preset`` must describe it); or stage 1's run folder, whose
            ``best.pt`` is taken (``last.pt`` under ``protocol="official"``, as the authors' default
            ``--crica_path .../last_model.pth``).
        trust_checkpoint: also load a teacher or ``last.pt`` that holds pickled Python objects
            (which runs code from the file); only for a file from a source you trust. Files are
            otherwise read with ``weights_only=True``.
        store_backbone: save the frozen backbone in every checkpoint even when it can be
            rebuilt from its weight file or seed.
        progress: tqdm bars.
    Protocol (:mod:`scicevpr.protocol`):
        protocol: ``"default"`` or ``"official"``: the authors' training order (cities in their
            list order, places shuffled once, the same order every epoch, the last partial batch
            kept; see :class:`scicevpr.train.PlaceBatchSampler`), fp32, the group sizes below, the teacher's
            ``last.pt``, their evaluation transform and float32 UTMs in validation.
        encoder_group_size: stage 1: the cross-image encoder attends within groups of this many
            images of each global batch (as ``nn.DataParallel`` splits it); None: the whole
            batch, or 144 (of 288) under ``"official"``.
        target_group_size: stage 2: the same for the teacher computing the distillation targets;
            None: the whole batch, or 72 under ``"official"``.
        val_group_size: validation batches likewise; None: the whole batch, or 8 (of 16) under
            ``"official"``. The official sizes are inferred from the GPUs the authors' scripts
            make visible (``CUDA_VISIBLE_DEVICES``: 2 in stage 1, 4 in stage 2).
    """

    model: str = "SuperCricaVPR"
    preset: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    weights: str | None = "auto"
    gsv_root: str | None = None
    cities: tuple[str, ...] | None = None
    places_per_batch: int = 72  # P
    img_per_place: int = 4  # K
    randaugment_ops: int = 3
    num_workers: int = 4
    drop_small_places: bool = True
    skip_corrupt: bool = False
    lr: float = 1e-4
    lr_step_epochs: int = 3
    lr_gamma: float = 0.5
    epochs: int | None = None
    max_iters_per_epoch: int | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    val_root: str | None = None
    val_dataset: str | None = "pitts30k"
    val_split: str = "val"
    val_every: int = 1
    eval_batch_size: int = 16
    run_dir: str | None = None
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    activation_checkpointing: bool | None = None
    teacher: str | None = None
    trust_checkpoint: bool = False
    store_backbone: bool = False
    progress: bool = True
    protocol: str = "default"
    encoder_group_size: int | None = None
    target_group_size: int | None = None
    val_group_size: int | None = None

    def __post_init__(self) -> None:
        check_protocol(self.protocol, "TrainConfig.protocol")
        for name in ("encoder_group_size", "target_group_size", "val_group_size"):
            check_group_size(getattr(self, name), name)
        if self.protocol == "official" and self.amp:
            raise ValueError("protocol='official' trains in fp32, as the authors do; amp=True contradicts it. "
                             "Leave amp unset, or use protocol='default'.")
        if self.model not in STAGE1_MODELS:
            raise ValueError(f"model={self.model!r}: expected one of {STAGE1_MODELS}.")
        check_number_fields(self)
        check_seed(self.seed)
        for name in ("lr", "lr_gamma"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("places_per_batch", "img_per_place", "lr_step_epochs", "val_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "randaugment_ops"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.img_per_place < 2:
            raise ValueError("img_per_place (K) must be >= 2: L_MS needs positive pairs within a place.")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 (or None for the paper's), got {self.epochs}")
        if self.max_iters_per_epoch is not None and self.max_iters_per_epoch < 1:
            raise ValueError(f"max_iters_per_epoch must be >= 1 or None, got {self.max_iters_per_epoch}")
        if isinstance(self.loss, dict):
            object.__setattr__(self, "loss", LossConfig(**self.loss))
        if self.cities is not None:  # one name is one city, not its letters
            object.__setattr__(self, "cities", (self.cities,) if isinstance(self.cities, str) else tuple(self.cities))

    def group_size(self, which: str) -> int | None:
        """Images the cross-image encoder attends across: ``which`` is ``"train"`` (stage 1),
        ``"targets"`` (stage 2's teacher) or ``"validation"``; None means the whole batch."""
        value = {"train": self.encoder_group_size, "targets": self.target_group_size,
                 "validation": self.val_group_size}[which]
        if value is None and self.protocol == "official":
            return OFFICIAL_GROUP_SIZES[which]
        return value

    def use_amp(self) -> bool | None:
        """``amp`` for :func:`scicevpr.precision.resolve_amp`: False (fp32) under the official protocol."""
        return False if self.protocol == "official" else self.amp

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def model_config(self) -> ModelConfig:
        """The stage-1 ModelConfig (preset + overrides)."""
        preset = self.preset or ("CricaVPR" if self.model == "CricaVPR" else "SciceVPR-B")
        cfg = get_config(preset, **self.model_overrides)
        if (self.model == "CricaVPR") != isinstance(cfg, CricaVPRConfig):
            raise ValueError(
                f"model={self.model!r} does not fit preset {preset!r}: CricaVPR takes the 'CricaVPR' / "
                f"'CricaVPR-S' presets, SuperCricaVPR and SciceVPR the 'SciceVPR-*' ones."
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (``config.json``)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# The offline world's model and recipes moved to scicevpr.offline.config; their names still import
# from here. Its configuration classes do not: each config class has one import path.
__getattr__ = moved_attributes(
    __name__,
    {"scicevpr.offline.config": ("OFFLINE_BACKBONE", "OFFLINE_MODEL_OVERRIDES", "OBJECTIVES", "OBJECTIVE_RECIPES",
                                 "PLACE_OBJECTIVES", "POOLINGS")},
    removed={name: "import it from scicevpr.offline.config (one import path for each config class)"
             for name in ("PretrainConfig", "ClaimsConfig")},
)
