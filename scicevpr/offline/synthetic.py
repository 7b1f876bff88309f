"""Offline synthetic place-recognition benchmark in the real datasets' layouts.

``generate(out_dir, preset, seed)`` renders street-level views (``scicevpr.offline.render``) of
procedurally built streets and writes

* a training split in the GSV-Cities layout (places with >= 4 views across conditions)::

    <out>/gsv_cities/Dataframes/<city>.csv
    <out>/gsv_cities/Images/<city>/<city>_<place:07d>_<year>_<month>_<northdeg>_<lat>_<lon>_<panoid>.jpg

* val and test splits in the VG-benchmark layout (database by day along the streets; queries in
  other conditions, at lateral offsets, with heading/pitch jitter and occluders)::

    <out>/vg/synthetic/images/{val,test}/database/@east@north@...@.jpg
    <out>/vg/synthetic/images/{val,test}/queries/@east@north@...@.jpg
    <out>/vg/synthetic/images/{val,test}/metadata.csv      (condition, offsets, ... per image)

so that ``GSVCitiesDataset(bench.gsv_root)`` and ``load_vg_split(bench.vg_root, "synthetic", "test")``
read it with no special case. The same preset and seed give byte-identical files, whatever the
number of worker processes. Re-running ``generate`` on a finished output is free (``manifest.json``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import string
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..files import exclusive_lock
from . import render as R
from ..data.paths import data_root

FORMAT_VERSION = 1  # bump whenever the rendered pixels or the layout change: old outputs are then not reused
DATASET_NAME = "synthetic"
MANIFEST = "manifest.json"
_IN_PROGRESS = ".generating"
JPEG_QUALITY = 90

# Fictional city names (no '_': it separates the GSV-Cities file-name fields).
CITY_NAMES = (
    "Alderton", "Bramford", "Castlebury", "Dunmore", "Elmsworth", "Fairhaven", "Glenrock", "Harlow",
    "Ivybridge", "Kingsmere", "Lowestead", "Marwick", "Northam", "Oakhurst", "Pennbury", "Queensfield",
)


@dataclass(frozen=True)
class SyntheticPreset:
    """Sizes and difficulty of a synthetic benchmark. All lengths in metres."""

    name: str
    image_size: int
    # world shared by all splits
    num_styles: int = 10  # recurring facade styles
    num_templates: int = 8  # building runs that reappear verbatim (perceptual aliasing)
    template_prob: float = 0.3  # chance that the next building run is a template
    # training split (GSV-Cities layout)
    train_cities: int = 4
    train_streets_per_city: int = 4
    train_places_per_street: int = 5
    train_place_spacing: float = 50.0
    views_per_place: tuple[int, int] = (4, 6)  # min, max views of a place
    train_conditions: tuple[tuple[str, float], ...] = (
        ("day", 0.3), ("dusk", 0.1), ("night", 0.12), ("fog", 0.12), ("rain", 0.12), ("snow", 0.12), ("autumn", 0.12),
    )
    # val / test splits (VG layout)
    val_streets: int = 4
    test_streets: int = 5
    val_street_length: float = 250.0
    test_street_length: float = 300.0
    db_spacing: float = 10.0
    db_directions: int = 1  # 1: views along the street; 2: also the opposite direction
    queries_per_street: int = 25
    val_queries_per_street: int | None = None  # None: as many as the test streets
    max_lateral_offset: float = 9.0  # of queries, from the database camera's lane
    max_query_yaw_deg: float = 20.0
    max_query_pitch_deg: float = 5.0
    query_conditions: tuple[tuple[str, float], ...] = (
        ("day", 0.22), ("dusk", 0.13), ("night", 0.13), ("fog", 0.13), ("rain", 0.13), ("snow", 0.13), ("autumn", 0.13),
    )

    @property
    def num_train_places(self) -> int:
        return self.train_cities * self.train_streets_per_city * self.train_places_per_street


PRESETS: dict[str, SyntheticPreset] = {
    # unit tests: ~80 small images, about a second
    "tiny": SyntheticPreset(
        name="tiny", image_size=128, train_cities=2, train_streets_per_city=2, train_places_per_street=3,
        views_per_place=(4, 5), val_streets=1, test_streets=1, val_street_length=60.0, test_street_length=80.0,
        queries_per_street=8,
    ),
    # CPU notebooks: ~1,600 images at 224 px; a test split of 500 queries (intervals a few points
    # wide) in a world tuned to teach (data/README.md, "Choosing the difficulty")
    "small": SyntheticPreset(
        name="small", image_size=224, template_prob=0.15, test_streets=10, queries_per_street=50, val_queries_per_street=25,
        max_lateral_offset=4.0, max_query_yaw_deg=10.0, max_query_pitch_deg=3.0,
        query_conditions=(("day", 0.3), ("dusk", 0.12), ("night", 0.12), ("fog", 0.12), ("rain", 0.12),
                          ("snow", 0.11), ("autumn", 0.11)),
    ),
    # the former `small`: queries up to 9 m off the database lane, 20 deg of heading, more aliasing
    "small-hard": SyntheticPreset(name="small-hard", image_size=224),
    # Backbone pretraining (scicevpr pretrain-backbone): a training split only, ~4,000 places,
    # ~20,000 images in every condition, at the benchmark's 224 px. Generate it with another seed
    # than the benchmark (e.g. --seed 1) so that its world (facade styles, template runs) differs
    # too; whatever the seeds, it shares no street with any val or test split (see PRETRAIN_NOTE).
    "pretrain": SyntheticPreset(
        name="pretrain", image_size=224, train_cities=10, train_streets_per_city=40, train_places_per_street=10,
        views_per_place=(4, 6), val_streets=0, test_streets=0,
    ),
    # GPU training: ~3,200 places, ~3,000 database images, 1,500 queries
    "full": SyntheticPreset(
        name="full", image_size=224, num_styles=12, num_templates=24, train_cities=10, train_streets_per_city=40,
        train_places_per_street=8, views_per_place=(4, 8), val_streets=10, test_streets=20,
        val_street_length=500.0, test_street_length=500.0, db_directions=2, queries_per_street=50,
    ),
}

PRETRAIN_NOTE = """Why the ``pretrain`` preset shares no street with a benchmark's val and test splits.

