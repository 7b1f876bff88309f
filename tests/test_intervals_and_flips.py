"""Bootstrap intervals in tables and plots, the R@N reporting rule, the paper's Fig. 1 counted
(top-1 changes under other batchings) and where wrong matches lie."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch

from scicevpr.lab import analysis, viz
from scicevpr.config import EvalConfig
from scicevpr.evaluate import EvalResult, chance_recall, recall_by_condition
from scicevpr.lab.analysis import informative_recall_values
from scicevpr.stability import (
    StabilityFeatures,
    batch_companions,
    batch_orders,
    batch_stability,
    encode_in_batches,
    encode_with_companions,
    top1_changes,
)

CFG = EvalConfig(num_workers=0, progress=False, recall_values=(1, 5))


class BatchMixer(torch.nn.Module):
    """A toy encoder: each descriptor is its image's mean regional feature plus ``mix`` times
    the batch mean (``mix = 0``: independent of the batch, like SciceVPR's student)."""

    def __init__(self, dim: int, mix: float) -> None:
        super().__init__()
        self.mix = mix
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.descriptor_dim = dim

    def encode(self, r: torch.Tensor, num_groups: int = 1) -> torch.Tensor:
        x = r.mean(1) * self.scale  # (B, R, C) -> (B, C)
        x = x + self.mix * x.mean(0, keepdim=True)
        return torch.nn.functional.normalize(x, dim=-1)


def toy_world(mix: float):
    """8 database points on a circle, 8 queries between neighbours: a batch-mean shift moves
    some queries' nearest database point (with ``mix`` > 0)."""
    angles_db = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    db = np.stack([np.cos(angles_db), np.sin(angles_db)], 1).astype(np.float32)
    angles_q = angles_db + np.pi / 8 + np.linspace(-0.05, 0.05, 8)
    q = np.stack([np.cos(angles_q), np.sin(angles_q)], 1).astype(np.float32)
    regional = torch.as_tensor(q)[:, None, :].repeat(1, 3, 1)  # (N_q, R = 3, C = 2)
    model = BatchMixer(2, mix).eval()
    alone = encode_in_batches(model, regional, 1)
    split = SimpleNamespace(num_queries=8, num_database=8, positives=[np.array([i]) for i in range(8)],
                            query_conditions=None, dataset="toy", split="test")
    return model, StabilityFeatures(regional, db, alone), split


def test_top1_changes_by_hand():
    assert top1_changes(np.array([1, 2, 3, 4]), np.array([1, 0, 3, 0])) == 2
    assert top1_changes(np.array([5]), np.array([5])) == 0


def test_batch_companions_follow_the_order():
    order = np.array([3, 0, 2, 1, 4])
    assert batch_companions(order, 2, 0) == [3]
    assert batch_companions(order, 2, 4) == []  # the last, partial batch
    assert batch_companions(order, 5, 2) == [3, 0, 1, 4]
    assert batch_orders(5, 3, seed=0)[0].tolist() == [0, 1, 2, 3, 4]
    assert [o.tolist() for o in batch_orders(5, 3, seed=0)] == [o.tolist() for o in batch_orders(5, 3, seed=0)]


def test_batch_dependent_toy_flips_top1_and_independent_one_does_not():
    model, features, split = toy_world(mix=1.5)
    table = batch_stability(model, split, query_batch_sizes=(1, 2, 8), num_orders=2, config=CFG, features=features)
    alone_row = table[(table["batch_size"] == 1) & (table["order"] == 0)].iloc[0]
    assert alone_row["top1_changed"] == 0 and alone_row["mean_cosine"] == pytest.approx(1.0)
    assert table["top1_changed"].max() > 0
    assert table["min_cosine"].min() < 0.999
    assert (table["typical_component"] > 0).all()

    flat_model, flat_features, _ = toy_world(mix=0.0)
    flat = batch_stability(flat_model, split, query_batch_sizes=(1, 2, 8), num_orders=2, config=CFG, features=flat_features)
    assert (flat["top1_changed"] == 0).all() and (flat["max_abs_change"] == 0).all()
    assert flat["min_cosine"].min() == pytest.approx(1.0)


def test_batch_stability_counts_queries_whose_correctness_changes():
    """Fig. 1 counts top-1 changes; the ones that move Recall@1 are those whose top-1 turns from
    right to wrong or back. Counted against encoding each query alone, checked by hand."""
    from scicevpr.stability import stability_summary

    model, features, split = toy_world(mix=1.5)
    table = batch_stability(model, split, query_batch_sizes=(1, 2, 8), num_orders=2, config=CFG, features=features)
    truth = np.arange(split.num_queries)  # query i's only positive is database image i
    right_alone = features.top1(features.alone) == truth
    for _, row in table.iterrows():
        order = batch_orders(split.num_queries, 2, 0)[row["order"]]
        right = features.top1(features.encode(model, row["batch_size"], order)) == truth
        assert row["correct_changed"] == int((right != right_alone).sum())
        assert row["correct_gained"] == int((right & ~right_alone).sum())
        assert row["correct_lost"] == int((~right & right_alone).sum())
        assert row["correct_changed"] <= row["top1_changed"]
        assert row["R@1"] == pytest.approx(100.0 * right.mean())
    assert table["correct_changed"].max() > 0
    summary = stability_summary(table).set_index("model")
    assert summary["correct_changed"].iloc[0] == table["correct_changed"].max()
    assert summary["top1_changed"].iloc[0] == table["top1_changed"].max()


def test_encode_with_companions_is_the_batch_encoding():
    model, features, _ = toy_world(mix=1.5)
    together = encode_in_batches(model, features.queries[torch.tensor([2, 5, 7])], 3)
    np.testing.assert_allclose(encode_with_companions(model, features, 2, [5, 7]), together[0], atol=1e-6)
    np.testing.assert_allclose(encode_with_companions(model, features, 2, []), features.alone[2], atol=1e-6)


def test_flip_example_finds_a_changed_query_or_none():
    model, features, split = toy_world(mix=1.5)
    ex = analysis.flip_example(model, features, split, batch_size=2, num_orders=1)
    assert ex is not None and ex["top1_a"] != ex["top1_b"]
    assert ex["query"] not in ex["companions"] and len(ex["companions"]) == 1
    flat_model, flat_features, _ = toy_world(mix=0.0)
    assert analysis.flip_example(flat_model, flat_features, split, batch_size=2, num_orders=2) is None


def test_companion_flipper_gives_what_the_flip_explorer_shows():
    """The explorer's numbers come from analysis (viz computes nothing): the flip of a query found by
    flip_example is found again with the same companions; alone, nothing changes."""
    model, features, split = toy_world(mix=1.5)
    ex = analysis.flip_example(model, features, split, batch_size=2, num_orders=1)
    flip = analysis.companion_flipper(model, features)
    again = flip(ex["query"], [*ex["companions"], ex["query"], 99])  # the query itself and out-of-range left out
    assert again["companions"] == ex["companions"]
    assert (again["top1_a"], again["top1_b"]) == (ex["top1_a"], ex["top1_b"])
    assert again["cosine"] == pytest.approx(ex["cosine"], abs=1e-6) and again["cosine"] < 0.999
    alone = flip(ex["query"], [])
    assert alone["top1_a"] == alone["top1_b"] and alone["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_flip_example_after_the_sweep_reuses_its_encodings_and_agrees():
    model, fresh, split = toy_world(mix=1.5)
    expected = analysis.flip_example(model, fresh, split, batch_size=2, num_orders=2)
    _, features, _ = toy_world(mix=1.5)
    batch_stability(model, split, query_batch_sizes=(1, 2), num_orders=2, config=CFG, features=features)
    calls = []
    features.encode = lambda *a, **k: calls.append(a) or features.alone.copy()  # the sweep saw batch size 2 in both orders
    assert analysis.flip_example(model, features, split, batch_size=2, num_orders=2) == expected
    order = batch_orders(8, 2)[1]
    fresh_cos = analysis.descriptor_cosines(encode_in_batches(model, fresh.queries, 2, order), fresh.alone)
    np.testing.assert_allclose(features.setting(model, 2, order)[1], fresh_cos, atol=1e-7)
    assert calls == []
    features.setting(model, 2, order[::-1])  # another order is another setting: encoded
    features.setting(model, 4, order)
    assert len(calls) == 2


def _result(correct_top1, n_db=20):
    n_q = len(correct_top1)
    predictions = np.array([[i if ok else (i + 10) % n_db, (i + 1) % n_db] for i, ok in enumerate(correct_top1)])
    split = SimpleNamespace(num_queries=n_q, num_database=n_db, positives=[np.array([i]) for i in range(n_q)],
                            query_conditions=None, dataset="toy", split="test", radius=25.0,
                            query_utms=np.array([[10.0 * i, 0.0] for i in range(n_q)]),
                            database_utms=np.array([[10.0 * i + 1, 0.0] for i in range(n_db)]),
                            query_metadata=None, database_metadata=None)
    correct = np.stack([[predictions[i, j] in split.positives[i] for j in range(2)] for i in range(n_q)])
    d = np.zeros((n_q, 4), np.float32)
    return EvalResult(split, {1: 100.0 * correct[:, 0].mean(), 5: 100.0 * correct.any(1).mean()}, predictions,
                      np.zeros(predictions.shape), correct, np.zeros((n_db, 4), np.float32), d, "toy")


def test_table_intervals_bracket_the_recall_and_format():
    res = _result([True, False, True, True, False, True, False, True])
    plain = res.table()
    assert "R@1 lo" not in plain
    t = res.table(intervals=True)
    assert list(t.columns[-6:]) == ["R@1", "R@1 lo", "R@1 hi", "R@5", "R@5 lo", "R@5 hi"]
    row = t.iloc[0]
    assert row["R@1 lo"] <= row["R@1"] <= row["R@1 hi"] and row["R@1 hi"] - row["R@1 lo"] > 10
    shown = viz.format_recalls(t)
    assert "R@1 lo" not in shown and shown.iloc[0]["R@1"] == f"62.5 [{row['R@1 lo']:.1f}, {row['R@1 hi']:.1f}]"
    assert viz.format_recalls(plain).iloc[0]["R@1"] == "62.5"


def test_recall_by_condition_intervals():
    correct = np.array([[True], [False], [True], [True]])
    t = recall_by_condition(correct, ["day", "day", "night", "night"], (1,), intervals=True).set_index("condition")
    assert t.loc["night", "R@1 lo"] == t.loc["night", "R@1 hi"] == 100.0  # every resample is all hits
    assert t.loc["day", "R@1 lo"] <= 50.0 <= t.loc["day", "R@1 hi"]
    kept = analysis.conditions_with_enough_queries(recall_by_condition(correct, ["day", "day", "night", "x"], (1,)), 2)
    assert kept["condition"].tolist() == ["day", "all"]


def test_informative_recall_values_rule():
    # R@100 needs a database of 1,000 and a chance level not above 90%.
    assert informative_recall_values(155, {1: 1.0, 5: 5.0, 10: 9.0, 100: 80.0}) == (1, 5, 10)
    assert informative_recall_values(5000, {1: 0.1, 5: 0.5, 10: 1.0, 100: 10.0}) == (1, 5, 10, 100)
    assert informative_recall_values(5000, {1: 50.0, 5: 91.0, 10: 95.0, 100: 99.0}) == (1,)
    chance = chance_recall(1000, [np.arange(5)] * 3)
    assert informative_recall_values(1000, chance)[-1] == 100


def test_failure_breakdown_counts_wrong_queries():
    res = _result([True, False, False, True])
    table = analysis.failure_breakdown(res, near=50.0)
    assert table["wrong top-1"].sum() == 2
    assert table["share (%)"].sum() == pytest.approx(100.0)


def test_plot_recalls_draws_intervals_chance_and_zero():
    res = _result([False] * 4 + [True] * 4)
    t = pd.concat([res.table(intervals=True), _result([False] * 8).table(intervals=True)], ignore_index=True)
    fig = viz.plot_recalls(t, chance={1: 5.0, 5: 20.0}, label="toy")
    ax = fig.axes[0]
    assert viz.missing_labels(fig) == []
    assert any(line.get_linestyle() == "--" for line in ax.get_lines())  # chance
    assert len(ax.containers) >= 4  # 2 bar groups + 2 error bar sets
    flat = [line for line in ax.get_lines() if line.get_ydata()[0] == 0 and line.get_color() == "black"]
    assert flat, "a zero bar gets a visible mark"
    fig2 = viz.plot_recall_by_condition({"toy": recall_by_condition(res.correct, ["a"] * 4 + ["b"] * 4, (1,), intervals=True)},
                                        "R@1", label="toy", chance={1: 5.0})
    assert viz.missing_labels(fig2) == []


def test_notebook_ablation_and_cricavpr_runs_differ_from_the_student_only_where_meant():
    from scicevpr.lab.notebook import CRICAVPR_OFFLINE_EPOCHS, setup

    s = setup("offline", quiet=True)
    student = s.train_config("student", teacher="t.pt").to_dict()
    for name, loss in (("ms-only", {"eta": 0.0}), ("distill-only", {"gamma": 0.0})):
        variant = s.student_variant_config(name, "t.pt", **loss).to_dict()
        differ = {k for k in student if student[k] != variant[k]}
        assert differ == {"loss", "run_dir", "val_every"}, differ
        assert variant["val_every"] == variant["epochs"]
        assert variant["run_dir"].endswith(f"student-{name}")
        assert all(variant["loss"][k] == v for k, v in loss.items())
    crica = s.cricavpr_config()
    assert crica.model == "CricaVPR" and crica.preset == "CricaVPR-S" and crica.epochs == CRICAVPR_OFFLINE_EPOCHS
    assert crica.model_overrides["layers"] == (tuple(s.model_overrides["layers"])[-1],)
    assert crica.run_dir.endswith("cricavpr")


def test_loss_variant_keeps_the_other_weights_and_validates_once_also_with_the_papers_epochs():
    from scicevpr.config import LossConfig
    from scicevpr.config import TrainConfig
    from scicevpr.train import PAPER_EPOCHS, loss_variant_config

    student = TrainConfig(teacher="t.pt", epochs=None, val_every=1, loss=LossConfig(gamma=0.5, eta=2.0), run_dir="runs/student")
    variant = loss_variant_config(student, "runs/student-ms-only", eta=0.0)
    assert (variant.loss.gamma, variant.loss.eta) == (0.5, 0.0)
    assert variant.val_every == PAPER_EPOCHS["student"] and variant.epochs is None  # None: the paper's 1 epoch
    assert variant.run_dir == "runs/student-ms-only" and student.run_dir == "runs/student"
    with pytest.raises(ValueError, match="no teacher"):
        loss_variant_config(TrainConfig(), "runs/x", eta=0.0)


def test_interval_from_a_logged_value_and_sweep_intervals():
    from scicevpr.evaluate import recall_interval_from_value, recall_intervals

    lo, hi = recall_interval_from_value(40.0, 100)
    assert lo < 40.0 < hi and 15 < hi - lo < 25  # about +-10 points on 100 queries
    assert recall_interval_from_value(0.0, 50) == (0.0, 0.0)
    correct = (np.arange(100) < 40)[:, None]
    assert recall_interval_from_value(40.0, 100) == recall_intervals(correct, (1,))[1]

    model, features, split = toy_world(mix=1.5)
    table = batch_stability(model, split, query_batch_sizes=(1, 2), num_orders=1, config=CFG, features=features,
                            intervals=True)
    assert ((table["R@1 lo"] <= table["R@1"]) & (table["R@1"] <= table["R@1 hi"])).all()
    fig = viz.plot_stability(table.assign(model="toy"), "R@1", label="toy", chance=12.5)
    assert viz.missing_labels(fig) == []


def test_stability_features_reuse_database_descriptors(tmp_path):
    import scicevpr
    from scicevpr.data.vg import load_vg_split
    from PIL import Image

    rng = np.random.default_rng(0)
    for role, n in (("database", 4), ("queries", 3)):
        folder = tmp_path / "toy" / "images" / "test" / role
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(
                folder / f"@{500000.0 + 10 * i:.2f}@4100000.00@{i:03d}@.jpg")
    split = load_vg_split(tmp_path, "toy", "test")
    torch.manual_seed(0)
    teacher = scicevpr.SuperCricaVPR("SciceVPR-S", weights=None, image_size=56).eval()
    cfg = EvalConfig(num_workers=0, progress=False)
    computed = stability_features_for(teacher, split, cfg)
    reused = stability_features_for(teacher, split, cfg, database=computed.database)
    np.testing.assert_array_equal(reused.database, computed.database)
    np.testing.assert_array_equal(reused.alone, computed.alone)
    with pytest.raises(ValueError, match="database descriptors"):
        stability_features_for(teacher, split, cfg, database=computed.database[:2])


def stability_features_for(model, split, cfg, database=None):
    from scicevpr.stability import stability_features

    return stability_features(model, split, cfg, database_batch_size=2, database=database)
