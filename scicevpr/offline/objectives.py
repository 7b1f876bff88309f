"""The objectives of the compact backbone's pretraining: what :mod:`scicevpr.offline.pretrain`'s
loop minimises, with the heads, teachers and losses each one needs.

Each objective is one function of a step's images (:class:`Batch`) that draws its views and
masks (:mod:`scicevpr.offline.augment`), runs the models and returns its losses
(:class:`Losses`); :data:`STEP_LOSSES` maps the objective's name to it. The loop backpropagates
``Losses.loss``, steps the optimiser, moves DINO's EMA teacher and logs ``Losses.parts``.

``objective="dino"`` -- self-distillation in DINOv2's spirit (Caron et al. 2021, "DINO";
Zhou et al. 2022, "iBOT"; Oquab et al. 2023, "DINOv2"; :func:`dino_step_losses`):

- a student ``g_s`` (backbone + :class:`DINOHead`) and a teacher ``g_t``, the exponential moving
  average of the student: ``theta_t <- m theta_t + (1 - m) theta_s``, ``m`` following a cosine
  from ``momentum`` to ``momentum_end``;
- multi-crop: 2 global crops at ``image_size`` (teacher and student) and ``local_crops`` local
  crops at ``local_size`` (student only); the ViT's position embedding is interpolated to each
  grid;
- the DINO loss between the teacher's CLS distribution on one global crop and the student's on
  every other crop: ``L_DINO = mean_{t != s} H(P_t, P_s)`` with
  ``P_t = softmax((g_t(x) - c) / tau_t)`` (centering ``c``, an EMA of the teacher's batch mean
  with ``center_momentum``; sharpening by a low ``tau_t`` warmed up from ``teacher_temp_warmup``
  to ``teacher_temp``) and ``P_s = softmax(g_s(x) / tau_s)``;
- iBOT's masked-image loss (``ibot_weight``): in a share ``mask_probability`` of the student's
  global crops a ratio in ``mask_ratio`` of the patches is replaced by the backbone's
  ``mask_token``; at those patches the student's patch distribution learns the teacher's on the
  unmasked crop (same head, its own center). Masks are drawn patch by patch rather than in
  DINOv2's blocks: on an 8 x 8 grid a block is one to three patches anyway;
- DINOv2's KoLeo regulariser on the student's global CLS features (``koleo_weight``):
  ``-1/n sum_i log min_{j != i} ||x_i - x_j||`` spreads them over the sphere, within each global
  view (two crops of one image are not each other's neighbours). ``koleo_weight`` multiplies the
  *mean* of the two views' terms, where DINOv2 sums them: 0.1 here is DINOv2's 0.05 (kept so that
  the settings recorded by earlier runs, the shipped backbone's first step among them, keep
  their meaning);
- ``L = L_DINO + ibot_weight L_iBOT + koleo_weight L_KoLeo``, minimised by the loop's AdamW and
  schedules (:mod:`scicevpr.offline.pretrain`).

Left out of DINOv2's recipe (a 4-block ViT trained for minutes, not a ViT-g for days): LayerScale
starts at 1.0 (``BackboneConfig.layerscale_init``, the value Meta's released hub models are built
with; DINOv2 trains from 1e-5), and there is no stochastic depth (drop-path), no layer-wise
learning-rate decay or patch-embedding lr multiplier, and the head's last layer is not frozen
during the first epoch.

``objective="supervised"`` -- a fallback: the same backbone trained with ``L_MS``
(:class:`~scicevpr.losses.MultiSimilarityLoss`) on P x K place batches of a GSV-Cities-layout
folder (:class:`~scicevpr.data.gsv.GSVCitiesDataset` and :class:`~scicevpr.train.PlaceBatchSampler`),
a descriptor being the L2-normalised mean (or GeM, or CLS) of the last block's tokens after the
final norm (:func:`place_step_losses`). Same optimiser and schedules; no teacher; the trained
backbone is exported.

``objective="distil"`` -- the ViT learns the features of a small convolutional network trained
with ``L_MS`` (:class:`LayoutCNN`, ``objective="cnn"``), as DeiT (Touvron et al. 2021) taught ViTs
from a convnet's outputs when images are few (:func:`distil_step_losses`; a trained ViT can be the
teacher too, :class:`ViTMapTeacher`). Both see the same random crop of a source image (no labels
are used), the ViT at ``image_size`` and the frozen network at ``distil_size``; with 112 and 64 px
both grids are 8 x 8, cell for cell. Two linear heads, dropped at export, carry the ViT's tokens
to the network's spaces:
``L_dense = mean_{b, i} (1 - cos(W_p z_{b,i}, f_{b,i}))`` over the patch tokens ``z_{b,i}`` and
the network's last feature map ``f`` (pooled to the ViT's grid, standardised per channel over the
batch), and ``L_cls = mean_b (1 - cos(W_c z_{b,cls}, d_b))`` with its place descriptor ``d``
(centred over the batch); ``L = L_dense + L_cls``. Every patch token gets a target, where
``L_MS`` gives one signal per image.

``objective="cnn"`` -- no ViT: the teacher of ``"distil"`` itself, :class:`LayoutCNN` trained from
scratch with ``L_MS`` on P x K place batches as the supervised objective is (one random resized
crop per image at ``distil_size`` pixels, from pixels in [0, 1]; batch norm statistics per rank
under DDP). On the synthetic streets this network learns places that the ViT's own ``L_MS``
fine-tunes do not (``scicevpr/weights/README.md``). Its export is the network's state dict.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..backbone import DinoVisionTransformer, build_backbone
from ..data.transforms import normalize_unit
from ..files import load_torch_file
from ..pooling import MultiRegionGeM
from ..precision import autocast
from ..runtime import gather_batch
from ..weights import check_manifest, file_sha256, load_weights, resolve_weights
from .augment import MultiCropAugment, random_masks
from .config import PretrainConfig

Run = Any  # scicevpr.offline.pretrain.Run, which imports this module: the state a step's losses read

PathLike = str | os.PathLike
GRID, GRID_DIM = (2, 4), 512  # pooling="grid": (rows, columns) of the token grid's cells, and the projection's width
CNN_MANIFEST_FORMAT = "scicevpr-layout-cnn"  # the "format" entry of an exported LayoutCNN's manifest


# --------------------------------------------------------------------------------------------
# DINO + iBOT + KoLeo: the head, the losses, the centering
# --------------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021, Sec. 3.1; DINOv2's ``dino_head.py``).

    ``C -> hidden -> hidden -> bottleneck`` MLP with GELU, L2-normalisation, then ``K``
    prototypes whose weight rows are unit vectors (weight normalisation with the norm fixed
    to 1, DINO's ``norm_last_layer``): (N, C) -> (N, K) logits, cosines in [-1, 1]. The last
    layer runs in fp32: a teacher temperature of 0.04 turns bf16 rounding of the cosines into
    visible changes of the softmax.
    """

    def __init__(self, in_dim: int, prototypes: int, hidden: int = 2048, bottleneck: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        self.last_layer = nn.Linear(bottleneck, prototypes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, K)."""
        z = self.mlp(x)  # (N, bottleneck)
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1)
            return F.linear(z, F.normalize(self.last_layer.weight.float(), dim=-1))


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Sablayrolles et al. 2019; DINOv2): (n, C) features -> ``-mean_i log min_j ||x_i - x_j||``
    on the L2-normalised features (fp32)."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    # the differences themselves: cdist's matrix-product form (used above 25 rows) loses the small
    # distances between nearly equal features, exactly where KoLeo has to push them apart
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # (n, n)
    d = d + torch.eye(len(x), device=x.device, dtype=x.dtype) * 1e4  # no self-match
    return -torch.log(d.min(dim=1).values + eps).mean()


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every rank: of rows of x (sum / count); identity without DDP."""
    total = x.sum(dim=0, dtype=torch.float32)
    count = torch.tensor([float(x.shape[0])], device=x.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return total / count.clamp(min=1)


def _masked_patches(tokens: torch.Tensor, mask_index: torch.Tensor) -> torch.Tensor:
    """(B, 1 + HW, C) tokens, (M,) flat indices into the B x HW patches -> (M, C), in crop then
    patch order. Indices computed on the CPU keep the device from waiting (boolean indexing would)."""
    B, N, C = tokens.shape
    return tokens[:, 1:].reshape(B * (N - 1), C).index_select(0, mask_index)  # (B, HW, C) -> (B*HW, C) -> (M, C)


def dino_losses(
    s_global: torch.Tensor, s_local: torch.Tensor | None, s_patch: torch.Tensor,
    t_global: torch.Tensor, t_patch: torch.Tensor, masks: torch.Tensor,
    center: torch.Tensor, patch_center: torch.Tensor, student_temp: float, teacher_temp: float,
    masked_crops: int | None = None, world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO's cross-view loss and iBOT's masked-patch loss (fp32).

    s_global (2b, K), s_local (Lb, K) or None, t_global (2b, K): CLS logits, the 2 (L) views
    stacked view-major; s_patch, t_patch (M, K): logits at the M masked patches, ``masks`` (2b, HW)
    saying which. Returns (L_DINO, L_iBOT); L_iBOT averages over each masked crop's patches, then
    over masked crops (0 when none is masked).

    Under DDP each of the ``world_size`` ranks holds its share of the crops, and DDP averages
    the ranks' gradients; ``masked_crops``, the number of masked crops in the global batch, makes
    that average the one-process L_iBOT (a rank's sum over its crops / ``masked_crops`` x
    ``world_size``) however the masked crops fall on the ranks. None: this call's own count.
    """
    n_global = 2
    b = t_global.shape[0] // n_global
    t = F.softmax((t_global.float() - center) / teacher_temp, dim=-1).chunk(n_global)  # 2 x (b, K)
    s = list(F.log_softmax(s_global.float() / student_temp, dim=-1).chunk(n_global))
    if s_local is not None and s_local.shape[0]:
        s += list(F.log_softmax(s_local.float() / student_temp, dim=-1).split(b))  # L x (b, K)
    total, terms = 0.0, 0
    for i, t_i in enumerate(t):
        for v, s_v in enumerate(s):
            if v == i:
                continue  # the same view
            total = total + (-(t_i * s_v).sum(dim=-1)).mean()
            terms += 1
    l_dino = total / terms
    if s_patch.shape[0] == 0:
        return l_dino, s_patch.sum() * 0.0  # keeps the graph (DDP) with no masked crop
    tp = F.softmax((t_patch.float() - patch_center) / teacher_temp, dim=-1)
    ce = -(tp * F.log_softmax(s_patch.float() / student_temp, dim=-1)).sum(dim=-1)  # (M,)
    per_crop = masks.sum(dim=1)  # (2b,)
    weight = (1.0 / per_crop.clamp(min=1).float()).repeat_interleave(per_crop, output_size=ce.shape[0])  # (M,): 1 / masked patches of its crop
    if masked_crops is None:
        masked_crops, world_size = int((per_crop > 0).sum()), 1
    l_ibot = (ce * weight).sum() * (world_size / max(masked_crops, 1))
    return l_dino, l_ibot


@torch.no_grad()
def update_centers(center: torch.Tensor, patch_center: torch.Tensor, t_global: torch.Tensor, t_patch: torch.Tensor,
                   masked: bool, momentum: float) -> None:
    """DINO's centering, after the optimiser's step, in place: ``c <- l c + (1 - l) mean(g_t(x))``
    with ``l = center_momentum``, the mean over the teacher's (2b, K) CLS logits ``t_global`` of
    every rank; iBOT's patch center the same over the (M, K) masked-patch logits ``t_patch``, when
    ``masked`` (some crop of the global batch has masked patches)."""
    center.mul_(momentum).add_(_all_reduce_mean(t_global.float()) * (1 - momentum))
    if masked:
        patch_center.mul_(momentum).add_(_all_reduce_mean(t_patch.float()) * (1 - momentum))


# --------------------------------------------------------------------------------------------
# Distillation: the teachers and the losses
# --------------------------------------------------------------------------------------------


class LayoutCNN(nn.Module):
    """A small convolutional network whose descriptor keeps where each feature lies: the teacher
    of ``objective="distil"``, trained with ``L_MS`` by ``objective="cnn"``.

    Four stages (32 -> 64 -> 128 -> 256 channels, 3 x 3 convolutions, batch norm, ReLU; stride 8
    in all: an 8 x 8 map at 64 px), the map averaged over a 2 x 4 grid (above/below, four
    vertical strips) and projected to 512 dimensions: (B, 3, S, S) -> (B, 512) unit descriptors.
    Images are uint8, or floats in [0, 1].
    """

    layout = (2, 4)  # rows x columns of the pooling grid
    channels, dim = 256, 512  # the last map's channels; the descriptor's dimension

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                                      block(32, 64), block(64, 128), block(128, self.channels))
        self.proj = nn.Linear(self.channels * self.layout[0] * self.layout[1], self.dim)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 256, S / 8, S / 8): the last stage's features ``f``."""
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return self.features((x - 0.45) / 0.25)

    def describe(self, f: torch.Tensor) -> torch.Tensor:
        """(B, 256, h, w) feature map -> (B, 512) unit descriptor ``d``."""
        cells = F.adaptive_avg_pool2d(f, self.layout)  # (B, 256, 2, 4)
        return F.normalize(self.proj(cells.flatten(1)), dim=1)  # (B, 2048) -> (B, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.describe(self.feature_map(x))

    @classmethod
    def load(cls, path: PathLike) -> "LayoutCNN":
        """A trained network from its state dict file, frozen, in eval mode. A file with a manifest
        beside it (an export of ``objective="cnn"``) must be the file the manifest describes; the
        verified manifest is kept as ``net.manifest`` (None without one)."""
        manifest = check_manifest(path, manifest_format=CNN_MANIFEST_FORMAT)
        net = cls()
        net.manifest = manifest
        state = load_torch_file(path, "LayoutCNN state dict", opt_in=None)
        try:
            net.load_state_dict(state)
        except (RuntimeError, AttributeError, TypeError) as e:
            raise ValueError(f"{str(path)!r} is not the state dict of a LayoutCNN (scicevpr pretrain-backbone "
                             f"--objective cnn ... --export cnn.pt writes one): {str(e).splitlines()[0]}") from None
        return net.eval().requires_grad_(False)


class ViTMapTeacher(nn.Module):
    """A trained backbone as the teacher of ``objective="distil"``: its last block's patch tokens
    after the final norm are the map ``f`` the student's patch tokens learn, cell for cell. It has
    no place descriptor, so the student's CLS token gets no objective (``distil_class_token=False``).

    ``feature_map``: (B, 3, S, S) uint8 or floats in [0, 1] -> (B, C, S / p, S / p).
    """

    def __init__(self, backbone: DinoVisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.channels = backbone.embed_dim  # C

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        B, _, S, _ = x.shape
        g = S // self.backbone.patch_size
        t = self.backbone.get_intermediate_layers(normalize_unit(x), [len(self.backbone.blocks) - 1])[0]  # (B, 1 + HW, C)
        return t[:, 1:].transpose(1, 2).reshape(B, self.channels, g, g)  # (B, HW, C) -> (B, C, g, g)

    def describe(self, f: torch.Tensor) -> torch.Tensor:
        raise ValueError("a ViT teacher has no place descriptor: distil with distil_class_token=False.")


def load_teacher(path: PathLike, config: PretrainConfig) -> tuple[LayoutCNN | ViTMapTeacher, dict[str, Any]]:
    """The teacher of a distil run and its record as the run read it (kept in the checkpoint's data
    record and copied to the export's manifest): its file's name and sha256, and how it was trained
    (from its manifest). A backbone weight file with its manifest (:data:`~scicevpr.weights.MANIFEST_FORMAT`, the
    architecture of ``config``) gives a :class:`ViTMapTeacher`; any other file is read as a
    :class:`LayoutCNN` (:meth:`LayoutCNN.load`, which refuses a file its manifest does not describe)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"distil_teacher {str(path)!r} does not exist; train one with `scicevpr pretrain-backbone "
                                "--objective cnn ... --export cnn.pt`, or give an exported backbone (.pth with its manifest).")
    record: dict[str, Any] = {"file": path.name, "sha256": file_sha256(path)}
    vit_manifest = check_manifest(path, config.backbone_config())  # None unless a backbone manifest lies beside it
    if vit_manifest is not None:
        if config.distil_class_token:
            raise ValueError(f"distil_teacher {str(path)!r} is a ViT backbone: it has no place descriptor for the CLS token "
                             "to learn; distil with distil_class_token=False (--no-distil-class-token).")
        if config.distil_size != config.image_size:
            raise ValueError(f"a ViT teacher sees the student's crop: set distil_size={config.image_size} (the image_size), "
                             f"not {config.distil_size}.")
        net = ViTMapTeacher(build_backbone(config.backbone_config(), path))
        record["kind"] = "vit"
        record["trained"] = {k: vit_manifest.get(k) for k in ("description", "label", "objective", "init", "distil_teacher", "steps", "train_s", "machines")}
        return net, record
    net = LayoutCNN.load(path)
    if net.manifest is not None:
        record["trained"] = {k: net.manifest.get(k) for k in ("description", "data", "steps", "images_seen", "train_s", "machines")}
    return net, record


@torch.no_grad()
def distil_targets(f: torch.Tensor, d: torch.Tensor | None, grid: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The network's outputs as targets (fp32): its map ``f`` (B, 256, h, w), average-pooled to the
    ViT's ``grid`` x ``grid`` patches when h differs, standardised per channel over the batch and
    the cells; its descriptors ``d`` (B, 512) centred over the batch. What every image shares (a
    ReLU map's positive mean direction, scoring cosines of about 0.5 for any prediction) is no
    target; what tells images and cells apart is. Under DDP each rank uses its own share's statistics.
    ``d`` None (no CLS objective): None."""
    f = f.float() if f.shape[-1] == grid else F.adaptive_avg_pool2d(f.float(), (grid, grid))
    f = (f - f.mean(dim=(0, 2, 3), keepdim=True)) / (f.std(dim=(0, 2, 3), keepdim=True) + 1e-6)
    return f, None if d is None else d.float() - d.float().mean(dim=0, keepdim=True)


def distil_losses(dense: torch.Tensor, cls: torch.Tensor | None, f: torch.Tensor, d: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(L_dense, L_cls)`` (fp32): ``dense`` (B, C_t, g, g) = ``W_p z`` against the target map
    ``f`` (B, C_t, g, g), cell by cell; ``cls`` (B, 512) = ``W_c z_cls`` against the target
    descriptor ``d`` (B, 512) (:func:`distil_targets`). Each is the mean of 1 - cosine; ``L_cls``
    is None without a CLS objective (``cls`` None)."""
    l_dense = (1 - F.cosine_similarity(dense.float(), f, dim=1)).mean()  # over b and the g x g cells
    l_cls = None if cls is None else (1 - F.cosine_similarity(cls.float(), d, dim=1)).mean()
    return l_dense, l_cls


# --------------------------------------------------------------------------------------------
# The models the optimiser trains: the student (every ViT objective) and DINO's EMA teacher
# --------------------------------------------------------------------------------------------


class Student(nn.Module):
    """What the optimiser trains, as one module so that one DDP forward covers a step.

    DINO: ``forward(globals, locals, masks) -> (global CLS logits, local CLS logits,
    masked-patch logits, global CLS features)``. Supervised: ``forward(images) -> descriptors``.
    Distil: ``forward(images) -> (W_p z, W_c z_cls)`` (``W_c z_cls`` None without a CLS objective);
    ``target_channels``: C_t, the channels of the teacher's map.
    """

    def __init__(self, config: PretrainConfig, target_channels: int = LayoutCNN.channels) -> None:
        super().__init__()
        self.objective = config.objective
        self.backbone = DinoVisionTransformer(config.backbone_config())  # trained here: not frozen
        if config.init_weights is not None:  # start from an exported backbone (its manifest checked)
            load_weights(self.backbone, resolve_weights(config.init_weights, self.backbone.config))
        self.grid = config.image_size // self.backbone.patch_size  # g: patches a side
        C = self.backbone.embed_dim
        last = len(self.backbone.blocks) - 1
        self.last = last
        if config.objective == "dino":
            self.head = DINOHead(C, config.prototypes, config.head_hidden, config.head_bottleneck)
        elif config.objective == "distil":
            self.backbone.mask_token.requires_grad_(False)
            self.dense_proj = nn.Linear(C, target_channels)  # W_p: patch token -> the teacher's feature at that cell
            self.cls_proj = nn.Linear(C, LayoutCNN.dim) if config.distil_class_token else None  # W_c: CLS token -> the network's place descriptor
        else:
            self.backbone.mask_token.requires_grad_(False)  # no masked patches without iBOT
            self.pooling = config.pooling
            g = self.grid
            self.pool = MultiRegionGeM((g, g)) if config.pooling in ("gem", "regions") else None
            if config.pooling == "grid":
                self.grid_proj = nn.Linear(GRID[0] * GRID[1] * C, GRID_DIM)

    def tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + HW, C): the last block's tokens after the final norm."""
        return self.backbone.get_intermediate_layers(x, [self.last], masks=masks)[0]

    def forward(self, *args: torch.Tensor):
        if self.objective == "dino":
            return self._dino(*args)
        t = self.tokens(*args)
        return self._distil(t) if self.objective == "distil" else self.describe(t)

    def _dino(self, globals_: torch.Tensor, locals_: torch.Tensor | None, masks: torch.Tensor, mask_index: torch.Tensor):
        t = self.tokens(globals_, masks)  # (2b, 1 + HW, C)
        g_cls = t[:, 0]  # (2b, C)
        g_logits = self.head(g_cls)  # (2b, K)
        patch_logits = self.head(_masked_patches(t, mask_index))  # (M, C) -> (M, K): masked patches only
        l_logits = self.head(self.tokens(locals_)[:, 0]) if locals_ is not None else None  # (Lb, K)
        return g_logits, l_logits, patch_logits, g_cls

    def _distil(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, 1 + HW, C) tokens -> (b, C_t, g, g) the patch tokens carried to the teacher's
        feature map (``W_p z``), and (b, 512) the CLS token to its descriptor (``W_c z_cls``; None
        without a CLS objective)."""
        B, N, C = t.shape
        dense = self.dense_proj(t[:, 1:]).transpose(1, 2).reshape(B, -1, self.grid, self.grid)  # (B, HW, C_t) -> (B, C_t, g, g)
        return dense, None if self.cls_proj is None else self.cls_proj(t[:, 0])

    def describe(self, t: torch.Tensor) -> torch.Tensor:
        """(b, 1 + HW, C) last-block tokens -> (b, D) the unit descriptor the objective trains
        (supervised: its ``pooling``; distil: ``W_c z_cls``, the CLS token in the network's space)."""
        if self.objective == "distil":
            if self.cls_proj is None:
                raise ValueError("a distil run without a CLS objective trains no descriptor of its own.")
            return F.normalize(self.cls_proj(t[:, 0]).float(), dim=-1)
        if self.pooling == "cls":
            d = t[:, 0]
        elif self.pooling == "mean":
            d = t[:, 1:].mean(dim=1)
        elif self.pooling == "grid":
            B, N, C = t.shape
            g = self.grid
            cells = F.adaptive_avg_pool2d(t[:, 1:].transpose(1, 2).reshape(B, C, g, g), GRID)  # (B, HW, C) -> (B, C, 2, 4)
            d = self.grid_proj(cells.flatten(1))  # (B, 8 C) -> (B, 512)
        else:
            B, N, C = t.shape
            g = self.grid
            regions = self.pool(t[:, 1:].transpose(1, 2).reshape(B, C, g, g))  # (B, HW, C) -> (B, C, g, g) -> (B, 14, C)
            d = regions[:, 0] if self.pooling == "gem" else regions.flatten(1)  # (B, C): whole map | (B, 14 C)
        return F.normalize(d.float(), dim=-1)  # (b, C) or (b, 14 C)


class Teacher(nn.Module):
    """The EMA teacher: backbone + head, no gradient."""

    def __init__(self, student: Student) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(student.backbone)  # theta_t = theta_s at the start
        self.head = copy.deepcopy(student.head)
        self.requires_grad_(False)
        self.last = student.last

    @torch.no_grad()
    def forward(self, globals_: torch.Tensor, mask_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(2b, 3, S, S) unmasked global crops -> (2b, K) CLS logits and (M, K) logits of the
        patches the student sees masked."""
        t = self.backbone.get_intermediate_layers(globals_, [self.last])[0]  # (2b, 1 + HW, C)
        return self.head(t[:, 0]), self.head(_masked_patches(t, mask_index))


# --------------------------------------------------------------------------------------------
# One step's losses, objective by objective
# --------------------------------------------------------------------------------------------
# Each function reads the run's state from ``run`` (:class:`~scicevpr.offline.pretrain.Run`: config,
# device, amp, ddp; model, the student as the optimiser sees it (DDP-wrapped under torchrun);
# student, teacher, cnn, ms; the view specs; DINO's centers) and changes none of it.


@dataclass
class Batch:
    """One step's images as the loop gives them to an objective
    (:meth:`scicevpr.offline.pretrain.Run.step`)."""

    images: torch.Tensor  # (b, 3, S, S) uint8: this rank's share of the global batch, from the image cache
    labels: np.ndarray | None  # (n,) place labels of the global batch (supervised, cnn); None otherwise
    gen: torch.Generator  # the step's generator, seeded by (seed, step): every random draw of the step, in order
    n: int  # images in the global batch
    mine: slice  # this rank's rows of the global batch
    sched: dict[str, float]  # the schedule at this step (lr, weight_decay, momentum, teacher_temp)

    def share(self, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of the global batch's view parameters (:meth:`MultiCropAugment.params`)."""
        return {k: v[self.mine] for k, v in p.items()}


@dataclass
class Losses:
    """What an objective's step gives the loop."""

    loss: torch.Tensor  # L: the scalar the loop backpropagates
    parts: dict[str, torch.Tensor]  # its terms, detached, as the log's "loss_*" columns
    teacher_logits: tuple[torch.Tensor, torch.Tensor] | None = None  # DINO: (2b, K), (M, K) for update_centers
    masked: bool = False  # DINO: some crop of the global batch has masked patches


def dino_step_losses(run: Run, batch: Batch) -> Losses:
    """DINO + iBOT + KoLeo: ``L = L_DINO + ibot_weight L_iBOT + koleo_weight L_KoLeo`` on 2 global
    and ``local_crops`` local crops of each image, the teacher seeing the global crops unmasked.
    Draws, in order: the global crops' parameters, the local crops', the masks."""
    c, dev, x, gen, n = run.config, run.device, batch.images, batch.gen, batch.n
    views = [MultiCropAugment.params(gen, n, spec) for spec in run.global_specs]
    local_params = [MultiCropAugment.params(gen, n, run.local_spec) for _ in range(c.local_crops)]
    num_patches = run.student.grid ** 2  # HW
    masks = random_masks(gen, 2 * n, num_patches, c.mask_probability if c.ibot_weight > 0 else 0.0,
                         c.mask_ratio).reshape(2, n, -1)  # (2n, HW) -> (2, n, HW): view-major like the crops
    globals_ = torch.cat([MultiCropAugment.apply(x, batch.share(p), s) for p, s in zip(views, run.global_specs)])  # (2b, 3, S, S)
    locals_ = (torch.cat([MultiCropAugment.apply(x, batch.share(p), run.local_spec) for p in local_params])
               if c.local_crops else None)  # (L*b, 3, s, s)
    m_cpu = masks[:, batch.mine].reshape(-1, num_patches)  # (2, b, HW) -> (2b, HW)
    m, mask_index = m_cpu.to(dev), m_cpu.flatten().nonzero().squeeze(1).to(dev)  # (2b, HW), (M,)
    with autocast(dev, run.amp):
        t_global, t_patch = run.teacher(globals_, mask_index)
        s_global, s_local, s_patch, g_cls = run.model(globals_, locals_, m, mask_index)
    l_dino, l_ibot = dino_losses(s_global, s_local, s_patch, t_global, t_patch, m, run.center,
                                 run.patch_center, c.student_temp, batch.sched["teacher_temp"],
                                 masked_crops=int((masks.sum(dim=-1) > 0).sum()),  # over the global batch
                                 world_size=run.ddp.world_size)
    l_koleo = sum(koleo_loss(v) for v in g_cls.chunk(2)) / 2 if c.koleo_weight > 0 else torch.zeros((), device=dev)
    loss = l_dino + c.ibot_weight * l_ibot + c.koleo_weight * l_koleo
    parts = {"loss_dino": l_dino.detach(), "loss_ibot": l_ibot.detach(), "loss_koleo": l_koleo.detach()}
    return Losses(loss, parts, teacher_logits=(t_global, t_patch),
                  masked=bool(masks.any()))  # a CPU tensor: no sync


def distil_step_losses(run: Run, batch: Batch) -> Losses:
    """Distillation: ``L = L_dense + L_cls`` (``L_dense`` alone without a CLS objective), the ViT
    and the frozen teacher seeing the same crop of each image. Draws one crop's parameters."""
    c, x = run.config, batch.images
    p = batch.share(MultiCropAugment.params(batch.gen, batch.n, run.supervised_spec))
    images = MultiCropAugment.apply(x, p, run.supervised_spec)  # (b, 3, S, S), ImageNet-normalised
    small = MultiCropAugment.apply(x, p, run.cnn_spec, normalise=False)  # (b, 3, s, s) in [0, 1]: the same crops
    with torch.no_grad():
        f = run.cnn.feature_map(small)  # (b, C_t, h, w): CNN (b, 256, s / 8, s / 8); ViT (b, C, g, g)
        d = run.cnn.describe(f) if c.distil_class_token else None  # (b, 512)
    with autocast(run.device, run.amp):
        dense, cls = run.model(images)
    l_dense, l_cls = distil_losses(dense, cls, *distil_targets(f, d, run.student.grid))
    loss = l_dense if l_cls is None else l_dense + l_cls
    parts = {"loss_dense": l_dense.detach()} if l_cls is None else {"loss_dense": l_dense.detach(), "loss_cls": l_cls.detach()}
    return Losses(loss, parts)


def place_step_losses(run: Run, batch: Batch) -> Losses:
    """``L_MS`` on a P x K place batch, as one process: the ViT's descriptor (supervised) or the
    network's (cnn, from pixels in [0, 1] at ``distil_size``). Draws one crop's parameters."""
    c, dev = run.config, run.device
    spec = run.cnn_spec if c.objective == "cnn" else run.supervised_spec
    p = MultiCropAugment.params(batch.gen, batch.n, spec)
    images = MultiCropAugment.apply(batch.images, batch.share(p), spec, normalise=c.objective != "cnn")  # (b, 3, S, S)
    y = torch.as_tensor(batch.labels, device=dev)  # global labels
    with autocast(dev, run.amp):
        d = run.model(images)  # (b, C)
    loss = run.ms(gather_batch(d), y)  # L_MS on the global batch, as one process
    return Losses(loss, {"loss_ms": loss.detach()})


# The losses of one step, by objective (every name of config.OBJECTIVES).
STEP_LOSSES: dict[str, Callable[[Run, Batch], Losses]] = {
    "dino": dino_step_losses,
    "distil": distil_step_losses,
    "supervised": place_step_losses,
    "cnn": place_step_losses,
}
