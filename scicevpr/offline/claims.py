"""The paper's claims, each tested offline with paired statistics over training seeds
(``scicevpr claims``; docs/method.md, "The paper's claims").

For every training seed, one recipe (:func:`scicevpr.offline.config.offline_train_config`, the synthetic
benchmark, the shipped offline backbone) trains these models, each in its own run folder, so a
killed run resumes without training a finished model again:

=================  =====  ==================================================================
name               stage  model
=================  =====  ==================================================================
teacher            1      Super-CricaVPR, the last M = 4 blocks fused (the recipe's model)
student            2      SciceVPR distilled from ``teacher`` with ``L_T = gamma L_MS + eta L_D``
student-ms         2      the same student with ``L_MS`` only (eta = 0)
teacher-m1         1      Super-CricaVPR with M = 1 (the last block only)
student-m1         2      SciceVPR distilled from ``teacher-m1`` with ``L_T``
cricavpr           1      CricaVPR-S: adapters in the backbone, CLS token as the 14th region
cricavpr-nocls     1      CricaVPR-S without its CLS region (13 regions)
cricavpr-frozen    1      CricaVPR-S without adapters (a frozen backbone, as SciceVPR's)
=================  =====  ==================================================================

Equal budget: every stage-1 model (the teachers and the three CricaVPR-S) trains the same
epochs of the same P x K place batches (same seed: the same places in the same order), every
stage-2 model the same epochs of its own; the steps and images are written beside each model.
The checkpoint kept is the last epoch's for every model: the offline validation split has 100
queries, too few to rank epochs (a difference of a few queries is inside its interval), so no
validation runs during training.

Every model is scored on the test split with the default batching (queries and database in
batches of 16, file order); the cross-image models and the student also under every query
batching of the stability sweep (:func:`scicevpr.stability.batch_stability`: batch sizes x
orders). The comparisons (:data:`CLAIMS`) are paired: the same queries, R@1 difference in
points, its paired-bootstrap interval, McNemar's exact p per seed, and over seeds the mean, min,
max and a two-level bootstrap interval of the mean (:mod:`scicevpr.stats`), with the verdict of
:func:`scicevpr.stats.verdict`. The table is computed, never typed: ``claims.md``, ``claims.csv``
and the per-seed, per-model ``claims_runs.csv``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .config import ClaimsConfig
from ..stats import VERDICTS, SeedDifferences, seed_differences, verdict

PathLike = str | os.PathLike

# Verdict of a row that measures a control, not a claim of the paper.
CONTROL = "control"
ALLOWED_VERDICTS = (*VERDICTS, CONTROL)

STAGE1 = ("teacher", "teacher-m1", "cricavpr", "cricavpr-nocls", "cricavpr-frozen")
STAGE2 = {"student": ("teacher", {}), "student-ms": ("teacher", {"eta": 0.0}), "student-m1": ("teacher-m1", {})}
# training order: a student right after its teacher, so that it draws the teacher's batches from the
# backbone cache; the CricaVPR-S variants last
MODELS = ("teacher", "student", "student-ms", "teacher-m1", "student-m1", "cricavpr-frozen", "cricavpr", "cricavpr-nocls")
CROSS_IMAGE = ("teacher", "teacher-m1", "cricavpr", "cricavpr-nocls", "cricavpr-frozen")
STABILITY = (*CROSS_IMAGE, "student")  # models whose batch dependence is measured
MIN_RANKING_QUERIES = 300  # validation queries needed to rank epochs; with fewer, the last epoch is the honest choice
RESULT_VERSION = 1  # of the scores kept beside each checkpoint (claims_eval.json / claims_eval.npz)


# --------------------------------------------------------------------------------------------
# The claims: which comparison tests which claim
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One row of the table: ``a - b`` in R@1, the paper claiming the sign ``direction``
    (None: a control, no claim). ``a`` / ``b``: ``"<model>"`` (default batching),
    ``"<model>@worst"`` (its worst batching, per seed), ``"<model>@varies"`` (1 where the query's
    R@1 correctness changes with the batching) or ``"zero"``."""

    id: str
    claim: str
    evidence: str
    a: str
    b: str
    direction: int | None = 1


