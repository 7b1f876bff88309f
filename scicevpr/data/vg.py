"""Visual Geo-localization benchmark layout (Pitts30k, MSLS-val, Tokyo24/7, Nordland, ...).

Layout::

    <root>/<dataset>/images/<split>/database/**/*.jpg
    <root>/<dataset>/images/<split>/queries/**/*.jpg
    <root>/<dataset>/images/<split>/metadata.csv      (optional; written by the synthetic generator)

File names carry the position: ``@utm_east@utm_north@...@.jpg``. Only the first two fields are
read; the full 14-field names written by the public converters
(``@east@north@zone@letter@lat@lon@pano@tile@heading@pitch@roll@height@timestamp@note@.jpg``)
parse too. Positives of a query are the database images within ``radius`` metres (UTM), sorted by
distance (paper: "Evaluation protocol").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .decode import find_corrupt_images, load_rgb, warn_skipped
from .paths import DATA_ENV, data_root
from .transforms import eval_transform, transform_size

PathLike = str | os.PathLike

UTM_PATTERN = "@utm_east@utm_north@...@.jpg"
METADATA_FILE = "metadata.csv"
ROLES = ("database", "queries")


def parse_utm(path: PathLike) -> tuple[float, float]:
    """(east, north) in metres from a VG file name ``@east@north@...@.jpg``.

    Raises ValueError naming the file and the expected pattern when the fields are absent.
    """
    name = Path(path).name
    fields = name.split("@")
    # "@e@n@.jpg".split("@") -> ["", "e", "n", ".jpg"]
    try:
        if len(fields) < 4 or fields[0] != "":
            raise ValueError("too few '@' fields")
        east, north = float(fields[1]), float(fields[2])
        if not (np.isfinite(east) and np.isfinite(north)):
            raise ValueError("non-finite coordinate")
    except ValueError as e:
        raise ValueError(
            f"image file name {name!r} (in {str(Path(path).parent)!r}) has no UTM fields: expected "
            f"{UTM_PATTERN}, e.g. '@0584790.82@4477197.41@17@T@@.jpg' ({e}). Rename the files with a "
            "VG-benchmark converter, or check that the folder holds the right dataset."
        ) from None
    return east, north


def format_vg_name(
    east: float,
    north: float,
    zone: int | str = "",
    letter: str = "",
    lat: float | None = None,
    lon: float | None = None,
    pano_id: str = "",
    tile: str = "",
    heading: float | None = None,
    pitch: float | None = None,
    timestamp: str = "",
    note: str = "",
) -> str:
    """A VG-benchmark file name with the public converters' 14 fields (only east/north required)."""
    lat_s = "" if lat is None else f"{lat:010.5f}"
    lon_s = "" if lon is None else f"{lon:011.5f}"
    head_s = "" if heading is None else f"{int(round(heading)) % 360:03d}"
    pitch_s = "" if pitch is None else f"{int(round(pitch)):03d}"
    zone_s = f"{int(zone):02d}" if zone != "" else ""
    fields = [f"{east:010.2f}", f"{north:010.2f}", zone_s, letter, lat_s, lon_s, pano_id, tile,
              head_s, pitch_s, "", "", timestamp, note]
    for f in fields:
        if "@" in f or "/" in f:
            raise ValueError(f"VG name fields may not contain '@' or '/': {f!r}")
    return "@" + "@".join(fields) + "@.jpg"


