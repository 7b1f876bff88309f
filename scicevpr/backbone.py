"""DINOv2 ViT with multi-layer outputs (docs/method.md, "Architecture", step 1).

The modules below reproduce the official DINOv2 architecture (Oquab et al. 2023,
``facebookresearch/dinov2``) with its parameter names, so that an official
``dinov2_vit{s,b,l,g}14_pretrain.pth`` state dict loads with ``strict=True``. Differences from
the official code are implementation only: attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on GPU, identical maths),
and no xFormers, drop-path or chunked blocks (not needed for a frozen backbone).

This module holds the architecture (the layers, :class:`DinoVisionTransformer`, whose
constructor builds a randomly initialised ViT and reads no file; its ``fingerprint``) and
:func:`build_backbone`, which gives a model its frozen backbone: it finds the weight file for
``weights=`` (a path, ``"auto"`` or ``None``), builds the ViT and loads the file into it, or
warns with a :class:`RandomWeightsWarning` when there is none. Finding, checking (manifests,
SHA-256) and loading weight files is :mod:`scicevpr.weights`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ._lazy import moved_attributes
from .config import BackboneConfig
from .weights import hash_tensors, load_weights, resolve_weights


class RandomWeightsWarning(UserWarning):
    """Emitted when a backbone is randomly initialised: results are not the paper's."""


# --------------------------------------------------------------------------------------------
# Layers (official names: patch_embed.proj, blocks.{i}.{norm1,attn.qkv,attn.proj,ls1,norm2,
# mlp.fc1,mlp.fc2 | mlp.w12,mlp.w3,ls2}, norm, cls_token, pos_embed, mask_token)
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` x ``patch_size`` patches -> tokens (a strided conv)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H*p, W*p) -> (B, H*W, C)."""
        x = self.proj(x)  # (B, C, H, W)
        return x.flatten(2).transpose(1, 2)  # (B, C, HW) -> (B, HW, C)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, computed by SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, C/heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, heads, C/heads) -> (B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """Feed-forward network: fc1 -> GELU -> fc2 (ViT-S/B/L)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward network of ViT-g/14 (official ``SwiGLUFFNFused`` widths)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` on a residual branch (Touvron et al., CaiT)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale.

    ``x = x + ls1(attn(norm1(x)))`` then ``x = x + ls2(mlp(norm2(x)))``. An optional
    ``adapter`` (set by models that adapt the frozen backbone, e.g. CricaVPR) is added to the
    feed-forward branch: ``x = x + ls2(mlp(h) + adapter_scale * adapter(h, grid))`` with
    ``h = norm2(x)``.
    """

    def __init__(self, dim: int, num_heads: int, ffn: str, layerscale_init: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim) if ffn == "mlp" else SwiGLUFFN(dim, 4 * dim)
        self.ls2 = LayerScale(dim, layerscale_init)
        self.adapter: nn.Module | None = None
        self.adapter_scale = 1.0

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 1 + H*W, C) -> (B, 1 + H*W, C); ``grid`` = (H, W) is passed to the adapter."""
        x = x + self.ls1(self.attn(self.norm1(x)))
        h = self.norm2(x)
        f = self.mlp(h)
        if self.adapter is not None:
            f = f + self.adapter_scale * self.adapter(h, grid)
        return x + self.ls2(f)


@contextlib.contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    """Put ``module``'s buffers back as they were on entry when the block exits (a
    recomputation must not update BatchNorm running statistics a second time)."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def checkpoint_block(block: Block, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``block(tokens, grid)`` with activation checkpointing: (B, 1 + H*W, C) -> (B, 1 + H*W, C).

    Only ``tokens`` is kept for the backward pass, which runs the block again
    (``torch.utils.checkpoint``, non-reentrant: autocast and the RNG state are those of the first
    pass). The recomputation leaves the block's buffers as the first pass left them: an
    adapter's BatchNorms in training mode update their running statistics once per step, as
    without checkpointing.
    """
    return torch.utils.checkpoint.checkpoint(
        block, tokens, grid, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _buffers_kept(block)),
    )