CLAIMS: tuple[Claim, ...] = (
    Claim("1", "fusing the last M = 4 blocks beats the last block alone (students, same recipe)",
          "Fig. 4-5; ablation over M", "student", "student-m1"),
    Claim("2a", "the teacher's retrieval changes with the query batching",
          "Fig. 1-2 (CricaVPR; Super-CricaVPR shares its encoder)", "teacher@varies", "zero"),
    Claim("2b", "CricaVPR's retrieval changes with the query batching",
          "Fig. 1-2: CricaVPR's R@1 on Tokyo24/7 varies with batch size and order", "cricavpr@varies", "zero"),
    Claim("3", "the student's descriptors do not depend on the batch",
          "by construction (each regional feature encoded alone)", "student@varies", "zero"),
    Claim("4a", "distillation (L_T) trains a better student than L_MS alone",
          "the paper's loss ablation", "student", "student-ms"),
    Claim("4b", "the student keeps (or exceeds) the teacher's accuracy",
          "abstract; teacher vs student tables", "student", "teacher"),
    Claim("5a", "SciceVPR beats CricaVPR (default batching)",
          "Fig. 2; main tables", "student", "cricavpr"),
    Claim("5b", "SciceVPR beats CricaVPR under every batching (CricaVPR-S's worst)",
          "Fig. 2: under every query batching on Tokyo24/7", "student", "cricavpr@worst"),
    Claim("5c", "SciceVPR beats CricaVPR without its CLS region",
          "control for Fig. 4a's difference 'class token as a 14th region'", "student", "cricavpr-nocls"),
    Claim("5d", "SciceVPR beats CricaVPR with a frozen backbone (no adapters)",
          "control for Fig. 4a's difference 'adapters inside DINOv2'", "student", "cricavpr-frozen"),
    Claim("c1", "what CricaVPR-S's CLS region adds", "control (not a claim)", "cricavpr", "cricavpr-nocls", None),
    Claim("c2", "what CricaVPR-S's adapters add", "control (not a claim)", "cricavpr", "cricavpr-frozen", None),
    Claim("c3", "what fusion adds to the teacher (M = 4 vs M = 1)", "control (not a claim)", "teacher", "teacher-m1", None),
    Claim("c4", "the student against the teacher at the teacher's worst batching", "control (not a claim)",
          "student", "teacher@worst", None),
)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _last_block() -> int:
    from .config import OFFLINE_MODEL_OVERRIDES

    return tuple(OFFLINE_MODEL_OVERRIDES["layers"])[-1]


def train_config(name: str, config: ClaimsConfig, bench, seed: int, run_dir: Path, teacher: PathLike | None = None):
    """The :class:`~scicevpr.config.TrainConfig` of model ``name`` (module docstring) for ``seed``:
    the offline recipe with validation off (the last epoch is kept), resumable."""
    from ..train import loss_variant_config
    from .config import offline_train_config

    stage = "student" if name in STAGE2 else "teacher"
    common: dict[str, Any] = dict(
        weights=config.weights, seed=seed, resume=True, progress=config.progress, val_dataset=None,
        num_workers=config.num_workers, max_iters_per_epoch=config.max_iters_per_epoch,
    )
    epochs = config.stage2_epochs if stage == "student" else config.stage1_epochs
    if epochs is not None:
        common["epochs"] = epochs
    last = (_last_block(),)
    overrides: dict[str, Any] = {
        "teacher": {},
        "teacher-m1": {"model_overrides": {"layers": last}},
        "student-m1": {"model_overrides": {"layers": last}},  # its teacher's model: a teacher is loaded as it was trained
        "cricavpr": {"model": "CricaVPR", "preset": "CricaVPR-S", "model_overrides": {"layers": last}},
        "cricavpr-nocls": {"model": "CricaVPR", "preset": "CricaVPR-S", "model_overrides": {"layers": last, "class_token": False}},
        "cricavpr-frozen": {"model": "CricaVPR", "preset": "CricaVPR-S", "model_overrides": {"layers": last, "adapters": False}},
    }.get(name, {})
    if name not in STAGE1 and name not in STAGE2:
        raise ValueError(f"unknown claims model {name!r}; expected one of {MODELS}")
    tc = offline_train_config(bench.gsv_root, bench.vg_root, run_dir, stage=stage, teacher=teacher,
                              dataset=bench.dataset, **common, **overrides)
    loss = STAGE2.get(name, (None, {}))[1]
    return loss_variant_config(tc, run_dir, **loss) if loss else tc  # e.g. eta = 0: the same steps, L_MS only


