"""CricaVPR (Lu et al., CVPR 2024), the cross-image baseline of the paper's Fig. 1-2.

CricaVPR is the model whose batch dependence SciceVPR removes. It shares scicevpr's DINOv2,
region GeM and cross-image encoder; what differs from Super-CricaVPR is how features reach
the encoder::

    image (B, 3, 224, 224)
      -> DINOv2 ViT-B/14 (frozen) with a trainable multi-scale conv adapter in every block
         block:  x <- x + ls1(attn(norm1(x)))
                 x <- x + ls2(mlp(norm2(x)) + 0.2 * adapter(norm2(x)))
      -> last block after the final LayerNorm                         (B, 1 + HW, C)
      -> CLS token as it is                                           (B, 1, C)
         + 13-region GeM (2 x 2 and 3 x 3 splits) of the patch tokens,
           each patch L2-normalised first, regions not normalised     (B, 13, C)
      -> 2-layer cross-image encoder (attention across the batch)     (B, 14, C)
      -> flatten + L2 normalisation                                   (B, 14 * C) = 10752-d

The adapter (:class:`MultiConvAdapter`) maps a block's normalised tokens ``h`` (B, 1+HW, C):
``z = ReLU(D_fc1 h)`` (C -> C/2); the patch rows of ``z`` as a (C/2, H, W) map go through
three conv-BN-ReLU branches (1x1; 1x1 then 3x3; 1x1 then 5x5), concatenated back to C/2
channels; the CLS row passes unchanged; ``z`` is added back (so the CLS row is ``2 z_cls``);
``D_fc2`` maps C/2 -> C. Training starts with ``D_fc2 = 0`` (adapters off) and the convs'
weights and biases at 1e-5, as the authors' training script does.

Trainable: adapters (including their BatchNorms), GeM ``p``, encoder. The rest of DINOv2 is
frozen and stays in eval mode under ``model.train()``; adapters follow ``train()``/``eval()``.
CricaVPR's authors test in batches of 16 images (8 for Pitts30k); the descriptors depend on
that choice, which is the point of the comparison.

Checkpoints: :meth:`CricaVPR.load_official` reads the authors' released ``CricaVPR.pth``
(``{"model_state_dict": ...}`` saved from ``nn.DataParallel``, so keys start with ``module.``)
or a bare state dict. Their key names, from ``network.py`` and ``backbone/dinov2/block.py``
of the authors' repository, and ours:

- ``backbone.*``: the same names in both. The DINOv2 part is the official one
  (``cls_token``, ``pos_embed``, ``mask_token``, ``patch_embed.proj``, ``norm``,
  ``blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``);
  each block adds ``blocks.{i}.adapter.{D_fc1, D_fc2}``, ``adapter.branch1.{conv, bn}`` and
  ``adapter.branch{2,3}.{0,1}.{conv, bn}`` (BatchNorm buffers included).
- ``aggregation.1.p`` (the GeM inside an ``nn.Sequential``) -> ``pool.p``.
- ``encoder.layers.{0,1}.*`` (an ``nn.TransformerEncoder``) -> ``encoder.layers.{0,1}.*``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import CricaVPRConfig
from .models import CrossImageEncoder, VPRModel
from .pooling import MultiRegionGeM

# Authors' checkpoint names -> scicevpr names, as ordered prefix rewrites.
_OFFICIAL_TO_OURS = (
    ("backbone.", "backbone."),
    ("aggregation.1.p", "pool.p"),
    ("encoder.layers.", "encoder.layers."),
)
# Key prefixes that only a SciceVPR / Super-CricaVPR checkpoint has.
_SCICEVPR_MARKERS = ("backbone.dino_model.", "conv.", "tokenmix.", "gem.p")


class ConvBNReLU(nn.Module):
    """Conv2d (with bias) -> BatchNorm2d -> ReLU (the authors' ``BasicConv2d``: keys ``conv``, ``bn``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bn_eps: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W)."""
        return F.relu(self.bn(self.conv(x)))


class MultiConvAdapter(nn.Module):
    """CricaVPR's multi-scale convolution adapter (module docstring has the formula).

    Args:
        dim: ``C``, the ViT width (in and out).
        hidden: ``C'``, the bottleneck width (C/2); must equal ``ch1x1 + ch3x3 + ch5x5``.
        ch1x1: output of the 1x1 branch.
        ch3x3red, ch3x3: 1x1 reduction then 3x3 output of the second branch.
        ch5x5red, ch5x5: 1x1 reduction then 5x5 output of the third branch.
        bn_eps: BatchNorm eps (1e-3).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        bn_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        if ch1x1 + ch3x3 + ch5x5 != hidden:
            raise ValueError(
                f"the adapter's branches ({ch1x1} + {ch3x3} + {ch5x5}) must add up to its "
                f"hidden width {hidden}, since z is added back to their concatenation."
            )
        self.D_fc1 = nn.Linear(dim, hidden)
        self.branch1 = ConvBNReLU(hidden, ch1x1, 1, bn_eps)
        self.branch2 = nn.Sequential(ConvBNReLU(hidden, ch3x3red, 1, bn_eps), ConvBNReLU(ch3x3red, ch3x3, 3, bn_eps))
        self.branch3 = nn.Sequential(ConvBNReLU(hidden, ch5x5red, 1, bn_eps), ConvBNReLU(ch5x5red, ch5x5, 5, bn_eps))
        self.D_fc2 = nn.Linear(hidden, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation: ``D_fc1`` as DINOv2's linears (trunc-normal 0.02,
        zero bias), ``D_fc2`` zero (the adapter starts switched off), conv weights and biases
        1e-5, BatchNorm at its defaults."""
        nn.init.trunc_normal_(self.D_fc1.weight, std=0.02)
        nn.init.zeros_(self.D_fc1.bias)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.constant_(m.weight, 1e-5)
                nn.init.constant_(m.bias, 1e-5)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward(self, h: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        """(B, 1 + H*W, C) normalised tokens, ``grid`` = (H, W) -> (B, 1 + H*W, C)."""
        if grid is None:
            raise ValueError("MultiConvAdapter needs the patch grid (H, W); the backbone Block passes it.")
        H, W = grid
        z = F.relu(self.D_fc1(h))  # (B, 1 + HW, C')
        B, N, Ch = z.shape
        if N != 1 + H * W:
            raise ValueError(f"expected 1 + {H}*{W} tokens (CLS + patches), got {N}")
        m = z[:, 1:].reshape(B, H, W, Ch).permute(0, 3, 1, 2)  # (B, HW, C') -> (B, H, W, C') -> (B, C', H, W)
        m = torch.cat([self.branch1(m), self.branch2(m), self.branch3(m)], dim=1)  # (B, C', H, W)
        m = m.flatten(2).transpose(1, 2)  # (B, C', HW) -> (B, HW, C')
        out = torch.cat([z[:, :1], m], dim=1) + z  # (B, 1 + HW, C'); the CLS row becomes 2 z_cls
        return self.D_fc2(out)  # (B, 1 + HW, C)


class CricaVPR(VPRModel):
    """CricaVPR: adapted DINOv2, CLS + 13 regional GeM features, 2-layer cross-image encoder.

    The same interface as :class:`~scicevpr.models.VPRModel` (``forward`` =
    ``encode(regional_features(extract_features(x)))``, ``aggregate``, ``load_official``,
    ``official_state_dict``, ``is_random_init``, ``descriptor_dim``, ``image_size``,
    ``cross_image``), so training, evaluation and the batch-stability sweep take it as they
    take Super-CricaVPR. It is built by ``VPRModel.__init__`` and overrides only what differs:
    the per-image modules (:meth:`build_features`: adapters instead of the fusion), ``train``,
    the backbone's output (tokens with CLS instead of a fused map, and no fusion after it:
    ``after_backbone``), ``regional_features`` and the checkpoint names.

    Args:
        preset_or_config: ``"CricaVPR"`` (ViT-B/14, 10752-d), ``"CricaVPR-S"`` (ViT-S/14,
            5376-d, CPU-sized) or a :class:`~scicevpr.config.CricaVPRConfig`.
        weights: DINOv2 weights for the backbone before the adapters are added: a path,
            ``"auto"`` or ``None`` (random, flagged by ``is_random_init``). A trained CricaVPR
            checkpoint is loaded afterwards with :meth:`load_official`.
        backbone: not supported (the adapters are inserted into the backbone's blocks, so it
            cannot be shared); present so that a misuse fails clearly.
        seed, **overrides: as for :class:`~scicevpr.models.VPRModel`.
    """

    config_cls = CricaVPRConfig
    encoder_cls = CrossImageEncoder
    cross_image = True

    def __init__(
        self,
        preset_or_config: str | CricaVPRConfig = "CricaVPR",
        weights: str | os.PathLike | None = "auto",
        backbone: nn.Module | None = None,
        seed: int | None = None,
        **overrides: Any,
    ) -> None:
        if backbone is not None:
            raise ValueError(
                "CricaVPR inserts adapters into its backbone's blocks, so it cannot share a "
                "backbone with another model; pass weights= instead."
            )
        super().__init__(preset_or_config, weights, seed=seed, **overrides)

    def build_features(self, cfg: CricaVPRConfig) -> None:
        """A trainable adapter in every block of the frozen DINOv2 (none with ``cfg.adapters=False``:
        the backbone then stays frozen, as SciceVPR's), and the 13-region GeM of the
        L2-normalised patch tokens (regions not normalised after)."""
        if cfg.adapters:
            for block in self.backbone.blocks:
                block.adapter = MultiConvAdapter(cfg.backbone.embed_dim, *cfg.adapter_channels, bn_eps=cfg.adapter_bn_eps)
                block.adapter_scale = cfg.adapter_scale
        grid = (cfg.grid_size, cfg.grid_size)  # (H, W)
        self.pool = MultiRegionGeM(
            grid, cfg.gem_p, cfg.gem_eps, whole_map=False, normalize_input=True, normalize_output=False
        )

    @staticmethod
    def encoder_depth(cfg: CricaVPRConfig) -> int:
        return cfg.teacher_layers

    def adapters(self) -> list[MultiConvAdapter]:
        """The adapters, one per backbone block (they live in ``backbone.blocks[i].adapter``);
        none when the config turns them off (``adapters=False``)."""
        return [block.adapter for block in self.backbone.blocks if block.adapter is not None]

    def train(self, mode: bool = True) -> "CricaVPR":
        """As ``nn.Module.train``, but frozen DINOv2 stays in eval mode; the adapters (and their
        BatchNorms) follow ``mode``."""
        super().train(mode)  # VPRModel: everything to `mode`, then the backbone back to eval
        for adapter in self.adapters():
            adapter.train(mode)
        return self

    # ---- forward ---------------------------------------------------------------------------

    def backbone_output(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + H*W, C): the adapted last block's tokens after the final
        LayerNorm (CLS first). The autograd graph is kept while adapter parameters train
        (:meth:`~scicevpr.models.VPRModel.backbone_features`)."""
        return self.backbone.get_intermediate_layers(x, self.config.layers)[0]

    def after_backbone(self, b: torch.Tensor) -> torch.Tensor:
        """Nothing between the backbone and the regional pooling (the adapters run inside the
        backbone): ``extract_features(x)`` is the backbone's (B, 1 + H*W, C) tokens."""
        return b

    def regional_features(self, f: torch.Tensor) -> torch.Tensor:
        """(B, 1 + H*W, C) normed tokens -> (B, 14, C): the CLS token as it is, then the GeM of
        the 2 x 2 and 3 x 3 regions of the L2-normalised patch tokens (not normalised after);
        (B, 13, C), the GeM regions alone, with ``class_token=False``.

        Everything up to here is computed per image; only :meth:`encode` (inherited: the
        cross-image encoder, flatten, L2 normalisation) mixes the images of a batch.
        """
        H, W = self.pool.grid
        B, N, C = f.shape
        if N != 1 + H * W:
            raise ValueError(
                f"CricaVPR ({self.config.name}) expects 1 + {H}*{W} tokens from extract_features, "
                f"got {N}; features and model must use the same image_size."
            )
        patches = f[:, 1:].transpose(1, 2).reshape(B, C, H, W)  # (B, HW, C) -> (B, C, HW) -> (B, C, H, W)
        regions = self.pool(patches)  # (B, 13, C), fp32
        if not self.config.class_token:
            return regions
        cls = f[:, :1].float()  # (B, 1, C)
        return torch.cat([cls, regions], dim=1)  # (B, 1, C) + (B, 13, C) -> (B, 14, C), fp32

    # ---- official checkpoints --------------------------------------------------------------

    official_key_map = _OFFICIAL_TO_OURS

    def official_hint(self, source_keys: list[str]) -> str:
        if any(k.startswith(_SCICEVPR_MARKERS) for k in source_keys):
            return (
                "These are SciceVPR / Super-CricaVPR keys: load this file with "
                "scicevpr.SuperCricaVPR(...).load_official or scicevpr.SciceVPR(...).load_official."
            )
        return "Check the preset ('CricaVPR' is ViT-B/14 with 2 encoder layers; 'CricaVPR-S' is ViT-S/14)."
