"""A saved map: database descriptors and a FAISS index on disk, queried later without
recomputing the database (``scicevpr index build`` / ``scicevpr index query``).

An index folder holds::

    index.json        format, database folder, index kind and parameters, the model's identity
    index.faiss       the FAISS index (faiss.write_index)
    descriptors.npy   (N, D) database descriptors, fp32, the values the index holds (an index
                      written before 2026-12 holds them rounded to fp16)
    files.txt         the N database files, relative to the database folder, in row order
    skipped.txt       unreadable files left out (only when skip_unreadable left some out)

The model's identity (class, configuration, SHA-256 of every weight) and the evaluation settings
that shape its descriptors (protocol; encoder group size of a cross-image model) are recorded,
and a query with another model or other settings is refused: its descriptors would live in
another space.

The queries are encoded in batches of ``EvalConfig.query_batch_size`` (default the query's own
``batch_size``; the index records its database's as ``database_batch_size``); a cross-image
model's descriptors depend on it (:func:`scicevpr.search.search_settings`, written to the
query's ``settings.json``).

Index kinds (:class:`IndexConfig`): ``flat`` (default) is exact L2 search on the fp32
descriptors, the same ranking as :func:`scicevpr.evaluate.search` (``scicevpr eval``); ``ivf`` (``IndexIVFFlat``: k-means cells, ``nprobe`` of them
visited) and ``hnsw`` (``IndexHNSWFlat``: a navigable small-world graph) are approximate,
faster on large maps. :func:`approximate_recall` measures how many of the exact neighbours an
approximate index returns; docs/tools.md and ``benchmarks/index_recall.md`` state it on the
synthetic benchmark.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import check_number_fields
from .search import SearchResult, describe_folder, make_result, model_label, search_settings, write_skipped

PathLike = str | os.PathLike

FORMAT = "scicevpr-index"
VERSION = 2  # 2: descriptor settings recorded, weights hashed from the whole state dict
MANIFEST_FILE = "index.json"
INDEX_FILE = "index.faiss"
DESCRIPTORS_FILE = "descriptors.npy"
FILES_FILE = "files.txt"
KINDS = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class IndexConfig:
    """Which FAISS index is built. Defaults: exact search.

    Attributes:
        kind: ``"flat"`` (exact L2), ``"ivf"`` (IndexIVFFlat) or ``"hnsw"`` (IndexHNSWFlat).
        nlist: IVF cells; None: ``4 sqrt(N)`` capped at ``N / 39`` (k-means wants 39 points per
            cell) and at least 1.
        nprobe: IVF cells visited per query (more: slower, closer to exact).
        hnsw_m: HNSW neighbours per node.
        ef_construction: HNSW candidate list while building.
        ef_search: HNSW candidate list while searching (more: slower, closer to exact).
    """

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int = 8
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; expected one of {list(KINDS)}")
        check_number_fields(self, "IndexConfig.")
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexConfig.{name} must be at least 1, got {getattr(self, name)}")

    def num_lists(self, n: int) -> int:
        """The IVF cell count used for ``n`` database vectors."""
        if self.nlist is not None:
            return max(1, min(self.nlist, n))
        return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


# --------------------------------------------------------------------------------------------
# FAISS indexes
# --------------------------------------------------------------------------------------------


def make_faiss_index(descriptors: np.ndarray, config: IndexConfig = IndexConfig()):
    """A FAISS L2 index of ``descriptors`` (N, D), trained (IVF) and filled."""
    import faiss

    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"cannot index descriptors of shape {x.shape}: need (N >= 1, D)")
    n, d = x.shape
    if config.kind == "flat":
        index = faiss.IndexFlatL2(d)
    elif config.kind == "ivf":
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, config.num_lists(n), faiss.METRIC_L2)
        index.train(x)
    else:
        index = faiss.IndexHNSWFlat(d, config.hnsw_m)
        index.hnsw.efConstruction = config.ef_construction
    index.add(x)
    set_search_parameters(index, config)
    return index


def set_search_parameters(index, config: IndexConfig) -> None:
    """``nprobe`` / ``efSearch`` (not all of them survive ``faiss.write_index``)."""
    import faiss

    if config.kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = config.nprobe
    elif config.kind == "hnsw":
        index.hnsw.efSearch = config.ef_search


def search_index(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(squared L2 distances, indices), each (N_q, min(k, N)); -1 where an approximate index
    found fewer than k neighbours."""
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def approximate_recall(database: np.ndarray, queries: np.ndarray, config: IndexConfig, k: int = 10) -> dict[str, float]:
    """How close an approximate index comes to exact search on these descriptors.

    Returns ``recall@k``: the mean fraction of each query's exact ``k`` nearest neighbours that
    the index returns among its ``k`` (FAISS's "k-NN recall"), and ``top1``: the fraction of
    queries whose nearest neighbour is the exact one.
    """
    from .evaluate import search

    _, exact = search(database, queries, k)
    _, approx = search_index(make_faiss_index(database, config), queries, k)
    overlap = [len(np.intersect1d(e, a[a >= 0])) / len(e) for e, a in zip(exact, approx)]
    return {f"recall@{exact.shape[1]}": float(np.mean(overlap)), "top1": float(np.mean(exact[:, 0] == approx[:, 0]))}