def _train(name: str, config: ClaimsConfig, bench, seed: int, seed_dir: Path, cache=None):
    from ..train import train_student, train_teacher

    teacher = None
    if name in STAGE2:
        teacher = seed_dir / STAGE2[name][0] / "last.pt"
        if not teacher.is_file():
            raise RuntimeError(f"{name} needs its teacher's {teacher}, which is missing: train {STAGE2[name][0]} first")
    tc = train_config(name, config, bench, seed, seed_dir / name, teacher)
    run = (train_student if name in STAGE2 else train_teacher)(tc, cache=cache)
    return tc, run


# --------------------------------------------------------------------------------------------
# Evaluation of one model, stored beside its checkpoint
# --------------------------------------------------------------------------------------------


def _r1_correct(top1: np.ndarray, positives) -> np.ndarray:
    """(N_q,) bool: query i's nearest database image is one of its positives."""
    return np.array([int(t) in set(np.asarray(p).tolist()) for t, p in zip(top1, positives)], dtype=bool)


def evaluate_model(model, split, config: ClaimsConfig, stability: bool,
                   cache=None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Scores of ``model`` on ``split``: (facts, per-query arrays).

    Facts: R@1/5/10 and the R@1 interval at the default batching; with ``stability``, the
    batch sweep's worst R@1 setting, the spread of R@1, the largest change of a descriptor
    component, and how many queries change their top-1 / their R@1 correctness across the
    settings. Arrays: ``correct`` (default batching), and with ``stability`` ``worst`` (at the
    worst setting), ``top1_varies`` and ``correct_varies`` (the top-1 / the correctness is not
    the same under every setting, batch size 1 included). ``cache``: a
    :class:`~scicevpr.offline.cache.BackboneCache` (None: none)."""
    from ..config import EvalConfig
    from ..evaluate import evaluate
    from ..stability import batch_stability, stability_features

    ec = EvalConfig(batch_size=16, device="cpu", amp=False, num_workers=0, progress=config.progress)
    res = evaluate(model, split, ec, cache=cache)
    correct = res.correct[:, 0].copy()
    lo, hi = res.intervals()[1]
    facts: dict[str, Any] = {"R@1": res.recalls[1], "R@5": res.recalls[5], "R@10": res.recalls[10],
                             "R@1 lo": lo, "R@1 hi": hi, "num_queries": int(split.num_queries)}
    arrays = {"correct": correct}
    if stability:
        f = stability_features(model, split, ec, database=res.database_descriptors, cache=cache)
        table = batch_stability(model, split, config.batch_sizes, config.num_orders, features=f, config=ec)
        seen = list(f.settings_seen.values())  # one (top1, cosines) per setting, in the table's row order
        if len(seen) != len(table):
            raise RuntimeError(f"the stability sweep recorded {len(seen)} settings for {len(table)} table rows")
        top1s = np.stack([t for t, _ in seen])  # (settings, N_q)
        corrects = np.stack([_r1_correct(t, split.positives) for t in top1s])  # (settings, N_q)
        w = int(np.argmin(table["R@1"].to_numpy()))
        worst = table.iloc[w]
        arrays.update(worst=corrects[w],
                      top1_varies=(top1s != top1s[:1]).any(0), correct_varies=(corrects != corrects[:1]).any(0))
        facts.update({"worst R@1": float(worst["R@1"]), "worst batch_size": int(worst["batch_size"]),
                      "worst order": int(worst["order"]), "R@1 spread": float(table["R@1"].max() - table["R@1"].min()),
                      "max_abs_change": float(table["max_abs_change"].max()),
                      "top1_varies": int(arrays["top1_varies"].sum()), "correct_varies": int(arrays["correct_varies"].sum()),
                      "settings": int(len(table))})
    return facts, arrays


def _stored_result(run_dir: Path, checkpoint_sha: str) -> tuple[dict, dict] | None:
    facts_path, arrays_path = run_dir / "claims_eval.json", run_dir / "claims_eval.npz"
    if not (facts_path.is_file() and arrays_path.is_file()):
        return None
    facts = json.loads(facts_path.read_text())
    if facts.get("version") != RESULT_VERSION or facts.get("checkpoint_sha256") != checkpoint_sha:
        return None
    with np.load(arrays_path) as z:
        arrays = {k: z[k] for k in z.files}
    return facts, arrays


def _store_result(run_dir: Path, facts: dict, arrays: dict) -> None:
    from ..files import atomic_write, atomic_write_text

    atomic_write(run_dir / "claims_eval.npz", lambda f: np.savez(f, **arrays))
    atomic_write_text(run_dir / "claims_eval.json", json.dumps(facts, indent=1, default=float))


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children (DataLoader
    workers): a measure of the work that the machine's other load does not stretch."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_model(name: str, config: ClaimsConfig, bench, split, seed: int, seed_dir: Path,
              log: Callable[[str], None] = print, cache=None) -> tuple[dict, dict]:
    """Train (or resume) model ``name`` of ``seed`` and score it; both are kept in its run folder
    and reused when the checkpoint is the same. ``cache``: a
    :class:`~scicevpr.offline.cache.BackboneCache` shared by the runs (None: none)."""
    from ..weights import file_sha256

    t0, c0 = time.perf_counter(), _cpu_seconds()
    tc, run = _train(name, config, bench, seed, seed_dir, cache)
    train_wall, train_cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    sha = file_sha256(run.last_path)
    stored = _stored_result(run.run_dir, sha)
    if stored is not None:
        log(f"seed {seed} {name}: done before (R@1 {stored[0]['R@1']:.1f})")
        return stored
    t1, c1 = time.perf_counter(), _cpu_seconds()
    facts, arrays = evaluate_model(run.model, split, config, stability=name in STABILITY, cache=cache)
    eval_s, eval_cpu = time.perf_counter() - t1, _cpu_seconds() - c1
    hist = run.history
    epochs = int(hist["epoch"].max()) if len(hist) else 0
    steps = int(hist["iteration"].max()) if len(hist) else 0
    facts.update({
        "version": RESULT_VERSION, "checkpoint_sha256": sha, "model": name, "seed": seed,
        "model_class": type(run.model).__name__, "stage": 2 if name in STAGE2 else 1,
        "epochs": epochs, "steps": steps, "images": steps * tc.places_per_batch * tc.img_per_place,
        "train_s": float(hist["train_s"].sum()) if "train_s" in hist else float("nan"),
        "train_wall_s": train_wall, "eval_s": eval_s, "train_cpu_s": train_cpu, "eval_cpu_s": eval_cpu,
        "checkpoint": "last epoch",
    })
    _store_result(run.run_dir, facts, arrays)
    log(f"seed {seed} {name}: R@1 {facts['R@1']:.1f} [{facts['R@1 lo']:.1f}, {facts['R@1 hi']:.1f}], "
        f"{steps} steps, trained in {train_wall:.0f} s ({train_cpu:.0f} CPU s), scored in {eval_s:.0f} s ({eval_cpu:.0f} CPU s)")
    return facts, arrays


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def _side(spec: str, arrays: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
    if spec == "zero":
        return np.zeros_like(next(iter(arrays.values()))["correct"])
    model, _, what = spec.partition("@")
    return arrays[model][{"": "correct", "worst": "worst", "varies": "correct_varies"}[what]]


def _fmt(x: float) -> str:
    return f"{x:+.1f}" if np.isfinite(x) else "n/a"


def _interval(d: SeedDifferences) -> str:
    return f"{_fmt(d.mean)} [{_fmt(d.lo)}, {_fmt(d.hi)}]"


def claim_rows(runs: dict[int, dict[str, tuple[dict, dict]]], config: ClaimsConfig) -> pd.DataFrame:
    """One row per :data:`CLAIMS` entry from ``runs[seed][model] = (facts, arrays)``."""
    seeds = sorted(runs)
    rows = []
    diffs: dict[str, SeedDifferences] = {}
    for c in CLAIMS:
        pairs = [(_side(c.a, {m: r[1] for m, r in runs[s].items()}), _side(c.b, {m: r[1] for m, r in runs[s].items()}))
                 for s in seeds]
        d = seed_differences(pairs, num_samples=config.num_samples, seed=0)
        diffs[c.id] = d
        if c.direction is None:
            v = CONTROL
        elif c.id == "3":  # a claim of equality, by construction: any change contradicts it
            v = "agrees" if d.max == 0 and all(runs[s]["student"][0]["top1_varies"] == 0 for s in seeds) else "contradicts"
        else:
            v = verdict(d.lo, d.hi, c.direction)
        rows.append({
            "id": c.id, "claim": c.claim, "paper_evidence": c.evidence, "comparison": f"{c.a} - {c.b}",
            "measure": "queries whose R@1 correctness changes with the batching (%)" if c.b == "zero" else "R@1 difference (points)",
            "seeds": len(seeds), "mean": d.mean, "lo": d.lo, "hi": d.hi, "min": d.min, "max": d.max,
            "per_seed": ";".join(f"{s.diff:.2f}" for s in d.per_seed),
            "mcnemar_p": ";".join(f"{s.p:.3g}" for s in d.per_seed) if c.b != "zero" else "",
            "verdict": v, "reason": "",
        })
    table = pd.DataFrame(rows)
    table["reason"] = [_reason(r, diffs, runs) for r in table.to_dict("records")]
    return table


def _reason(row: dict, diffs: dict[str, SeedDifferences], runs) -> str:
    """The measured context of a row whose verdict is not "agrees", from other rows' numbers
    (never typed results): the controls that measure the difference's likely cause."""
    if row["verdict"] in ("agrees", CONTROL):
        return ""
    i, seeds = row["id"], sorted(runs)
    parts = []
    if row["verdict"] == "inconclusive":
        parts.append(f"the interval holds 0 over {len(seeds)} seed(s)")
    if i.startswith("5"):
        parts.append(f"CricaVPR-S's CLS region adds {_interval(diffs['c1'])}, its adapters {_interval(diffs['c2'])} points")
    if i == "1":
        parts.append(f"the teachers differ by {_interval(diffs['c3'])} points (M = 4 - M = 1)")
    if i == "4b":
        parts.append(f"against the teacher's worst batching: {_interval(diffs['c4'])} points")
    if i in ("2a", "2b", "3"):
        m = i == "2a" and "teacher" or i == "2b" and "cricavpr" or "student"
        top1 = [runs[s][m][0]["top1_varies"] for s in seeds]
        change = max(runs[s][m][0]["max_abs_change"] for s in seeds)
        parts.append(f"top-1 changes with the batching for {min(top1)}-{max(top1)} queries, "
                     f"descriptors change by up to {change:.2g}")
    return "; ".join(parts)


def runs_table(runs: dict[int, dict[str, tuple[dict, dict]]]) -> pd.DataFrame:
    """``claims_runs.csv``: one row per (seed, model) with its facts."""
    keys = ["seed", "model", "model_class", "stage", "epochs", "steps", "images", "checkpoint", "num_queries",
            "R@1", "R@1 lo", "R@1 hi", "R@5", "R@10", "worst R@1", "worst batch_size", "worst order", "R@1 spread",
            "settings", "top1_varies", "correct_varies", "max_abs_change", "train_s", "train_wall_s", "eval_s", "train_cpu_s", "eval_cpu_s"]
    rows = [{k: runs[s][m][0].get(k) for k in keys} for s in sorted(runs) for m in MODELS if m in runs[s]]
    return pd.DataFrame(rows, columns=keys)


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads; "
            f"Python {platform.python_version()}, torch {torch.__version__}, {platform.system()} {platform.release()}")


