"""Evaluation: descriptors, exact FAISS search, Recall@N, PCA and the batch-stability sweep.

Protocol (PAPER.md, "Evaluation protocol", the Visual Geo-localization Benchmark convention):
database and query images are hard-resized to the model size and fed **in file order, in
batches of 16** (this matters only for cross-image models: the teacher, CricaVPR); descriptors
are searched exhaustively with ``faiss.IndexFlatL2``; a query is correct at N when one of its N
nearest database images lies within 25 m. ``Recall@N`` is the percentage of correct queries.

For the batch-stability experiment (paper Fig. 1-2) the per-image part of a model (backbone,
fusion, pooling) is computed once and only the encoder, the single step where images of a batch
can see each other, is re-run for each query batch size and order.

:data:`BACKBONE_CACHE` (off unless enabled; the offline notebooks enable it) keeps the
backbone's outputs of evaluation batches, so that the same batch through the same weights is
computed once: a frozen backbone's validation images every epoch, or a teacher and a student
(one backbone) evaluated on one split, cost one backbone pass. A hit returns the output of the
identical computation, so descriptors and recalls are bit for bit those without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import faiss
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import EvalConfig
from .data.decode import JpegBytesDataset, collate_jpeg_bytes, decode_jpeg_bytes, load_rgb
from .data.transforms import eval_transform
from .data.vg import ImageFileDataset, VGSplit, list_images
from .files import atomic_write
from .precision import autocast, model_device, resolve_amp
from .protocol import (
    OFFICIAL_PCA_FOLDER,
    OFFICIAL_PCA_MAX_IMAGES,
    check_protocol,
    eval_batch_size,
    num_groups,
)
from .weights import hash_tensors, tensor_bytes

PathLike = str | os.PathLike


def fast_enabled(config: EvalConfig, device: torch.device) -> bool:
    if config.protocol == "official":
        return False  # fp32, no compile, PIL decoding (then amp and gpu_decode follow: off)
    return device.type == "cuda" if config.fast is None else config.fast


def amp_enabled(config: EvalConfig, device: torch.device) -> bool:
    """bf16 autocast or not: ``amp`` when given, else the fast path asks for the precision
    policy's automatic choice (:func:`scicevpr.precision.resolve_amp`) and the plain path for fp32."""
    requested = config.amp if config.amp is not None else (None if fast_enabled(config, device) else False)
    return resolve_amp(device, requested)


def gpu_decode_enabled(config: EvalConfig, device: torch.device) -> bool:
    on = fast_enabled(config, device) if config.gpu_decode is None else config.gpu_decode
    return on and device.type == "cuda"


class BackboneCache:
    """Backbone outputs of evaluation batches, kept for reuse within the session.

    An entry is keyed by everything the output depends on: the backbone's weights (a hash of
    every parameter and buffer, adapters included, with names, dtypes and shapes), the settings
    its modules hold besides tensors (training mode, norms' eps, CricaVPR's ``adapter_scale``,
    the backbone's configuration with its ``interpolate_offset``), the code that
    computes the output (the model class's ``backbone_output`` and its ``layers``), the input
    batch (a hash of its bytes, so also its order and size), the autocast state and torch's
    thread count. A hit is therefore the output of the identical computation. Only inference
    uses it (no autograd graph is kept); the oldest entries are dropped beyond ``max_bytes``.

    It pays where the same images pass the same weights again: the validation split after every
    epoch of a frozen backbone, several heads on one backbone (a teacher and its student, the
    ablations) evaluated on one split, and training runs on one frozen backbone that draw the
    same batches (a student's epochs are its teacher's first ones: the same seed gives the same
    places and augmentations). It costs memory (an entry is the (B, M*C, H, W) output: about
    0.4 MB an image for SciceVPR-S at 112 px, 3 MB for SciceVPR-B at 224 px) and a hash of the
    weights per pass; it is off until :meth:`enable` is called.
    """

    def __init__(self) -> None:
        self.max_bytes = 0
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def enable(self, max_bytes: int) -> None:
        """Keep up to ``max_bytes`` of backbone outputs (0 turns the cache off and empties it)."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes}: expected >= 0 (0 turns the cache off)")
        self.max_bytes = int(max_bytes)
        self._evict()

    def clear(self) -> None:
        """Drop every entry and reset the counts."""
        self.entries.clear()
        self.num_bytes = self.hits = self.misses = 0

    @staticmethod
    def weights_key(model: torch.nn.Module) -> str:
        """A digest of what the backbone output of ``model`` (a :class:`~scicevpr.models.VPRModel`)
        depends on besides its input."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{type(model).backbone_output.__qualname__} {tuple(model.config.layers)}".encode())
        for name, m in model.backbone.named_modules():
            # plain settings (training mode, e.g. of CricaVPR's adapter BatchNorms; eps; adapter_scale;
            # the BackboneConfig): two backbones with equal weights can differ by them
            settings = sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_") and (
                isinstance(v, (bool, int, float, str, tuple)) or dataclasses.is_dataclass(v)))
            h.update(f"{name} {type(m).__qualname__} {settings}".encode())
        hash_tensors(h, (*model.backbone.named_parameters(), *model.backbone.named_buffers()), with_layout=True)
        return h.hexdigest()

    def backbone_features(self, model: torch.nn.Module, x: torch.Tensor, weights_key: str) -> torch.Tensor:
        """``model.backbone_features(x)``, from the cache when this exact computation was done
        before. ``weights_key``: :meth:`weights_key` of ``model``, hashed once for a pass during
        which the backbone does not change. An output that autograd needs (a backbone training,
        as CricaVPR's adapters do) is never cached."""
        if not self.enabled or (torch.is_grad_enabled() and any(p.requires_grad for p in model.backbone.parameters())):
            return model.backbone_features(x)
        h = hashlib.blake2b(tensor_bytes(x), digest_size=16)
        amp = torch.is_autocast_enabled(x.device.type)
        key = (weights_key, h.hexdigest(), str(x.dtype), tuple(x.shape), str(x.device), amp,
               str(torch.get_autocast_dtype(x.device.type)) if amp else None, torch.get_num_threads())
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        out = model.backbone_features(x)
        self.entries[key] = out
        self.num_bytes += out.element_size() * out.nelement()
        self._evict()
        return out

    def _evict(self) -> None:
        while self.entries and self.num_bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.num_bytes -= old.element_size() * old.nelement()


