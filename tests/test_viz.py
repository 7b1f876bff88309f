"""The plotting helpers (scicevpr.lab.viz) and the notebooks' switch and helpers (scicevpr.lab.notebook).

Figures must be complete (title, axis labels) and stamped with the weights/data label; files
must be deterministic; the switch must select the documented configurations.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from scicevpr.lab import analysis  # noqa: E402
from scicevpr.lab import notebook as nb  # noqa: E402
from scicevpr.lab import viz  # noqa: E402
from scicevpr.offline.config import OFFLINE_BACKBONE  # noqa: E402
from scicevpr.pooling import region_boxes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LABEL = "random DINOv2 backbone (offline), synthetic data"
ENV = ("SCICEVPR_MODE", "SCICEVPR_PRESET", "SCICEVPR_DATA", "SCICEVPR_WEIGHTS", "SCICEVPR_DATASET",
       "SCICEVPR_THREADS", "SCICEVPR_SEED", "SCICEVPR_VAL_DATASET", "SCICEVPR_EPOCHS", "SCICEVPR_MAX_ITERS")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def labelled_axes_figure() -> plt.Figure:
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [1, 4, 9])
    ax.set_title("t")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (%)")
    return fig


def texts(fig: plt.Figure) -> list[str]:
    return [t.get_text() for t in fig.texts]


# ---------------------------------------------------------------------------------------------
# labels, saving
# ---------------------------------------------------------------------------------------------


def test_stamp_adds_the_label_once_and_can_replace_it():
    fig = labelled_axes_figure()
    viz.stamp(fig, LABEL)
    viz.stamp(fig, LABEL)
    assert texts(fig).count(LABEL) == 1
    viz.stamp(fig, "pretrained DINOv2 ViT-B/14, pitts30k test")
    assert LABEL not in texts(fig)
    assert viz.figure_label(fig) == "pretrained DINOv2 ViT-B/14, pitts30k test"


def test_missing_labels_finds_unlabelled_panels():
    fig, (a, b) = plt.subplots(1, 2)
    a.set_title("complete")
    a.set_xlabel("x")
    a.set_ylabel("y")
    b.plot([0, 1])
    problems = viz.missing_labels(fig)
    assert any("no title" in p for p in problems)
    assert any("no x label" in p for p in problems)
    assert any("no y label" in p for p in problems)
    b.set_title("b")
    b.set_xlabel("x")
    b.set_ylabel("y")
    assert viz.missing_labels(fig) == []


def test_save_figure_checks_name_and_labels(tmp_path):
    fig = labelled_axes_figure()
    with pytest.raises(ValueError, match="NN_some_name"):
        viz.save_figure(fig, "stability", folder=tmp_path)
    with pytest.raises(ValueError, match="NN_some_name"):
        viz.save_figure(fig, "03_Stability Plot", folder=tmp_path)
    bad, _ = plt.subplots()
    bad.axes[0].plot([0, 1])
    with pytest.raises(ValueError, match="incomplete"):
        viz.save_figure(bad, "03_bad", folder=tmp_path)


def test_save_figure_writes_deterministic_png_with_label(tmp_path):
    paths = []
    for folder in ("a", "b"):
        fig = labelled_axes_figure()
        paths.append(viz.save_figure(fig, "03_demo", label=LABEL, folder=tmp_path / folder))
    assert paths[0].name == "03_demo.png"
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1]
    assert data[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert b"Software" not in data[0] and b"matplotlib" not in data[0].lower()
    with Image.open(paths[0]) as im:
        assert im.info.get("dpi", (100, 100))[0] == pytest.approx(100, abs=1)


def test_save_figure_defaults_to_the_repository_figures_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO / "notebooks")
    assert viz.figures_dir() == REPO / "figures"


def test_save_table_writes_csv_and_markdown_with_label(tmp_path):
    table = pd.DataFrame([{"model": "SciceVPR", "R@1": 12.345, "dim": 5376}])
    csv_path, md_path = viz.save_table(table, "results", label=LABEL, title="Recall", folder=tmp_path)
    md = md_path.read_text()
    assert LABEL in md and "| model | R@1 | dim |" in md and "| SciceVPR | 12.35 | 5376 |" in md
    assert pd.read_csv(csv_path)["R@1"].iloc[0] == pytest.approx(12.345)


# ---------------------------------------------------------------------------------------------
# every plotting function gives a complete, stamped figure
# ---------------------------------------------------------------------------------------------


def stability_table() -> pd.DataFrame:
    rows = []
    for model, moves in (("teacher", True), ("student", False)):
        for bs in (1, 2, 4):
            for order in (0, 1):
                r1 = 10.0 + (bs + order if moves else 0)
                rows.append({"model": model, "batch_size": bs, "order": order, "R@1": r1, "R@5": r1 + 5,
                             "R@10": r1 + 8, "max_abs_change": (0.01 * bs if moves and bs > 1 else 0.0)})
    return pd.DataFrame(rows)


def training_log(stage2: bool) -> pd.DataFrame:
    return pd.DataFrame({
        "epoch": [1, 2, 3], "iteration": [5, 10, 15], "loss": [2.0, 1.5, 1.2],
        "loss_ms": [1.8, 1.4, 1.1] if stage2 else [2.0, 1.5, 1.2],
        "loss_d": [0.2, 0.1, 0.1] if stage2 else [np.nan] * 3,
        "R@1": [5.0, 7.0, 6.0], "R@5": [20.0, 25.0, 22.0], "R@10": [30.0, 33.0, 31.0],
        "best": [True, True, np.nan],
    })


def per_condition(offset: float) -> pd.DataFrame:
    return pd.DataFrame({"condition": ["day", "night", "all"], "queries": [10, 5, 15],
                         "R@1": [50 + offset, 20 + offset, 40 + offset]})


def figures_to_check():
    rng = np.random.default_rng(0)
    images = rng.random((2, 28, 28, 3))
    maps = {8: rng.random((2, 2, 2, 3)), 11: rng.random((2, 2, 2, 3))}
    yield "layer_pca", viz.plot_layer_pca(images, maps, fused=(11,), captions=["a", "b"], label=LABEL)
    yield "layer_similarity", viz.plot_layer_similarity(np.eye(3), [9, 10, 11], fused=(10, 11), label=LABEL)
    yield "layer_recall", viz.plot_layer_recall(pd.DataFrame({"features": ["block 0", "fused"], "R@1": [3.0, 5.0]}),
                                                highlight=["fused"], label=LABEL)
    yield "regions", viz.plot_regions(rng.random((112, 112, 3)), region_boxes(8, 8), (8, 8), label=LABEL)
    yield "influence", viz.plot_influence({"a": np.eye(4), "b": np.ones((4, 4))}, (1, 1), label=LABEL)
    yield "gem_p", viz.plot_gem_p([1, 2, 4], np.array([0.0, 0.3, 0.6]), {1: np.full((2, 2), 0.25)}, label=LABEL)
    yield "stability", viz.plot_stability(stability_table(), label=LABEL)
    yield "training", viz.plot_training_curves({"stage 1": training_log(False), "stage 2": training_log(True)},
                                               label=LABEL)
    yield "agreement", viz.plot_agreement({"before": rng.random(20), "after": rng.random(20)}, label=LABEL)
    yield "recalls", viz.plot_recalls(pd.DataFrame([{"model": "m", "R@1": 1.0, "R@5": 2.0, "R@10": 3.0, "R@100": 4.0}]),
                                      label=LABEL)
    yield "by_condition", viz.plot_recall_by_condition({"m1": per_condition(0), "m2": per_condition(5)}, label=LABEL)
    batch = torch.zeros(2, 3, 3, 28, 28)
    yield "training_batch", viz.plot_training_batch(batch, torch.tensor([[1, 1, 1], [2, 2, 2]]), label=LABEL)


@pytest.mark.parametrize("name,fig", list(figures_to_check()), ids=lambda v: v if isinstance(v, str) else "")
def test_figures_are_complete_and_stamped(name, fig):
    assert viz.missing_labels(fig) == [], name
    assert LABEL in texts(fig), name


def test_recall_plots_keep_the_chance_line_in_view_and_claim_intervals_only_when_drawn():
    """A chance level above every bar (a random backbone) stays inside the axes, and the x label
    mentions 95% intervals only where error bars were drawn."""
    fig = viz.plot_layer_recall(pd.DataFrame({"features": ["block 0", "fused"], "R@1": [3.0, 5.0]}), chance=12.0, label=LABEL)
    assert fig.axes[0].get_ylim()[1] > 12.0
    fig = viz.plot_recall_by_condition({"m": per_condition(-19.0)}, metric="R@1", chance={1: 60.0}, label=LABEL)
    assert fig.axes[0].get_ylim()[1] > 60.0
    plain = pd.DataFrame([{"model": "m", "R@1": 1.0, "R@5": 2.0}])
    assert "95% interval" not in viz.plot_recalls(plain, label=LABEL).axes[0].get_xlabel()
    with_ci = plain.assign(**{"R@1 lo": 0.5, "R@1 hi": 1.5, "R@5 lo": 1.0, "R@5 hi": 3.0})
    assert "bars: 95% interval" in viz.plot_recalls(with_ci, label=LABEL).axes[0].get_xlabel()
    plt.close("all")


def test_plot_stability_draws_one_line_per_model_and_order():
    fig = viz.plot_stability(stability_table(), label=LABEL)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 2 * 2
    teacher_file_order = [l for l in ax.get_lines() if l.get_label() == "teacher, file order"][0]
    np.testing.assert_allclose(teacher_file_order.get_ydata(), [11.0, 12.0, 14.0])
    assert ax.get_ylabel() == "Recall@1 (%)"


def test_plot_training_curves_reads_a_run_folder(tmp_path):
    training_log(False).to_csv(tmp_path / "log.csv", index=False)
    fig = viz.plot_training_curves({"stage 1": tmp_path}, label=LABEL)
    assert viz.missing_labels(fig) == []
    with pytest.raises(FileNotFoundError, match="no training log"):
        viz.read_log(tmp_path / "missing")


def test_the_kept_checkpoint_is_marked_on_the_recall_it_was_chosen_by():
    log = training_log(False)  # best (last True) at epoch 2: R@1 7.0, R@5 25.0
    fig = viz.plot_training_curves({"stage 1": log}, label=LABEL)
    circles = [c for c in fig.axes[1].collections if len(c.get_offsets()) == 1]
    assert [tuple(c.get_offsets()[0]) for c in circles] == [(2.0, 25.0)]
    assert "chosen by R@5" in fig.axes[1].get_title()


def make_split_and_result(tmp_path):
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        p = tmp_path / f"{i}.jpg"
        Image.new("RGB", (32, 32), colour).save(p)
        paths.append(p)
    split = SimpleNamespace(
        query_paths=paths[:2], database_paths=paths[2:], query_utms=np.array([[0.0, 0.0], [100.0, 0.0]]),
        database_utms=np.array([[10.0, 0.0], [100.0, 30.0]]), query_conditions=["night", "fog"], radius=25.0,
        positives=[np.array([0]), np.array([], dtype=int)], num_queries=2,
    )
    result = SimpleNamespace(predictions=np.array([[0, 1], [0, 1]]),
                             correct=np.array([[True, False], [False, False]]), model_name="m", split=split)
    return split, result


def test_gallery_frames_follow_correctness(tmp_path):
    split, result = make_split_and_result(tmp_path)
    fig = viz.plot_gallery(split, result, [0, 1], k=2, label=LABEL)
    axes = np.array(fig.axes).reshape(2, 3)
    colour = lambda ax: matplotlib.colors.to_hex(ax.spines["left"].get_edgecolor())  # noqa: E731
    assert colour(axes[0, 1]) == viz.CORRECT_COLOUR
    assert colour(axes[0, 2]) == viz.WRONG_COLOUR
    assert colour(axes[1, 1]) == viz.WRONG_COLOUR
    assert "10 m" in axes[0, 1].get_title() and "night" in axes[0, 0].get_title()
    assert viz.missing_labels(fig) == [] and LABEL in texts(fig)


def test_widgets_are_built_and_redraw_on_change(tmp_path):
    widgets = pytest.importorskip("ipywidgets")
    w = viz.stability_explorer(stability_table(), label=LABEL)
    assert isinstance(w, widgets.VBox)
    controls, image, text = w.children
    assert {c.description for c in controls.children} == {"batch size", "order"}
    first = image.value
    assert first[:4] == b"\x89PNG" and "student: 0.00e+00" in text.value
    controls.children[0].value = 2
    assert image.value != first and "teacher: 2.00e-02" in text.value

    split, result = make_split_and_result(tmp_path)
    w = viz.retrieval_explorer(split, {"m": result}, k=2, label=LABEL)
    controls, image, text = w.children
    assert "first correct rank: 1" in text.value
    controls.children[0].value = 1
    assert "first correct rank: none" in text.value

    asked = []

    def flip(query, companions):  # what analysis.companion_flipper returns, here by hand
        asked.append((query, companions))
        companions = [c for c in companions if c < split.num_queries and c != query]  # [1] of the 2 queries
        return {"query": query, "companions": companions, "top1_a": 0, "top1_b": 1 if companions else 0,
                "name_a": "alone", "name_b": "in the batch", "cosine": 0.5 if companions else 1.0}

    controls, image, text = viz.flip_explorer(flip, split, label=LABEL).children
    assert asked == [(0, [1, 2, 3])] and "top-1 changed: db 0 alone, db 1 in the batch" in text.value
    controls.children[1].value = "x"  # not a list of indices: no companions
    assert asked[-1] == (0, []) and "top-1 unchanged" in text.value and "1.0000" in text.value


# ---------------------------------------------------------------------------------------------
# PCA-to-RGB and the analysis helpers
# ---------------------------------------------------------------------------------------------


def test_pca_rgb_is_deterministic_and_colours_equal_features_equally():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 16, 4, 4, generator=g)
    f[1] = f[0]  # the second image repeats the first
    f = torch.cat([f, torch.randn(1, 16, 4, 4, generator=g)])
    rgb = viz.pca_rgb(f)
    assert rgb.shape == (3, 4, 4, 3)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    np.testing.assert_array_equal(rgb[0], rgb[1])
    np.testing.assert_array_equal(rgb, viz.pca_rgb(f.clone()))
    np.testing.assert_allclose(viz.pca_rgb(f[[2, 0, 1]]), rgb[[2, 0, 1]], atol=1e-9)  # one PCA for all images
    np.testing.assert_allclose(viz.pca_rgb(f + 5.0), rgb, atol=1e-5)  # centred
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        viz.pca_rgb(torch.zeros(3, 4, 4))


def test_linear_cka():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert analysis.linear_cka(a, a) == pytest.approx(1.0)
    assert analysis.linear_cka(a, 3.0 * a @ q) == pytest.approx(1.0)  # rotation and scale
    assert analysis.linear_cka(a, torch.randn(200, 8, generator=g)) < 0.2


def test_influence_maps_separate_channel_fusion_from_token_mixing():
    from scicevpr.fusion import MultiLayerFusion

    torch.manual_seed(0)
    fusion = MultiLayerFusion(in_channels=8, mix_dim=4, grid=(3, 3), num_token_mixers=1)
    maps = analysis.influence_maps(fusion, torch.randn(1, 8, 3, 3), token=(1, 2))
    conv, mixed = maps["after 1x1 channel fusion"], maps["after the token mixers"]
    assert (conv > 0).sum() <= 1 and conv[1, 2] >= 0  # at most the perturbed token (ReLU may zero it)
    assert np.count_nonzero(conv[np.arange(3) != 1]) == 0
    assert (mixed > 0).sum() == 9


def test_gem_analysis_goes_from_mean_to_max():
    x = torch.rand(4, 5, 5, generator=torch.Generator().manual_seed(0)) + 0.1
    ps, position, weights = analysis.gem_analysis(x, ps=(1, 4, 64), shown=(1, 64))
    assert position[0] == pytest.approx(0.0, abs=1e-5)
    assert 0 < position[1] < position[2] < 1
    for w in weights.values():
        assert w.sum() == pytest.approx(1.0)
    assert weights[64].max() > weights[1].max()


def test_pick_queries():
    correct = np.array([[True, False], [False, True], [True, True], [False, False]])
    result = SimpleNamespace(correct=correct, split=SimpleNamespace(query_conditions=["a", "b", "b", "a"]))
    assert analysis.pick_queries(result, 4, success=True) == [0, 2]
    assert analysis.pick_queries(result, 4, success=False) == [1, 3]
    assert analysis.pick_queries(result, 1, success=False) == [3]  # condition "a" first


def test_agreement():
    d = np.eye(3, dtype=np.float32)
    a = SimpleNamespace(query_descriptors=d, predictions=np.array([[0], [1], [2]]))
    b = SimpleNamespace(query_descriptors=d[[0, 2, 1]], predictions=np.array([[0], [2], [2]]))
    out = analysis.agreement(a, a)
    assert out == {"mean cosine": 1.0, "L_D": 0.0, "same top-1 (%)": 100.0}
    out = analysis.agreement(a, b)
    assert out["mean cosine"] == pytest.approx(1 / 3, abs=1e-3) and out["same top-1 (%)"] == pytest.approx(66.7)


def test_parameter_counts_and_preset_table():
    table = analysis.preset_table(("SciceVPR-B",))
    row = table.iloc[0]
    assert row["M*C"] == 3072 and row["C_mix"] == 768 and row["descriptor"] == 10752 and row["grid"] == "16x16"
    assert row["1x1 conv (M)"] == pytest.approx((3072 * 768 + 768) / 1e6, abs=0.01)
    assert row["token mixers (M)"] == pytest.approx(2 * (2 * 256 * 256 + 256 + 256 + 2 * 768) / 1e6, abs=0.01)


# ---------------------------------------------------------------------------------------------
# the switch
# ---------------------------------------------------------------------------------------------


def test_repo_root_is_found_from_the_notebooks_folder(monkeypatch):
    monkeypatch.chdir(REPO / "notebooks")
    assert nb.find_repo_root() == REPO
    monkeypatch.chdir(REPO)
    assert nb.find_repo_root() == REPO


def test_offline_is_the_default(clean_env):
    s = nb.setup(quiet=True)
    assert s.mode == "offline" and s.offline
    from scicevpr.offline.config import offline_train_config

    recipe = offline_train_config("gsv", "vg", "run")
    assert s.preset == recipe.preset == "SciceVPR-S" and s.weights == recipe.weights == "auto" and s.device == "cpu"
    assert s.model_overrides == dict(recipe.model_overrides)  # the model the offline recipe trains
    assert s.synthetic_preset == "small" and s.eval_dataset == "synthetic"
    assert s.data_root == REPO / "data" and s.figures_dir == REPO / "figures"
    assert s.vg_root == REPO / "data" / "synthetic" / "small" / "vg"
    # the compact backbone shipped in scicevpr/weights, named as its manifest says, never as Meta's DINOv2
    cfg = s.model_config()
    assert cfg.backbone == OFFLINE_BACKBONE and not s.random_backbone
    assert "synthetic streets (not Meta's DINOv2)" in s.figure_label and s.figure_label.endswith(", synthetic data")
    model = s.build("SciceVPR")
    assert not model.is_random_init and s.label_for(model) == s.figure_label
    assert torch.get_num_threads() == 2
    text = s.describe()
    assert str(REPO) not in text and "RANDOM" not in text and "not Meta's DINOv2 weights" in text
    # random initialisation stays one setting away
    r = s.with_weights(None)
    assert r.random_backbone and r.figure_label == LABEL and r.build("SciceVPR").is_random_init


def test_full_mode_reads_preset_data_and_dataset(clean_env, tmp_path):
    clean_env.setenv("SCICEVPR_MODE", "full")
    clean_env.setenv("SCICEVPR_PRESET", "SciceVPR-L")
    clean_env.setenv("SCICEVPR_DATA", str(tmp_path))
    clean_env.setenv("SCICEVPR_DATASET", "tokyo247")
    s = nb.setup(quiet=True)
    assert s.preset == "SciceVPR-L" and s.weights == "auto" and s.model_overrides == {}
    assert s.vg_root == tmp_path and s.gsv_root == tmp_path / "gsv_cities"
    assert s.eval_dataset == "tokyo247" and s.synthetic_preset is None and s.pca_dim == 4096
    assert s.figure_label == "pretrained DINOv2 ViT-L/14, tokyo247 test"
    assert s.label_for(SimpleNamespace(is_random_init=True)) == "random DINOv2 backbone (full mode), tokyo247 test"
    assert s.val_dataset == "pitts30k" and s.train_overrides == {}
    with pytest.raises(FileNotFoundError, match="data/README.md"):
        s.benchmark()  # no dataset there: the message says where to look


def test_full_mode_with_random_weights_says_so_everywhere(clean_env, tmp_path, capsys):
    clean_env.setenv("SCICEVPR_MODE", "full")
    clean_env.setenv("SCICEVPR_WEIGHTS", "random")
    clean_env.setenv("SCICEVPR_DATA", str(tmp_path))
    clean_env.setenv("SCICEVPR_DATASET", "synthetic")
    clean_env.setenv("SCICEVPR_VAL_DATASET", "synthetic")
    s = nb.setup()
    printed = capsys.readouterr().out
    assert s.preset == "SciceVPR-B" and s.weights is None and s.random_backbone
    assert s.figure_label == "random DINOv2 backbone (full mode), synthetic test"
    assert s.label_for(None) == s.label_for(SimpleNamespace(is_random_init=True)) == s.figure_label
    assert "RANDOM" in s.describe() and "SCICEVPR_WEIGHTS=random" in printed
    assert (s.eval_dataset, s.val_dataset) == ("synthetic", "synthetic")
    cfg = s.train_config("teacher")
    assert cfg.weights is None and cfg.val_dataset == "synthetic" and cfg.preset == "SciceVPR-B"
    assert cfg.places_per_batch == 72 and cfg.img_per_place == 4 and cfg.epochs is None  # the paper's recipe
    # offline: the same variable turns the pretrained compact backbone into a random one
    clean_env.setenv("SCICEVPR_MODE", "offline")
    off = nb.setup(quiet=True)
    assert off.weights is None and off.figure_label == LABEL and "RANDOM" in off.describe()


def test_training_caps_for_smoke_runs(clean_env, tmp_path):
    base = nb.setup(quiet=True)
    clean_env.setenv("SCICEVPR_EPOCHS", "2")
    clean_env.setenv("SCICEVPR_MAX_ITERS", "3")
    s = nb.setup(quiet=True)
    assert s.train_overrides == {"epochs": 2, "max_iters_per_epoch": 3}
    for stage in ("teacher", "student"):
        cfg = s.train_config(stage)
        assert (cfg.epochs, cfg.max_iters_per_epoch) == (2, 3)
    assert "epochs=2, max_iters_per_epoch=3" in s.describe() and "capped" not in base.describe()
    assert s.run_root() != base.run_root()  # a capped run never resumes the recipe's
    clean_env.setenv("SCICEVPR_MODE", "full")
    clean_env.setenv("SCICEVPR_DATA", str(tmp_path))
    full = nb.setup(quiet=True).train_config("teacher")
    assert (full.epochs, full.max_iters_per_epoch, full.places_per_batch) == (2, 3, 72)
    for bad in ("0", "two", "-1"):
        clean_env.setenv("SCICEVPR_EPOCHS", bad)
        with pytest.raises(ValueError, match="SCICEVPR_EPOCHS"):
            nb.setup(quiet=True)


def test_bad_switch_values_fail_with_the_choices(clean_env):
    clean_env.setenv("SCICEVPR_MODE", "fast")
    with pytest.raises(ValueError, match="offline"):
        nb.setup(quiet=True)
    clean_env.setenv("SCICEVPR_MODE", "full")
    clean_env.setenv("SCICEVPR_PRESET", "SciceVPR-XL")
    with pytest.raises(ValueError, match="SciceVPR-B"):
        nb.setup(quiet=True)
    clean_env.delenv("SCICEVPR_PRESET")
    for name, bad, minimum in (("SCICEVPR_SEED", "-1", 0), ("SCICEVPR_SEED", "abc", 0), ("SCICEVPR_THREADS", "0", 1),
                               ("SCICEVPR_THREADS", "two", 1)):
        clean_env.setenv(name, bad)
        with pytest.raises(ValueError, match=rf"{name}='{bad}': expected a whole number >= {minimum}, or unset for"):
            nb.setup(quiet=True)
        clean_env.delenv(name)


def test_setup_seeds_everything(clean_env):
    nb.setup(quiet=True)
    a = (torch.rand(3), np.random.rand(3))
    nb.setup(quiet=True)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_offline_train_config_matches_the_settings(clean_env):
    pytest.importorskip("scicevpr.train")
    s = nb.setup(quiet=True)
    cfg = s.train_config("teacher")
    assert cfg.preset == s.preset and cfg.weights == s.weights == "auto" and dict(cfg.model_overrides) == s.model_overrides
    assert s.build("SciceVPR").config == cfg.model_config()  # notebooks and training: the same model
    assert cfg.resume and not cfg.progress and Path(cfg.run_dir) == s.run_root() / "teacher"
    assert s.run_root().parent == s.runs_dir and s.run_root() == nb.setup(quiet=True).run_root()
    other = dataclasses.replace(s, train_overrides={"epochs": 1})
    assert other.run_root() != s.run_root()  # another recipe never resumes this one's runs
    assert Path(cfg.gsv_root) == s.gsv_root and Path(cfg.val_root) == s.vg_root


def test_runs_are_not_reused_across_backbones_or_worlds(clean_env, monkeypatch, tmp_path):
    from scicevpr.offline import synthetic

    s = nb.setup(quiet=True)
    base = s.run_root()
    assert s.with_weights(None).run_root() != base  # random backbone: other runs
    copy = tmp_path / "other.pth"  # the same name, other content: "auto" would find either
    copy.write_bytes(b"not the shipped weights")
    monkeypatch.setattr("scicevpr.weights.resolve_weights", lambda weights, config: copy)
    assert s.run_root() != base
    monkeypatch.undo()
    monkeypatch.setitem(synthetic.PRESETS, "small", dataclasses.replace(synthetic.PRESETS["small"], max_lateral_offset=1.0))
    assert s.run_root() != base  # another world


def test_the_weights_file_is_hashed_once_per_version(clean_env, tmp_path):
    import os

    from scicevpr import weights

    hashes = weights._sha256_of_version.cache_info
    path = tmp_path / "w.pth"
    path.write_bytes(b"first")
    os.utime(path, ns=(1, 1))  # an old file: its hash is kept
    before = hashes().misses
    assert weights.weights_record(path) == (hashlib.sha256(b"first").hexdigest(), None)
    assert weights.weights_record(path)[0] == weights.file_sha256(path)
    assert hashes().misses == before + 1  # no manifest: hashed once, however often asked
    path.write_bytes(b"second")  # a new version (same size) is hashed anew...
    assert weights.weights_record(path)[0] == hashlib.sha256(b"second").hexdigest()
    assert weights.weights_record(path)[0] == hashlib.sha256(b"second").hexdigest()
    assert hashes().misses == before + 1  # ...every time while it is young (a racy write could keep its mtime)
    manifest = {"format": weights.MANIFEST_FORMAT, "sha256": "0" * 64, "label": "x", "description": "y"}
    weights.manifest_path(path).write_text(json.dumps(manifest))  # the manifest is read on every call
    with pytest.raises(ValueError, match="does not match its manifest"):
        weights.weights_record(path)


def test_building_models_on_one_weight_file_hashes_it_once(clean_env, monkeypatch):
    from scicevpr import weights
    from scicevpr.backbone import build_backbone

    path = weights.PACKAGE_WEIGHTS_DIR / f"{OFFLINE_BACKBONE.hub_name}_pretrain.pth"
    if not path.is_file() or time.time() - path.stat().st_mtime < 3:
        pytest.skip(f"no settled shipped backbone at {path}")
    read = []
    real = weights._sha256_of_version.__wrapped__
    monkeypatch.setattr(weights, "_sha256_of_version", functools.lru_cache(lambda *key: read.append(key) or real(*key)))
    for _ in range(3):
        build_backbone(OFFLINE_BACKBONE, weights=path)
    weights.weights_record(path)
    assert len(read) == 1


# ---------------------------------------------------------------------------------------------
# the notebooks themselves (structure only; pytest --nbval runs them)
# ---------------------------------------------------------------------------------------------

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_five_numbered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    cells = json.loads(path.read_text())["cells"]
    source = lambda c: "".join(c["source"])  # noqa: E731
    assert cells[0]["cell_type"] == "markdown" and "What this notebook teaches" in source(cells[0])
    assert "$" in source(cells[0])  # the paper's equations, in LaTeX
    code = [source(c) for c in cells if c["cell_type"] == "code"]
    assert "nb.setup()" in code[0]
    all_code = "\n".join(code)
    figures = re.findall(r'save_figure\(fig, "(\d\d)_[a-z0-9_]+"', all_code)
    assert figures and set(figures) == {path.name[:2]}
    assert "/work/" not in all_code and "/home/" not in all_code
    for c in cells:
        if c["cell_type"] == "code" and "_explorer(" in source(c):
            assert source(c).startswith("# NBVAL_IGNORE_OUTPUT")
        if c["cell_type"] == "code":
            for out in c.get("outputs", []):
                assert out.get("output_type") != "error", f"{path.name} holds an error output"


# ---------------------------------------------------------------------------------------------
# legends and canvas
# ---------------------------------------------------------------------------------------------


def recall_rows() -> pd.DataFrame:
    """Six rows as notebook 05 draws them: a tall bar (with its interval) next to the legend's corner."""
    rows = []
    for name, r1, r5, r10 in (("Super-CricaVPR (teacher)", 57.6, 83.8, 91.0), ("SciceVPR", 53.4, 79.2, 87.0),
                              ("CricaVPR-S (baseline)", 72.8, 92.4, 95.2), ("SciceVPR + PCA 256", 47.8, 78.0, 85.2),
                              ("raw pixels 32x32 (baseline)", 7.4, 17.8, 25.0),
                              ("hue histograms, 6 strips (baseline)", 18.6, 36.0, 44.8)):
        row = {"model": name}
        for n, v in ((1, r1), (5, r5), (10, r10)):
            row.update({f"R@{n}": v, f"R@{n} lo": v - 4.2, f"R@{n} hi": min(100.0, v + 4.2)})
        rows.append(row)
    return pd.DataFrame(rows)


