"""Try a variant of the synthetic world: chance level, raw pixels, and the offline recipe's
teacher and student on it, with bootstrap intervals. A tool for choosing the default preset's
difficulty (how far queries stray from the database lane, the condition mix, aliasing, the
number of training places).

    python benchmarks/world_sweep.py NAME '{"max_lateral_offset": 4.0, "test_streets": 10,
        "queries_per_street": 50}' [WEIGHTS.pth | none]

Fields are those of ``scicevpr.data.synthetic.SyntheticPreset`` replaced in the ``small``
preset; the data go to ``/tmp/scicevpr-world-NAME`` and the runs beside it. Run it with the
pinned kernels (``make`` exports them) for numbers comparable with the stored notebooks.
Measured so far (2 CPU cores; DINO backbone of ``scicevpr/weights``): see
``scicevpr/weights/README.md``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from scicevpr.data.synthetic import PRESETS, generate
from scicevpr.data.vg import load_vg_split
from scicevpr.evaluate import EvalConfig, chance_recall, evaluate, pixel_baseline_recall
from scicevpr.train import offline_train_config, train_student, train_teacher


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def main(name: str, changes: dict, weights: str | None) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    preset = dataclasses.replace(PRESETS["small"], name=name, **{k: _tuples(v) for k, v in changes.items()})
    root = Path(f"/tmp/scicevpr-world-{name}")
    t = time.time()
    bench = generate(root / "data", preset=preset, seed=0, progress=False, workers=2)
    split = load_vg_split(bench.vg_root, "synthetic", "test")
    show = lambda d: {k: round(v, 1) for k, v in d.items()}  # noqa: E731
    print(name, "queries", split.num_queries, "database", split.num_database, f"generated in {time.time() - t:.0f} s")
    print(name, "chance", show(chance_recall(split.num_database, split.positives, (1, 5, 10))))
    print(name, "raw pixels", show(pixel_baseline_recall(split)))
    overrides = {"backbone_num_blocks": 4, "backbone_pretrain_img_size": 112} if weights else {}
    runs = root / ("runs-pretrained" if weights else "runs-random")
    ec = EvalConfig(num_workers=0, progress=False, amp=False)
    teacher = train_teacher(offline_train_config(bench.gsv_root, bench.vg_root, runs / "teacher", weights=weights,
                                                 model_overrides=overrides, progress=False, resume=True))
    r = evaluate(teacher.model, split, ec)
    print(name, "teacher", show(r.recalls), {k: tuple(round(x, 1) for x in v) for k, v in r.intervals().items()})
    student = train_student(offline_train_config(bench.gsv_root, bench.vg_root, runs / "student", stage="student",
                                                 teacher=teacher.best_path, weights=weights, model_overrides=overrides,
                                                 progress=False, resume=True))
    r = evaluate(student.model, split, ec)
    print(name, "student", show(r.recalls), {k: tuple(round(x, 1) for x in v) for k, v in r.intervals().items()},
          f"{time.time() - t:.0f} s in all")


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), None if len(sys.argv) < 4 or sys.argv[3] == "none" else sys.argv[3])