# --------------------------------------------------------------------------------------------
# Model identity
# --------------------------------------------------------------------------------------------


def descriptor_settings(model, eval_config=None) -> dict[str, Any]:
    """The evaluation settings that change the descriptor space beside the weights:
    ``protocol`` (the official protocol resizes differently) and, for a cross-image model only,
    ``encoder_group_size`` (the images its encoder attends to). ``eval_config`` None: the
    defaults; ``model`` None: one taken as cross-image."""
    from .config import EvalConfig

    cfg = EvalConfig() if eval_config is None else eval_config
    return {"protocol": cfg.protocol,
            "encoder_group_size": cfg.encoder_group_size if getattr(model, "cross_image", True) else None}


def model_identity(model, eval_config=None) -> dict[str, Any]:
    """The model class, its configuration, a SHA-256 of all its weights (every parameter and
    buffer of the state dict, whatever its ``requires_grad``; BatchNorm step counters aside) and
    the :func:`descriptor_settings` of ``eval_config``: two models with the same identity give the
    same descriptors."""
    from .checkpoint import config_to_dict
    from .weights import hash_tensors

    weights = sorted(((n, t) for n, t in model.state_dict().items()
                      if not n.endswith("num_batches_tracked")), key=lambda nt: nt[0])  # BatchNorm step counters: no effect on descriptors
    h = hash_tensors(hashlib.sha256(), weights)
    return {"model_class": type(model).__name__, "config": config_to_dict(model.config),
            "weights_sha256": h.hexdigest(), "label": model_label(model),
            "settings": descriptor_settings(model, eval_config)}