def write_tables(claims: pd.DataFrame, runs_df: pd.DataFrame, config: ClaimsConfig, bench_label: str,
                 wall_s: float, command: str, num_val_queries: int) -> tuple[Path, Path, Path]:
    """``claims.md``, ``claims.csv`` and ``claims_runs.csv`` in ``config.out``; ``num_val_queries``:
    the validation split's size, the reason given for keeping the last epoch."""
    from ..evaluate import recall_interval_from_value
    from ..files import atomic_write_text

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, runs_path, md_path = out / "claims.csv", out / "claims_runs.csv", out / "claims.md"
    atomic_write_text(csv_path, claims.to_csv(index=False, float_format="%.3f"))
    atomic_write_text(runs_path, runs_df.to_csv(index=False, float_format="%.3f"))

    seeds = sorted(runs_df["seed"].unique().tolist())
    lines = [
        "# The paper's claims, tested offline",
        "",
        f"Written by `{command}` on {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; "
        f"this run took {wall_s / 60:.1f} min; training and scoring of all models as recorded "
        f"(a resumed run reuses finished models): {(runs_df['train_wall_s'].sum() + runs_df['eval_s'].sum()) / 60:.1f} min.",
        f"Machine: {_machine()}.",
        "",
        f"Data: {bench_label}; {int(runs_df['num_queries'].iloc[0])} test queries. Seeds: {', '.join(map(str, seeds))}"
        + (" (fewer than 3: a verdict over seeds needs at least 3)." if len(seeds) < 3 else "."),
        "",
        "| id | claim | the paper's evidence | offline measurement: a - b, mean [95% interval] (seeds: min, max) | McNemar p per seed | verdict | likely reason where it differs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in claims.to_dict("records"):
        what = "share of queries whose R@1 correctness changes, %" if r["comparison"].endswith("- zero") else "R@1, points"
        meas = (f"`{r['comparison']}` ({what}): {r['mean']:+.1f} [{r['lo']:+.1f}, {r['hi']:+.1f}] "
                f"(min {r['min']:+.1f}, max {r['max']:+.1f})")
        p = r["mcnemar_p"].replace(";", ", ") if isinstance(r["mcnemar_p"], str) and r["mcnemar_p"] else "-"
        lines.append(f"| {r['id']} | {r['claim']} | {r['paper_evidence']} | {meas} | {p} | {r['verdict']} | {r['reason'] or ''} |")

    summary = runs_df.groupby("model", sort=False).agg(
        R1=("R@1", "mean"), R1_min=("R@1", "min"), R1_max=("R@1", "max"), worst=("worst R@1", "mean"),
        top1=("top1_varies", "mean"), steps=("steps", "first"), images=("images", "first"),
        epochs=("epochs", "first"), train=("train_wall_s", "mean"), score=("eval_s", "mean"),
        train_cpu=("train_cpu_s", "mean"), score_cpu=("eval_cpu_s", "mean"))
    lines += ["", "Per model (mean over seeds; R@1 at the default batching, queries and database in batches of 16):", "",
              "| model | R@1 mean [min, max] | worst batching's R@1 | queries whose top-1 changes | epochs | steps | images | train s (CPU s) | score s (CPU s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m, r in summary.iterrows():
        worst = "-" if pd.isna(r["worst"]) else f"{r['worst']:.1f}"
        top1 = "-" if pd.isna(r["top1"]) else f"{r['top1']:.1f}"
        lines.append(f"| {m} | {r['R1']:.1f} [{r['R1_min']:.1f}, {r['R1_max']:.1f}] | {worst} | {top1} | "
                     f"{int(r['epochs'])} | {int(r['steps'])} | {int(r['images'])} | {r['train']:.0f} ({r['train_cpu']:.0f}) | "
                     f"{r['score']:.0f} ({r['score_cpu']:.0f}) |")
    lo, hi = recall_interval_from_value(50.0, max(num_val_queries, 1))
    lines += [
        "",
        "Notes:",
        f"- Every model is kept at its last epoch: the validation split has {num_val_queries} queries, too few to rank "
        f"epochs (at R@5 = 50 its 95% interval is {lo:.0f}-{hi:.0f}; ranking needs >= {MIN_RANKING_QUERIES} queries), "
        "so no validation runs during training.",
        "- Equal budget: every stage-1 model (teacher, teacher-m1 and the three CricaVPR-S) trains the same epochs "
        "of the same P x K place batches; every stage-2 student the same epochs of its own (steps and images above).",
        "- Intervals: a - b in R@1 with the queries paired; over seeds a two-level bootstrap (seeds, then queries, "
        "the same query resample for both models of a seed). Verdict: the interval of the mean excludes 0 on the "
        "paper's side (agrees) or the other (contradicts), else inconclusive; claim 3 (equality by construction) "
        "agrees only when no query changes under any batching. Rows c1-c4 are controls, not claims.",
        "- `@worst`: the batching (query batch size x order) with the lowest R@1, chosen per seed after the fact (which favours claim 5b), "
        f"among batch sizes {', '.join(map(str, config.batch_sizes))} x {config.num_orders} orders. "
        "`@varies`: 1 for a query whose R@1 correctness is not the same under all of them.",
    ]
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return md_path, csv_path, runs_path


def _backbone_label(weights: str | None) -> str:
    """The backbone file's name and SHA-256 (its content, whatever ``"auto"`` resolved to)."""
    from ..weights import file_sha256, resolve_weights
    from .config import OFFLINE_BACKBONE

    path = resolve_weights(weights, OFFLINE_BACKBONE)
    return "random (no weights)" if path is None else f"`{path.name}` (sha256 {file_sha256(path)[:12]})"


def run_claims(config: ClaimsConfig, command: str = "scicevpr claims", log: Callable[[str], None] = print) -> tuple[Path, Path, Path]:
    """Train every model of every seed (resuming what is done), score them, and write the tables.
    Returns the paths of ``claims.md``, ``claims.csv`` and ``claims_runs.csv``."""
    import torch

    from .synthetic import generate
    from ..data.vg import load_vg_split
    from .cache import BackboneCache

    t0 = time.perf_counter()
    torch.set_num_threads(config.threads)
    cache = BackboneCache(config.cache_bytes)
    bench = generate(config.data, preset=config.preset, seed=0, progress=config.progress)
    split = load_vg_split(bench.vg_root, bench.dataset, "test")
    num_val = load_vg_split(bench.vg_root, bench.dataset, "val").num_queries
    if num_val >= MIN_RANKING_QUERIES:
        log(f"the validation split has {num_val} queries, enough to rank epochs; the last epoch is kept all the same, "
            f"as for the benchmarks without such a split")
    root = Path(config.runs) / config.preset
    runs: dict[int, dict[str, tuple[dict, dict]]] = {}
    for seed in config.seeds:
        runs[seed] = {}
        for name in MODELS:
            runs[seed][name] = run_model(name, config, bench, split, seed, root / f"seed-{seed}", log, cache)
    cache.clear()
    claims = claim_rows(runs, config)
    runs_df = runs_table(runs)
    label = f"synthetic `{config.preset}` benchmark ({bench.root}), backbone {_backbone_label(config.weights)}"
    paths = write_tables(claims, runs_df, config, label, time.perf_counter() - t0, command, num_val)
    log(f"claims table: {paths[0]}")
    return paths



# --------------------------------------------------------------------------------------------
# Reading the committed table (the notebooks)
# --------------------------------------------------------------------------------------------


def read_claims(figures_dir: PathLike) -> pd.DataFrame:
    """``<figures_dir>/claims.csv`` as ``scicevpr claims`` wrote it: one row per :data:`CLAIMS`
    entry. Raises FileNotFoundError naming the command that writes it."""
    path = Path(figures_dir) / "claims.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: `scicevpr claims` writes it (about an hour on 2 CPU cores "
                                "for 3 seeds; `--seeds 0` for one).")
    table = pd.read_csv(path, dtype={"id": str, "mcnemar_p": str, "per_seed": str, "reason": str}, keep_default_na=False)
    missing = {"id", "claim", "mean", "lo", "hi", "min", "max", "seeds", "verdict"} - set(table.columns)
    if missing:
        raise ValueError(f"{str(path)!r} lacks the columns {sorted(missing)}: it was not written by this version of "
                         "`scicevpr claims`; run it again.")
    return table


def verdict_text(table: pd.DataFrame, claim_id: str) -> str:
    """One line for a notebook's closing cell: the claim, the measured difference over seeds with
    its interval, and the verdict, e.g. ``claim 1 (...): student - student-m1 = +5.1 [+1.2, +8.9]
    R@1 points over 3 seeds (min +3.0, max +7.4): agrees``."""
    rows = table[table["id"] == claim_id]
    if rows.empty:
        raise KeyError(f"no claim {claim_id!r} in the table; its ids: {', '.join(table['id'])}")
    r = rows.iloc[0]
    zero = str(r["comparison"]).endswith("- zero")
    what = str(r["comparison"]).removesuffix(" - zero")
    unit = "% of queries change their R@1 correctness with the batching" if zero else "R@1 points"
    reason = f" ({r['reason']})" if isinstance(r.get("reason"), str) and r["reason"] else ""
    return (f"claim {r['id']} ({r['claim']}): {what} = {r['mean']:+.1f} [{r['lo']:+.1f}, {r['hi']:+.1f}] {unit} over "
            f"{int(r['seeds'])} seed(s) (min {r['min']:+.1f}, max {r['max']:+.1f}): {r['verdict']}{reason}")


README_BEGIN = "<!-- claims table: scicevpr.offline.claims.readme_table(read_claims('figures')); tests/test_claims.py checks it -->"
README_END = "<!-- end of the claims table -->"


def readme_table(table: pd.DataFrame) -> str:
    """The README's short form of the table (claims only, controls left to ``claims.md``):
    claim | measured a - b over seeds with its interval | verdict, as markdown lines."""
    lines = ["| claim | offline measurement, mean over seeds [95% interval] | verdict |", "|---|---|---|"]
    for r in table[table["verdict"] != CONTROL].to_dict("records"):
        zero = str(r["comparison"]).endswith("- zero")
        what = str(r["comparison"]).removesuffix(" - zero")
        unit = "% of queries change their R@1 correctness with the batching" if zero else "R@1 points"
        lines.append(f"| {r['id']}. {r['claim']} | `{what}`: {r['mean']:+.1f} [{r['lo']:+.1f}, {r['hi']:+.1f}] {unit} "
                     f"({int(r['seeds'])} seeds) | {r['verdict']} |")
    return "\n".join(lines)
