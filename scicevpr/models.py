"""Super-CricaVPR (teacher) and SciceVPR (student), assembled (docs/method.md; paper Fig. 3).

Both models are the same pipeline and share every line of code but their encoder::

    image (B, 3, 224, 224)
      -> frozen DINOv2, blocks l_1..l_M after the final LayerNorm   (B, M*C, 16, 16)
      -> 1x1 channel fusion + ReLU                                  (B, C_mix, 16, 16)
      -> token mixers                                               (B, C_mix, 16, 16)
      -> 14-region GeM, each region L2-normalised                   (B, 14, C_mix)
      -> encoder: cross-image (teacher) | self-enhanced (student)   (B, 14, C_mix)
      -> flatten + L2 normalisation                                 (B, 14 * C_mix)

The backbone is frozen in both training stages, and in stage 2 so is the 1x1 conv copied from
the teacher: :meth:`VPRModel.extract_features` (backbone + conv) is then the same for both
models and can be computed once per batch.

The two region encoders (docs/method.md, "Architecture", step 4; paper Fig. 3), the one place where
the models differ, both stack ``nn.TransformerEncoderLayer`` (d_model ``C_mix``, 16 heads, FFN
2048, GELU, dropout 0.1, post-norm) and map the (B, 14, C_mix) regional features to
(B, 14, C_mix). They differ only in what attends to what:

- :class:`CrossImageEncoder` (Super-CricaVPR, the teacher, 2 layers): for each region, the
  *sequence axis is the batch*: image b's region k attends to region k of every image in the
  batch. Its output for one image depends on which other images share the batch, and on how
  many: the instability of paper Fig. 1-2.
- :class:`SelfEnhancedEncoder` (SciceVPR, the student, 1 layer): each of the B x 14 regional
  features is a sequence of length 1. Attention over a single token is the identity on its
  value, so no image sees another and descriptors do not depend on the batch (in eval mode
  bit for bit: the layer runs image by image, so that no kernel's rounding can depend on B).

Keys: ``encoder.layers.{i}.*`` (the official ``nn.TransformerEncoder``'s names).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import DinoVisionTransformer, build_backbone
from .config import PRESETS, ModelConfig, get_config
from .files import read_model_file
from .fusion import MultiLayerFusion
from .pooling import MultiRegionGeM
from .precision import model_device

# Official checkpoint names (authors' code) -> scicevpr names, as ordered prefix rewrites.
_OFFICIAL_TO_OURS = (
    ("backbone.dino_model.", "backbone."),
    ("conv.", "fusion.conv."),
    ("tokenmix.", "fusion.token_mixers."),
    ("gem.p", "pool.p"),
    ("encoder.layers.", "encoder.layers."),
)


def _rename(key: str, table: tuple[tuple[str, str], ...]) -> str | None:
    for src, dst in table:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


# --------------------------------------------------------------------------------------------
# The region encoders (module docstring)
# --------------------------------------------------------------------------------------------


def _encoder_layers(dim: int, heads: int, ffn: int, dropout: float, num_layers: int) -> nn.ModuleList:
    return nn.ModuleList(
        nn.TransformerEncoderLayer(
            d_model=dim, nhead=heads, dim_feedforward=ffn, dropout=dropout,
            activation="gelu", batch_first=False,
        )
        for _ in range(num_layers)
    )


class _RegionEncoder(nn.Module):
    def __init__(self, dim: int, heads: int = 16, ffn: int = 2048, dropout: float = 0.1, num_layers: int = 1) -> None:
        super().__init__()
        self.layers = _encoder_layers(dim, heads, ffn, dropout, num_layers)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """(S, N, C) -> (S, N, C): attention along S, independently for each of the N columns."""
        for layer in self.layers:
            x = layer(x)
        return x


class CrossImageEncoder(_RegionEncoder):
    """Super-CricaVPR's encoder: attention across the images of the batch, per region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 14, C) -> (B, 14, C); sequence = the B images, one column per region."""
        return self._run(x)  # batch_first=False: (S=B, N=14, C)


