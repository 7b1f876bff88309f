"""Place recognition on your own photos: folders without labels in, nearest database images out.

``scicevpr search --database DIR --queries DIR`` and :func:`search_folders`: every ``.jpg``,
``.jpeg`` or ``.png`` file below each folder (any names, any nesting) is described with the
evaluation protocol's descriptors (:func:`scicevpr.evaluate.compute_descriptors`), the database
is searched exactly (:func:`scicevpr.evaluate.search`), and per query the top-k database files
and their similarities are written to a CSV, with a contact sheet (PNG) of the first queries.

Where every file name carries UTM fields (``@east@north@...@.jpg``, the VG-benchmark names),
Recall@N is computed as ``scicevpr eval`` does (:func:`scicevpr.evaluate.recall_at_n`).

The database is encoded in batches of ``EvalConfig.batch_size`` (16), the queries in batches of
``query_batch_size`` (default the same). Only a cross-image model (the teacher, CricaVPR) gives
other descriptors under another batching; ``settings.json`` records both sizes and whether the
model's descriptors depend on them (:func:`search_settings`).

The similarity of a query and a database image is the inner product of their descriptors,
their cosine similarity since descriptors have unit norm (1: identical, about 0: unrelated).
:mod:`scicevpr.index` shares :class:`SearchResult` and :func:`write_search_outputs`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ._lazy import moved_attributes
from .data.paths import PHOTO_SUFFIXES

PathLike = str | os.PathLike

JPEG_SUFFIXES = (".jpg", ".jpeg")
MATCHES_FILE = "matches.csv"
SHEET_FILE = "contact_sheet.png"
SKIPPED_FILE = "skipped.txt"
RECALLS_FILE = "recalls.csv"
SETTINGS_FILE = "settings.json"
SIMILARITY_CHUNK_BYTES = 1 << 24  # the database neighbours gathered at once by make_result (16 MiB)


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def list_images(folder: PathLike, role: str = "image") -> list[Path]:
    """Every ``.jpg`` / ``.jpeg`` / ``.png`` file below ``folder`` (any case, any depth;
    dot-files skipped), sorted by relative POSIX path (:func:`scicevpr.data.vg.list_images`). A missing folder or one without images raises, naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{role} folder {str(folder)!r} does not exist. Pass a folder of .jpg/.png photos (subfolders allowed).")
    from .data.vg import files_below, list_images as vg_list_images  # torch-free import of this module (--help)

    paths = vg_list_images(folder, PHOTO_SUFFIXES, ignore_case=True)
    if not paths:
        files = files_below(folder)
        others = sorted({p.suffix.lower() or "(no extension)" for p in files})
        found = f" it holds {len(files)} other files ({', '.join(others[:8])})" if files else " it is empty"
        raise ValueError(
            f"{role} folder {str(folder)!r} has no images:{found}. Put .jpg, .jpeg or .png photos in it "
            "(subfolders allowed) or convert them."
        )
    return paths


def readable_images(paths: Sequence[Path], folder: PathLike, role: str, skip_unreadable: bool = False,
                    progress: bool = True) -> tuple[list[Path], list[Path]]:
    """``(readable, skipped)``: every file is test-decoded (:func:`~scicevpr.data.decode.find_corrupt_images`).
    Unreadable files raise a ValueError naming them, unless ``skip_unreadable`` leaves them out."""
    from .data.decode import find_corrupt_images

    bad = set(find_corrupt_images(paths, progress=progress))
    if not bad:
        return list(paths), []
    skipped = [p for p in paths if p in bad]
    if not skip_unreadable:
        first = ", ".join(repr(str(p)) for p in skipped[:3])
        raise ValueError(
            f"{len(skipped)} of {len(paths)} files in the {role} folder {str(folder)!r} cannot be decoded "
            f"(corrupt, truncated or not images), e.g. {first}{' ...' if len(skipped) > 3 else ''}. Delete or "
            "replace them, or pass --skip-unreadable (skip_unreadable=True) to leave them out; they are then "
            f"counted and listed in {SKIPPED_FILE}."
        )
    readable = [p for p in paths if p not in bad]
    if not readable:
        raise ValueError(f"none of the {len(paths)} files in the {role} folder {str(folder)!r} can be decoded.")
    return readable, skipped


