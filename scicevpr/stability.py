"""Batch stability (paper Fig. 1-2): how a model's descriptors and Recall@N change when the
queries are encoded in other batches.

A cross-image model (Super-CricaVPR, CricaVPR) lets the images of a batch see each other in its
encoder, so a query's descriptor ``X_T`` depends on its companions; SciceVPR's self-enhanced
encoder sees one image at a time and ``X_S`` does not. The sweep measures it without paying a
backbone pass per setting: the per-image part of the model (backbone, fusion, pooling: the
regional features, ``(N, R, C)``) is computed once (:func:`compute_regional_features`), and only
the encoder, the single step where images can meet, is re-run for each query batch size and
order (:func:`encode_in_batches`). The database is encoded once in file order, in batches of 16,
as the evaluation protocol does (:mod:`scicevpr.evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .config import EvalConfig
from .data.vg import VGSplit
from .evaluate import (
    FeatureCache,
    PathLike,
    amp_enabled,
    gpu_decode_enabled,
    iterate_images,
    per_image_function,
    prepare_model,
    recall_columns,
    recall_intervals,
    score,
    search,
)
from .precision import autocast, model_device, resolve_amp
from .protocol import num_groups


@torch.no_grad()
def compute_regional_features(
    model: torch.nn.Module, paths: Sequence[PathLike], config: EvalConfig = EvalConfig(), desc: str = "features",
    cache: FeatureCache | None = None,
) -> torch.Tensor:
    """(N, R, C) per-image regional features (everything before the encoder), on the CPU, fp32.

    These do not depend on the batch, so they are computed once; :func:`encode_in_batches`
    then replays the encoder under any batching. ``cache``: as in :func:`scicevpr.evaluate.evaluate`.
    """
    device = prepare_model(model, config)
    amp = amp_enabled(config, device)
    features = per_image_function(model, config, device, cache)
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
                       database_batch_size: int = 16, database: np.ndarray | None = None,
                       cache: FeatureCache | None = None) -> StabilityFeatures:
    """The :class:`StabilityFeatures` of ``model`` on ``split`` (one backbone pass per image).
    ``database``: (N_db, D) descriptors already computed in file order in batches of
    ``database_batch_size`` (e.g. ``EvalResult.database_descriptors``), reused instead of a
    second pass over the database. ``cache``: as in :func:`scicevpr.evaluate.evaluate`."""
    q_regional = compute_regional_features(model, split.query_paths, config, desc="query features", cache=cache)
    amp = amp_enabled(config, model_device(model))
    g = config.encoder_group_size
    if database is None:
        db_regional = compute_regional_features(model, split.database_paths, config, desc="database features",
                                                cache=cache)
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
    cache: FeatureCache | None = None,
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
    ``cache``: as in :func:`scicevpr.evaluate.evaluate`, for the features computed here.
    """
    name = name or f"{type(model).__name__}"
    f = features if features is not None else stability_features(model, split, config, database_batch_size,
                                                                  cache=cache)
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
