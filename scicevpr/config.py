"""Configuration dataclasses whose defaults are the paper's values.

Every function in the package takes one of these configs (or explicit arguments), never an
argparse namespace. The command line and the notebooks only *build* configs.

Paper symbols used throughout (PAPER.md, Sec. "Architecture"):

- ``M``      number of last DINOv2 blocks fused (``len(ModelConfig.layers)``)
- ``C``      DINOv2 embedding width (384 / 768 / 1024 / 1536 for S / B / L / g)
- ``C_mix``  width after the 1x1 channel-fusion conv (``ModelConfig.mix_dim``)
- ``r``      token-mixer MLP ratio (``ModelConfig.token_mlp_ratio``)
- ``p``      GeM exponent (``ModelConfig.gem_p``)
- ``B``      images in a batch; the cross-image encoder attends across ``B``
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

# Official DINOv2 architectures (facebookresearch/dinov2 hubconf): the key is the short name
# used by scicevpr, the value the hub name, which is also the prefix of the official weight
# file ``<hub name>_pretrain.pth``.
BACKBONE_ARCHS: dict[str, dict[str, Any]] = {
    "vits14": dict(hub_name="dinov2_vits14", embed_dim=384, depth=12, num_heads=6, ffn="mlp"),
    "vitb14": dict(hub_name="dinov2_vitb14", embed_dim=768, depth=12, num_heads=12, ffn="mlp"),
    "vitl14": dict(hub_name="dinov2_vitl14", embed_dim=1024, depth=24, num_heads=16, ffn="mlp"),
    "vitg14": dict(hub_name="dinov2_vitg14", embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}


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
            a compact one is trained by :mod:`scicevpr.pretrain` (see ``OFFLINE_BACKBONE``).
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
        full = BACKBONE_ARCHS[self.arch]["depth"]
        if self.num_blocks is not None:
            if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or not 1 <= self.num_blocks <= full:
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


# The compact backbone this project pretrains itself (``scicevpr pretrain-backbone``): DINOv2's
# ViT-S/14 architecture and parameter names cut to its first 4 blocks (7.4 M parameters, 15 MB in
# fp16), its position embedding learned at 112 px (8 x 8 patches), the offline image size.
OFFLINE_BACKBONE = BackboneConfig(arch="vits14", num_blocks=4, pretrain_img_size=112)


@dataclass(frozen=True)
class ModelConfig:
    """A SciceVPR / Super-CricaVPR model. Defaults: SciceVPR-B (PAPER.md, "Architecture").

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
        depth = self.backbone.depth
        if not self.layers or any(not 0 <= i < depth for i in self.layers):
            raise ValueError(
                f"layers={self.layers} must be non-empty block indices in [0, {depth}) for "
                f"DINOv2 {self.backbone.arch}."
            )
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers={self.layers} must be strictly increasing.")
        p = self.backbone.patch_size
        if self.image_size % p:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of the patch size {p}; "
                f"use e.g. {self.image_size // p * p} or {(self.image_size // p + 1) * p}."
            )
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