class SelfEnhancedEncoder(_RegionEncoder):
    """SciceVPR's encoder: each regional feature is enhanced on its own (sequence length 1).

    In eval mode the layer runs image by image: a matrix kernel may round a row differently
    with the number of rows multiplied together (MKL on an Intel Xeon does, by up to 1e-6 for
    ``nn.Linear(384, 2048)``; GPU libraries pick their kernels by shape), so only products of
    the same shape make an image's descriptor bit for bit the same in every batch. In training
    mode the B*14 features go through the layer together: the same values up to that rounding,
    one product per weight for the forward pass and its gradient.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 14, C) -> (B, 14, C); every one of the B*14 features is its own sequence."""
        B, R, C = x.shape
        if not self.training:
            # (1, 14, C) per image: (S=1, N=14, C), the same product whatever B
            return torch.cat([self._run(x[b : b + 1]) for b in range(B)], dim=0)
        x = self._run(x.reshape(1, B * R, C))  # (B, 14, C) -> (S=1, N=B*14, C)
        return x.reshape(B, R, C)  # (1, B*14, C) -> (B, 14, C)


# --------------------------------------------------------------------------------------------
# The shared pipeline
# --------------------------------------------------------------------------------------------


class VPRModel(nn.Module):
    """The pipeline shared by :class:`SuperCricaVPR`, :class:`SciceVPR` and
    :class:`~scicevpr.cricavpr.CricaVPR`: backbone, per-image features (:meth:`build_features`),
    region encoder. Build one by name with :func:`scicevpr.create_model`.

    Args:
        preset_or_config: ``"SciceVPR-B"``, ``"SciceVPR-L"``, ``"SciceVPR-S"`` or a ModelConfig.
        weights: DINOv2 weights: a path, ``"auto"`` or ``None`` (random init, reported by
            ``is_random_init`` and a warning).
        backbone: an existing frozen backbone to share instead of building one (used when a
            student is built from its teacher).
        seed: draw every random initialisation (the backbone's when ``weights=None``, then the
            trainable parts) from torch's CPU generator seeded with ``seed``, in a forked RNG (the
            caller's RNG, the GPUs' included, is untouched); None draws from torch's RNG as it stands.
        **overrides: ModelConfig fields to replace, e.g. ``image_size=112``.
    """

    config_cls: type[ModelConfig] = ModelConfig
    encoder_cls: type[nn.Module]
    cross_image: bool  # True when a descriptor depends on the rest of the batch

    def __init__(
        self,
        preset_or_config: str | ModelConfig = "SciceVPR-B",
        weights: str | os.PathLike | None = "auto",
        backbone: DinoVisionTransformer | None = None,
        seed: int | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        cfg = get_config(preset_or_config, **overrides)
        if type(cfg) is not self.config_cls:  # a CricaVPRConfig is a ModelConfig too, for another model
            presets = [n for n, c in PRESETS.items() if type(c) is self.config_cls]
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_cls.__name__} (presets {', '.join(map(repr, presets))}); "
                f"got the {type(cfg).__name__} {cfg.name!r}, which is another model's configuration."
            )
        self.config = cfg
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if backbone is None:
                self.backbone = build_backbone(cfg.backbone, weights, seed)  # draws first, from the seed
            else:
                if getattr(backbone, "config", None) != cfg.backbone:
                    raise ValueError(f"the shared backbone is not a {cfg.backbone.arch} as the config asks")
                self.backbone = backbone
                if seed is not None:
                    torch.default_generator.manual_seed(seed)  # the CPU generator the heads draw from (GPUs' untouched)
            self.build_features(cfg)
            self.encoder = self.encoder_cls(
                cfg.mix_dim, cfg.encoder_heads, cfg.encoder_ffn, cfg.encoder_dropout, self.encoder_depth(cfg)
            )

    def build_features(self, cfg: ModelConfig) -> None:
        """The per-image modules between the backbone and the encoder: the multi-layer fusion
        (1x1 channel conv + token mixers, paper Fig. 5) and the 14-region GeM."""
        grid = (cfg.grid_size, cfg.grid_size)  # (H, W)
        self.fusion = MultiLayerFusion(cfg.in_channels, cfg.mix_dim, grid, cfg.num_token_mixers, cfg.token_mlp_ratio)
        self.pool = MultiRegionGeM(grid, cfg.gem_p, cfg.gem_eps)

    @staticmethod
    def encoder_depth(cfg: ModelConfig) -> int:
        raise NotImplementedError

    # ---- properties ------------------------------------------------------------------------

    @property
    def is_random_init(self) -> bool:
        """True when the DINOv2 backbone has random weights (results are then not the paper's)."""
        return bool(self.backbone.is_random_init)

    @property
    def descriptor_dim(self) -> int:
        return self.config.descriptor_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def activation_checkpointing(self) -> bool:
        """True when the backbone's blocks are checkpointed (:meth:`set_activation_checkpointing`)."""
        return bool(self.backbone.checkpoint_blocks)

    def set_activation_checkpointing(self, on: bool = True) -> "VPRModel":
        """Checkpoint the backbone's blocks while gradients flow through them
        (:func:`scicevpr.backbone.checkpoint_block`): less memory for a second forward pass
        through the backbone, with the same descriptors, losses and gradients. It matters where
        the backbone holds trainable parameters (CricaVPR's adapters); a frozen backbone runs
        without an autograd graph anyway. Returns the model."""
        self.backbone.checkpoint_blocks = bool(on)
        return self

    @property
    def data_config(self) -> dict[str, Any]:
        """What the model expects and returns, in the manner of timm's ``resolve_data_config``:

        - ``input_size`` (3, S, S): every image is hard-resized to S x S (no crop, aspect not
          kept), bilinear with antialiasing (``interpolation``, ``antialias``, ``crop_pct`` 1.0);
        - ``mean``, ``std``: the ImageNet normalisation applied after scaling to [0, 1];
        - ``descriptor_dim``: D of the (B, D) unit-norm descriptors;
        - ``batch_dependent``: True for a cross-image model (the teacher, CricaVPR), whose
          descriptor of an image depends on the other images of its batch: encode queries in
          the batches you evaluate with (16 under the VG-benchmark protocol).

        :attr:`transform` builds the PIL-image transform from it.
        """
        from .data.transforms import data_config

        return data_config(self.config.image_size, self.descriptor_dim, self.cross_image)

    @property
    def transform(self):
        """PIL image (or (3, H, W) uint8 tensor) -> the (3, S, S) input this model expects
        (:attr:`data_config`; :func:`scicevpr.data.transforms.transform_from_data_config`)."""
        from .data.transforms import transform_from_data_config

        return transform_from_data_config(self.data_config)

    def train(self, mode: bool = True) -> "VPRModel":
        """As ``nn.Module.train``, but the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    # ---- forward ---------------------------------------------------------------------------

    def check_input(self, x: torch.Tensor) -> None:
        """A batch of images the model can describe: a float tensor (B >= 1, 3, S, S) of the
        weights' dtype (or any float under autocast), finite; else one error naming the fix."""
        s = self.config.image_size
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__} ({self.config.name}) expects a torch.Tensor of images (B, 3, {s}, {s}), got a "
                f"{type(x).__module__}.{type(x).__name__}; convert a NumPy array with torch.from_numpy(a).float()."
            )
        if not torch.is_floating_point(x):
            raise TypeError(
                f"{type(self).__name__} ({self.config.name}) expects float images normalised with the ImageNet "
                f"mean and std, got a {x.dtype} tensor. Convert uint8 images with "
                f"scicevpr.data.normalize_uint8_batch(images, {s}) or load files with scicevpr.data.eval_transform({s})."
            )
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (s, s):
            raise ValueError(
                f"{type(self).__name__} ({self.config.name}) expects images of shape "
                f"(B, 3, {s}, {s}), got {tuple(x.shape)}. Resize inputs to {s} x {s} (the "
                f"evaluation transform does this) or build the model with image_size=<your size> "
                f"(a multiple of {self.config.backbone.patch_size})."
            )
        if x.shape[0] == 0:
            raise ValueError(f"{type(self).__name__} ({self.config.name}) got an empty batch (0 images); pass at least one.")
        if torch.compiler.is_compiling():  # the compiled fast path (CUDA) leaves out the per-batch checks below
            return
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{type(self).__name__} ({self.config.name}) has {dtype} weights but got {x.dtype} images; convert them "
                f"with images.to({dtype}) (or run under scicevpr.precision.autocast for mixed precision)."
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"{type(self).__name__} ({self.config.name}) got images that hold NaN or infinite values: every "
                f"descriptor of them would be NaN. Check how the batch was made (decoding, normalisation)."
            )

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) checked images -> :meth:`backbone_output`. No autograd graph is kept
        while every backbone parameter is frozen."""
        self.check_input(x)
        trainable = any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            return self.backbone_output(x)

    def backbone_output(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, M*C, H, W): blocks ``l_1..l_M`` after the final LayerNorm,
        concatenated on channels."""
        return self.backbone.forward_multilayer(x, self.config.layers)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C_mix, H, W): backbone and 1x1 channel fusion + ReLU."""
        return self.after_backbone(self.backbone_features(x))

    def after_backbone(self, b: torch.Tensor) -> torch.Tensor:
        """:meth:`backbone_output` -> :meth:`extract_features`'s output: the per-image modules
        between the backbone and the regional pooling, here the 1x1 channel fusion + ReLU,
        (B, M*C, H, W) -> (B, C_mix, H, W)."""
        return self.fusion.channel_fusion(b)

    def regional_features(self, f: torch.Tensor) -> torch.Tensor:
        """(B, C_mix, H, W) channel-fused features -> (B, 14, C_mix) regional GeM vectors.

        Everything up to here is computed per image; only :meth:`encode` can mix images.
        """
        return self.pool(self.fusion.mix_tokens(f))  # (B, C_mix, H, W) -> (B, 14, C_mix), fp32

    def encode(self, r: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """(B, 14, C_mix) regional features -> (B, 14 * C_mix) unit-norm descriptors.

        The only step where the teacher lets the images of a batch see each other.
        ``groups > 1`` splits the batch as ``nn.DataParallel`` over ``groups`` GPUs does
        (``torch.chunk``: chunks of ``ceil(B / groups)``, the last smaller, fewer chunks when
        ``B < groups``) and encodes each chunk on its own: the authors' multi-GPU scripts
        (:data:`scicevpr.protocol.OFFICIAL_GROUP_SIZES`).
        """
        if groups > 1 and r.shape[0] > 1:
            chunks = torch.chunk(r, groups, dim=0)  # each (B_g, 14, C_mix)
            return torch.cat([self.encode(c) for c in chunks], dim=0)  # (B, 14 * C_mix)
        r = self.encoder(r)  # (B, 14, C_mix)
        return F.normalize(r.flatten(1).float(), p=2, dim=-1)  # (B, 14, C) -> (B, 14*C)

    def aggregate(self, f: torch.Tensor) -> torch.Tensor:
        """(B, C_mix, H, W) channel-fused features -> (B, 14 * C_mix) unit-norm descriptors."""
        return self.encode(self.regional_features(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, 14 * C_mix) L2-normalised descriptors."""
        return self.aggregate(self.extract_features(x))

    # ---- official checkpoints --------------------------------------------------------------

    # Authors' checkpoint names -> scicevpr names (ordered prefix rewrites); subclasses whose
    # authors used other names override this table and :meth:`official_hint`.
    official_key_map: tuple[tuple[str, str], ...] = _OFFICIAL_TO_OURS

    def official_hint(self, source_keys: list[str]) -> str:
        """The advice appended to a failed :meth:`load_official`."""
        return (
            "Check the model class (SuperCricaVPR has a 2-layer encoder, SciceVPR 1 layer, "
            "CricaVPR checkpoints have 'aggregation.*' keys) and the preset (backbone size, "
            "mix_dim, image_size)."
        )

    def _official_name(self, key: str) -> str:
        back = tuple((dst, src) for src, dst in self.official_key_map)
        return _rename(key, back) or key

    def load_official(
        self, path_or_state_dict: str | os.PathLike | Mapping[str, Any], trust_checkpoint: bool = False
    ) -> "VPRModel":
        """Load the authors' training checkpoint strictly.

        Accepts ``{"model_state_dict": ...}`` or a bare state dict, keys with or without
        ``module.``, in the authors' names (for SciceVPR / Super-CricaVPR:
        ``backbone.dino_model.*``, ``conv.*``, ``tokenmix.{i}.*``, ``gem.p``,
        ``encoder.layers.{i}.*``). Anything else raises an error listing the missing and
        unexpected keys. The checkpoint holds the whole DINOv2, so ``is_random_init`` becomes
        False. A file is read safely (``weights_only=True``); ``trust_checkpoint=True`` also
        loads one that holds pickled Python objects, which runs code from it.
        """
        file = read_model_file(path_or_state_dict, trust_checkpoint)
        if file.native:
            raise ValueError(
                f"{file.where} is a native scicevpr checkpoint, not an authors' one: load it with "
                f"scicevpr.load_model (command line: --checkpoint)."
            )
        source = file.content
        ours, unexpected = {}, []
        for k, v in source.items():
            new = _rename(k, self.official_key_map)
            if new is None:
                unexpected.append(k)
            else:
                ours[new] = v
        expected = set(self.state_dict())
        missing = sorted(self._official_name(k) for k in expected - set(ours))
        unexpected = sorted(unexpected + [self._official_name(k) for k in set(ours) - expected])
        if missing or unexpected:
            raise ValueError(
                f"not a {type(self).__name__} ({self.config.name}) checkpoint in the authors' "
                f"format.\n  missing keys ({len(missing)}): {_preview(missing)}"
                f"\n  unexpected keys ({len(unexpected)}): {_preview(unexpected)}\n"
                f"{self.official_hint(list(source))}"
            )
        try:
            self.load_state_dict(ours, strict=True)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"checkpoint does not fit {self.config.name}: {e}") from None
        self.backbone.mark_stored()
        return self

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights in the authors' key names (inverse of :meth:`load_official`)."""
        return {self._official_name(k): v for k, v in self.state_dict().items()}