def write_skipped(out: Path, skipped: Sequence[Path]) -> Path | None:
    """``out/skipped.txt``: the files left out, one per line. With none left out there is no such
    file: one that an earlier run left in the same folder is removed. Returns its path, or None."""
    path = Path(out) / SKIPPED_FILE
    if not skipped:
        path.unlink(missing_ok=True)
        return None
    path.write_text("".join(f"{p}\n" for p in skipped))
    return path


def utm_positives(database_paths: Sequence[Path], query_paths: Sequence[Path], radius: float = 25.0) -> list[np.ndarray] | None:
    """Per query, the database indices within ``radius`` metres when every file name carries
    UTM fields (``@east@north@...@.jpg``); None when any does not (then no recall is computed)."""
    from .data.vg import parse_utm, radius_positives

    try:
        db = np.array([parse_utm(p) for p in database_paths], dtype=np.float64).reshape(-1, 2)
        q = np.array([parse_utm(p) for p in query_paths], dtype=np.float64).reshape(-1, 2)
    except ValueError:
        return None
    return radius_positives(db, q, radius)


def model_label(model) -> str:
    """Which model made a figure, e.g. ``"SciceVPR (SciceVPR-S), random backbone"``."""
    cfg = getattr(model, "config", None)
    name = type(model).__name__ + (f" ({cfg.name})" if cfg is not None else "")
    return name + (", random backbone" if getattr(model, "is_random_init", False) else "")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """The nearest database images of each query, with what is needed to write and plot them."""

    database_root: Path
    query_root: Path
    database_paths: list[Path]
    query_paths: list[Path]
    predictions: np.ndarray  # (N_q, k) database indices, nearest first (-1: no more neighbours)
    similarities: np.ndarray  # (N_q, k) inner products of the descriptors (cosine similarity)
    query_descriptors: np.ndarray  # (N_q, D)
    model_name: str = ""
    skipped: list[Path] = field(default_factory=list)  # unreadable files left out (databases' and queries')
    positives: list[np.ndarray] | None = None  # from UTM file names, else None
    radius: float = 25.0
    recalls: dict[int, float] | None = None
    correct: np.ndarray | None = None  # (N_q, k) bool when ``positives`` is known
    settings: dict = field(default_factory=dict)  # how the descriptors were computed (:func:`search_settings`)

    @property
    def num_queries(self) -> int:
        return len(self.query_paths)

    def matches(self, k: int | None = None):
        """The top-``k`` matches as a long table: ``query, rank, database, similarity``
        (file paths relative to the query / database folder), plus ``correct`` with UTM names."""
        import pandas as pd

        k = self.predictions.shape[1] if k is None else min(k, self.predictions.shape[1])
        rows = []
        for i, q in enumerate(self.query_paths):
            name = q.relative_to(self.query_root).as_posix()
            for j in range(k):
                d = int(self.predictions[i, j])
                if d < 0:
                    break
                row = {"query": name, "rank": j + 1, "database": self.database_paths[d].relative_to(self.database_root).as_posix(),
                       "similarity": round(float(self.similarities[i, j]), 5)}
                if self.correct is not None:
                    row["correct"] = bool(self.correct[i, j])
                rows.append(row)
        return pd.DataFrame(rows, columns=["query", "rank", "database", "similarity"] + (["correct"] if self.correct is not None else []))

    def recall_table(self):
        """One row as ``scicevpr eval`` prints it (model, database, queries, dim, R@N), or None
        without UTM names."""
        import pandas as pd

        from .evaluate import recall_columns  # here, so that importing this module does not import torch

        if self.recalls is None:
            return None
        row = {"model": self.model_name, "database": str(self.database_root), "queries": self.num_queries,
               "dim": self.query_descriptors.shape[1], **recall_columns(self.recalls)}
        return pd.DataFrame([row])