def identity_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two identities, in words (empty when they give the same descriptors)."""
    out = []
    if recorded["model_class"] != current["model_class"]:
        out.append(f"model class {recorded['model_class']} -> {current['model_class']}")
    a, b = recorded["config"], current["config"]
    flat = lambda d: {**{k: v for k, v in d.items() if k != "backbone"}, **{f"backbone_{k}": v for k, v in d.get("backbone", {}).items()}}
    fa, fb = flat(a), flat(b)
    for key in sorted(set(fa) | set(fb)):
        if fa.get(key) != fb.get(key):
            out.append(f"{key} {fa.get(key)!r} -> {fb.get(key)!r}")
    if not out and recorded["weights_sha256"] != current["weights_sha256"]:
        out.append(f"weights (sha256 {recorded['weights_sha256'][:12]}... -> {current['weights_sha256'][:12]}...)")
    # An identity without settings (an index of format 1, written before they were recorded) is
    # taken as built with the defaults, what `index build` used unless told otherwise.
    defaults = descriptor_settings(None)
    sa, sb = recorded.get("settings", defaults), current.get("settings", defaults)
    for key in defaults:
        if sa.get(key) != sb.get(key):
            out.append(f"{key} {sa.get(key)!r} -> {sb.get(key)!r}")
    return out


def settings_options(settings: dict[str, Any]) -> str:
    """The command-line options that give these :func:`descriptor_settings`."""
    group = settings.get("encoder_group_size")
    return f"--protocol {settings.get('protocol', 'default')}" + (f" --encoder-group-size {group}" if group else "")


# --------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------


@dataclass
class SavedIndex:
    """An index folder in memory (:func:`load_index`)."""

    folder: Path
    manifest: dict[str, Any]
    database_root: Path
    files: list[str]  # relative to database_root, in row order
    descriptors: np.ndarray  # (N, D) float32
    index: Any = field(repr=False)

    @property
    def config(self) -> IndexConfig:
        return IndexConfig(**self.manifest["index"])

    @property
    def database_paths(self) -> list[Path]:
        return [self.database_root / f for f in self.files]

    def check_model(self, model, config=None) -> None:
        """Raise a ValueError when ``model`` under ``config`` (:class:`scicevpr.config.EvalConfig`)
        does not give the descriptors the index was built with (another model, other weights,
        another protocol or encoder group size)."""
        rec = self.manifest["model"]
        diff = identity_differences(rec, model_identity(model, config))
        if diff:
            settings = rec.get("settings", descriptor_settings(None))  # format 1: the defaults
            source = f", made with {self.manifest['model_source']}" if self.manifest.get("model_source") else ""
            old = ""
            if self.manifest.get("version", 0) < 2:
                old = (f" This index was written by an older scicevpr (index format {self.manifest.get('version', 0)}), which "
                       "hashed the weights another way, so even the model that built it shows other weights here, and which "
                       "did not record the settings (taken as the defaults): rebuild it (scicevpr index build --overwrite).")
            raise ValueError(
                f"index {str(self.folder)!r} was built with another model or other descriptor settings ({rec['label']}{source}; "
                f"{settings_options(settings)}); this query differs in: {'; '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}. "
                "Its descriptors would not be comparable: query with the model and settings that built the index "
                f"({settings_options(settings)}; in Python the EvalConfig fields of these names), or rebuild the index with "
                f"these (scicevpr index build).{old}"
            )

    def query(self, model, queries: PathLike, k: int = 5, config=None, skip_unreadable: bool = False,
              radius: float = 25.0, check_model: bool = True) -> SearchResult:
        """The ``k`` nearest database images of every image below ``queries``, from the saved
        index (the database is not recomputed). Recall@N as in :func:`scicevpr.search.search_folders`."""
        from .config import EvalConfig

        config = EvalConfig() if config is None else config
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if check_model:
            self.check_model(model, config)
        q_paths, q, skipped = describe_folder(model, queries, "query", config, skip_unreadable)
        if q.shape[1] != self.descriptors.shape[1]:
            raise ValueError(f"query descriptors are {q.shape[1]}-d but the index holds {self.descriptors.shape[1]}-d ones")
        _, pred = search_index(self.index, q, max([k, *config.recall_values]))
        settings = search_settings(model, config, self.manifest.get("database_batch_size"))
        return make_result(self.database_root, queries, self.database_paths, q_paths, self.descriptors, q, pred,
                           config.recall_values, radius, model_label(model), skipped, settings)


def build_index(model, database: PathLike, out: PathLike, config: IndexConfig = IndexConfig(), eval_config=None,
                skip_unreadable: bool = False, model_source: str | None = None, overwrite: bool = False) -> SavedIndex:
    """Describe every image below ``database`` and write an index folder at ``out``.

    Args:
        model: the model whose descriptors fill the index (its identity is recorded).
        database: folder of .jpg/.jpeg/.png files, searched recursively.
        out: the index folder (must not hold an index unless ``overwrite``).
        config: which FAISS index (:class:`IndexConfig`; default exact).
        eval_config: :class:`scicevpr.config.EvalConfig` for the descriptors.
        skip_unreadable: leave out undecodable files (listed in ``skipped.txt``) instead of raising.
        model_source: how the model was made, for error messages (e.g. ``"--checkpoint runs/s/best.pt"``).
    """
    import faiss

    from .config import EvalConfig
    from .files import atomic_write

    out = Path(out)
    if (out / MANIFEST_FILE).exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} already holds an index; pass --overwrite (overwrite=True) or another folder.")
    database = Path(database).resolve()
    paths, desc, skipped = describe_folder(model, database, "database", eval_config, skip_unreadable)
    desc = np.ascontiguousarray(desc, dtype=np.float32)  # fp32, as eval ranks; descriptors.npy holds the same
    index = make_faiss_index(desc, config)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / DESCRIPTORS_FILE, lambda f: np.save(f, desc))
    faiss.write_index(index, str(out / INDEX_FILE))
    files = [p.relative_to(database).as_posix() for p in paths]
    (out / FILES_FILE).write_text("".join(f"{f}\n" for f in files))
    write_skipped(out, skipped)  # an overwritten index keeps no older list
    from . import __version__

    manifest = {
        "format": FORMAT, "version": VERSION, "scicevpr": __version__,
        "database_root": str(database), "count": len(files), "dim": int(desc.shape[1]),
        "index": asdict(config), "skipped": len(skipped),
        "database_batch_size": (EvalConfig() if eval_config is None else eval_config).batch_size,
        "model": model_identity(model, eval_config), "model_source": model_source,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return SavedIndex(out, manifest, database, files, desc, index)


MANIFEST_KEYS = ("count", "dim", "index", "model", "database_root")  # what load_index and queries read


def damaged_index(folder: Path, name: str, reason: str) -> str:
    """The message for an index file that cannot be read."""
    return (f"index {str(folder)!r}: {name} is damaged ({reason}). Rebuild the index: scicevpr index build "
            f"--database DIR --out {folder} --overwrite (with the model that built it).")


def load_index(folder: PathLike, database_root: PathLike | None = None) -> SavedIndex:
    """Read an index folder written by :func:`build_index`.

    ``database_root``: where the database images are now, when they moved (only the contact
    sheet reads them).
    """
    import faiss

    from .evaluate import load_descriptors

    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a scicevpr index: {MANIFEST_FILE} is missing. Build one with "
            "`scicevpr index build --database DIR --out FOLDER`."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(damaged_index(folder, MANIFEST_FILE, f"not JSON: {e}")) from None
    if not isinstance(manifest, dict):
        raise ValueError(damaged_index(folder, MANIFEST_FILE, "not a JSON object"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{str(manifest_path)!r} is not a scicevpr index manifest (format {manifest.get('format')!r}).")
    if manifest.get("version", 0) > VERSION:
        raise ValueError(f"index {str(folder)!r} has version {manifest['version']}; this scicevpr reads <= {VERSION}. Upgrade scicevpr.")
    for name in (INDEX_FILE, DESCRIPTORS_FILE, FILES_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"index {str(folder)!r} lacks {name}; the folder is incomplete: rebuild it with `scicevpr index build`.")
    lacking = [k for k in MANIFEST_KEYS if k not in manifest]
    if not lacking:
        lacking = [k for k in ("model", "index") if not isinstance(manifest[k], dict)]
        lacking += [] if lacking or "label" in manifest["model"] else ["model.label"]
    if lacking:
        raise ValueError(damaged_index(folder, MANIFEST_FILE, f"entries missing or malformed: {', '.join(lacking)}"))
    try:
        config = IndexConfig(**manifest["index"])
    except (TypeError, ValueError) as e:
        raise ValueError(damaged_index(folder, MANIFEST_FILE, f"its index entry: {e}")) from None
    try:
        files = (folder / FILES_FILE).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(damaged_index(folder, FILES_FILE, f"not UTF-8 text: {e}")) from None
    try:
        desc = load_descriptors(folder / DESCRIPTORS_FILE)
    except ValueError as e:
        raise ValueError(damaged_index(folder, DESCRIPTORS_FILE, getattr(e, "reason", str(e)))) from None
    if desc.ndim != 2:
        raise ValueError(damaged_index(folder, DESCRIPTORS_FILE, f"an array of shape {desc.shape}, not (images, dim)"))
    try:
        index = faiss.read_index(str(folder / INDEX_FILE))
    except RuntimeError as e:
        raise ValueError(damaged_index(folder, INDEX_FILE, str(e).strip().splitlines()[-1])) from None
    if not (len(files) == desc.shape[0] == index.ntotal == manifest["count"]):
        raise ValueError(
            f"index {str(folder)!r} is inconsistent: {len(files)} files, {desc.shape[0]} descriptors, {index.ntotal} "
            f"indexed vectors, {manifest['count']} in the manifest. Rebuild it with `scicevpr index build`."
        )
    set_search_parameters(index, config)
    root = Path(database_root) if database_root is not None else Path(manifest["database_root"])
    return SavedIndex(folder, manifest, root, files, desc, index)


def describe(saved: SavedIndex) -> str:
    """One line about an index: images, dimension, kind, model."""
    import faiss

    cfg = saved.config
    nlist = faiss.extract_index_ivf(saved.index).nlist if cfg.kind == "ivf" else None
    kind = {"flat": "exact (flat L2)", "ivf": f"IVF, {nlist} cells, nprobe {cfg.nprobe}",
            "hnsw": f"HNSW, M {cfg.hnsw_m}, efSearch {cfg.ef_search}"}[cfg.kind]
    return (f"index {saved.folder}: {saved.manifest['count']} images of {saved.database_root}, {saved.manifest['dim']}-d, "
            f"{kind}, model {saved.manifest['model']['label']}")


def measure_recall(database: np.ndarray, queries: np.ndarray, configs: Sequence[IndexConfig], k: int = 10):
    """A table of :func:`approximate_recall` for several index configurations."""
    import pandas as pd

    rows = []
    for c in configs:
        row = {"kind": c.kind, "nlist": c.num_lists(len(database)) if c.kind == "ivf" else "-",
               "nprobe": c.nprobe if c.kind == "ivf" else "-", "hnsw_m": c.hnsw_m if c.kind == "hnsw" else "-",
               "ef_search": c.ef_search if c.kind == "hnsw" else "-"}
        row.update({k_: round(v, 4) for k_, v in approximate_recall(database, queries, c, k).items()})
        rows.append(row)
    return pd.DataFrame(rows)
