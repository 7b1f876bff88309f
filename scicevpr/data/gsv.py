"""GSV-Cities training layout (paper: "Training"; P places x K images per batch).

Layout::

    <root>/Dataframes/<city>.csv    columns: place_id, year, month, northdeg, city_id, lat, lon, panoid
    <root>/Images/<city_id>/<city_id>_<place_id:07d>_<year:04d>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg

``lat`` and ``lon`` appear in file names as Python writes the floats (``str(float)``), as in the
dataset's own loader. Place ids are made unique across cities as the official loader does
(``place_id + city_index * 10**5``). Places with fewer than K images are dropped, counted and
reported in a warning (or, with ``drop_small_places=False``, are an error). With
``skip_corrupt=True`` images that do not decode are left out first (counted and reported too).
CSV files are read as UTF-8 (a byte-order mark is allowed); another encoding is an error that
names the file. Each item is K images of one place, so
``DataLoader(ds, batch_size=P)`` yields ``(P, K, 3, S, S)`` images and ``(P, K)`` place ids.

Extra CSV columns are allowed and kept (the synthetic benchmark adds ``condition`` and others).
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .decode import check_images, find_corrupt_images, load_rgb, warn_skipped
from .paths import DATA_ENV, data_root
from .transforms import train_transform, transform_size

PathLike = str | os.PathLike

GSV_COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")
CITY_ID_STRIDE = 10**5  # the official loader's prefix: place ids of city i become id + i * 10**5


def gsv_image_name(city_id: str, place_id: int, year: int, month: int, northdeg: int, lat: float, lon: float, panoid: str) -> str:
    """The dataset's file-name scheme (``place_id`` is the id within its city)."""
    return f"{city_id}_{int(place_id):07d}_{int(year):04d}_{int(month):02d}_{int(northdeg):03d}_{lat}_{lon}_{panoid}.jpg"


def _name_key(name: str) -> tuple | None:
    """(city, place, year, month, northdeg, panoid) from a file name, ignoring how lat/lon are written."""
    stem = name[:-4] if name.lower().endswith(".jpg") else name
    parts = stem.split("_", 7)  # panoids may themselves contain '_'
    if len(parts) != 8:
        return None
    city, place, year, month, northdeg, _lat, _lon, panoid = parts
    try:
        return (city, int(place), int(year), int(month), int(northdeg), panoid)
    except ValueError:
        return None


def list_cities(root: PathLike) -> list[str]:
    """Names of the cities that have a ``Dataframes/<city>.csv``, sorted."""
    folder = Path(root) / "Dataframes"
    return sorted(p.stem for p in folder.glob("*.csv"))