def make_result(database_root: PathLike, query_root: PathLike, database_paths: Sequence[Path], query_paths: Sequence[Path],
                database_descriptors: np.ndarray, query_descriptors: np.ndarray, predictions: np.ndarray,
                recall_values: Sequence[int] = (1, 5, 10, 100), radius: float = 25.0, model_name: str = "",
                skipped: Sequence[Path] = (), settings: dict | None = None) -> SearchResult:
    """A :class:`SearchResult` from descriptors and ranked predictions: similarities, and
    Recall@N (:func:`scicevpr.evaluate.recall_at_n`) when the names carry UTM fields."""
    from .evaluate import recall_at_n

    predictions = np.asarray(predictions, dtype=np.int64)
    valid = predictions >= 0
    rows = np.where(valid, predictions, 0)  # (N_q, k)
    # chunks of queries: the (N_q, k, D) neighbours at once would be 27 GiB for Pitts30k's 6,816 queries
    # (k = 100, D = 10,752); each value is the same einsum as on the whole array
    per_query = max(1, rows.shape[1] * database_descriptors.shape[1] * database_descriptors.dtype.itemsize)
    chunk = max(1, SIMILARITY_CHUNK_BYTES // per_query)
    sims = np.empty(rows.shape, dtype=np.float32)  # (N_q, k)
    for start in range(0, len(rows), chunk):  # one (c, k, D) chunk of neighbours alive at a time
        sims[start : start + chunk] = np.einsum("qkd,qd->qk", database_descriptors[rows[start : start + chunk]],
                                                query_descriptors[start : start + chunk])
    sims[~valid] = np.nan
    positives = utm_positives(database_paths, query_paths, radius)
    recalls = correct = None
    if positives is not None:
        recalls, correct = recall_at_n(predictions, positives, recall_values)
    return SearchResult(Path(database_root), Path(query_root), list(database_paths), list(query_paths), predictions, sims,
                        query_descriptors, model_name, list(skipped), positives, float(radius), recalls, correct,
                        dict(settings or {}))


# --------------------------------------------------------------------------------------------
# Searching folders
# --------------------------------------------------------------------------------------------


def search_settings(model, config=None, database_batch_size: int | None = None) -> dict:
    """How a search computes its descriptors, as ``settings.json`` records it: the database's
    and the queries' batch sizes (``config.batch_size``; ``config.query_batch_size`` or the
    same), whether the model's descriptors depend on them (``batch_dependent``: a cross-image
    model), the protocol and the encoder group size. ``database_batch_size``: the one a saved
    index was built with, when it differs from ``config``'s."""
    from .config import EvalConfig

    config = EvalConfig() if config is None else config
    return {"batch_dependent": bool(getattr(model, "cross_image", False)),
            "database_batch_size": int(database_batch_size or config.batch_size),
            "query_batch_size": int(config.query_batch_size or config.batch_size),
            "protocol": config.protocol, "encoder_group_size": config.encoder_group_size}


def describe_folder(model, folder: PathLike, role: str, config=None, skip_unreadable: bool = False):
    """``(paths, descriptors (N, D), skipped)`` of the images below ``folder`` (protocol of
    :func:`scicevpr.evaluate.compute_descriptors`; PNGs are decoded on the CPU), in batches of
    ``config.batch_size``, or of ``config.query_batch_size`` when set and ``role`` is ``"query"``."""
    from .config import EvalConfig
    from .evaluate import compute_descriptors

    config = EvalConfig() if config is None else config
    paths = list_images(folder, role)
    paths, skipped = readable_images(paths, folder, role, skip_unreadable, progress=config.progress)
    if any(p.suffix.lower() not in JPEG_SUFFIXES for p in paths):
        config = dataclasses.replace(config, gpu_decode=False)  # the batched decoder reads JPEG only
    batch_size = (config.query_batch_size if role == "query" else None) or config.batch_size
    return paths, compute_descriptors(model, paths, config, batch_size, desc=f"{role} descriptors"), skipped


def search_folders(model, database: PathLike, queries: PathLike, k: int = 5, config=None,
                   skip_unreadable: bool = False, radius: float = 25.0) -> SearchResult:
    """The ``k`` nearest database images of every query image (exact search).

    Args:
        model: any scicevpr model (``load_model``, ``torch.hub.load``, a preset).
        database, queries: folders of .jpg/.jpeg/.png files, searched recursively.
        k: matches kept per query (the search also goes as deep as the largest Recall@N).
        config: :class:`scicevpr.config.EvalConfig` (batch size, query batch size, device,
            workers, recall values).
        skip_unreadable: leave out files that cannot be decoded (listed in ``result.skipped``)
            instead of raising.
        radius: positives radius in metres when the names carry UTM fields.
    """
    from .config import EvalConfig
    from .evaluate import search

    config = EvalConfig() if config is None else config
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    db_paths, db, db_skipped = describe_folder(model, database, "database", config, skip_unreadable)
    q_paths, q, q_skipped = describe_folder(model, queries, "query", config, skip_unreadable)
    _, pred = search(db, q, max([k, *config.recall_values]))
    return make_result(database, queries, db_paths, q_paths, db, q, pred, config.recall_values, radius,
                       model_label(model), db_skipped + q_skipped, search_settings(model, config))


def write_search_outputs(result: SearchResult, out: PathLike, k: int = 5, sheet_queries: int = 8,
                         label: str | None = None) -> dict[str, Path]:
    """Write ``matches.csv`` (top-``k`` per query), ``contact_sheet.png`` (the first
    ``sheet_queries`` queries; none when 0), ``skipped.txt`` (when files were skipped),
    ``recalls.csv`` (with UTM names) and ``settings.json`` (:func:`search_settings`, when known)
    into ``out``; returns the paths by kind. One of these that this run does not write and an
    earlier run left in ``out`` is removed: the folder describes this run alone."""
    import json

    import matplotlib.pyplot as plt

    from .lab.viz import plot_matches, save_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"matches": out / MATCHES_FILE}
    result.matches(k).to_csv(written["matches"], index=False, lineterminator="\n")
    if sheet_queries > 0:
        missing = [p for p in result.database_paths[:1] if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"database image {str(missing[0])!r} is not there any more, so no contact sheet can be drawn: "
                "pass the folder where the database images now are (--database-root), or --sheet-queries 0."
            )
        fig = plot_matches(result.query_paths, result.database_paths, result.predictions, result.similarities,
                           range(min(sheet_queries, result.num_queries)), k=min(k, result.predictions.shape[1]),
                           correct=result.correct, label=label or result.model_name)
        written["sheet"] = save_png(fig, out / SHEET_FILE)
        plt.close(fig)
    if write_skipped(out, result.skipped) is not None:
        written["skipped"] = out / SKIPPED_FILE
    table = result.recall_table()
    if table is not None:
        written["recalls"] = out / RECALLS_FILE
        table.to_csv(written["recalls"], index=False, lineterminator="\n")
    if result.settings:
        written["settings"] = out / SETTINGS_FILE
        written["settings"].write_text(json.dumps({"model": result.model_name, **result.settings}, indent=1) + "\n")
    for kind, name in (("sheet", SHEET_FILE), ("recalls", RECALLS_FILE), ("settings", SETTINGS_FILE)):
        if kind not in written:  # skipped.txt: write_skipped
            (out / name).unlink(missing_ok=True)
    return written


def report(result: SearchResult, written: dict[str, Path]) -> str:
    """What the command prints: counts, skipped files, Recall@N (with UTM names), outputs."""
    lines = [f"{result.num_queries} queries searched against {len(result.database_paths)} database images "
             f"({result.query_descriptors.shape[1]}-d descriptors, {result.model_name})"]
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} unreadable files (listed in {written['skipped']})")
    st = result.settings
    if st.get("batch_dependent"):
        lines.append(f"queries encoded in batches of {st['query_batch_size']}, the database in batches of "
                     f"{st['database_batch_size']}: this cross-image model's descriptors depend on the batch "
                     "(--query-batch-size sets the queries')")
    table = result.recall_table()
    if table is not None:
        lines.append(table.to_string(index=False))
    else:
        lines.append("no Recall@N: the file names carry no UTM fields (@east@north@...@.jpg)")
    lines += [f"written {p}" for kind, p in written.items() if kind != "skipped"]
    return "\n".join(lines)


# One suffix rule for photo folders, in scicevpr.data.paths; the old name still imports from here.
__getattr__ = moved_attributes(__name__, {"scicevpr.data.paths": ("IMAGE_SUFFIXES=PHOTO_SUFFIXES",)})