def condition_rows(offset: float) -> pd.DataFrame:
    conditions = ["autumn", "day", "dusk", "fog", "night", "rain", "snow", "all"]
    r1 = np.array([68, 67, 46, 50, 38, 63, 56, 57], float) + offset
    r10 = np.minimum(np.array([90, 96, 88, 85, 78, 98, 93, 91], float) + offset / 3, 100.0)
    t = pd.DataFrame({"condition": conditions, "queries": [50, 150, 60, 60, 60, 60, 60, 500], "R@1": r1, "R@10": r10})
    for m in ("R@1", "R@10"):
        t[f"{m} lo"], t[f"{m} hi"] = t[m] - 10, np.minimum(t[m] + 10, 100.0)
    return t


def layer_rows() -> pd.DataFrame:
    rows = []
    for backbone, vals in (("random initialisation", [2.6, 2.8, 2.2, 2.8, 3.0]),
                           ("pretrained (this project)", [8.2, 12.6, 23.6, 33.0, 20.0])):
        for f, v in zip(["block 0", "block 1", "block 2", "block 3", "blocks 0-3 fused"], vals):
            rows.append({"features": f, "backbone": backbone, "R@1": v, "R@1 lo": v - 2, "R@1 hi": v + 4})
    return pd.DataFrame(rows)