def radius_positives(database_utms: np.ndarray, query_utms: np.ndarray, radius: float,
                     utm_dtype: str = "float64") -> list[np.ndarray]:
    """For each query, the database indices within ``radius`` (inclusive), nearest first.

    Exact search, chunked over queries so that memory stays bounded for large databases.
    ``utm_dtype="float32"`` rounds the coordinates to float32 first (then computes in float64),
    as SciceVPR's test dataset does (``datasets_ws.py``: ``.astype(np.float32)`` before
    sklearn's ``radius_neighbors``): at the radius edge the positive sets can differ.
    """
    if utm_dtype not in ("float64", "float32"):
        raise ValueError(f"utm_dtype must be 'float64' or 'float32', got {utm_dtype!r}")
    db = np.asarray(database_utms).astype(utm_dtype).astype(np.float64).reshape(-1, 2)  # (N_db, 2)
    q = np.asarray(query_utms).astype(utm_dtype).astype(np.float64).reshape(-1, 2)  # (N_q, 2)
    r2 = float(radius) ** 2
    chunk = max(1, 4_000_000 // max(1, len(db)))
    positives: list[np.ndarray] = []
    for start in range(0, len(q), chunk):
        diff = q[start : start + chunk, None, :] - db[None, :, :]  # (c, N_db, 2)
        d2 = np.einsum("cnk,cnk->cn", diff, diff)  # (c, N_db)
        for row in d2:
            idx = np.flatnonzero(row <= r2)
            positives.append(idx[np.argsort(row[idx], kind="stable")].astype(np.int64))
    return positives


@dataclass
class VGSplit:
    """One split (database + queries) of a VG-layout dataset, with ground truth."""

    root: Path
    dataset: str
    split: str
    database_paths: list[Path]
    query_paths: list[Path]
    database_utms: np.ndarray  # (N_db, 2) float64, east/north in metres
    query_utms: np.ndarray  # (N_q, 2) float64
    positives: list[np.ndarray]  # per query: database indices within radius, nearest first
    radius: float = 25.0
    database_conditions: list[str] | None = None  # from metadata.csv when present
    query_conditions: list[str] | None = None
    database_metadata: pd.DataFrame | None = None  # rows aligned with database_paths
    query_metadata: pd.DataFrame | None = None  # rows aligned with query_paths
    skipped: list[Path] = field(default_factory=list)  # corrupt files left out (skip_corrupt=True)
    split_dir: Path | None = None  # where database/ and queries/ were read; None: the VG layout

    @property
    def num_database(self) -> int:
        return len(self.database_paths)

    @property
    def num_queries(self) -> int:
        return len(self.query_paths)

    @property
    def all_paths(self) -> list[Path]:
        """Database then queries: the order in which descriptors are extracted."""
        return list(self.database_paths) + list(self.query_paths)

    @property
    def folder(self) -> Path:
        return self.split_dir if self.split_dir is not None else self.root / self.dataset / "images" / self.split

    @property
    def queries_without_positives(self) -> np.ndarray:
        """Indices of queries with no database image within the radius (they count as misses)."""
        return np.array([i for i, p in enumerate(self.positives) if len(p) == 0], dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"VGSplit(dataset={self.dataset!r}, split={self.split!r}, num_database={self.num_database}, "
            f"num_queries={self.num_queries}, radius={self.radius}, root={str(self.root)!r})"
        )


def _listing(folder: Path) -> str:
    try:
        names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    except OSError:
        return ""
    return f" (found there: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''})" if names else " (it is empty)"


def _require_dir(folder: Path, what: str, fix: str) -> None:
    if not folder.is_dir():
        parent = folder.parent
        where = _listing(parent) if parent.is_dir() else ""
        raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist{where}. {fix}")


def files_below(folder: PathLike) -> list[Path]:
    """Every file below ``folder`` (any depth, unsorted) as the authors' ``glob("**",
    recursive=True)`` finds it: symlinked folders are followed (``Path.rglob`` does not on
    Python 3.11, and a split assembled from symlinked folders would lose their images), dot-files
    and dot-folders are skipped, and the paths go through ``folder`` as given (not resolved).

    A folder that links back to one of its own ancestors (a symlink loop) is not entered again:
    ``glob`` would list its files once more per level until the OS refuses (ELOOP, 40 levels).
    A link to a folder that holds ``folder`` itself is a ValueError: it would list the files
    beside ``folder`` (e.g. ``database/loop -> ..`` the queries) as its own.
    """
    folder = Path(folder)
    files: list[Path] = []
    root = os.path.realpath(folder)
    stack = [(folder, frozenset({root}))]  # (folder, real paths of it and its ancestors)
    while stack:
        here, ancestors = stack.pop()
        try:
            entries = list(os.scandir(here))
        except OSError:  # unreadable, or vanished, as glob skips it
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = here / entry.name
            if entry.is_dir():  # follows symlinks
                real = os.path.realpath(path)
                if real != root and root.startswith(real.rstrip(os.sep) + os.sep):
                    raise ValueError(
                        f"folder link {str(path)!r} points to {real!r}, a folder that holds {str(folder)!r} itself: the "
                        f"files of the folders beside it (e.g. the queries of a split) would be listed as files of "
                        f"{str(folder)!r}. Remove the link, or point it at a folder outside {real!r}."
                    )
                if real not in ancestors:
                    stack.append((path, ancestors | {real}))
            elif entry.is_file():
                files.append(path)
    return files


def list_images(folder: PathLike, suffixes: Sequence[str] = (".jpg",), ignore_case: bool = False) -> list[Path]:
    """Every file below ``folder`` whose extension is one of ``suffixes`` (default ``.jpg``, the
    datasets' format; compared as ``glob`` does, case-sensitively, unless ``ignore_case``), in a
    deterministic order (sorted relative POSIX paths).

    Dot-files and dot-folders are skipped, as the authors' ``glob("**/*.jpg")`` skips them: a
    split copied from macOS holds ``._@...@.jpg`` resource forks that are not images. Symlinked
    folders are followed, as ``glob`` follows them (:func:`files_below`).
    """
    folder = Path(folder)
    wanted = {x.lower() for x in suffixes} if ignore_case else set(suffixes)
    paths = [p for p in files_below(folder) if (p.suffix.lower() if ignore_case else p.suffix) in wanted]
    return sorted(paths, key=lambda p: p.relative_to(folder).as_posix())


def _check_nonempty(paths: list[Path], folder: Path, role: str) -> None:
    if paths:
        return
    others = sorted({p.suffix for p in files_below(folder)})
    hint = f" It holds files with extensions {others}; convert them to .jpg." if others else ""
    raise ValueError(
        f"the {role} set is empty: no .jpg images under {str(folder)!r}.{hint} Expected files named "
        f"{UTM_PATTERN} in {folder.name}/ (subfolders allowed)."
    )


def _read_metadata(split_dir: Path, database: list[Path], queries: list[Path]):
    """Conditions (and every other column) of ``metadata.csv``, aligned with the image lists."""
    meta_path = split_dir / METADATA_FILE
    if not meta_path.is_file():
        return None, None, None, None
    meta = pd.read_csv(meta_path, keep_default_na=False)
    missing = [c for c in ("file", "condition") if c not in meta.columns]
    if missing:
        raise ValueError(
            f"metadata file {str(meta_path)!r} lacks column(s) {missing}; it needs at least 'file' "
            "(path relative to the split folder) and 'condition'. Fix or delete the file."
        )
    meta = meta.set_index("file", drop=False)
    if not meta.index.is_unique:
        dup = meta.index[meta.index.duplicated()][0]
        raise ValueError(f"metadata file {str(meta_path)!r} lists {dup!r} more than once")
    out = []
    for paths in (database, queries):
        rel = [p.relative_to(split_dir).as_posix() for p in paths]
        absent = [r for r in rel if r not in meta.index]
        if absent:
            raise ValueError(
                f"metadata file {str(meta_path)!r} has no row for {len(absent)} image(s), e.g. {absent[0]!r}; "
                "regenerate it or delete it (conditions are optional)."
            )
        rows = meta.loc[rel].reset_index(drop=True)
        out += [rows["condition"].astype(str).tolist(), rows]
    return out[0], out[2], out[1], out[3]


def _find_split_dir(root: Path, dataset: str, split: str, queries: str) -> Path:
    """``<root>/<dataset>/images/<split>``, or ``<root>/<dataset>/<split>`` when the dataset has no
    ``images/`` level (the MSLS converter's layout ``msls/{train,val}/{database,queries}``)."""
    readme = "data/README.md (section 'Layouts written by the public converters')"
    _require_dir(root / dataset, "dataset", f"Expected {root!s}/{dataset}/images/{split}/{{database,{queries}}}/; check the dataset name or root.")
    flat = root / dataset / split
    if not (root / dataset / "images").is_dir() and (flat / "database").is_dir():
        return flat  # MSLS converter layout, no images/ level
    _require_dir(root / dataset / "images", "images",
                 f"A VG-layout dataset has {dataset}/images/<split>/{{database,queries}}/ (or, as the MSLS "
                 f"converter writes it, {dataset}/<split>/{{database,queries}}/); see {readme}.")
    split_dir = root / dataset / "images" / split
    _require_dir(split_dir, "split", f"Check the split name (usually 'train', 'val' or 'test'); see {readme}.")
    return split_dir


def load_vg_split(
    root: PathLike | None,
    dataset: str,
    split: str = "test",
    radius: float = 25.0,
    skip_corrupt: bool = False,
    utm_dtype: str = "float64",
    queries: str = "queries",
) -> VGSplit:
    """Read ``<root>/<dataset>/images/<split>/{database,queries}`` and compute positives.

    Args:
        root: folder holding the datasets; None means ``$SCICEVPR_DATA`` (else ``./data``).
        dataset: e.g. ``"pitts30k"``, ``"msls"``, ``"tokyo247"``, ``"synthetic"``. A dataset
            without the ``images/`` level (``msls/<split>/{database,queries}``, as the MSLS
            converter writes it) is read too.
        split: ``"test"``, ``"val"`` or ``"train"``.
        radius: positives are database images within this distance (metres, UTM) of the query.
        skip_corrupt: False (default): no image is decoded here and a corrupt file raises when it
            is loaded. True: every image is test-decoded now; files that fail are left out of the
            split (positives computed without them), listed in ``.skipped`` and reported in a warning.
        utm_dtype: ``"float64"`` (default) or ``"float32"``, SciceVPR's test code, which rounds
            the coordinates to float32 before the radius search (:func:`radius_positives`).
        queries: the queries folder's name, e.g. ``"queries_v1"`` for SF-XL's test split.

    Dot-files (macOS ``._*.jpg``) are skipped, as the authors' ``glob`` does.
    """
    root = data_root(root)
    if radius <= 0:
        raise ValueError(f"radius must be positive (metres), got {radius}")
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset root {str(root)!r} does not exist. Pass the folder that holds <dataset>/images/<split>/ "
            f"as root, or set the environment variable {DATA_ENV}."
        )
    split_dir = _find_split_dir(root, dataset, split, queries)
    folders = {}
    for role, name in zip(ROLES, ("database", queries)):
        folders[role] = split_dir / name
        fix = "A split folder must contain both database/ and queries/."
        if role == "queries":
            others = sorted(p.name for p in split_dir.glob("queries*") if p.is_dir())
            if others:
                fix += (f" It holds {others}: pass queries={others[0]!r} (command line: --queries {others[0]}); "
                        "see data/README.md (section 'Layouts written by the public converters').")
        _require_dir(folders[role], role, fix)
    database = list_images(folders["database"])
    queries = list_images(folders["queries"])  # the folder's name is no longer needed
    _check_nonempty(database, folders["database"], "database")
    _check_nonempty(queries, folders["queries"], "query")
    skipped: list[Path] = []
    if skip_corrupt:
        bad = set(find_corrupt_images(database + queries))
        if bad:
            skipped = [p for p in database + queries if p in bad]
            database = [p for p in database if p not in bad]
            queries = [p for p in queries if p not in bad]
            warn_skipped(skipped, len(database) + len(queries) + len(skipped), str(split_dir))
            _check_nonempty(database, folders["database"], "database (after skipping corrupt files)")
            _check_nonempty(queries, folders["queries"], "query (after skipping corrupt files)")
    db_utms = np.array([parse_utm(p) for p in database], dtype=np.float64).reshape(-1, 2)
    q_utms = np.array([parse_utm(p) for p in queries], dtype=np.float64).reshape(-1, 2)
    db_cond, q_cond, db_meta, q_meta = _read_metadata(split_dir, database, queries)
    return VGSplit(
        root=root,
        dataset=dataset,
        split=split,
        database_paths=database,
        query_paths=queries,
        database_utms=db_utms,
        query_utms=q_utms,
        positives=radius_positives(db_utms, q_utms, radius, utm_dtype),
        radius=float(radius),
        database_conditions=db_cond,
        query_conditions=q_cond,
        database_metadata=db_meta,
        query_metadata=q_meta,
        skipped=skipped,
        split_dir=split_dir,
    )