def _read_city(root: Path, city: str) -> pd.DataFrame:
    csv = root / "Dataframes" / f"{city}.csv"
    if not csv.is_file():
        raise FileNotFoundError(
            f"GSV-Cities dataframe {str(csv)!r} does not exist (cities found: {list_cities(root)}). "
            "Check the city name, or pass cities=None to use all of them."
        )
    # Floats are parsed to the nearest double, so str(lat) usually rebuilds the file name; names that
    # write lat/lon differently are matched on the other fields (see _resolve_files).
    try:
        df = pd.read_csv(csv, dtype={"panoid": str, "city_id": str}, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        utf16 = e.object[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise ValueError(
            f"GSV-Cities dataframe {str(csv)!r} is not UTF-8 text (byte {e.start}: {e.reason}"
            f"{'; it looks like UTF-16' if utf16 else ''}). Save it as UTF-8, e.g. "
            f"`iconv -f {'UTF-16' if utf16 else 'LATIN1'} -t UTF-8 {csv.name} > fixed.csv`."
        ) from None
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"GSV-Cities dataframe {str(csv)!r} is empty. It needs a header line with {list(GSV_COLUMNS)} and "
            "one row per image; restore the file from the dataset, or remove it to leave the city out."
        ) from None
    except pd.errors.ParserError as e:
        raise ValueError(
            f"GSV-Cities dataframe {str(csv)!r} is not a valid CSV file ({str(e).strip()}); restore it from the dataset."
        ) from None
    missing = [c for c in GSV_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"GSV-Cities dataframe {str(csv)!r} lacks column(s) {missing}; found {list(df.columns)}. "
            f"Each Dataframes/<city>.csv needs {list(GSV_COLUMNS)}."
        )
    if len(df) == 0:
        raise ValueError(f"GSV-Cities dataframe {str(csv)!r} has no rows")
    df = _check_rows(df, csv)
    if df["place_id"].max() >= CITY_ID_STRIDE or df["place_id"].min() < 0:
        raise ValueError(f"{str(csv)!r}: place_id must lie in [0, {CITY_ID_STRIDE}) to be made unique across cities")
    return df


INTEGER_COLUMNS = ("place_id", "year", "month", "northdeg")
NUMBER_COLUMNS = ("lat", "lon")


def _check_rows(df: pd.DataFrame, csv: Path) -> pd.DataFrame:
    """Every field a number where the layout needs one (integers for :data:`INTEGER_COLUMNS`),
    no short row and no row twice; an error names the file, its line and the field. Returns
    ``df`` with those columns as numbers."""
    def line(i: int) -> int:
        return int(i) + 2  # the header is line 1

    short = df[list(GSV_COLUMNS)].isna().any(axis=1) | (df[list(GSV_COLUMNS)].astype(str) == "").any(axis=1)
    if short.any():
        i = short.idxmax()
        empty = [c for c in GSV_COLUMNS if pd.isna(df.at[i, c]) or str(df.at[i, c]) == ""]
        raise ValueError(f"GSV-Cities dataframe {str(csv)!r}, line {line(i)}: no value for {', '.join(empty)} (a short "
                         f"or damaged row; {int(short.sum())} such row(s)). Restore the file from the dataset, or remove the row.")
    for col in (*INTEGER_COLUMNS, *NUMBER_COLUMNS):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.astype(float))
        if col in INTEGER_COLUMNS:
            bad |= values.astype(float) % 1 != 0
        if bad.any():
            i = bad.idxmax()
            kind = "an integer" if col in INTEGER_COLUMNS else "a number"
            raise ValueError(f"GSV-Cities dataframe {str(csv)!r}, line {line(i)}: {col} must be {kind}, got "
                             f"{df.at[i, col]!r} ({int(bad.sum())} such row(s)). Restore the file from the dataset, or "
                             f"remove the row.")
        df[col] = values.astype(np.int64) if col in INTEGER_COLUMNS else values.astype(float)
    twice = df.duplicated(subset=list(GSV_COLUMNS), keep="first")
    if twice.any():
        i = twice.idxmax()
        first = df.index[(df[list(GSV_COLUMNS)] == df.loc[i, list(GSV_COLUMNS)]).all(axis=1)][0]
        raise ValueError(f"GSV-Cities dataframe {str(csv)!r}, line {line(i)} repeats line {line(first)} (the same image "
                         f"twice in its place; {int(twice.sum())} repeated row(s)). Remove the repeated rows.")
    return df


def _resolve_files(root: Path, df: pd.DataFrame, csv_name: str) -> list[Path]:
    """Image path for each row; tolerant of how lat/lon floats were written in the names."""
    paths: list[Path] = []
    listings: dict[str, dict] = {}
    missing = []
    for row in df.itertuples(index=False):
        city = str(row.city_id)
        folder = root / "Images" / city
        if city not in listings:
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"GSV-Cities image folder {str(folder)!r} does not exist (rows of {csv_name} have "
                    f"city_id {city!r}). Expected <root>/Images/<city_id>/ next to <root>/Dataframes/."
                )
            names = os.listdir(folder)
            listings[city] = {"names": set(names), "keys": {k: n for n in names if (k := _name_key(n)) is not None}}
        name = gsv_image_name(city, row.place_id, row.year, row.month, row.northdeg, row.lat, row.lon, row.panoid)
        if name not in listings[city]["names"]:
            key = (city, int(row.place_id), int(row.year), int(row.month), int(row.northdeg), str(row.panoid))
            alt = listings[city]["keys"].get(key)
            if alt is None:
                missing.append(name)
                name = None
            else:
                name = alt
        paths.append(folder / name if name else None)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {csv_name} are missing from {str(root / 'Images')!r}, e.g. "
            f"{missing[0]!r}. Expected names <city>_<place_id:07d>_<year>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg; "
            "re-extract the dataset or remove the rows."
        )
    return paths


