"""A synthetic benchmark laid out where full mode (``SCICEVPR_MODE=full``) expects the real data.

Full mode reads GSV-Cities from ``$SCICEVPR_DATA/gsv_cities/`` and VG-benchmark splits from
``$SCICEVPR_DATA/<dataset>/images/<split>/``. This script generates a synthetic benchmark
(:mod:`scicevpr.offline.synthetic`) in ``<root>/generated/<size>/`` and links its files (hard
links, copies where those fail) into::

    <root>/gsv_cities/Dataframes/<city>.csv, <root>/gsv_cities/Images/<city>/*.jpg     training
    <root>/synthetic/images/{val,test}/{database,queries}/*.jpg (+ metadata.csv)        evaluation

so that the notebooks run the full configuration end to end on it with::

    SCICEVPR_MODE=full SCICEVPR_DATA=<root> SCICEVPR_DATASET=synthetic SCICEVPR_VAL_DATASET=synthetic \\
    SCICEVPR_WEIGHTS=random SCICEVPR_EPOCHS=2 SCICEVPR_MAX_ITERS=2

Sizes (``--size``):

``small``
    the synthetic ``small`` preset: 80 training places (one 72 x 4 batch per epoch), about 100
    validation and 280 test images; seconds on a GPU machine.
``smoke``
    the least that still fills one paper-size training batch: 72 places x 4 views, one short
    validation and test street (about 15 images each); for checking full mode on a CPU.

Checks that a GPU run would otherwise find late: the layouts are read back with the loaders.
Refuses to touch ``<root>/gsv_cities`` or ``<root>/synthetic`` unless this script wrote them.

    python benchmarks/full_mode_data.py --root /tmp/scicevpr-full-data --size small
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scicevpr.data.gsv import GSVCitiesDataset  # noqa: E402
from scicevpr.offline.synthetic import PRESETS, SyntheticPreset, generate  # noqa: E402
from scicevpr.data.vg import load_vg_split  # noqa: E402

MARKER = "full_mode_data.json"  # written into <root>: the folders below are this script's
DATASET = "synthetic"

SIZES: dict[str, SyntheticPreset] = {
    "small": PRESETS["small"],
    "smoke": SyntheticPreset(
        name="smoke", image_size=224, train_cities=2, train_streets_per_city=4, train_places_per_street=9,
        views_per_place=(4, 4), val_streets=1, test_streets=1, val_street_length=60.0, test_street_length=80.0,
        queries_per_street=8,
    ),
}


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def build(root: Path, size: str = "small", seed: int = 0, workers: int | None = None) -> dict:
    """Generate (or reuse) the benchmark and lay it out under ``root``; returns a summary."""
    root = Path(root)
    targets = {"gsv_cities": root / "gsv_cities", DATASET: root / DATASET}
    marker = root / MARKER
    for name, path in targets.items():
        if path.exists() and not marker.is_file():
            raise FileExistsError(
                f"{str(path)!r} exists and was not written by this script (no {MARKER} in {str(root)!r}); "
                "it may be a real dataset. Choose another --root."
            )
    bench = generate(root / "generated" / size, preset=SIZES[size], seed=seed, progress=False, workers=workers)
    for path in targets.values():
        if path.exists():
            shutil.rmtree(path)
    shutil.copytree(bench.gsv_root, targets["gsv_cities"], copy_function=_link_or_copy)
    shutil.copytree(bench.vg_root / bench.dataset, targets[DATASET], copy_function=_link_or_copy)
    summary = {"size": size, "seed": seed, "generated": str(bench.root), **bench.counts}
    marker.write_text(json.dumps(summary, indent=2) + "\n")

    # read the layouts back as full mode will
    train = GSVCitiesDataset(targets["gsv_cities"], image_size=224, seed=seed)
    summary["train_places_with_4_views"] = len(train)
    for split in ("val", "test"):
        s = load_vg_split(root, DATASET, split)
        summary[f"{split}_database"], summary[f"{split}_queries"] = s.num_database, s.num_queries
    if len(train) < 72:
        raise RuntimeError(f"only {len(train)} training places: full mode's P = 72 needs at least 72")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the folder to use as $SCICEVPR_DATA")
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: up to 8)")
    args = p.parse_args(argv)
    summary = build(Path(args.root), args.size, args.seed, args.workers)
    print(f"full-mode data ({args.size}) under {args.root}:")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