class ImageFileDataset(Dataset):
    """Images from a list of files, for descriptor extraction: yields ``(image (3, S, S), index)``.

    Decoding (PIL) happens in DataLoader workers; the default transform is the evaluation
    transform (hard resize to S x S, ImageNet normalisation); ``image_size`` (S) is the
    transform's when one is given. ``index`` is the position in ``paths``.

    A corrupt file raises ``CorruptImageError`` naming it. With ``skip_corrupt=True`` every file is
    test-decoded at construction; the ones that fail are left out (``len`` shrinks, the yielded
    index stays the position in the original ``paths``), listed in ``.skipped`` and reported.
    """

    def __init__(self, paths, image_size: int | None = None, skip_corrupt: bool = False, transform=None):
        self.paths = [Path(p) for p in paths]
        self.image_size = transform_size(image_size, transform)
        self.transform = transform if transform is not None else eval_transform(self.image_size)
        self.skipped: list[Path] = []
        self.indices = np.arange(len(self.paths), dtype=np.int64)
        if skip_corrupt:
            bad = set(find_corrupt_images(self.paths))
            if bad:
                self.skipped = [p for p in self.paths if p in bad]
                self.indices = np.array([i for i, p in enumerate(self.paths) if p not in bad], dtype=np.int64)
                warn_skipped(self.skipped, len(self.paths), "ImageFileDataset")

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[i])
        return self.transform(load_rgb(self.paths[index])), index
