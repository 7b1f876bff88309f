"""Try a variant of the synthetic world: chance level, raw pixels, hue histograms in strips (the
colour layout alone), and the offline recipe's teacher and student on it, with bootstrap
intervals. A tool for choosing the default preset's difficulty (how far queries stray from the
database lane, the condition mix, aliasing, the number of training places).

    python benchmarks/world_sweep.py NAME '{"max_lateral_offset": 4.0}' [auto | none | WEIGHTS.pth] [--ablation]
        [--train '{"max_iters_per_epoch": 10}']

Fields are those of ``scicevpr.offline.synthetic.SyntheticPreset`` replaced in the ``small``
preset; the data go to ``/tmp/scicevpr-world-NAME`` and the runs beside it. ``--train`` replaces
fields of both stages' ``TrainConfig`` (e.g. keep the recipe's 10 iterations an epoch on a world
with more training places). Run it with the pinned kernels (``make`` exports them) for numbers
comparable with the stored notebooks.
The student before training is the stage-2 model as training starts it (the backbone and the
teacher's frozen 1x1 conv, untrained token mixers and encoder). Measured so far (2 CPU cores):
see ``scicevpr/weights/README.md`` and ``data/README.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path

import torch

from scicevpr.lab.analysis import initial_student
from scicevpr.weights import file_sha256
from scicevpr.offline.synthetic import PRESETS, generate
from scicevpr.data.vg import load_vg_split
from scicevpr.config import EvalConfig
from scicevpr.evaluate import chance_recall, evaluate
from scicevpr.lab.baselines import colour_baseline_result, pixel_baseline_result
from scicevpr.config import TrainConfig
from scicevpr.offline.config import offline_train_config
from scicevpr.train import loss_variant_config, train_student, train_teacher


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def main(name: str, changes: dict, weights: str | None, ablation: bool = False, train: dict | None = None) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    preset = dataclasses.replace(PRESETS["small"], name=name, **{k: _tuples(v) for k, v in changes.items()})
    root = Path(f"/tmp/scicevpr-world-{name}")
    t = time.time()
    bench = generate(root / "data", preset=preset, seed=0, progress=False, workers=2)
    split = load_vg_split(bench.vg_root, "synthetic", "test")
    show = lambda d: {k: round(v, 1) for k, v in d.items()}  # noqa: E731
    ci = lambda r: {k: tuple(round(x, 1) for x in v) for k, v in r.intervals().items()}  # noqa: E731
    print(name, "queries", split.num_queries, "database", split.num_database, f"generated in {time.time() - t:.0f} s")
    print(name, "chance", show(chance_recall(split.num_database, split.positives, (1, 5, 10))))
    pixels = pixel_baseline_result(split)
    print(name, "raw pixels", show(pixels.recalls), ci(pixels))
    colours = colour_baseline_result(split)
    print(name, "hue histograms", show(colours.recalls), ci(colours))
    # runs are resumed when present: a weight file's runs are keyed by its content, not only its name
    tag = "random" if weights is None else "shipped" if weights == "auto" else f"{Path(weights).stem}-{file_sha256(weights)[:12]}"
    runs = root / f"runs-{tag}"
    ec = EvalConfig(num_workers=0, progress=False, amp=False)
    common = dict(weights=weights, progress=False, resume=True, **(train or {}))
    teacher = train_teacher(offline_train_config(bench.gsv_root, bench.vg_root, runs / "teacher", **common))
    untrained = initial_student(teacher.model, seed=0)  # the backbone (and the teacher's conv) without trained heads
    r = evaluate(untrained, split, ec)
    print(name, "student before training", show(r.recalls), ci(r))
    r = evaluate(teacher.model, split, ec)
    print(name, "teacher", show(r.recalls), ci(r))
    student_config = offline_train_config(bench.gsv_root, bench.vg_root, runs / "student", stage="student",
                                          teacher=teacher.best_path, **common)
    student = train_student(student_config)
    r = evaluate(student.model, split, ec)
    print(name, "student", show(r.recalls), ci(r), f"{time.time() - t:.0f} s in all")
    if ablation:  # notebook 04's ablation: the student's steps, scored once at the end
        ms_only = train_student(loss_variant_config(student_config, runs / "student-ms-only", eta=0.0))
        r = evaluate(ms_only.model, split, ec)
        print(name, "student L_MS only (eta = 0)", show(r.recalls), ci(r), f"{time.time() - t:.0f} s in all")


def _json_fields(parser: argparse.ArgumentParser, option: str, text: str, fields_of) -> dict:
    """``text`` as a JSON object whose keys are fields of the dataclass ``fields_of``."""
    try:
        value = json.loads(text)
    except ValueError as e:
        parser.error(f"{option}: {text!r} is not JSON ({e}); write an object such as '{{\"max_lateral_offset\": 4.0}}'")
    if not isinstance(value, dict):
        parser.error(f"{option}: {text!r} is not a JSON object of field names and values")
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(fields_of)})
    if unknown:
        parser.error(f"{option}: {fields_of.__name__} has no field {', '.join(unknown)}; "
                     f"its fields are {', '.join(f.name for f in dataclasses.fields(fields_of))}")
    return value


def parse_args(argv: list[str] | None = None) -> dict:
    """The command line as ``main``'s keyword arguments; a bad variant, ``--train`` field or
    weights path exits with status 2 and one message naming it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the variant's name (data in /tmp/scicevpr-world-NAME)")
    parser.add_argument("changes", help="JSON object of SyntheticPreset fields replaced in the 'small' preset")
    parser.add_argument("weights", nargs="?", default="auto", help="auto (the shipped backbone), none (random) or a path")
    parser.add_argument("--ablation", action="store_true", help="also train the student with L_MS only (eta = 0)")
    parser.add_argument("--train", default=None, help="JSON object of TrainConfig fields replaced in both stages")
    args = parser.parse_args(argv)
    changes = _json_fields(parser, "changes", args.changes, type(PRESETS["small"]))
    train = None if args.train is None else _json_fields(parser, "--train", args.train, TrainConfig)
    if args.weights not in ("auto", "none") and not Path(args.weights).is_file():
        parser.error(f"weights: no file {args.weights!r}; give auto, none or the path of a weight file")
    return dict(name=args.name, changes=changes, weights=None if args.weights == "none" else args.weights,
                ablation=args.ablation, train=train)


if __name__ == "__main__":
    main(**parse_args())
