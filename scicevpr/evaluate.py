"""Evaluation: descriptors, exact FAISS search, Recall@N with intervals and chance, PCA.

Protocol (docs/method.md, "Evaluation protocol", the Visual Geo-localization Benchmark convention):
database and query images are hard-resized to the model size and fed **in file order, in
batches of 16** (this matters only for cross-image models: the teacher, CricaVPR); descriptors
are searched exhaustively with ``faiss.IndexFlatL2``; a query is correct at N when one of its N
nearest database images lies within 25 m. ``Recall@N`` is the percentage of correct queries.

The batch-stability experiment (paper Fig. 1-2) is in :mod:`scicevpr.stability`. A ``cache``
(:class:`FeatureCache`, e.g. the offline notebooks' :class:`~scicevpr.offline.cache.BackboneCache`)
may be passed to keep the backbone's outputs for reuse; without one, nothing is hashed or kept.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import faiss
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ._lazy import moved_attributes
from .config import EvalConfig
from .data.decode import JpegBytesDataset, collate_jpeg_bytes, decode_jpeg_bytes
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
from .runtime import resolve_device

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


class FeatureCache(Protocol):
    """What evaluation and training accept as ``cache``: ``extractor(model)`` gives a function
    ``x -> model.extract_features(x)`` for one pass during which the backbone does not change
    (:class:`scicevpr.offline.cache.BackboneCache`, the offline notebooks' economy). Without a
    cache, ``model.extract_features`` runs as it is: nothing is hashed or kept."""

    def extractor(self, model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]: ...


def per_image_function(model: torch.nn.Module, config: EvalConfig, device: torch.device,
                       cache: FeatureCache | None = None):
    """``x -> regional features (B, R, C)``: the batch-independent part of the model, compiled
    with ``torch.compile`` on the fast CUDA path (the last, smaller batch is padded so one
    graph serves every batch; padding is harmless because nothing here mixes images). Elsewhere
    the backbone's outputs go through ``cache`` when one is given."""
    if not (fast_enabled(config, device) and device.type == "cuda"):
        extract = model.extract_features if cache is None else cache.extractor(model)
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


def prepare_model(model: torch.nn.Module, config: EvalConfig) -> torch.device:
    """Move ``model`` to ``config.device`` (when set; ``"auto"``: CUDA when there is one), switch
    it to eval mode; its device."""
    if config.device is not None:
        model.to(resolve_device(config.device))
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
        ds = ImageFileDataset(paths, transform=eval_transform(image_size, protocol))
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
    cache: FeatureCache | None = None,
) -> np.ndarray:
    """(N, D) float32 descriptors of image files, fed in the order of ``paths`` in batches of
    ``batch_size`` (default ``config.batch_size``), as the VG-benchmark protocol does. The
    cross-image encoder sees exactly each batch, or its groups of ``config.encoder_group_size``.
    ``cache``: a :class:`FeatureCache` for the backbone's outputs (None: none)."""
    if isinstance(paths, (str, os.PathLike)):  # not its characters, one by one
        raise TypeError(f"compute_descriptors takes a list of image files, got one path {str(paths)!r}; for a "
                        f"folder's images pass scicevpr.data.vg.list_images(folder)")
    device = prepare_model(model, config)
    bs = batch_size or config.batch_size
    amp = amp_enabled(config, device)
    groups = num_groups(bs, config.encoder_group_size)
    features = per_image_function(model, dataclasses.replace(config, batch_size=bs), device, cache)
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


# --------------------------------------------------------------------------------------------
# Search and recall
# --------------------------------------------------------------------------------------------


def search(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 search (``faiss.IndexFlatL2``): (distances, indices), each (N_q, min(k, N_db))."""
    if database.ndim != 2 or queries.ndim != 2 or database.shape[1] != queries.shape[1]:
        raise ValueError(f"descriptor shapes do not match: database {database.shape}, queries {queries.shape}")
    if len(database) == 0 or k < 1:
        raise ValueError(f"search needs a non-empty database and k >= 1 neighbours; got {len(database)} database "
                         f"descriptors and k={k}")
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
    if x.ndim != 2 or len(x) < 2 or dim < 1:
        raise ValueError(f"PCA needs (N, D) samples with N >= 2 and dim >= 1 components; got shape "
                         f"{tuple(x.shape)} and dim={dim}")
    n, d_in = x.shape
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
    ``R@N lo`` and ``R@N hi`` when ``bounds`` holds its interval. Every table of recalls in the
    package builds its row here."""
    row: dict[str, float] = {}
    for n, v in recalls.items():
        row[f"R@{n}"] = round(v, 2)
        if bounds is not None and n in bounds:
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
    cache: FeatureCache | None = None,
) -> EvalResult:
    """Recall@N of ``model`` on ``split`` under the VG-benchmark protocol (see module docstring)
    and ``config.protocol``.

    ``pca``: a fitted :class:`PCA` applied to both database and query descriptors.
    ``cache``: a :class:`FeatureCache` for the backbone's outputs (the offline notebooks'
    :class:`~scicevpr.offline.cache.BackboneCache`); the numbers are the same without it.
    """
    if not isinstance(split, VGSplit) or not isinstance(config, EvalConfig):
        raise TypeError(f"evaluate(model, split, config) takes a VGSplit (scicevpr.data.load_vg_split(root, dataset, "
                        f"split)) and an EvalConfig; got {type(split).__name__} and {type(config).__name__}")
    if split.num_database == 0 or split.num_queries == 0:
        raise ValueError(f"{split.dataset}/{split.split} has {split.num_database} database images and "
                         f"{split.num_queries} queries; both must be non-empty")
    cls = type(model).__name__
    bs = eval_batch_size(config.protocol, cls, split.dataset, config.batch_size)  # CricaVPR, Pitts: 8
    qbs = eval_batch_size(config.protocol, cls, split.dataset, config.query_batch_size or config.batch_size)
    db = compute_descriptors(model, split.database_paths, config, batch_size=bs, desc=f"{split.dataset} database",
                             cache=cache)
    q = compute_descriptors(model, split.query_paths, config, batch_size=qbs, desc=f"{split.dataset} queries",
                            cache=cache)
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


# The batch-stability sweep moved to scicevpr.stability, the baselines without learning to
# scicevpr.lab.baselines, the notebooks' choice of N to scicevpr.lab.analysis, the backbone cache's
# class to scicevpr.offline.cache; their names still import from here.
__getattr__ = moved_attributes(__name__, {
    "scicevpr.stability": (
        "StabilityFeatures", "batch_companions", "batch_orders", "batch_stability", "compute_regional_features",
        "descriptor_cosines", "encode_in_batches", "encode_with_companions", "stability_features",
        "stability_summary", "top1_changes"),
    "scicevpr.lab.baselines": (
        "colour_baseline_result", "colour_histogram_descriptors", "pixel_baseline_result", "pixel_descriptors"),
    "scicevpr.lab.analysis": ("informative_recall_values",),
    "scicevpr.offline.cache": ("BackboneCache",),
}, removed={
    "BACKBONE_CACHE": "the backbone cache is no longer module state; create a scicevpr.offline.cache.BackboneCache "
                      "and pass it as cache= to evaluate(), the stability sweep and training",
    "feature_extractor": "it served BACKBONE_CACHE; evaluate(..., cache=BackboneCache(...)) uses a cache",
    "pixel_baseline_recall": "use scicevpr.lab.baselines.pixel_baseline_result(split, ...).recalls",
})
