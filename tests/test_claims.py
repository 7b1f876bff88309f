"""``scicevpr claims`` end to end on the ``tiny`` benchmark (one iteration per stage, two seeds),
its equal-budget recipe, and its resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scicevpr.offline.claims import ALLOWED_VERDICTS, CLAIMS, MODELS, STAGE1, STAGE2, train_config
from scicevpr.offline.config import ClaimsConfig
from scicevpr.cli import main


def test_stage1_models_share_one_budget_and_differ_only_by_the_model(tiny_benchmark, tmp_path):
    config = ClaimsConfig(preset="tiny", stage1_epochs=3, max_iters_per_epoch=2)
    configs = {name: train_config(name, config, tiny_benchmark, 5, tmp_path / name) for name in STAGE1}
    budget = {(c.epochs, c.max_iters_per_epoch, c.places_per_batch, c.img_per_place, c.seed, c.lr, c.gsv_root,
               c.randaugment_ops, c.val_dataset) for c in configs.values()}
    assert budget == {(3, 2, 8, 4, 5, 1e-4, str(tiny_benchmark.gsv_root), 3, None)}  # no validation: last epoch kept
    mo = {n: c.model_overrides for n, c in configs.items()}
    assert mo["teacher"]["layers"] == (0, 1, 2, 3) and mo["teacher-m1"]["layers"] == (3,)
    assert {configs[n].model for n in ("cricavpr", "cricavpr-nocls", "cricavpr-frozen")} == {"CricaVPR"}
    assert all(mo[n]["layers"] == (3,) for n in ("cricavpr", "cricavpr-nocls", "cricavpr-frozen"))
    assert mo["cricavpr-nocls"]["class_token"] is False and mo["cricavpr-frozen"]["adapters"] is False
    assert "class_token" not in mo["cricavpr"] and "adapters" not in mo["cricavpr"]
    students = {n: train_config(n, config, tiny_benchmark, 5, tmp_path / n, teacher=tmp_path / "t.pt") for n in STAGE2}
    assert len({(c.epochs, c.places_per_batch, c.seed) for c in students.values()}) == 1
    assert students["student-ms"].loss.eta == 0.0 and students["student"].loss.eta == 1.0


@pytest.mark.slow
def test_claims_command_end_to_end_and_resumes(tiny_benchmark, tmp_path, capsys):
    out, runs = tmp_path / "figures", tmp_path / "runs"
    args = ["claims", "--preset", "tiny", "--seeds", "0", "1", "--data", str(tiny_benchmark.root), "--runs", str(runs),
            "--out", str(out), "--stage1-epochs", "1", "--stage2-epochs", "1", "--max-iters-per-epoch", "1",
            "--batch-sizes", "1,2", "--num-orders", "2", "--num-samples", "200", "--num-workers", "0", "--quiet"]
    assert main(args) == 0
    claims = pd.read_csv(out / "claims.csv", keep_default_na=False)
    assert claims["id"].tolist() == [c.id for c in CLAIMS]
    assert set(claims["verdict"]) <= set(ALLOWED_VERDICTS)
    assert (claims.loc[claims["id"].str.startswith("c"), "verdict"] == "control").all()
    assert (claims["lo"] <= claims["hi"]).all() and (claims["min"] <= claims["mean"]).all() and (claims["mean"] <= claims["max"]).all()
    assert (claims["seeds"] == 2).all() and all(len(s.split(";")) == 2 for s in claims["per_seed"])
    paired = claims[~claims["comparison"].str.endswith("- zero")]
    p = np.array([float(x) for s in paired["mcnemar_p"] for x in s.split(";")])
    assert ((0 < p) & (p <= 1)).all()

    table = pd.read_csv(out / "claims_runs.csv")
    assert len(table) == 2 * len(MODELS) and set(table["model"]) == set(MODELS)
    assert (table["checkpoint"] == "last epoch").all()
    for _, by_seed in table.groupby("seed"):
        stage1 = by_seed[by_seed["model"].isin(STAGE1)]
        assert stage1[["epochs", "steps", "images"]].drop_duplicates().shape[0] == 1  # equal budget
        assert by_seed[by_seed["model"].isin(list(STAGE2))][["steps", "images"]].drop_duplicates().shape[0] == 1
    student = table[table["model"] == "student"]
    assert (student["max_abs_change"] == 0).all() and (student["top1_varies"] == 0).all()  # stable by construction
    assert (table.loc[table["model"] == "teacher", "settings"] == 4).all()  # batch sizes 1, 2 x 2 orders

    md = (out / "claims.md").read_text()
    assert "| id | claim | the paper's evidence |" in md and "this run took" in md and "Machine:" in md
    assert all(f"| {c.id} | {c.claim} |" in md for c in CLAIMS)
    assert "last epoch" in md and "fewer than 3" in md

    # resume: every model is found done, nothing trains again, the same table comes out
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("last.pt")}
    assert len(stamps) == 2 * len(MODELS)
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("done before") == 2 * len(MODELS)
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("last.pt")} == stamps
    again = pd.read_csv(out / "claims.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(again, claims)

    # what the notebooks read: the written table, one line per claim
    from scicevpr.offline.claims import read_claims, verdict_text

    read = read_claims(out)
    r = claims[claims["id"] == "4a"].iloc[0]
    line = verdict_text(read, "4a")
    assert line.startswith("claim 4a (") and "student - student-ms" in line and f"{r['mean']:+.1f} [{r['lo']:+.1f}, {r['hi']:+.1f}]" in line
    assert line.endswith(r["verdict"] + (f" ({r['reason']})" if r["reason"] else "")) and "over 2 seed(s)" in line
    assert "% of queries change" in verdict_text(read, "2a") and "cricavpr - zero" not in verdict_text(read, "2b")
    with pytest.raises(KeyError, match="no claim '9'"):
        verdict_text(read, "9")
    with pytest.raises(FileNotFoundError, match="scicevpr claims"):
        read_claims(tmp_path / "nowhere")
    (tmp_path / "old").mkdir()
    claims.drop(columns=["verdict"]).to_csv(tmp_path / "old" / "claims.csv", index=False)
    with pytest.raises(ValueError, match="lacks the columns"):
        read_claims(tmp_path / "old")


def fake_runs(num_seeds: int = 3, n: int = 400) -> dict:
    """runs[seed][model] = (facts, arrays) as :func:`scicevpr.offline.claims.run_model` returns them, made up:
    the student finds 60% of the queries, CricaVPR-S 40% (30% at its worst batching), the others as
    the student; the teacher's correctness changes with the batching for 5% of the queries."""
    rng = np.random.default_rng(0)
    runs = {}
    for s in range(num_seeds):
        u = rng.random(n)
        student, crica = u < 0.6, u < 0.4
        varies = np.zeros(n, bool)
        varies[: n // 20] = True
        runs[s] = {}
        for m in MODELS:
            correct = crica if m.startswith("cricavpr") else student
            arrays = {"correct": correct}
            facts = {"R@1": 100 * correct.mean(), "top1_varies": 0, "max_abs_change": 0.0}
            if m in ("teacher", "teacher-m1", "cricavpr", "cricavpr-nocls", "cricavpr-frozen", "student"):
                v = varies if m != "student" else np.zeros(n, bool)
                arrays.update(worst=u < 0.3 if m.startswith("cricavpr") else correct, correct_varies=v, top1_varies=v)
                facts.update(top1_varies=int(v.sum()), max_abs_change=0.0 if m == "student" else 0.1)
            runs[s][m] = (facts, arrays)
    return runs


def test_claim_rows_verdicts_from_known_differences():
    from scicevpr.offline.claims import claim_rows

    table = claim_rows(fake_runs(), ClaimsConfig(num_samples=500)).set_index("id")
    assert table.loc["5a", "verdict"] == "agrees" and table.loc["5a", "mean"] == pytest.approx(20.0, abs=3)
    assert table.loc["5b", "mean"] > table.loc["5a", "mean"]  # against CricaVPR-S's worst batching
    assert table.loc["2a", "verdict"] == "agrees" and table.loc["2a", "mean"] == pytest.approx(5.0)
    assert table.loc["3", "verdict"] == "agrees" and table.loc["3", "reason"] == ""
    for i in ("1", "4a", "4b"):  # identical models: no difference, no direction
        assert table.loc[i, "verdict"] == "inconclusive" and (table.loc[i, "lo"], table.loc[i, "hi"]) == (0.0, 0.0)
        assert "holds 0" in table.loc[i, "reason"]
    assert table.loc["c1", "verdict"] == "control" and table.loc["c1", "mcnemar_p"] == "1;1;1"
    reversed_runs = fake_runs()
    for s in reversed_runs:  # the student now finds nothing, and one of its top-1s changes with the batching
        facts, arrays = reversed_runs[s]["student"]
        reversed_runs[s]["student"] = ({**facts, "top1_varies": 3}, {**arrays, "correct": np.zeros_like(arrays["correct"])})
    rev = claim_rows(reversed_runs, ClaimsConfig(num_samples=500)).set_index("id")
    assert rev.loc["5a", "verdict"] == "contradicts" and "CLS region adds" in rev.loc["5a", "reason"]
    assert rev.loc["3", "verdict"] == "contradicts"  # a top-1 that changes breaks the equality claim


def test_readme_shows_the_committed_claims_table():
    """The README's table is the one readme_table computes from figures/claims.csv, never typed."""
    from pathlib import Path

    from scicevpr.offline.claims import README_BEGIN, README_END, read_claims, readme_table

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    assert README_BEGIN in text and README_END in text
    shown = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert shown == readme_table(read_claims(root / "figures"))