def _preview(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "") if keys else "none"


class SuperCricaVPR(VPRModel):
    """Super-CricaVPR, the teacher: multi-layer fusion + a 2-layer cross-image encoder.

    A descriptor depends on the other images of its batch (paper Fig. 1-2).
    """

    encoder_cls = CrossImageEncoder
    cross_image = True

    @staticmethod
    def encoder_depth(cfg: ModelConfig) -> int:
        return cfg.teacher_layers


class SciceVPR(VPRModel):
    """SciceVPR, the student: multi-layer fusion + a 1-layer self-enhanced encoder.

    Descriptors are the same whatever the batch.
    """

    encoder_cls = SelfEnhancedEncoder
    cross_image = False

    @staticmethod
    def encoder_depth(cfg: ModelConfig) -> int:
        return cfg.student_layers

    @classmethod
    def from_teacher(cls, teacher: SuperCricaVPR, seed: int | None = None) -> "SciceVPR":
        """Stage-2 initialisation (docs/method.md, "Training"): share the teacher's frozen backbone,
        copy its 1x1 fusion conv and freeze it; token mixers, GeM and encoder start fresh, drawn
        from ``seed`` (see :class:`VPRModel`)."""
        student = cls(teacher.config, backbone=teacher.backbone, seed=seed)
        student.fusion.conv.load_state_dict(teacher.fusion.conv.state_dict())
        student.fusion.conv.requires_grad_(False)
        return student.to(model_device(teacher))