Every street is built by ``render.make_street`` from its own random stream, keyed by the seed, the
split and the street's index: ``_street_rng(seed, 1, city, k)`` for training streets and
``_street_rng(seed, 2 | 3, k)`` for val | test streets. The ``pretrain`` preset writes training
streets only (``val_streets = test_streets = 0``), so its streets come from the training streams
and never from a val or test stream, whatever the two seeds. With another seed than the
benchmark's (the documented ``--seed 1`` against the benchmark's 0) the whole world differs as
well: facade styles and the template runs that reappear verbatim are drawn from
``default_rng([seed, 0])``. ``tests/test_pretrain.py`` builds both plans and checks that no
street's building sequence recurs.
"""

BASE_PITCH_DEG = 4.0  # cameras look slightly up, as street-view crops do
DB_LANE_X = -2.0  # the database car drives in the right-hand lane


@dataclass
class SyntheticBenchmark:
    """Where a generated benchmark lives and what it holds."""

    root: Path
    gsv_root: Path  # GSV-Cities layout: Dataframes/ + Images/
    vg_root: Path  # VG layout root: load_vg_split(vg_root, "synthetic", split)
    dataset: str = DATASET_NAME
    preset: str = "small"
    seed: int = 0
    counts: dict = field(default_factory=dict)

    @property
    def cities(self) -> list[str]:
        return sorted(p.stem for p in (self.gsv_root / "Dataframes").glob("*.csv"))

    def load_split(self, split: str = "test", radius: float = 25.0):
        from ..data.vg import load_vg_split

        return load_vg_split(self.vg_root, self.dataset, split, radius=radius)

    def train_dataset(self, **kwargs):
        from ..data.gsv import GSVCitiesDataset

        return GSVCitiesDataset(self.gsv_root, **kwargs)


def default_synthetic_dir(preset: str = "small") -> Path:
    """``$SCICEVPR_DATA/synthetic/<preset>`` (``./data/synthetic/<preset>`` when unset)."""
    return data_root() / "synthetic" / preset


def get_preset(preset: str | SyntheticPreset) -> SyntheticPreset:
    if isinstance(preset, SyntheticPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


# ----------------------------------------------------------------------------------------------
# planning: the world and every camera, decided before any pixel is drawn
# ----------------------------------------------------------------------------------------------
@dataclass
class _Job:
    key: tuple  # (seed, split code, index): the image's own RNG stream
    street: tuple  # key into the world's street dict
    camera: R.Camera
    condition: str
    occluders: float
    path: str  # relative to the output root
    sun: tuple | None = None  # fixed (azimuth, elevation) for database drives


_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
SPLITS = ("train", "val", "test")
_SPLIT_PREFIX = {"train": "gsv_cities/", "val": f"vg/{DATASET_NAME}/images/val/", "test": f"vg/{DATASET_NAME}/images/test/"}


def _choose_conditions(rng: np.random.Generator, weights: tuple[tuple[str, float], ...], n: int) -> list[str]:
    """Stratified draw: each condition gets its share (rounded), the order is shuffled."""
    names = [c for c, _ in weights]
    w = np.array([x for _, x in weights], dtype=np.float64)
    w = w / w.sum()
    counts = np.floor(w * n).astype(int)
    for k in np.argsort(-(w * n - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    out = [c for c, k in zip(names, counts) for _ in range(k)]
    return [out[i] for i in rng.permutation(len(out))]


def _panoid(rng: np.random.Generator) -> str:
    alphabet = string.ascii_letters + string.digits + "-_"
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), 22))


def _latlon(city_ref: tuple[float, float], east0: float, north0: float, east: float, north: float) -> tuple[float, float]:
    """Local flat-earth conversion around a fictional reference point (metres -> degrees)."""
    lat = city_ref[0] + (north - north0) / 111_320.0
    lon = city_ref[1] + (east - east0) / (111_320.0 * math.cos(math.radians(city_ref[0])))
    return round(lat, 6), round(lon, 6)


def _timestamp(rng: np.random.Generator, condition: str, year: int, month: int) -> str:
    hour = {"night": int(rng.integers(21, 24)), "dusk": int(rng.integers(18, 20))}.get(condition, int(rng.integers(9, 17)))
    return f"{year:04d}{month:02d}{int(rng.integers(1, 29)):02d}_{hour:02d}{int(rng.integers(0, 60)):02d}00"


def _month(rng: np.random.Generator, condition: str) -> int:
    if condition == "snow":
        return int(rng.choice([1, 2, 12]))
    if condition == "autumn":
        return int(rng.choice([10, 11]))
    return int(rng.integers(3, 10))


def _street_rng(seed: int, code: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng([seed, 100 + code, *ids])


def build_plan(preset: SyntheticPreset, seed: int):
    """World (streets) and the list of images to render, with their metadata."""
    # Imported here, not at the top: .gsv and .vg import torch, which `scicevpr synth --help` does not need.
    from ..data.gsv import gsv_image_name
    from ..data.vg import format_vg_name

    world_rng = np.random.default_rng([seed, 0])
    styles = R.make_styles(world_rng, preset.num_styles)
    templates = R.make_templates(world_rng, styles, preset.num_templates)
    streets: dict[tuple, R.Street] = {}
    jobs: list[_Job] = []
    tables: dict[str, list[dict]] = {"train": [], "val": [], "test": []}

    # ---- training split: places along the streets of a few cities (GSV-Cities layout) ----
    ci = 0
    for c in range(preset.train_cities):
        city = CITY_NAMES[c % len(CITY_NAMES)] + ("" if c < len(CITY_NAMES) else str(c // len(CITY_NAMES)))
        east0, north0 = 300_000.0 + 60_000.0 * c, 4_500_000.0
        ref = (40.0 + 0.5 * c, -3.0 + 0.7 * c)
        place_id = 0
        for k in range(preset.train_streets_per_city):
            srng = _street_rng(seed, 1, c, k)
            length = preset.train_place_spacing * (preset.train_places_per_street + 1)
            origin = (east0 + 1500.0 * (k % 8), north0 + 1500.0 * (k // 8))
            street = R.make_street(srng, len(streets), origin, srng.uniform(0, 2 * math.pi), length, styles, templates, preset.template_prob)
            streets[("train", c, k)] = street
            for p in range(preset.train_places_per_street):
                u_p = preset.train_place_spacing * (p + 1)
                direction = 0.0 if srng.random() < 0.5 else math.pi
                n_views = int(srng.integers(preset.views_per_place[0], preset.views_per_place[1] + 1))
                conds = [c_ for c_, _ in preset.train_conditions]
                w = np.array([x for _, x in preset.train_conditions])
                # Distinct conditions first; repeats only when a place has more views than conditions.
                chosen = list(srng.choice(conds, size=min(n_views, len(conds)), replace=False, p=w / w.sum()))
                if n_views > len(conds):
                    chosen += list(srng.choice(conds, size=n_views - len(conds), p=w / w.sum()))
                hwl, hwr = street.half_width
                for v in range(n_views):
                    x = float(np.clip(srng.uniform(-6, 6), -(hwr - 1.0), hwl - 1.0))
                    cam = R.Camera(
                        u=u_p + float(srng.uniform(-3, 3)),
                        x=x,
                        yaw=direction + math.radians(float(np.clip(srng.normal(0, 7), -15, 15))),
                        pitch=math.radians(BASE_PITCH_DEG + float(srng.uniform(-3, 3))),
                        height=float(srng.uniform(2.0, 2.7)),
                    )
                    cond = str(chosen[v])
                    east, north = street.utm(cam.u, cam.x)
                    lat, lon = _latlon(ref, east0, north0, east, north)
                    year, month = int(srng.integers(2012, 2024)), _month(srng, cond)
                    heading = street.compass_heading(cam.yaw)
                    panoid = _panoid(srng)
                    name = gsv_image_name(city, place_id, year, month, int(heading) % 360, lat, lon, panoid)
                    rel = f"gsv_cities/Images/{city}/{name}"
                    jobs.append(_Job((seed, 1, ci), ("train", c, k), cam, cond, 1.0, rel))
                    tables["train"].append(
                        dict(place_id=place_id, year=year, month=month, northdeg=int(heading) % 360, city_id=city,
                             lat=lat, lon=lon, panoid=panoid, condition=cond, street=street.street_id,
                             along_m=round(cam.u, 3), lateral_m=round(cam.x, 3), yaw_deg=round(math.degrees(cam.yaw), 2),
                             pitch_deg=round(math.degrees(cam.pitch), 2), utm_east=round(float(east), 2),
                             utm_north=round(float(north), 2), _file=rel)
                    )
                    ci += 1
                place_id += 1

    # ---- val / test: database by day along the streets, queries elsewhere (VG layout) ----
    for split, n_streets, length in (
        ("val", preset.val_streets, preset.val_street_length),
        ("test", preset.test_streets, preset.test_street_length),
    ):
        code = _SPLIT_CODES[split]
        base_e, base_n = (600_000.0 if split == "val" else 700_000.0), 5_000_000.0
        idx = 0
        split_dir = f"vg/{DATASET_NAME}/images/{split}"
        for k in range(n_streets):
            srng = _street_rng(seed, code, k)
            origin = (base_e + 2000.0 * (k % 6), base_n + 2000.0 * (k // 6))
            street = R.make_street(srng, len(streets), origin, srng.uniform(0, 2 * math.pi), length, styles, templates, preset.template_prob)
            streets[(split, k)] = street
            hwl, hwr = street.half_width
            db_sun = (float(srng.uniform(0, 2 * math.pi)), math.radians(float(srng.uniform(35, 55))))
            directions = [0.0, math.pi][: preset.db_directions]
            rows = []
            for u in np.arange(0.0, length + 1e-6, preset.db_spacing):
                for d in directions:
                    cam = R.Camera(
                        u=float(u) + float(srng.uniform(-0.5, 0.5)),
                        x=DB_LANE_X + float(srng.uniform(-0.3, 0.3)),
                        yaw=d + math.radians(float(srng.uniform(-2, 2))),
                        pitch=math.radians(BASE_PITCH_DEG + float(srng.uniform(-1, 1))),
                    )
                    rows.append(("database", cam, "day", 0.5, db_sun))
            n_q = preset.queries_per_street if split == "test" or preset.val_queries_per_street is None else preset.val_queries_per_street
            for cond in _choose_conditions(srng, preset.query_conditions, n_q):
                # Anywhere across the road or sidewalks, but not hugging a facade.
                lo = max(-(hwr - 2.0), DB_LANE_X - preset.max_lateral_offset)
                hi = min(hwl - 2.0, DB_LANE_X + preset.max_lateral_offset)
                cam = R.Camera(
                    u=float(srng.uniform(0.0, length)),
                    x=float(srng.uniform(lo, hi)),
                    yaw=float(srng.choice(directions))
                    + math.radians(float(np.clip(srng.normal(0, preset.max_query_yaw_deg / 2), -preset.max_query_yaw_deg, preset.max_query_yaw_deg))),
                    pitch=math.radians(BASE_PITCH_DEG + float(srng.uniform(-preset.max_query_pitch_deg, preset.max_query_pitch_deg))),
                    height=float(srng.uniform(1.5, 2.7)),
                )
                rows.append(("queries", cam, cond, 1.0, None))
            for role, cam, cond, occ, sun in rows:
                east, north = street.utm(cam.u, cam.x)
                heading = street.compass_heading(cam.yaw)
                year = int(srng.integers(2012, 2024))
                month = 6 if role == "database" else _month(srng, cond)
                tag = "d" if role == "database" else "q"
                name = format_vg_name(
                    float(east), float(north), pano_id=f"{split}{tag}{idx:06d}", heading=heading,
                    pitch=math.degrees(cam.pitch), timestamp=_timestamp(srng, cond, year, month), note=cond,
                )
                rel_in_split = f"{role}/{name}"
                jobs.append(_Job((seed, code, idx), (split, k), cam, cond, occ, f"{split_dir}/{rel_in_split}", sun))
                tables[split].append(
                    dict(file=rel_in_split, role=role, condition=cond, street=street.street_id,
                         along_m=round(cam.u, 3), lateral_m=round(cam.x, 3),
                         lateral_offset_m=round(cam.x - DB_LANE_X, 3), yaw_deg=round(math.degrees(cam.yaw), 2),
                         pitch_deg=round(math.degrees(cam.pitch), 2), camera_height_m=round(cam.height, 2),
                         heading_deg=round(heading, 1), utm_east=round(float(east), 2), utm_north=round(float(north), 2))
                )
                idx += 1
    return streets, jobs, tables


# ----------------------------------------------------------------------------------------------
# rendering and writing
# ----------------------------------------------------------------------------------------------
_WORKER: dict = {}  # a pool worker's own copy of the streets (set by _init_worker in the child process)


def _init_worker(streets, root, size):
    _WORKER.update(streets=streets, root=Path(root), size=size)


def render_job(job: _Job, streets: dict, size: int) -> np.ndarray:
    """Pixels of one planned image: (size, size, 3) uint8. Depends only on the job, not on order."""
    rng = np.random.default_rng(list(job.key))
    light = R.draw_lighting(job.condition, rng)
    if job.sun is not None and job.condition == "day":
        light.sun_az, light.sun_el = job.sun
    return R.render(streets[job.street], job.camera, light, size, rng, occluders=job.occluders, image_key=int(job.key[-1]) * 7 + job.key[1])


def save_jpeg(pixels: np.ndarray, path: Path) -> None:
    """Deterministic JPEG: fixed quality and subsampling, no optimisation, no progressive scan."""
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0", optimize=False, progressive=False)


def write_job(job: _Job, streets: dict, root: Path, size: int) -> None:
    """Render one planned image and save it at ``root / job.path``."""
    save_jpeg(render_job(job, streets, size), root / job.path)


def _run_job(job: _Job) -> None:
    write_job(job, _WORKER["streets"], _WORKER["root"], _WORKER["size"])


def _write_tables(root: Path, tables: dict) -> None:
    train = pd.DataFrame(tables["train"])
    cols = ["place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid"]
    for city, df in (train.groupby("city_id", sort=True) if len(train) else []):
        df = df.drop(columns=["_file"])
        df = df[cols + [c for c in df.columns if c not in cols]]
        df.to_csv(root / "gsv_cities" / "Dataframes" / f"{city}.csv", index=False)
    for split in ("val", "test"):
        if not tables[split]:
            continue
        df = pd.DataFrame(tables[split]).sort_values(["role", "file"], kind="stable")
        df.to_csv(root / "vg" / DATASET_NAME / "images" / split / "metadata.csv", index=False)


def _manifest_for(preset: SyntheticPreset, seed: int, splits: tuple[str, ...]) -> dict:
    return {
        "generator": "scicevpr.offline.synthetic",
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "splits": sorted(splits),
        "preset": json.loads(json.dumps(asdict(preset))),
    }


def _matches(manifest_path: Path, expected: dict) -> bool:
    try:
        found = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return False
    return all(found.get(k) == v for k, v in expected.items())


def _benchmark(root: Path, preset: SyntheticPreset, seed: int, counts: dict) -> SyntheticBenchmark:
    return SyntheticBenchmark(root=root, gsv_root=root / "gsv_cities", vg_root=root / "vg", dataset=DATASET_NAME, preset=preset.name, seed=seed, counts=counts)


def generate(
    out_dir: str | os.PathLike | None = None,
    preset: str | SyntheticPreset = "small",
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
    workers: int | None = None,
    splits: tuple[str, ...] | None = None,
) -> SyntheticBenchmark:
    """Generate (or reuse) the synthetic benchmark.

    Args:
        out_dir: output folder; None means ``$SCICEVPR_DATA/synthetic/<preset>`` (else ``data/...``).
        preset: ``"tiny"`` (unit tests), ``"small"`` (CPU notebooks), ``"small-hard"`` (the former
            ``"small"``: harder viewpoints, more aliasing), ``"full"`` (GPU training),
            ``"pretrain"`` (backbone pretraining: training split only), or a ``SyntheticPreset``.
        seed: the same preset and seed give byte-identical files.
        progress: show a tqdm bar.
        force: regenerate even if a matching benchmark exists; replace one made with other settings.
        workers: rendering processes; None picks ``min(cpu_count, 8)`` for large jobs, 0 renders in
            this process. The output does not depend on it.
        splits: a subset of ``("train", "val", "test")`` to write (default: all). A split's files
            do not depend on which other splits are written.
    Returns:
        ``SyntheticBenchmark`` with ``gsv_root`` and ``vg_root`` for the loaders.
    """
    preset = get_preset(preset)
    splits = tuple(SPLITS if splits is None else splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits!r}")
    root = Path(out_dir) if out_dir is not None else default_synthetic_dir(preset.name)
    with _exclusive(root):  # a second generate() of the same folder waits, then reuses the result
        return _generate(root, preset, seed, splits, progress, force, workers)


@contextmanager
def _exclusive(root: Path):
    """Hold an exclusive lock on ``root`` (a ``.<name>.lock`` file beside it) for the block.

    Two notebooks or commands generating the same benchmark at once would otherwise delete and
    rewrite each other's files. The operating system releases the lock when its process dies, so
    an interrupted generation never leaves it stuck. Without ``fcntl`` (Windows) nothing is locked.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root.parent / f".{root.name}.lock", wait=True):
        yield


