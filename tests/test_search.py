"""`scicevpr search` over photo folders without labels, and eval's Recall@N curves, on the tiny
synthetic benchmark with a small random-weight SciceVPR."""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scicevpr.checkpoint import load_model, save_checkpoint
from scicevpr.factory import create_model
from scicevpr.cli import main
from scicevpr.config import EvalConfig
from scicevpr.evaluate import chance_recall, evaluate, recall_at_n, recall_curve, search
from scicevpr.search import list_images, make_result, search_folders

CFG = EvalConfig(num_workers=0, progress=False)
RUN = ["--num-workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = create_model("SciceVPR", "SciceVPR-S", weights=None, seed=0, image_size=56, mix_dim=64)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "student.pt", model)


@pytest.fixture(scope="module")
def split(tiny_benchmark):
    return tiny_benchmark.load_split("test")


@pytest.fixture
def photos(split, tmp_path):
    """The test split as someone's photos: other names, nested folders, some PNGs, no UTM."""
    db, q = tmp_path / "map", tmp_path / "new"
    for i, p in enumerate(split.database_paths):
        dst = db / f"street{i % 2}" / f"IMG_{i:04d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst)
    for i, p in enumerate(split.query_paths):
        dst = q / ("day" if i % 2 else "night") / f"photo {i}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.open(p).save(dst)
    return db, q


def test_search_with_utm_names_prints_the_recalls_of_eval(split, checkpoint, tmp_path, capsys):
    folder = split.folder
    out = tmp_path / "out"
    code = main(["search", "--checkpoint", str(checkpoint), "--database", str(folder / "database"),
                 "--queries", str(folder / "queries"), "--out", str(out), "--top-k", "3", "--sheet-queries", "2", *RUN])
    assert code == 0
    printed = capsys.readouterr().out
    want = evaluate(load_model(checkpoint), split, CFG).recalls
    recalls = pd.read_csv(out / "recalls.csv")
    assert {n: recalls.loc[0, f"R@{n}"] for n in want} == pytest.approx({n: round(v, 2) for n, v in want.items()})
    assert "R@1" in printed and f"{want[1]:.2f}".rstrip("0").rstrip(".") in printed
    matches = pd.read_csv(out / "matches.csv")
    assert len(matches) == split.num_queries * 3 and list(matches["rank"][:3]) == [1, 2, 3]
    assert matches.groupby("query")["similarity"].apply(lambda s: s.is_monotonic_decreasing).all()
    assert matches["correct"].dtype == bool
    with Image.open(out / "contact_sheet.png") as im:
        assert im.width > 400 and im.height > 200


def test_search_own_photos_without_labels(photos, checkpoint, split, tmp_path, capsys):
    db, q = photos
    out = tmp_path / "out"
    out.mkdir()
    (out / "recalls.csv").write_text("R@1\n99.0\n")  # an earlier search's, of photos with UTM names
    args = ["search", "--checkpoint", str(checkpoint), "--database", str(db), "--queries", str(q), "--out", str(out), *RUN]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "no Recall@N" in printed and not (out / "recalls.csv").exists()
    matches = pd.read_csv(out / "matches.csv")
    assert len(matches) == 5 * split.num_queries and "correct" not in matches
    assert matches["database"].str.match(r"street[01]/IMG_\d{4}\.jpg").all()
    assert matches["query"].str.match(r"(day|night)/photo \d+\.png").all()
    assert (out / "contact_sheet.png").is_file()
    assert main([*args, "--sheet-queries", "0"]) == 0  # the same folder again: no sheet is left from the first run
    assert not (out / "contact_sheet.png").exists() and (out / "matches.csv").is_file()
    capsys.readouterr()


def test_a_database_queried_with_itself_finds_each_image_first(photos, checkpoint):
    db, _ = photos
    result = search_folders(load_model(checkpoint), db, db, k=2, config=CFG)
    assert (result.predictions[:, 0] == np.arange(len(result.query_paths))).all()
    np.testing.assert_allclose(result.similarities[:, 0], 1.0, atol=1e-5)
    assert (result.similarities[:, 1] < result.similarities[:, 0]).all()
    assert result.recalls is None  # no UTM names


def test_empty_and_missing_folders_are_clear_errors(photos, checkpoint, tmp_path, capsys):
    db, q = photos
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    for bad, words in ((tmp_path / "empty", "it is empty"), (tmp_path / "notes", ".txt"), (tmp_path / "nowhere", "does not exist")):
        assert main(["search", "--checkpoint", str(checkpoint), "--database", str(db), "--queries", str(bad), *RUN]) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and words in err
    with pytest.raises(ValueError, match=".jpg, .jpeg or .png"):
        list_images(tmp_path / "empty", "query")


def test_similarities_are_computed_without_the_neighbours_descriptor_array():
    """make_result's similarities are the inner products of each query and its predicted
    database descriptors (NaN where the prediction is -1), as the direct computation gives them,
    and its peak memory stays far below the (N_q, k, D) array of the neighbours' descriptors
    (27 GiB for Pitts30k's 6,816 queries at k = 100, D = 10,752)."""
    rng = np.random.default_rng(0)
    n_q, n_db, k, dim = 300, 200, 50, 2048
    db = rng.standard_normal((n_db, dim), dtype=np.float32)
    q = rng.standard_normal((n_q, dim), dtype=np.float32)
    pred = np.argsort(rng.random((n_q, n_db)), axis=1)[:, :k]  # (N_q, k)
    pred[0, -3:] = -1
    pred[7, 1:] = -1
    db_paths, q_paths = [Path(f"/db/{i}.jpg") for i in range(n_db)], [Path(f"/q/{i}.jpg") for i in range(n_q)]
    tracemalloc.start()
    try:
        result = make_result("/db", "/q", db_paths, q_paths, db, q, pred)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    neighbours = n_q * k * dim * 4  # bytes of the (N_q, k, D) float32 array: 117 MiB
    assert peak < neighbours / 4, f"peak {peak / 2**20:.0f} MiB"
    valid = pred >= 0
    want = np.einsum("qkd,qd->qk", db[np.where(valid, pred, 0)], q).astype(np.float32)  # (N_q, k), the direct way
    want[~valid] = np.nan
    assert result.similarities.dtype == np.float32 and result.similarities.shape == (n_q, k)
    np.testing.assert_array_equal(result.similarities, want)  # the same values, NaN where -1
    assert np.isnan(result.similarities[0, -3:]).all() and np.isnan(result.similarities[7, 1:]).all()
    assert result.similarities[3, 4] == pytest.approx(float(db[pred[3, 4]] @ q[3]), rel=1e-4)


def test_unreadable_files_fail_or_are_skipped_and_counted(photos, checkpoint, tmp_path, capsys):
    db, q = photos
    (q / "broken.jpg").write_bytes(b"not a jpeg at all")
    args = ["search", "--checkpoint", str(checkpoint), "--database", str(db), "--queries", str(q), *RUN]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "--skip-unreadable" in err
    assert main([*args, "--out", str(tmp_path / "b"), "--skip-unreadable"]) == 0
    assert "skipped 1 unreadable files" in capsys.readouterr().out
    assert (tmp_path / "b" / "skipped.txt").read_text().strip().endswith("broken.jpg")
    assert "broken.jpg" not in pd.read_csv(tmp_path / "b" / "matches.csv")["query"].tolist()
    index = ["index", "build", "--checkpoint", str(checkpoint), "--database", str(q), "--skip-unreadable", *RUN]
    assert main([*index, "--out", str(tmp_path / "map")]) == 0
    assert (tmp_path / "map" / "skipped.txt").is_file()
    # the same folders written again with every file readable: no list of skipped files is left behind
    (q / "broken.jpg").unlink()
    assert main([*args, "--out", str(tmp_path / "b"), "--skip-unreadable"]) == 0
    assert main([*index, "--out", str(tmp_path / "map"), "--overwrite"]) == 0
    capsys.readouterr()
    assert not (tmp_path / "b" / "skipped.txt").exists() and not (tmp_path / "map" / "skipped.txt").exists()


# --------------------------------------------------------------------------------------------
# eval: Recall@N curves
# --------------------------------------------------------------------------------------------


def test_recall_curve_agrees_with_recall_at_n():
    rng = np.random.default_rng(0)
    db, q = rng.normal(size=(150, 8)).astype(np.float32), rng.normal(size=(20, 8)).astype(np.float32)
    positives = [rng.choice(150, size=3, replace=False) for _ in range(20)]
    curve = recall_curve(db, q, positives, 100)
    _, pred = search(db, q, 100)
    want, _ = recall_at_n(pred, positives, (1, 5, 10, 100))
    assert curve.shape == (100,) and np.all(np.diff(curve) >= 0)
    assert [curve[n - 1] for n in (1, 5, 10, 100)] == [want[n] for n in (1, 5, 10, 100)]


def test_eval_writes_a_recall_plot_one_line_per_descriptor_folder(tiny_benchmark, split, checkpoint, tmp_path, capsys):
    other = save_checkpoint(tmp_path / "other.pt", create_model("SciceVPR", "SciceVPR-S", weights=None, seed=1,
                                                                image_size=56, mix_dim=64))
    ds = ["--vg-root", str(tiny_benchmark.vg_root), "--dataset", "synthetic", *RUN]
    for name, ckpt in (("a", checkpoint), ("b", other)):
        assert main(["eval", "--checkpoint", str(ckpt), *ds, "--save-descriptors", str(tmp_path / name),
                     "--plot", str(tmp_path / f"{name}.png")]) == 0
        assert (tmp_path / f"{name}.png").is_file()
    capsys.readouterr()
    assert main(["eval", *ds, "--descriptors", str(tmp_path / "a"), str(tmp_path / "b"), "--names", "seed 0", "seed 1",
                 "--plot", str(tmp_path / "both.png"), "--out", str(tmp_path / "both.csv")]) == 0
    table = pd.read_csv(tmp_path / "both.csv")
    assert table["model"].tolist() == ["seed 0", "seed 1"]
    want = evaluate(load_model(checkpoint), split, CFG).recalls
    assert table.loc[0, "R@1"] == pytest.approx(round(want[1], 2), abs=0.01)  # fp16 descriptors, same ranking here
    with Image.open(tmp_path / "both.png") as im:
        assert im.width > 300
    # descriptors of another split are refused
    assert main(["eval", *ds, "--split", "val", "--descriptors", str(tmp_path / "a")]) == 2
    assert "another split" in capsys.readouterr().err


def test_recall_curve_plot_has_a_line_per_model_and_chance():
    import matplotlib

    matplotlib.use("Agg")
    from scicevpr.lab.viz import missing_labels, plot_recall_curves

    curves = {"A": np.linspace(10, 90, 100), "B": np.linspace(5, 80, 100)}
    chance = list(chance_recall(100, [np.array([1, 2])] * 4, range(1, 101)).values())
    fig = plot_recall_curves(curves, chance=chance, label="synthetic")
    ax = fig.axes[0]
    assert len(ax.lines) == 3 and [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["A (R@1 10.0)", "B (R@1 5.0)"]
    assert missing_labels(fig) == []
    assert ax.lines[2].get_ydata()[-1] == pytest.approx(100.0)  # 100 of 100 retrieved: every positive found


def test_search_and_index_query_take_and_record_the_query_batch_size_of_a_cross_image_model(split, tmp_path, capsys):
    import json

    teacher = save_checkpoint(tmp_path / "teacher.pt", create_model("SuperCricaVPR", "SciceVPR-S", weights=None, seed=0,
                                                                  image_size=56, mix_dim=64))
    folder = split.folder
    common = ["--checkpoint", str(teacher), "--queries", str(folder / "queries"), "--sheet-queries", "0", *RUN]
    sims = {}
    for bs in ("1", None):
        out = tmp_path / f"search-{bs}"
        assert main(["search", *common, "--database", str(folder / "database"), "--out", str(out)]
                    + (["--query-batch-size", bs] if bs else [])) == 0
        settings = json.loads((out / "settings.json").read_text())
        assert settings["batch_dependent"] is True and settings["database_batch_size"] == 16
        assert settings["query_batch_size"] == (int(bs) if bs else 16)
        assert f"queries encoded in batches of {bs or 16}" in capsys.readouterr().out
        sims[bs] = pd.read_csv(out / "matches.csv")["similarity"].to_numpy()
    assert not np.allclose(sims["1"], sims[None], atol=1e-4)  # the teacher's descriptors follow the batching
    assert main(["index", "build", "--checkpoint", str(teacher), "--database", str(folder / "database"),
                 "--out", str(tmp_path / "map"), *RUN]) == 0
    assert main(["index", "query", *common, "--index", str(tmp_path / "map"), "--out", str(tmp_path / "iq"),
                 "--query-batch-size", "1"]) == 0
    assert json.loads((tmp_path / "iq" / "settings.json").read_text())["query_batch_size"] == 1
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "iq" / "matches.csv")["similarity"].to_numpy(), sims["1"])
