"""The `scicevpr` command end to end on the tiny synthetic benchmark, and its errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scicevpr.cli import build_parser, main, parse_model_overrides

COMMANDS = ("synth", "train-teacher", "train-student", "eval", "stability", "extract", "demo")


def test_every_command_has_help(capsys):
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: scicevpr " + cmd in capsys.readouterr().out


def test_console_script_is_installed():
    exe = shutil.which("scicevpr") or str(__import__("pathlib").Path(sys.executable).parent / "scicevpr")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert all(cmd in out for cmd in COMMANDS)


def test_options_default_to_the_paper_and_parse_types():
    args = build_parser().parse_args(["train-teacher", "--lr", "3e-4", "--cities", "A,B", "--epochs", "none",
                                      "--resume", "--set", "image_size=112"])
    assert vars(args)["TrainConfig.lr"] == 3e-4 and vars(args)["TrainConfig.cities"] == ("A", "B")
    assert vars(args)["TrainConfig.epochs"] is None and vars(args)["TrainConfig.resume"] is True
    assert "TrainConfig.places_per_batch" not in vars(args)  # unchanged -> the dataclass default (72)
    assert parse_model_overrides(["image_size=112", "layers=8,9"]) == {"image_size": 112, "layers": (8, 9)}
    with pytest.raises(SystemExit, match="unknown model field 'imagesize'"):
        parse_model_overrides(["imagesize=112"])


def test_missing_dataset_folder_is_a_clear_error(tmp_path, capsys):
    code = main(["eval", "--preset", "SciceVPR-S", "--weights", "none", "--set", "image_size=56",
                 "--vg-root", str(tmp_path / "nowhere"), "--dataset", "pitts30k", "--quiet"])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.slow
def test_synth_train_distil_eval_stability_extract(tmp_path, capsys):
    data = tmp_path / "synthetic"
    assert main(["synth", "--preset", "tiny", "--out", str(data), "--quiet"]) == 0
    common = ["--gsv-root", str(data / "gsv_cities"), "--val-root", str(data / "vg"), "--val-dataset", "synthetic",
              "--places-per-batch", "4", "--img-per-place", "2", "--epochs", "1", "--max-iters-per-epoch", "1",
              "--num-workers", "0", "--device", "cpu", "--quiet"]
    assert main(["train-teacher", "--preset", "SciceVPR-S", "--weights", "none", "--set", "image_size=56",
                 "--run-dir", str(tmp_path / "t"), *common]) == 0
    assert (tmp_path / "t" / "best.pt").is_file() and (tmp_path / "t" / "log.csv").is_file()
    assert main(["train-student", "--teacher", str(tmp_path / "t" / "best.pt"), "--run-dir", str(tmp_path / "s"),
                 *common]) == 0
    ckpt = str(tmp_path / "s" / "best.pt")
    ds = ["--vg-root", str(data / "vg"), "--dataset", "synthetic", "--num-workers", "0", "--quiet"]
    assert main(["eval", "--checkpoint", ckpt, *ds, "--out", str(tmp_path / "r.csv"),
                 "--save-descriptors", str(tmp_path / "d")]) == 0
    table = pd.read_csv(tmp_path / "r.csv")
    assert list(table.columns) == ["model", "dataset", "split", "dim", "R@1", "R@5", "R@10", "R@100"]
    assert table.loc[0, "dim"] == 14 * 384 and 0 <= table.loc[0, "R@1"] <= 100
    assert np.load(tmp_path / "d" / "queries.npy").dtype == np.float16
    assert main(["stability", "--checkpoint", ckpt, *ds, "--batch-sizes", "1,4", "--orders", "2",
                 "--out", str(tmp_path / "st.csv")]) == 0
    st = pd.read_csv(tmp_path / "st.csv")
    assert len(st) == 4 and st["max_abs_change"].max() <= 1e-6  # the student is batch-independent
    images = data / "vg" / "synthetic" / "images" / "test" / "queries"
    assert main(["extract", "--checkpoint", ckpt, "--images", str(images), "--out", str(tmp_path / "q.npy"),
                 "--num-workers", "0", "--quiet"]) == 0
    assert np.load(tmp_path / "q.npy").shape[1] == 14 * 384
    assert (tmp_path / "q.txt").read_text().count("\n") == np.load(tmp_path / "q.npy").shape[0]


def test_demo_strips_widget_state_so_an_unchanged_notebook_stays_unchanged(tmp_path):
    import nbformat

    from scicevpr.cli import WIDGET_VIEW, strip_widget_state

    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"a1b2": {}}}}
    cell = nbformat.v4.new_code_cell("# NBVAL_IGNORE_OUTPUT\nwidget")
    cell.outputs = [nbformat.v4.new_output("display_data", data={WIDGET_VIEW: {"model_id": "a1b2"}, "text/plain": "VBox()"})]
    nb.cells.append(cell)
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    strip_widget_state(path)
    cleaned = nbformat.read(path, as_version=4)
    assert "widgets" not in cleaned.metadata
    assert cleaned.cells[0].outputs[0]["data"] == {"text/plain": "VBox()"}
    before = path.read_bytes()
    strip_widget_state(path)
    assert path.read_bytes() == before


def test_stored_notebooks_hold_no_random_widget_ids():
    """What `make demo` stores: no widget state, so re-running leaves `git status` clean."""
    from scicevpr.cli import WIDGET_VIEW

    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb")):
        text = path.read_text()
        assert WIDGET_VIEW not in text and "widget-state+json" not in text, path.name