# --------------------------------------------------------------------------------------------
# The ViT
# --------------------------------------------------------------------------------------------


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT/14 (official architecture and parameter names), randomly initialised; building
    it reads no file. :func:`build_backbone` gives a model its frozen backbone with weights, and
    :func:`scicevpr.weights.load_weights` loads a weight file into one.

    Args:
        config: which ViT and its patch / position-embedding settings.
        weights: must stay None (a weight file given here, as the constructor once took it, is
            refused with the call to use instead: :func:`build_backbone`).
        seed: draw the random initialisation after seeding torch's global CPU generator with
            ``seed`` (the RNG every ``nn.Module`` initialisation draws from; the GPUs' generators
            are left alone), so that a checkpoint can rebuild it from the seed alone; None draws
            from the RNG as it stands.

    Attributes:
        is_random_init: True when no pretrained weights were loaded. Every figure or table
            built on such a model must say so.
        weights_path: the file the weights came from (set by
            :func:`scicevpr.weights.load_weights`), or None.
        checkpoint_blocks: activation checkpointing (False by default): while gradients are
            recorded, each block keeps only its input and runs again in the backward pass
            (:func:`checkpoint_block`). For a backbone that gradients flow through (CricaVPR's
            adapters train inside it), the activations kept fall from every block's to one
            block's, for one more forward pass; outputs and gradients are the same.
        provenance: how these frozen weights can be had again, as a checkpoint records it
            (:mod:`scicevpr.checkpoint`): ``{"source": "file", "path", "hub_name"}`` once a
            weight file is loaded, ``{"source": "random", "seed"}`` for a seeded random
            initialisation, ``{"source": "stored"}`` when only a copy of the weights can
            rebuild them (an unseeded initialisation, weights loaded with a whole checkpoint:
            :meth:`mark_stored`).
    """

    def __init__(self, config: BackboneConfig, weights: Any = None, *, seed: int | None = None) -> None:
        super().__init__()
        if weights is not None:  # the constructor took a weight file before scicevpr.weights
            raise TypeError(
                f"DinoVisionTransformer(config, weights={str(weights)!r}): the constructor builds a random ViT and "
                f"reads no file. Use scicevpr.build_backbone(config, weights=...) for a loaded, frozen backbone, or "
                f"scicevpr.weights.load_weights(backbone, path)."
            )
        if seed is not None:
            torch.default_generator.manual_seed(seed)  # the CPU generator the initialisation draws from (GPUs' untouched)
        self.config = config
        C = config.embed_dim
        self.patch_size = config.patch_size
        self.embed_dim = C
        self.num_heads = config.num_heads
        pretrain_grid = config.pretrain_img_size // config.patch_size  # 518 / 14 = 37
        self.patch_embed = PatchEmbed(config.patch_size, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid**2, C))
        self.mask_token = nn.Parameter(torch.zeros(1, C))  # replaces masked patches (iBOT pretraining)
        self.blocks = nn.ModuleList(
            Block(C, config.num_heads, config.spec["ffn"], config.layerscale_init)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(C, eps=1e-6)
        self._init_weights()
        self.is_random_init = True
        self.weights_path: Path | None = None
        self.provenance: dict[str, Any] = {"source": "stored"} if seed is None else {"source": "random", "seed": int(seed)}
        self._fingerprint: tuple[tuple, str] | None = None  # (stamp of the parameters hashed, digest)
        self.checkpoint_blocks = False

    def _init_weights(self) -> None:
        """Official DINOv2 initialisation (timm ViT): trunc-normal 0.02, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def mark_stored(self, random_init: bool = False) -> None:
        """Record that the weights just loaded came with a whole checkpoint (an authors' one, or a
        native one's ``backbone_state``): only a stored copy rebuilds them."""
        self.is_random_init = bool(random_init)
        self.weights_path = None
        self.provenance = {"source": "stored"}

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the names (as in a model's state dict, ``backbone.*``) and bytes of the
        frozen parameters, sorted by name; a checkpoint records it and checks it on load.

        Cached until a parameter is replaced or modified in place (tensor version counters), so
        that saving a checkpoint every epoch does not hash the backbone again.
        """
        frozen = sorted((f"backbone.{n}", p) for n, p in self.named_parameters() if not p.requires_grad)
        stamp = tuple((k, p.data_ptr(), p._version) for k, p in frozen)
        if self._fingerprint is not None and self._fingerprint[0] == stamp:
            return self._fingerprint[1]
        self._fingerprint = (stamp, hash_tensors(hashlib.sha256(), frozen).hexdigest())
        return self._fingerprint[1]

    # ---- forward ---------------------------------------------------------------------------

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (H/p, W/p) for an image; raises unless both sides are multiples of p."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"DINOv2 needs image sides that are multiples of the patch size {p}; got "
                f"{height} x {width}. Resize to e.g. {height // p * p} x {width // p * p} "
                f"(224 = 16 * 14 is the paper's size)."
            )
        return height // p, width // p

    def interpolate_pos_encoding(self, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """Position embedding for a ``grid`` = (H, W) patch grid: (1, 1 + H*W, C).

        As the official code: bicubic resize of the 37 x 37 table with scale factors
        ``(H + 0.1) / 37`` and ``(W + 0.1) / 37`` (the offset avoids an off-by-one output size
        from floating-point error, and the scale factor, not the size, sets the sampling grid).
        """
        N = self.pos_embed.shape[1] - 1
        M = int(math.sqrt(N))  # 37
        H, W = grid
        if H * W == N and H == W:
            return self.pos_embed.to(dtype)
        pos_embed = self.pos_embed.float()
        cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        C = pos_embed.shape[-1]
        off = self.config.interpolate_offset
        patch_pos = patch_pos.reshape(1, M, M, C).permute(0, 3, 1, 2)  # (1, C, 37, 37)
        patch_pos = F.interpolate(
            patch_pos, scale_factor=((H + off) / M, (W + off) / M), mode="bicubic"
        )  # (1, C, H, W)
        if patch_pos.shape[-2:] != (H, W):
            raise RuntimeError(f"position embedding resized to {tuple(patch_pos.shape[-2:])}, expected {grid}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, H * W, C)  # (1, HW, C)
        return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)

    def prepare_tokens(
        self, x: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H*p, W*p) images -> (B, 1 + H*W, C) tokens with CLS and position, and (H, W).

        ``masks`` (B, H*W) bool: patches replaced by ``mask_token`` before the position embedding
        is added (official ``prepare_tokens_with_masks``; iBOT's masked-image modelling).
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        grid = self.grid_size(x.shape[-2], x.shape[-1])
        tokens = self.patch_embed(x)  # (B, HW, C)
        if masks is not None:
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"masks must be (B, H*W) = {tuple(tokens.shape[:2])}, got {tuple(masks.shape)}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(tokens.dtype)  # (B, 1, C)
        tokens = torch.cat((cls, tokens), dim=1)  # (B, 1 + HW, C)
        return tokens + self.interpolate_pos_encoding(grid, tokens.dtype), grid

    def get_intermediate_layers(
        self, x: torch.Tensor, layers: Sequence[int], norm: bool = True, masks: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Outputs of the chosen blocks (0-based), each (B, 1 + H*W, C), after the final norm.

        Blocks after ``max(layers)`` are not run. ``masks``: see :meth:`prepare_tokens`.
        """
        wanted = set(layers)
        if not wanted or min(wanted) < 0 or max(wanted) >= len(self.blocks):
            raise ValueError(f"layers {list(layers)} out of range for {len(self.blocks)} blocks")
        tokens, grid = self.prepare_tokens(x, masks)
        outputs = []
        checkpointed = self.checkpoint_blocks and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            tokens = checkpoint_block(block, tokens, grid) if checkpointed else block(tokens, grid)
            if i in wanted:
                outputs.append(self.norm(tokens) if norm else tokens)
        return outputs

    def forward_multilayer(self, x: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """Multi-layer patch features: (B, 3, H*p, W*p) -> (B, M*C, H, W).

        The M chosen blocks' outputs pass through the final LayerNorm, the CLS token is dropped,
        and the layers are concatenated on channels in the order given (official SciceVPR).
        """
        B = x.shape[0]
        H, W = self.grid_size(x.shape[-2], x.shape[-1])
        outs = self.get_intermediate_layers(x, layers)  # M x (B, 1 + HW, C)
        feats = torch.cat([o[:, 1:] for o in outs], dim=-1)  # (B, HW, M*C)
        return feats.transpose(1, 2).reshape(B, -1, H, W)  # (B, M*C, HW) -> (B, M*C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Final normalised CLS token: (B, 3, H, W) -> (B, C)."""
        return self.get_intermediate_layers(x, [len(self.blocks) - 1])[0][:, 0]


def build_backbone(
    config: BackboneConfig, weights: str | os.PathLike | None = None, seed: int | None = None
) -> DinoVisionTransformer:
    """A frozen DINOv2 (all parameters ``requires_grad=False``) with the weights ``weights``.

    ``weights``: a weight file (or a folder that holds it), ``"auto"`` or ``None``
    (:func:`scicevpr.weights.resolve_weights`). The file is found first, before the ViT is built,
    so that a wrong path fails at once; it is then loaded with :func:`scicevpr.weights.load_weights`
    (manifest and names checked). ``None`` keeps the random initialisation and warns with a
    :class:`RandomWeightsWarning`. ``seed`` as in :class:`DinoVisionTransformer`.
    """
    path = resolve_weights(weights, config)
    model = DinoVisionTransformer(config, seed=seed)
    if path is None:
        warnings.warn(
            f"DINOv2 {config.arch} is randomly initialised (weights=None): descriptors and "
            f"recalls are NOT those of pretrained DINOv2. Pass weights='auto' or a path to "
            f"{config.hub_name}_pretrain.pth for real results.",
            RandomWeightsWarning,
            stacklevel=2,
        )
    else:
        load_weights(model, path)
    return model.requires_grad_(False)


# The weight files' handling moved to scicevpr.weights; its names still import from here.
__getattr__ = moved_attributes(__name__, {"scicevpr.weights": (
    "MANIFEST_FORMAT", "PACKAGE_WEIGHTS_DIR", "WEIGHTS_URL", "check_manifest", "file_sha256", "manifest_path",
    "tensor_bytes")})