class GSVCitiesDataset(Dataset):
    """GSV-Cities: item i is K images of place i -> ``(images (K, 3, S, S), place_ids (K,))``.

    Args:
        root: the folder holding ``Dataframes/`` and ``Images/``; None means
            ``$SCICEVPR_DATA/gsv_cities``.
        cities: city names (CSV stems); None means every CSV in ``Dataframes/``, sorted.
        img_per_place: K, images sampled per place (paper: 4).
        image_size: S, side of the square output (default 224); the transform's when one is given.
        transform: PIL -> tensor; default ``train_transform(image_size)`` (RandAugment, 3 ops).
        seed: with ``set_epoch``, fixes which K images are drawn and the augmentations, so that
            training is repeatable and resumable whatever the number of workers.
        drop_small_places: True (official): places with fewer than K images are dropped,
            counted in ``num_dropped_places`` and reported in a warning. False: such a place is
            an error naming it.
        skip_corrupt: False: every file is checked now at the cost of a few bytes each
            (:func:`~scicevpr.data.decode.check_images`: a truncated, empty or missing image is an
            error naming it, before any epoch); a file damaged only in its middle raises when it
            is loaded. True: every image is test-decoded now; the ones that fail are left out
            (before places are counted), listed in ``.skipped`` and reported in a warning.
        check_files: with ``skip_corrupt=False``, whether to check the files now (default). A
            training under DDP checks them on rank 0 only: every rank builds the same dataset,
            and a failure there stops the whole launch.
    """

    def __init__(
        self,
        root: PathLike | None = None,
        cities: Sequence[str] | None = None,
        img_per_place: int = 4,
        image_size: int | None = None,
        transform: Callable | None = None,
        seed: int = 0,
        drop_small_places: bool = True,
        skip_corrupt: bool = False,
        check_files: bool = True,
    ):
        root = Path(root) if root is not None else data_root() / "gsv_cities"
        if img_per_place < 1:
            raise ValueError(f"img_per_place (K) must be >= 1, got {img_per_place}")
        if not root.is_dir():
            raise FileNotFoundError(
                f"GSV-Cities root {str(root)!r} does not exist. Pass the folder that holds Dataframes/ and "
                f"Images/ as root, or set {DATA_ENV} so that $SCICEVPR_DATA/gsv_cities is that folder."
            )
        for sub in ("Dataframes", "Images"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(
                    f"GSV-Cities folder {str(root / sub)!r} does not exist; {str(root)!r} must contain "
                    "Dataframes/<city>.csv and Images/<city>/."
                )
        if cities is None:
            cities = list_cities(root)
            if not cities:
                raise FileNotFoundError(f"no <city>.csv files in {str(root / 'Dataframes')!r}")
        self.root = root
        self.cities = list(cities)
        self.img_per_place = int(img_per_place)
        self.image_size = transform_size(image_size, transform, default=224)
        self.transform = transform if transform is not None else train_transform(self.image_size)
        self.seed = int(seed)
        self.epoch = 0

        frames = []
        for i, city in enumerate(self.cities):
            df = _read_city(root, city)
            df["path"] = _resolve_files(root, df, f"Dataframes/{city}.csv")
            df["city_place_id"] = df["place_id"].astype(np.int64)
            df["place_id"] = df["city_place_id"] + i * CITY_ID_STRIDE  # unique across cities
            frames.append(df)
        df = pd.concat(frames, ignore_index=True)
        self.skipped: list[Path] = []
        if skip_corrupt:
            bad = set(find_corrupt_images(df["path"].tolist()))
            if bad:
                keep = ~df["path"].isin(bad)
                self.skipped = df.loc[~keep, "path"].tolist()
                warn_skipped(self.skipped, len(df), str(root))
                df = df[keep].reset_index(drop=True)
        elif check_files:
            check_images(df["path"].tolist(), f"the GSV-Cities folder {str(root)!r}")
        counts = df.groupby("place_id")["place_id"].transform("size")
        small = df[counts < self.img_per_place]
        if len(small) and not drop_small_places:
            first = small.iloc[0]
            n = int((df["place_id"] == first["place_id"]).sum())
            raise ValueError(
                f"place {int(first['city_place_id'])} of city {first['city_id']!r} has {n} image(s) but "
                f"img_per_place (K) = {self.img_per_place} are required ({small['place_id'].nunique()} such places). "
                "Lower img_per_place, or pass drop_small_places=True (command line: --drop-small-places) to drop "
                "them as the official loader does."
            )
        self.num_dropped_places = int(small["place_id"].nunique())
        if self.num_dropped_places:
            warnings.warn(
                f"dropped {self.num_dropped_places} of {df['place_id'].nunique()} places in {str(root)!r} that have "
                f"fewer than img_per_place (K) = {self.img_per_place} images (drop_small_places=False refuses them).",
                stacklevel=2,
            )
        df = df[counts >= self.img_per_place]
        if len(df) == 0:
            raise ValueError(
                f"no place in {self.cities} has at least img_per_place (K) = {self.img_per_place} images; lower K."
            )
        self.dataframe = df.sort_values(["place_id", "path"], kind="stable").reset_index(drop=True)
        self.place_ids = np.array(pd.unique(self.dataframe["place_id"]), dtype=np.int64)  # sorted
        groups = self.dataframe.groupby("place_id").indices
        self._rows = [np.asarray(groups[p], dtype=np.int64) for p in self.place_ids]
        self._paths = self.dataframe["path"].tolist()

    def __len__(self) -> int:
        """Number of places (not images)."""
        return len(self.place_ids)

    @property
    def num_images(self) -> int:
        return len(self.dataframe)

    def set_epoch(self, epoch: int) -> None:
        """Vary the sampled images and augmentations per epoch (reproducibly)."""
        self.epoch = int(epoch)

    def _sample_seed(self, index: int) -> list[int]:
        return [self.seed, self.epoch, int(index)]

    def sample_rows(self, index: int) -> np.ndarray:
        """Dataframe rows of the K images drawn for place ``index`` at the current epoch."""
        rows = self._rows[index]
        rng = np.random.default_rng(self._sample_seed(index))
        return rows[rng.choice(len(rows), size=self.img_per_place, replace=False)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"place index {index} out of range [0, {len(self)})")
        images = []
        for k, row in enumerate(self.sample_rows(index)):
            image = load_rgb(self._paths[row])
            # Augmentations draw from torch's global CPU RNG: seed it per image, restore it after
            # (the CPU generator alone: torch.manual_seed would also reseed every GPU's, e.g. the
            # training's dropout masks when images load in the main process).
            aug_seed = zlib.crc32(np.array(self._sample_seed(index) + [k], dtype=np.int64).tobytes())
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(aug_seed)
                images.append(self.transform(image))  # (3, S, S)
        place_id = int(self.place_ids[index])
        return torch.stack(images), torch.full((self.img_per_place,), place_id, dtype=torch.long)  # (K, 3, S, S), (K,)

    def __repr__(self) -> str:
        return (
            f"GSVCitiesDataset(root={str(self.root)!r}, cities={len(self.cities)}, places={len(self)}, "
            f"images={self.num_images}, img_per_place={self.img_per_place}, image_size={self.image_size})"
        )


ORDINAL_SUFFIXES = ("", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten")


def combine_gsv_folders(out: PathLike, folders: Sequence[PathLike], suffixes: Sequence[str] | None = None) -> Path:
    """One GSV-Cities-layout folder holding the cities of several, e.g. the places of two
    ``scicevpr synth --preset pretrain`` seeds, whose cities share names.

    The cities of ``folders[i]`` are renamed ``<city><suffixes[i]>`` (default suffixes: ``""``,
    ``"Two"``, ``"Three"``, ...): their dataframes are rewritten with the new ``city_id`` (every
    other field as it was written) and their images are symbolic links under the new names
    (``<city><suffix>_<place>_..._<panoid>.jpg``); a city kept under its own name is linked
    whole. Nothing is copied and the sources are not changed.

    Raises:
        FileExistsError: ``out`` exists and is not empty.
        FileNotFoundError: a folder has no ``Dataframes/``.
        ValueError: two cities would have the same name (give other suffixes).
    """
    import csv

    out = Path(out)
    folders = [Path(f).resolve() for f in folders]
    if suffixes is None and len(folders) > len(ORDINAL_SUFFIXES):
        raise ValueError(f"more than {len(ORDINAL_SUFFIXES)} folders: give the suffixes.")
    suffixes = list(ORDINAL_SUFFIXES[: len(folders)] if suffixes is None else suffixes)
    if len(suffixes) != len(folders):
        raise ValueError(f"{len(folders)} folders but {len(suffixes)} suffixes: give one suffix a folder.")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{str(out)!r} exists and is not empty; give a new folder (nothing was written).")
    plan: dict[str, tuple[Path, str]] = {}  # new city name -> (source folder, old name)
    for folder, suffix in zip(folders, suffixes):
        if not (folder / "Dataframes").is_dir():
            raise FileNotFoundError(f"{str(folder)!r} has no Dataframes/ folder; give GSV-Cities-layout folders "
                                    "(e.g. <benchmark>/gsv_cities).")
        for city in list_cities(folder):
            new = city + suffix
            if new in plan:
                raise ValueError(f"city {new!r} is in {str(plan[new][0])!r} and {str(folder)!r}: give suffixes that "
                                 "tell the folders apart (e.g. '' and 'Two').")
            plan[new] = (folder, city)
    (out / "Dataframes").mkdir(parents=True, exist_ok=True)
    (out / "Images").mkdir(exist_ok=True)
    for new, (folder, city) in plan.items():
        if new == city:
            (out / "Dataframes" / f"{city}.csv").symlink_to(folder / "Dataframes" / f"{city}.csv")
            (out / "Images" / city).symlink_to(folder / "Images" / city, target_is_directory=True)
            continue
        with open(folder / "Dataframes" / f"{city}.csv", newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
        col = rows[0].index("city_id")
        for row in rows[1:]:
            row[col] = new if row[col] == city else row[col]
        with open(out / "Dataframes" / f"{new}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(rows)
        images = out / "Images" / new
        images.mkdir()
        for src in sorted((folder / "Images" / city).iterdir()):
            name = new + src.name[len(city):] if src.name.startswith(f"{city}_") else src.name
            (images / name).symlink_to(src)
    return out