def test_legend_overlaps_sees_a_legend_on_a_bar():
    fig, ax = plt.subplots()
    ax.bar([0, 1], [10.0, 1.0], label="tall")
    ax.text(1, 1.5, "1.0")
    ax.legend(loc="upper left")
    assert any("covers a bar" in p for p in viz.legend_overlaps(fig))
    ax.get_legend().remove()
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    assert viz.legend_overlaps(fig) == []


@pytest.mark.parametrize("name", ["recalls", "by_condition", "layer_recall"])
def test_no_legend_covers_a_bar_or_a_value_label(name):
    """The figures of notebooks 05 and 01 with their real shapes: 05_recalls.png hid the
    teacher's and CricaVPR-S's R@1 labels under its legend, 05_recall_by_condition.png the
    "all" bars."""
    if name == "recalls":
        fig = viz.plot_recalls(recall_rows(), metrics=["R@1", "R@5", "R@10"], label=LABEL,
                               chance={1: 1.6, 5: 7.6, 10: 14.8})
    elif name == "by_condition":
        fig = viz.plot_recall_by_condition({"Super-CricaVPR (teacher)": condition_rows(0),
                                            "SciceVPR": condition_rows(-4), "CricaVPR-S (baseline)": condition_rows(15)},
                                           ["R@1", "R@10"], label=LABEL, chance={1: 1.6, 10: 14.8})
    else:
        fig = viz.plot_layer_recall(layer_rows(), "R@1", highlight=["blocks 0-3 fused"], label=LABEL, chance=1.6,
                                    baselines={"raw pixels 32x32": 7.4})
    assert viz.legend_overlaps(fig) == []