def _generate(root: Path, preset: SyntheticPreset, seed: int, splits: tuple[str, ...], progress: bool, force: bool,
              workers: int | None) -> SyntheticBenchmark:
    expected = _manifest_for(preset, seed, splits)
    manifest_path = root / MANIFEST
    if manifest_path.is_file() and not (root / _IN_PROGRESS).exists() and not force:
        if _matches(manifest_path, expected):
            return _benchmark(root, preset, seed, json.loads(manifest_path.read_text()).get("counts", {}))
        found = json.loads(manifest_path.read_text())
        raise FileExistsError(
            f"{str(root)!r} holds a synthetic benchmark made with other settings (preset "
            f"{found.get('preset', {}).get('name')!r}, seed {found.get('seed')!r}); pass force=True "
            "(--force) to replace it, or choose another output folder."
        )
    ours = manifest_path.is_file() or (root / _IN_PROGRESS).exists()
    if root.exists() and any(root.iterdir()) and not ours:
        raise FileExistsError(
            f"{str(root)!r} exists, is not empty and holds no synthetic benchmark; choose another output folder."
        )
    for sub in ("gsv_cities", "vg", MANIFEST):  # only what this generator writes
        p = root / sub
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    streets, jobs, tables = build_plan(preset, seed)
    jobs = [j for j in jobs if j.path.startswith(tuple(_SPLIT_PREFIX[s] for s in splits))]
    tables = {s: (t if s in splits else []) for s, t in tables.items()}
    root.mkdir(parents=True, exist_ok=True)
    (root / _IN_PROGRESS).write_text("generation in progress or interrupted; generate() will redo it\n")
    for d in sorted({str(Path(j.path).parent) for j in jobs}):
        (root / d).mkdir(parents=True, exist_ok=True)
    if "train" in splits:
        (root / "gsv_cities" / "Dataframes").mkdir(parents=True, exist_ok=True)

    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(jobs) >= 300 else 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=f"synthetic {preset.name}", unit="img")
    if workers and workers > 1:
        # fork (as DataLoader workers do on Linux): no re-import of the caller's script, fast start;
        # the children only run numpy and PIL. spawn elsewhere.
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            with ProcessPoolExecutor(workers, mp_context=get_context(method), initializer=_init_worker, initargs=(streets, str(root), preset.image_size)) as ex:
                for _ in ex.map(_run_job, jobs, chunksize=8):
                    if bar is not None:
                        bar.update(1)
    else:  # in this process, leaving nothing behind in _WORKER
        for job in jobs:
            write_job(job, streets, root, preset.image_size)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    _write_tables(root, tables)
    counts = {
        "splits": sorted(splits),
        "train_places": len({(r["city_id"], r["place_id"]) for r in tables["train"]}),
        "train_images": len(tables["train"]),
        **{f"{s}_{role}": sum(r["role"] == role for r in tables[s]) for s in ("val", "test") for role in ("database", "queries")},
        "images": len(jobs),
    }
    manifest = {**expected, "counts": counts}  # no timings: every file, this one too, is reproducible
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (root / _IN_PROGRESS).unlink()
    return _benchmark(root, preset, seed, counts)