BACKBONE_CACHE = BackboneCache()


def feature_extractor(model: torch.nn.Module):
    """``x -> model.extract_features(x)`` with the backbone's part through :data:`BACKBONE_CACHE`
    when it is enabled. The weights are hashed here, once: use the function for one pass (an
    evaluation, a training run on a frozen backbone) during which the backbone does not change."""
    if not BACKBONE_CACHE.enabled or not hasattr(model, "after_backbone"):
        return model.extract_features
    weights_key = BACKBONE_CACHE.weights_key(model)
    return lambda x: model.after_backbone(BACKBONE_CACHE.backbone_features(model, x, weights_key))


def per_image_function(model: torch.nn.Module, config: EvalConfig, device: torch.device):
    """``x -> regional features (B, R, C)``: the batch-independent part of the model, compiled
    with ``torch.compile`` on the fast CUDA path (the last, smaller batch is padded so one
    graph serves every batch; padding is harmless because nothing here mixes images). Elsewhere
    the backbone's outputs go through :data:`BACKBONE_CACHE` when it is enabled."""
    if not (fast_enabled(config, device) and device.type == "cuda"):
        extract = feature_extractor(model)
        return lambda x: model.regional_features(extract(x))

    def run(x: torch.Tensor) -> torch.Tensor:
        return model.regional_features(model.extract_features(x))

    compiled = torch.compile(run, dynamic=False)
    full = config.batch_size

    def padded(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < full:
            x = torch.cat([x, x.new_zeros(full - n, *x.shape[1:])])
        return compiled(x)[:n]

    return padded


def _prepare(model: torch.nn.Module, config: EvalConfig) -> torch.device:
    if config.device is not None:
        model.to(config.device)
    model.eval()
    return model_device(model)


def iterate_images(
    paths: Sequence[PathLike],
    image_size: int,
    batch_size: int,
    device: torch.device,
    num_workers: int = 2,
    gpu_decode: bool = False,
    progress: bool = True,
    desc: str = "images",
    protocol: str = "default",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(images (b, 3, S, S) on device, indices (b,))`` in the order of ``paths``.

    With ``gpu_decode`` on CUDA, workers only read bytes and the batch is decoded on the GPU;
    otherwise workers decode with PIL and apply ``eval_transform(S, protocol)``.
    """
    gpu = bool(gpu_decode) and device.type == "cuda"
    if gpu:
        ds = JpegBytesDataset(paths)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_jpeg_bytes)
    else:
        ds = ImageFileDataset(paths, image_size, transform=eval_transform(image_size, protocol))
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
    for batch, idx in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if gpu:
            x = decode_jpeg_bytes(batch, image_size, device, [ds.paths[i] for i in idx.tolist()])
        else:
            x = batch.to(device, non_blocking=True)
        yield x, idx


@torch.no_grad()
def compute_descriptors(
    model: torch.nn.Module,
    paths: Sequence[PathLike],
    config: EvalConfig = EvalConfig(),
    batch_size: int | None = None,
    desc: str = "descriptors",
) -> np.ndarray:
    """(N, D) float32 descriptors of image files, fed in the order of ``paths`` in batches of
    ``batch_size`` (default ``config.batch_size``), as the VG-benchmark protocol does. The
    cross-image encoder sees exactly each batch, or its groups of ``config.encoder_group_size``."""
    device = _prepare(model, config)
    bs = batch_size or config.batch_size
    amp = amp_enabled(config, device)
    groups = num_groups(bs, config.encoder_group_size)
    features = per_image_function(model, dataclasses.replace(config, batch_size=bs), device)
    out = np.zeros((len(paths), model.descriptor_dim), dtype=np.float32)
    for x, idx in iterate_images(paths, model.image_size, bs, device, config.num_workers,
                                 gpu_decode_enabled(config, device), config.progress, desc, config.protocol):
        with autocast(device, amp):
            d = model.encode(features(x), groups)  # the encoder sees exactly this batch (or its groups)
        out[idx.numpy()] = d.float().cpu().numpy()
    check_finite_descriptors(out, f"the descriptors of {len(paths)} images", paths)
    return out


def check_finite_descriptors(descriptors: np.ndarray, what: str, paths: Sequence[PathLike] | None = None) -> None:
    """Refuse descriptors that hold a NaN or an infinity: a search among them ranks arbitrarily
    and its Recall@N would be a silent, meaningless number. ``paths``: the images of the rows, to
    name the first bad one."""
    rows = np.flatnonzero(~np.isfinite(descriptors).all(axis=tuple(range(1, descriptors.ndim)))) if descriptors.size else []
    if len(rows):
        first = f" (the first: row {rows[0]}" + (f", image {str(paths[rows[0]])!r})" if paths is not None else ")")
        raise ValueError(
            f"{what} hold NaN or infinite values in {len(rows)} of {len(descriptors)} rows{first}: the model's weights "
            f"are not finite (a training that diverged) or an image gave non-finite input. Recall@N of them would mean "
            f"nothing; use a model with finite weights, or compute the descriptors again."
        )


@torch.no_grad()
def compute_regional_features(
    model: torch.nn.Module, paths: Sequence[PathLike], config: EvalConfig = EvalConfig(), desc: str = "features"
) -> torch.Tensor:
    """(N, R, C) per-image regional features (everything before the encoder), on the CPU, fp32.

    These do not depend on the batch, so they are computed once; :func:`encode_in_batches`
    then replays the encoder under any batching.
    """
    device = _prepare(model, config)
    amp = amp_enabled(config, device)
    features = per_image_function(model, config, device)
    chunks, order = [], []
    for x, idx in iterate_images(paths, model.image_size, config.batch_size, device, config.num_workers,
                                 gpu_decode_enabled(config, device), config.progress, desc, config.protocol):
        with autocast(device, amp):
            r = features(x)
        chunks.append(r.float().cpu())
        order.append(idx)
    feats = torch.cat(chunks)
    return feats[torch.argsort(torch.cat(order))]


@torch.no_grad()
def encode_in_batches(
    model: torch.nn.Module,
    regional: torch.Tensor,
    batch_size: int,
    order: np.ndarray | None = None,
    amp: bool = False,
    group_size: int | None = None,
) -> np.ndarray:
    """Descriptors from regional features (N, R, C), the images grouped into consecutive
    batches of ``batch_size`` following ``order`` (default: file order). Returns (N, D) in the
    original index order. ``amp``: bf16 autocast where the precision policy allows it.
    ``group_size``: the encoder attends within groups of a batch (``EvalConfig.encoder_group_size``)."""
    device = model_device(model)
    amp = resolve_amp(device, amp)
    model.eval()
    n = regional.shape[0]
    order = np.arange(n) if order is None else np.asarray(order)
    out = np.zeros((n, model.descriptor_dim), dtype=np.float32)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        r = regional[torch.as_tensor(idx)].to(device)
        with autocast(device, amp):
            out[idx] = model.encode(r, num_groups(batch_size, group_size)).float().cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# Search and recall
# --------------------------------------------------------------------------------------------


def search(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 search (``faiss.IndexFlatL2``): (distances, indices), each (N_q, min(k, N_db))."""
    if database.ndim != 2 or queries.ndim != 2 or database.shape[1] != queries.shape[1]:
        raise ValueError(f"descriptor shapes do not match: database {database.shape}, queries {queries.shape}")
    check_finite_descriptors(database, "the database descriptors")
    check_finite_descriptors(queries, "the query descriptors")
    index = faiss.IndexFlatL2(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    k = min(k, database.shape[0])
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def recall_at_n(
    predictions: np.ndarray, positives: Sequence[np.ndarray], recall_values: Sequence[int] = (1, 5, 10, 100)
) -> tuple[dict[int, float], np.ndarray]:
    """Recall@N in percent, and the (N_q, k) boolean matrix "prediction j of query i is a positive".

    A query without any positive counts as a failure (the VG-benchmark convention). N larger
    than the number of predictions uses all of them.
    """
    if len(positives) != predictions.shape[0]:
        raise ValueError(f"{predictions.shape[0]} queries predicted but {len(positives)} positive lists")
    correct = np.zeros(predictions.shape, dtype=bool)
    for i, pos in enumerate(positives):
        correct[i] = np.isin(predictions[i], pos)
    return recalls_from_ranks(hit_ranks(correct), recall_values), correct


def hit_ranks(correct: np.ndarray) -> np.ndarray:
    """(N_q,) rank of each query's first correct prediction (``iinfo.max`` when none)."""
    return np.where(correct.any(1), correct.argmax(1), np.iinfo(np.int64).max)


def recalls_from_ranks(ranks: np.ndarray, recall_values: Sequence[int] = (1, 5, 10, 100)) -> dict[int, float]:
    """Recall@N in percent from each query's :func:`hit_ranks`: the share found within N."""
    n_q = max(len(ranks), 1)
    return {int(n): float(100.0 * (ranks < n).sum() / n_q) for n in recall_values}


def recall_curve(
    database: np.ndarray, queries: np.ndarray, positives: Sequence[np.ndarray], max_n: int = 100
) -> np.ndarray:
    """(max_n,) Recall@N in percent for N = 1..max_n (the curve VPR papers draw), from one exact
    :func:`search` and :func:`recall_at_n`. N beyond the database size keeps the last value."""
    _, pred = search(database, queries, max_n)
    recalls, _ = recall_at_n(pred, positives, tuple(range(1, max_n + 1)))
    return np.array([recalls[n] for n in range(1, max_n + 1)])


def recall_intervals(
    correct: np.ndarray,
    recall_values: Sequence[int] = (1, 5, 10, 100),
    level: float = 0.95,
    num_samples: int = 2000,
    seed: int = 0,
) -> dict[int, tuple[float, float]]:
    """Percentile bootstrap interval of Recall@N (percent) over queries.

    The queries are resampled with replacement ``num_samples`` times (seeded, so an interval is
    reproducible); each Recall@N is recomputed on the resample and the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles are returned. With 125 queries one query is 0.8 points and a
    95% interval around R@1 = 10 spans about 10 points: differences inside it are noise.

    Args:
        correct: (N_q, k) bool, prediction j of query i is a positive (``recall_at_n``'s second output).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n_q = correct.shape[0]
    if n_q == 0:
        raise ValueError("recall intervals need at least one query")
    ranks = hit_ranks(correct)
    rng = np.random.default_rng(seed)
    sample = rng.integers(0, n_q, size=(num_samples, n_q))  # (S, N_q) query indices
    out = {}
    for n in recall_values:
        hits = (ranks < n)[sample].mean(1) * 100.0  # (S,)
        lo, hi = np.quantile(hits, [(1 - level) / 2, (1 + level) / 2])
        out[int(n)] = (float(lo), float(hi))
    return out


def recall_interval_from_value(recall: float, num_queries: int, level: float = 0.95, num_samples: int = 2000,
                               seed: int = 0) -> tuple[float, float]:
    """The bootstrap interval (:func:`recall_intervals`) of a Recall@N known only as a value over
    ``num_queries`` queries (e.g. a training log's validation recall): resampling queries depends
    only on how many were found (in distribution), so the interval follows from the value and
    the count, up to the bootstrap's sampling noise."""
    hits = int(round(recall / 100.0 * num_queries))
    correct = (np.arange(num_queries) < hits)[:, None]  # (N_q, 1)
    return recall_intervals(correct, (1,), level=level, num_samples=num_samples, seed=seed)[1]


def chance_recall(num_database: int, positives: Sequence[np.ndarray], recall_values: Sequence[int] = (1, 5, 10, 100)) -> dict[int, float]:
    """Expected Recall@N (percent) of a random ranking of the database, from the split's positives.

    A query with p positives among D database images is found at N with probability
    ``1 - C(D - p, N) / C(D, N) = 1 - prod_{j<N} (D - p - j) / (D - j)``; the mean over queries
    (queries without positives count 0) is the chance level every recall plot should show.
    """
    if num_database < 1:
        raise ValueError("chance_recall needs a non-empty database")
    counts = np.array([len(p) for p in positives], dtype=np.float64)
    out = {}
    for n in recall_values:
        n_eff = min(int(n), num_database)
        j = np.arange(n_eff, dtype=np.float64)
        miss = np.prod(np.clip((num_database - counts[:, None] - j) / (num_database - j), 0.0, 1.0), axis=1)
        out[int(n)] = float(100.0 * (1.0 - miss).mean()) if len(counts) else 0.0
    return out


def informative_recall_values(
    num_database: int, chance: dict[int, float], recall_values: Sequence[int] = (1, 5, 10, 100),
    max_share: float = 0.1, max_chance: float = 90.0,
) -> tuple[int, ...]:
    """The N of ``recall_values`` worth reporting on a split: those whose top N is at most
    ``max_share`` of the database (R@100 needs 1,000 database images) and whose chance level
    (:func:`chance_recall`) is at most ``max_chance`` percent. A recall that a random ranking
    nearly reaches says nothing about the model. N = 1 is always kept."""
    keep = [int(n) for n in recall_values
            if int(n) == 1 or (int(n) <= max_share * num_database and chance.get(int(n), 0.0) <= max_chance)]
    return tuple(keep)


def pixel_descriptors(paths: Sequence[PathLike], thumb: int = 32, grayscale: bool = False) -> np.ndarray:
    """(N, thumb * thumb * channels) float32 descriptors: each image bilinearly shrunk to
    ``thumb`` x ``thumb`` pixels, values in [0, 1]."""
    out = []
    for p in paths:
        im = load_rgb(p).convert("L" if grayscale else "RGB").resize((thumb, thumb), Image.BILINEAR)
        out.append(np.asarray(im, dtype=np.float32).ravel() / 255.0)
    return np.stack(out)


def pixel_baseline_result(split: VGSplit, thumb: int = 32, grayscale: bool = False,
                          recall_values: Sequence[int] = (1, 5, 10)) -> "EvalResult":
    """Raw pixels (:func:`pixel_descriptors`) scored through the same exact :func:`search` and
    :func:`recall_at_n` as every model (:func:`score`): an :class:`EvalResult`, so the floor any
    learned descriptor must beat has intervals and a chance level like the models."""
    db, q = pixel_descriptors(split.database_paths, thumb, grayscale), pixel_descriptors(split.query_paths, thumb, grayscale)
    name = f"raw pixels {thumb}x{thumb}{' grey' if grayscale else ''} (baseline)"
    return score(None, split, db, q, EvalConfig(recall_values=tuple(recall_values)), name=name)


def colour_histogram_descriptors(paths: Sequence[PathLike], strips: int = 6, bins: int = 12, thumb: int = 64,
                                 min_saturation: float = 0.15) -> np.ndarray:
    """(N, strips * bins) float32 descriptors of colour layout without any learning: each image
    shrunk to ``thumb`` x ``thumb`` pixels and cut into ``strips`` vertical strips (left to right);
    per strip, the histogram of hue (HSV, ``bins`` bins over the colour wheel) of the pixels whose
    saturation exceeds ``min_saturation`` (grey road, sky haze and night are left out), L1-normalised
    and square-rooted (so L2 distances are Hellinger distances). A strip without a coloured pixel
    is all zeros. It sees which colours lie left, ahead and right, not where edges are, so it
    survives the small shifts of viewpoint that defeat raw pixels, not the changes of light."""
    if strips < 1 or bins < 1 or thumb < strips:
        raise ValueError(f"strips={strips}, bins={bins}, thumb={thumb}: need strips, bins >= 1 and thumb >= strips")
    edges = np.linspace(0, thumb, strips + 1).round().astype(int)
    out = []
    for p in paths:
        hsv = np.asarray(load_rgb(p).resize((thumb, thumb), Image.BILINEAR).convert("HSV"), dtype=np.float32) / 255.0
        parts = []
        for a, b in zip(edges[:-1], edges[1:]):
            strip = hsv[:, a:b].reshape(-1, 3)  # (thumb * width, 3) H, S, V in [0, 1]
            hue = strip[strip[:, 1] > min_saturation, 0]
            hist = np.histogram(hue, bins=bins, range=(0.0, 1.0))[0].astype(np.float32)  # (bins,)
            parts.append(np.sqrt(hist / max(hist.sum(), 1.0)))
        out.append(np.concatenate(parts))
    return np.stack(out)


def colour_baseline_result(split: VGSplit, strips: int = 6, bins: int = 12,
                           recall_values: Sequence[int] = (1, 5, 10)) -> "EvalResult":
    """Hue histograms in vertical strips (:func:`colour_histogram_descriptors`) scored like every
    model (:func:`score`). A second floor beside raw pixels: on the synthetic benchmark, whose
    facades are flat colours, it measures how far colour layout alone identifies a place."""
    db = colour_histogram_descriptors(split.database_paths, strips, bins)
    q = colour_histogram_descriptors(split.query_paths, strips, bins)
    name = f"hue histograms, {strips} strip{'' if strips == 1 else 's'} (baseline)"
    return score(None, split, db, q, EvalConfig(recall_values=tuple(recall_values)), name=name)


def pixel_baseline_recall(split: VGSplit, thumb: int = 32, grayscale: bool = False,
                          recall_values: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@N in percent of raw pixels (:func:`pixel_baseline_result`): the floor any learned
    descriptor must beat. Low on the synthetic benchmark, whose queries come in other conditions
    and at other viewpoints than the database."""
    return pixel_baseline_result(split, thumb, grayscale, recall_values).recalls


# --------------------------------------------------------------------------------------------
# PCA
# --------------------------------------------------------------------------------------------


@dataclass
class PCA:
    """``y = (x - mean) @ components.T``: (N, D) -> (N, d). No whitening (official protocol)."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (d, D), rows orthonormal, by decreasing variance
    explained_variance: np.ndarray  # (d,)

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) @ self.components.T).astype(np.float32)


def principal_components(x: np.ndarray | torch.Tensor, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The PCA computation, in float64: ``(mean (D,), components (d, D), variances (d,))`` of
    (N, D) samples, ``d = min(dim, N - 1, D)`` (N centred samples span at most N - 1
    directions), components by decreasing variance. Exact: SVD of the centred samples when
    N <= D, else the eigenvectors of their covariance."""
    x = torch.as_tensor(x, dtype=torch.float64)
    n, d_in = x.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 samples, got {n}")
    dim = min(dim, n - 1, d_in)
    mean = x.mean(0)
    xc = x - mean
    if n <= d_in:
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)  # vh (N, D)
        comps, var = vh[:dim], s[:dim] ** 2 / max(n - 1, 1)
    else:
        evals, evecs = torch.linalg.eigh(xc.T @ xc / max(n - 1, 1))  # ascending
        comps, var = evecs.flip(1)[:, :dim].T, evals.flip(0)[:dim]
    return mean.numpy(), comps.numpy(), var.numpy()


def fit_pca(descriptors: np.ndarray, dim: int = 4096) -> PCA:
    """PCA of (N, D) descriptors keeping ``min(dim, N - 1, D)`` components
    (:func:`principal_components`)."""
    if len(descriptors) < 2:
        raise ValueError(f"PCA needs at least 2 descriptors, got {len(descriptors)}")
    mean, comps, var = principal_components(descriptors, dim)
    return PCA(mean.astype(np.float32), comps.astype(np.float32), var)


def official_pca_images(vg_root: PathLike) -> list[Path]:
    """The authors' PCA folder: every ``*.jpg`` (database and queries) of Pitts30k's training
    split, ``<vg_root>/pitts30k/images/train`` (their ``--pca_dataset_folder`` and
    ``datasets_ws.PCADataset``: sorted ``glob("**/*.jpg")``)."""
    folder = Path(vg_root).joinpath(*OFFICIAL_PCA_FOLDER)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the official PCA folder {str(folder)!r} does not exist: the authors fit the PCA on Pitts30k's "
            "training images. Put Pitts30k (VG layout, train split) under the VG root, or pass the images "
            "to fit on explicitly (command line: --pca-images FOLDER)."
        )
    return list_images(folder)


def select_pca_images(
    paths: Sequence[PathLike],
    max_images: int = OFFICIAL_PCA_MAX_IMAGES,
    seed: int = 0,
    protocol: str = "default",
) -> list[Path]:
    """The images a PCA is fitted on, in the order they are fed to the model.

    ``"default"``: a seeded subset of ``max_images`` kept in file order (so a cross-image model
    sees neighbouring images together). ``"official"``: the authors' shuffled loader
    (``util.compute_pca``: ``DataLoader(..., shuffle=True)`` stopped after 2^14 images): a
    seeded permutation of all the images, its first ``max_images``, in that shuffled order.
    """
    check_protocol(protocol)
    paths = [Path(p) for p in paths]
    if protocol == "official":
        perm = np.random.default_rng(seed).permutation(len(paths))[:max_images]
        return [paths[i] for i in perm]
    if len(paths) > max_images:
        rng = np.random.default_rng(seed)
        paths = [paths[i] for i in np.sort(rng.choice(len(paths), max_images, replace=False))]
    return paths


def fit_pca_on_images(
    model: torch.nn.Module,
    paths: Sequence[PathLike],
    dim: int = 4096,
    max_images: int = OFFICIAL_PCA_MAX_IMAGES,
    seed: int = 0,
    config: EvalConfig = EvalConfig(),
) -> PCA:
    """PCA fitted on the descriptors of up to ``max_images`` training images (official: 2^14),
    chosen and ordered by :func:`select_pca_images` under ``config.protocol``. The authors' set
    is :func:`official_pca_images` (Pitts30k train)."""
    paths = list(paths)
    if not paths:
        raise ValueError("no images to fit the PCA on: pass training images (the authors use Pitts30k's "
                         "images/train, see official_pca_images)")
    paths = select_pca_images(paths, max_images, seed, config.protocol)
    return fit_pca(compute_descriptors(model, paths, config, desc="PCA descriptors"), dim)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def recall_columns(recalls: dict[int, float], bounds: dict[int, tuple[float, float]] | None = None) -> dict[str, float]:
    """The Recall@N columns of a results row: ``R@N`` (percent, 2 decimals), each followed by
    ``R@N lo`` and ``R@N hi`` when ``bounds`` (its interval) is given."""
    row: dict[str, float] = {}
    for n, v in recalls.items():
        row[f"R@{n}"] = round(v, 2)
        if bounds is not None:
            row[f"R@{n} lo"], row[f"R@{n} hi"] = (round(b, 2) for b in bounds[n])
    return row


@dataclass
class EvalResult:
    """Recall@N of one model on one split, with everything needed for galleries and tables."""

    split: VGSplit
    recalls: dict[int, float]
    predictions: np.ndarray  # (N_q, k) database indices, nearest first
    distances: np.ndarray  # (N_q, k) squared L2 distances
    correct: np.ndarray  # (N_q, k) bool
    database_descriptors: np.ndarray
    query_descriptors: np.ndarray
    model_name: str = ""
    pca_dim: int | None = None
    per_condition: pd.DataFrame | None = field(default=None)

    def table(self, intervals: bool = False, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
        """One row: model, dataset, split, dimension, R@N columns (percent, 2 decimals).

        ``intervals``: each ``R@N`` is followed by ``R@N lo`` and ``R@N hi``, its bootstrap
        interval over the queries (:meth:`intervals`); :func:`scicevpr.lab.viz.format_recalls`
        writes them as "11.4 [8.8, 14.2]"."""
        row = {
            "model": self.model_name,
            "dataset": self.split.dataset,
            "split": self.split.split,
            "dim": self.query_descriptors.shape[1],
        }
        row.update(recall_columns(self.recalls, self.intervals(level, seed) if intervals else None))
        return pd.DataFrame([row])

    def intervals(self, level: float = 0.95, seed: int = 0) -> dict[int, tuple[float, float]]:
        """Bootstrap interval of each Recall@N over the queries (:func:`recall_intervals`)."""
        return recall_intervals(self.correct, tuple(self.recalls), level=level, seed=seed)

    def chance(self) -> dict[int, float]:
        """Recall@N of a random ranking on this split (:func:`chance_recall`)."""
        return chance_recall(self.split.num_database, self.split.positives, tuple(self.recalls))

    def save_descriptors(self, folder: PathLike) -> tuple[Path, Path]:
        """Write ``database.npy`` and ``queries.npy`` (fp16) for reuse; returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = folder / "database.npy", folder / "queries.npy"
        for p, d in zip(paths, (self.database_descriptors, self.query_descriptors)):
            save_descriptors(p, d)
        return paths


def save_descriptors(path: PathLike, descriptors: np.ndarray) -> Path:
    """Save (N, D) descriptors as fp16 ``.npy``, atomically (:func:`scicevpr.files.atomic_write`)."""
    return atomic_write(path, lambda f: np.save(f, descriptors.astype(np.float16)))


def load_descriptors(path: PathLike) -> np.ndarray:
    """Load descriptors saved by :func:`save_descriptors` as float32."""
    try:
        return np.load(path).astype(np.float32)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, TypeError) as e:  # truncated, not .npy, or pickled objects
        error = ValueError(f"descriptor file {str(path)!r} is damaged or not a descriptor array ({e}); compute it "
                           f"again (the command that wrote it).")
        error.reason = str(e)  # for a caller that says how to rebuild it
        raise error from None


def load_descriptor_folder(folder: PathLike, split: VGSplit) -> tuple[np.ndarray, np.ndarray]:
    """``database.npy`` and ``queries.npy`` of a folder written by
    :meth:`EvalResult.save_descriptors`, checked against ``split`` (one row per image)."""
    folder = Path(folder)
    out = []
    for role, n in (("database", split.num_database), ("queries", split.num_queries)):
        path = folder / f"{role}.npy"
        if not path.is_file():
            raise FileNotFoundError(
                f"descriptor file {str(path)!r} does not exist: a descriptor folder holds database.npy and "
                f"queries.npy, as `scicevpr eval --save-descriptors FOLDER` writes them."
            )
        d = load_descriptors(path)
        check_finite_descriptors(d, f"descriptor file {str(path)!r}: its descriptors")
        if d.ndim != 2 or d.shape[0] != n:
            raise ValueError(
                f"{str(path)!r} holds {d.shape[0] if d.ndim else 0} descriptors but {split.dataset}/{split.split} has "
                f"{n} {role} images: it was computed on another split. Pass the same --dataset/--split it was saved with."
            )
        out.append(d)
    if out[0].shape[1] != out[1].shape[1]:
        raise ValueError(f"{str(folder)!r}: database ({out[0].shape[1]}-d) and queries ({out[1].shape[1]}-d) differ in dimension")
    return out[0], out[1]


def recall_by_condition(
    correct: np.ndarray, conditions: Sequence[str], recall_values: Sequence[int] = (1, 5, 10, 100),
    intervals: bool = False, level: float = 0.95, seed: int = 0,
) -> pd.DataFrame:
    """Recall@N per query condition (night, fog, ...): one row per condition plus "all".
    ``intervals``: ``R@N lo`` / ``R@N hi`` columns, the bootstrap interval over that
    condition's queries (:func:`recall_intervals`)."""
    conditions = np.asarray(conditions)
    if len(conditions) != correct.shape[0]:
        raise ValueError(f"{len(conditions)} conditions for {correct.shape[0]} queries")
    ranks = hit_ranks(correct)
    rows = []
    for cond in [*sorted(set(conditions.tolist())), "all"]:
        mask = np.ones(len(conditions), bool) if cond == "all" else conditions == cond
        row = {"condition": cond, "queries": int(mask.sum())}
        bounds = recall_intervals(correct[mask], recall_values, level=level, seed=seed) if intervals else None
        row.update(recall_columns(recalls_from_ranks(ranks[mask], recall_values), bounds))
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate(
    model: torch.nn.Module,
    split: VGSplit,
    config: EvalConfig = EvalConfig(),
    pca: PCA | None = None,
    name: str | None = None,
) -> EvalResult:
    """Recall@N of ``model`` on ``split`` under the VG-benchmark protocol (see module docstring)
    and ``config.protocol``.

    ``pca``: a fitted :class:`PCA` applied to both database and query descriptors.
    """
    if split.num_database == 0 or split.num_queries == 0:
        raise ValueError(f"{split.dataset}/{split.split} has {split.num_database} database images and "
                         f"{split.num_queries} queries; both must be non-empty")
    cls = type(model).__name__
    bs = eval_batch_size(config.protocol, cls, split.dataset, config.batch_size)  # CricaVPR, Pitts: 8
    qbs = eval_batch_size(config.protocol, cls, split.dataset, config.query_batch_size or config.batch_size)
    db = compute_descriptors(model, split.database_paths, config, batch_size=bs, desc=f"{split.dataset} database")
    q = compute_descriptors(model, split.query_paths, config, batch_size=qbs, desc=f"{split.dataset} queries")
    return score(model, split, db, q, config, pca, name)


def score(
    model: torch.nn.Module | None,
    split: VGSplit,
    database: np.ndarray,
    queries: np.ndarray,
    config: EvalConfig = EvalConfig(),
    pca: PCA | None = None,
    name: str | None = None,
) -> EvalResult:
    """Search and Recall@N for descriptors already computed."""
    if pca is not None:
        database, queries = pca.transform(database), pca.transform(queries)
    dist, pred = search(database, queries, max(config.recall_values))
    recalls, correct = recall_at_n(pred, split.positives, config.recall_values)
    per_condition = None
    if split.query_conditions is not None:
        per_condition = recall_by_condition(correct, split.query_conditions, config.recall_values)
    if name is None and model is not None:
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        name = f"{type(model).__name__} ({name})" if name != type(model).__name__ else name
    return EvalResult(split, recalls, pred, dist, correct, database, queries, name or "",
                      None if pca is None else pca.dim, per_condition)


# --------------------------------------------------------------------------------------------
# Batch stability (paper Fig. 1-2)
# --------------------------------------------------------------------------------------------


@dataclass
class StabilityFeatures:
    """What a batch-stability sweep reuses: the per-image regional features of the queries
    (computed once: they do not depend on the batch), the database descriptors (file order,
    batches of ``database_batch_size``) and the query descriptors encoded one at a time."""

    queries: torch.Tensor  # (N_q, R, C) regional features
    database: np.ndarray  # (N_db, D)
    alone: np.ndarray  # (N_q, D), batch size 1
    amp: bool = False
    group_size: int | None = None
    # (batch_size, order's bytes) -> (top-1 (N_q,), cosine to ``alone`` (N_q,)) of the settings
    # encoded so far, so that a second look at a setting (e.g. Fig. 1 after Fig. 2) is free
    settings_seen: dict = field(default_factory=dict, repr=False)

    def top1(self, queries: np.ndarray) -> np.ndarray:
        """(N_q,) index of each query's nearest database image (exact L2 :func:`search`)."""
        return search(self.database, queries, 1)[1][:, 0]

    def encode(self, model: torch.nn.Module, batch_size: int, order: np.ndarray) -> np.ndarray:
        """(N_q, D) query descriptors encoded in consecutive batches of ``batch_size`` taken in
        ``order`` (:func:`encode_in_batches`). A batch of one holds only its query, whatever the
        order: batch size 1 is ``alone`` itself, the same computation, not encoded again."""
        if batch_size == 1:
            return self.alone
        return encode_in_batches(model, self.queries, batch_size, order, amp=self.amp, group_size=self.group_size)

    @staticmethod
    def _key(batch_size: int, order: np.ndarray) -> tuple[int, bytes]:
        """A setting is its batch size and the order itself, so no other setting's result can
        answer for it."""
        return int(batch_size), np.asarray(order, dtype=np.int64).tobytes()

    def remember(self, batch_size: int, order: np.ndarray, queries: np.ndarray,
                 top1: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Record the top-1 and cosines to ``alone`` of ``queries``, encoded in batches of
        ``batch_size`` in ``order``; returns them."""
        top1 = self.top1(queries) if top1 is None else np.asarray(top1)
        seen = self.settings_seen[self._key(batch_size, order)] = (top1, descriptor_cosines(queries, self.alone))
        return seen

    def setting(self, model: torch.nn.Module, batch_size: int, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(top1, cosine)`` of the queries encoded in batches of ``batch_size`` in ``order``,
        encoded only when this setting was not seen before."""
        key = self._key(batch_size, order)
        if key not in self.settings_seen:
            self.remember(batch_size, order, self.encode(model, batch_size, order))
        return self.settings_seen[key]


def descriptor_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) descriptor matrices of the same images."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


def stability_features(model: torch.nn.Module, split: VGSplit, config: EvalConfig = EvalConfig(),
                       database_batch_size: int = 16, database: np.ndarray | None = None) -> StabilityFeatures:
    """The :class:`StabilityFeatures` of ``model`` on ``split`` (one backbone pass per image).
    ``database``: (N_db, D) descriptors already computed in file order in batches of
    ``database_batch_size`` (e.g. ``EvalResult.database_descriptors``), reused instead of a
    second pass over the database."""
    q_regional = compute_regional_features(model, split.query_paths, config, desc="query features")
    amp = amp_enabled(config, model_device(model))
    g = config.encoder_group_size
    if database is None:
        db_regional = compute_regional_features(model, split.database_paths, config, desc="database features")
        db = encode_in_batches(model, db_regional, database_batch_size, amp=amp, group_size=g)
    else:
        if database.shape[0] != split.num_database:
            raise ValueError(f"{database.shape[0]} database descriptors for {split.num_database} database images")
        db = np.asarray(database, dtype=np.float32)
    alone = encode_in_batches(model, q_regional, 1, amp=amp)
    return StabilityFeatures(q_regional, db, alone, amp, g)


def batch_orders(num_queries: int, num_orders: int, seed: int = 0) -> list[np.ndarray]:
    """File order (order 0), then ``num_orders - 1`` seeded random permutations of the queries."""
    rng = np.random.default_rng(seed)
    return [np.arange(num_queries)] + [rng.permutation(num_queries) for _ in range(num_orders - 1)]


def batch_companions(order: np.ndarray, batch_size: int, query: int) -> list[int]:
    """The other queries that share ``query``'s batch when ``order`` is cut into consecutive
    batches of ``batch_size`` (as :func:`encode_in_batches` does)."""
    pos = int(np.flatnonzero(np.asarray(order) == query)[0])
    start = pos - pos % batch_size
    return [int(i) for i in order[start : start + batch_size] if int(i) != query]


@torch.no_grad()
def encode_with_companions(model: torch.nn.Module, features: StabilityFeatures, query: int,
                           companions: Sequence[int]) -> np.ndarray:
    """(D,) descriptor of ``query`` encoded in one batch with ``companions`` (query indices):
    the experiment of the paper's Fig. 1 for any choice of batch."""
    idx = [int(query), *[int(c) for c in companions if int(c) != int(query)]]
    order = np.asarray(idx)
    out = encode_in_batches(model, features.queries[torch.as_tensor(order)], len(idx), amp=features.amp,
                            group_size=features.group_size)
    return out[0]


def top1_changes(top1: np.ndarray, reference: np.ndarray) -> int:
    """How many queries have another nearest database image than in ``reference``."""
    return int((np.asarray(top1) != np.asarray(reference)).sum())


def batch_stability(
    model: torch.nn.Module,
    split: VGSplit,
    query_batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
    num_orders: int = 3,
    seed: int = 0,
    database_batch_size: int = 16,
    config: EvalConfig = EvalConfig(),
    name: str | None = None,
    features: StabilityFeatures | None = None,
    intervals: bool = False,
) -> pd.DataFrame:
    """Recall of ``model`` when the queries are encoded with other batch sizes and orders.

    The database is encoded in file order, in batches of ``database_batch_size``; the queries
    with every batch size in ``query_batch_sizes``, in file order (``order`` 0) and in
    ``num_orders - 1`` random orders (1, 2, ...). Returns a tidy table: one row per
    (batch_size, order) with R@N and, against encoding the queries one at a time (batch size 1):
    ``top1_changed`` (queries whose nearest database image is another one, the paper's Fig. 1),
    ``correct_changed`` (queries whose top-1 turns from right to wrong or from wrong to right: the
    flips that move Recall@1; ``correct_gained`` / ``correct_lost`` split them),
    ``min_cosine`` / ``mean_cosine`` (cosine of each query descriptor to its batch-size-1 one) and
    ``max_abs_change`` (the largest change of any descriptor component); ``typical_component``
    is the median |component| of the batch-size-1 descriptors, the scale to read changes on.
    ``features``: a :func:`stability_features` result to reuse (else computed here).
    ``intervals``: ``R@N lo`` / ``R@N hi`` columns, each setting's bootstrap interval over queries.
    """
    name = name or f"{type(model).__name__}"
    f = features if features is not None else stability_features(model, split, config, database_batch_size)
    alone = f.alone
    res_alone = score(None, split, f.database, alone, config)
    top1_alone, right_alone = res_alone.predictions[:, 0], res_alone.correct[:, 0]
    typical = float(np.median(np.abs(alone)))
    rows = []
    for bs in query_batch_sizes:
        for o, order in enumerate(batch_orders(split.num_queries, num_orders, seed)):
            q = f.encode(model, bs, order)
            res = score(None, split, f.database, q, config)
            _, cos = f.remember(bs, order, q, res.predictions[:, 0])
            row = {"model": name, "batch_size": bs, "order": o,
                   "max_abs_change": float(np.abs(q - alone).max()),
                   "top1_changed": top1_changes(res.predictions[:, 0], top1_alone),
                   "correct_changed": int((res.correct[:, 0] != right_alone).sum()),
                   "correct_gained": int((res.correct[:, 0] & ~right_alone).sum()),
                   "correct_lost": int((~res.correct[:, 0] & right_alone).sum()),
                   "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                   "typical_component": typical}
            row.update(recall_columns(res.recalls, recall_intervals(res.correct, tuple(res.recalls)) if intervals else None))
            rows.append(row)
    return pd.DataFrame(rows)


def stability_summary(table: pd.DataFrame, metric: str = "R@1") -> pd.DataFrame:
    """Per model: min, max and spread (max - min) of ``metric`` over all batch settings, the
    largest descriptor change, and (where :func:`batch_stability` counted them) the most queries
    whose top-1 changed (``top1_changed``) and whose top-1 *correctness* changed
    (``correct_changed``) in one setting against batch size 1."""
    by_model = table.groupby("model", sort=False)
    g = by_model[metric]
    out = pd.DataFrame({"min": g.min(), "max": g.max()})
    out["spread"] = (out["max"] - out["min"]).round(2)
    out["max_abs_change"] = by_model["max_abs_change"].max()
    for column in ("top1_changed", "correct_changed"):
        if column in table:
            out[column] = by_model[column].max()
    return out.reset_index()