def test_layer_recall_draws_the_pixel_baseline_and_uses_its_canvas(tmp_path):
    """01_layer_recall.png promised a raw-pixel line and drew none, and its two-backbone stamp,
    wider than the figure, left most of the saved canvas empty."""
    long_label = f"random initialisation: {LABEL} | pretrained (this project): ViT-S/14 self-supervised, then " \
                 f"distilled from a small CNN, on synthetic streets (not Meta's DINOv2), synthetic data"
    fig = viz.plot_layer_recall(layer_rows(), "R@1", label=long_label, chance=1.6, baselines={"raw pixels 32x32": 7.4})
    ax = fig.axes[0]
    pixel = [l for l in ax.get_lines() if "raw pixels 32x32" in l.get_label()]
    assert len(pixel) == 1 and np.allclose(pixel[0].get_ydata(), 7.4)
    width = fig.get_size_inches()[0]
    path = viz.save_png(fig, tmp_path / "01_layer_recall.png")
    with Image.open(path) as im:
        saved = im.size[0] / viz.DPI
    assert saved < width * 1.15, f"the saved figure is {saved:.1f} in wide for a {width:.1f} in canvas"
    axes_box = ax.get_window_extent()
    assert axes_box.width > 0.55 * fig.bbox.width  # the bars fill the canvas, not a corner of it
