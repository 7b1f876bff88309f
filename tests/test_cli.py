"""The `scicevpr` command end to end on the tiny synthetic benchmark, and its errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import scicevpr
from scicevpr.cli import build_parser, main, parse_model_overrides

COMMANDS = ("synth", "combine-gsv", "train-teacher", "train-student", "train-offline", "pretrain-backbone", "eval", "stability", "extract",
            "search", "index", "claims", "demo")
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--preset", "SciceVPR-S", "--weights", "none", "--set", "image_size=56", "mix_dim=64", "encoder_heads=4",
         "encoder_ffn=128"]


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
    with pytest.raises(ValueError, match="unknown model field 'imagesize'"):
        parse_model_overrides(["imagesize=112"])


@pytest.mark.parametrize("argv, option", [
    (["stability", "--vg-root", "v", "--dataset", "d", "--pca-dim", "8"], "--pca-dim"),  # the sweep applies no PCA
    (["stability", "--vg-root", "v", "--dataset", "d", "--query-batch-size", "4"], "--query-batch-size"),  # --batch-sizes
    (["index", "build", "--database", "d", "--out", "o", "--recall-values", "1"], "--recall-values"),  # no queries
])
def test_an_option_a_command_would_ignore_is_refused(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and f"unrecognized arguments: {option}" in capsys.readouterr().err
    assert build_parser().parse_args(["eval", "--vg-root", "v", "--dataset", "d", "--pca-dim", "8"])  # eval uses them


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


# --------------------------------------------------------------------------------------------
# --help answers at once
# --------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_help_imports_neither_torch_nor_the_training_code():
    code = ("import sys\nfrom scicevpr.cli import main\n"
            f"for cmd in {list(COMMANDS)!r}:\n"
            "    try:\n        main([cmd, '--help'])\n    except SystemExit:\n        pass\n"
            "    heavy = sorted(m for m in ('torch', 'scicevpr.train', 'scicevpr.offline.pretrain', 'scicevpr.evaluate') if m in sys.modules)\n"
            "    assert not heavy, (cmd, heavy)\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize("cmd", ["train-teacher", "eval"])
def test_help_answers_as_its_own_process(cmd):
    """What makes --help fast is that it imports no torch (the test above); its time is not asserted
    here: on a loaded machine a wall-clock bound fails for reasons that are not the code's."""
    done = subprocess.run([sys.executable, "-m", "scicevpr.cli", cmd, "--help"], capture_output=True, text=True, env=_env())
    assert done.returncode == 0 and f"usage: scicevpr {cmd}" in done.stdout


# --------------------------------------------------------------------------------------------
# Every fault: one message naming the file or folder and the fix, status 2, no traceback
# --------------------------------------------------------------------------------------------


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run the command; check that a failure is one error line without a traceback."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Original Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == (1 if code else 0), err
    return code, out, err


@pytest.fixture
def no_model(monkeypatch):
    """Building a model fails the test: paths must be checked before (it takes seconds)."""

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the paths were checked")

    monkeypatch.setattr(scicevpr.models.VPRModel, "__init__", built)


@pytest.fixture
def vg_copy(tiny_benchmark, tmp_path):
    shutil.copytree(tiny_benchmark.vg_root, tmp_path / "vg")
    return tmp_path / "vg"


@pytest.fixture
def gsv_copy(tiny_benchmark, tmp_path):
    shutil.copytree(tiny_benchmark.gsv_root, tmp_path / "gsv")
    return tmp_path / "gsv"


def _queries(vg_root: Path) -> list[Path]:
    return sorted((vg_root / "synthetic" / "images" / "test" / "queries").glob("*.jpg"))


def test_an_existing_run_folder_without_resume(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("epoch\n1\n")
    code, _, err = run_cli(["train-teacher", "--run-dir", str(run), "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err and str(run) in err


def test_a_run_folder_in_use_by_another_training(tmp_path, capsys):
    from scicevpr.files import lock_run_dir

    run = tmp_path / "run"
    with lock_run_dir(run):
        code, _, err = run_cli(["train-teacher", "--run-dir", str(run), "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and "is in use by another training" in err and str(run) in err


def test_a_read_only_run_folder(tmp_path, capsys, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "run")):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    code, _, err = run_cli(["train-teacher", "--run-dir", str(tmp_path / "run"), "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and "cannot write to run folder" in err and "Read-only file system" in err and "--run-dir" in err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("epoch\n1\n")
    argv = ["train-teacher", "--run-dir", str(run), "--device", "cpu", "--quiet"]
    with pytest.raises(FileExistsError):
        main(["--debug", *argv])
    monkeypatch.setenv("SCICEVPR_DEBUG", "1")
    with pytest.raises(FileExistsError):
        main(argv)


def test_a_corrupt_image_read_by_dataloader_workers_then_skipped(vg_copy, capsys):
    bad = _queries(vg_copy)[2]
    bad.write_bytes(bad.read_bytes()[:200])
    argv = ["eval", *SMALL, "--vg-root", str(vg_copy), "--dataset", "synthetic", "--num-workers", "2", "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and f"cannot decode image {str(bad)!r}" in err and "--skip-corrupt" in err
    assert "DataLoader worker" not in err and len(err.strip().splitlines()) <= 3  # (plus the random-weights warning)
    code, out, err = run_cli([*argv, "--skip-corrupt"], capsys)
    assert code == 0 and "R@1" in out
    assert "skipped 1 of" in err and bad.name in err


def test_extract_skips_a_corrupt_photo_when_asked(vg_copy, tmp_path, capsys):
    """``extract`` lists a folder as ``search`` does; ``--skip-corrupt`` leaves a truncated photo out and says so."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for q in _queries(vg_copy)[:3]:
        (folder / q.name).write_bytes(q.read_bytes())
    bad = sorted(folder.glob("*.jpg"))[1]
    bad.write_bytes(bad.read_bytes()[:200])
    argv = ["extract", *SMALL, "--images", str(folder), "--out", str(tmp_path / "d.npy"), "--num-workers", "0", "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and f"cannot decode image {str(bad)!r}" in err and "--skip-corrupt" in err
    code, _, err = run_cli([*argv, "--skip-corrupt"], capsys)
    assert code == 0 and "skipped 1 of 3" in err and bad.name in err
    assert np.load(tmp_path / "d.npy").shape[0] == 2


def test_an_image_above_the_decompression_bomb_limit(vg_copy, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # the tiny images have 128 x 128 = 16,384 pixels
    argv = ["eval", *SMALL, "--vg-root", str(vg_copy), "--dataset", "synthetic", "--num-workers", "0", "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "is too large to decode safely" in err and "--skip-corrupt" in err


def test_a_gsv_csv_in_another_encoding(gsv_copy, vg_copy, tmp_path, capsys):
    csv = sorted((gsv_copy / "Dataframes").glob("*.csv"))[0]
    csv.write_bytes(csv.read_text().encode("utf-16"))
    argv = ["train-teacher", *SMALL, "--gsv-root", str(gsv_copy), "--val-dataset", "none", "--run-dir",
            str(tmp_path / "run"), "--device", "cpu", "--num-workers", "0", "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and f"{str(csv)!r} is not UTF-8 text" in err and "iconv" in err


def test_small_places_kept_out_or_refused_and_corrupt_images_skipped(gsv_copy, tmp_path, capsys):
    counts = pd.concat([pd.read_csv(p) for p in (gsv_copy / "Dataframes").glob("*.csv")])
    counts = counts.groupby(["city_id", "place_id"]).size()
    small = int((counts < 5).sum())
    assert 0 < small and (counts >= 5).sum() >= 3
    argv = ["train-teacher", *SMALL, "--gsv-root", str(gsv_copy), "--val-dataset", "none", "--img-per-place", "5",
            "--places-per-batch", "2", "--epochs", "1", "--max-iters-per-epoch", "1", "--device", "cpu",
            "--num-workers", "0", "--quiet"]
    code, _, err = run_cli([*argv, "--run-dir", str(tmp_path / "refuse"), "--no-drop-small-places"], capsys)
    assert code == 2 and "img_per_place (K) = 5 are required" in err and "--drop-small-places" in err
    code, out, err = run_cli([*argv, "--run-dir", str(tmp_path / "drop")], capsys)
    assert code == 0 and f"data: {small} place(s) with fewer than K = 5 images dropped, every image file checked" in out
    assert f"dropped {small} of" in err
    bad = sorted((gsv_copy / "Images").rglob("*.jpg"))[-1]  # a place that one iteration does not draw
    bad.write_bytes(bad.read_bytes()[:200])
    code, out, err = run_cli([*argv, "--run-dir", str(tmp_path / "refused")], capsys)  # refused before any step
    assert code == 2 and re.search(rf"1 of \d+ images in .* cannot be decoded.*{bad.name}.*--skip-corrupt", err), err
    assert not (tmp_path / "refused" / "last.pt").exists()
    code, out, err = run_cli([*argv, "--run-dir", str(tmp_path / "skip"), "--skip-corrupt"], capsys)
    assert code == 0 and "1 corrupt image(s) skipped" in out and "skipped 1 of" in err


def test_a_truncated_or_missing_official_checkpoint_before_any_model(vg_copy, tmp_path, capsys, no_model):
    common = ["eval", "--preset", "SciceVPR-S", "--vg-root", str(vg_copy), "--dataset", "synthetic", "--quiet"]
    code, _, err = run_cli([*common, "--official", str(tmp_path / "missing.pth")], capsys)
    assert code == 2 and "missing.pth' does not exist" in err
    torch.save({"model_state_dict": {"a": torch.zeros(1000)}}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli([*common, "--official", str(tmp_path / "cut.pth")], capsys)
    assert code == 2 and "cut.pth' cannot be read as a PyTorch file" in err and "truncated" in err


def test_a_checkpoint_with_pickled_objects_needs_trust(vg_copy, tmp_path, capsys):
    from scicevpr.checkpoint import checkpoint_dict
    from scicevpr.factory import create_model as build

    model = build("SciceVPR", scicevpr.get_config("SciceVPR-S", image_size=56, mix_dim=64, encoder_heads=4,
                                                   encoder_ffn=128), weights=None)
    torch.save(checkpoint_dict(model, meta={"when": pd.Timestamp("2024-01-01")}), tmp_path / "pickled.pt")
    common = ["extract", "--checkpoint", str(tmp_path / "pickled.pt"), "--images", str(_queries(vg_copy)[0].parent),
              "--out", str(tmp_path / "d.npy"), "--num-workers", "0", "--quiet"]
    code, _, err = run_cli(common, capsys)
    assert code == 2 and "holds pickled Python objects" in err and "--trust-checkpoint" in err
    code, out, _ = run_cli([*common, "--trust-checkpoint"], capsys)
    assert code == 0 and (tmp_path / "d.npy").is_file()


def test_weights_that_are_not_dinov2_are_summarised(vg_copy, tmp_path, capsys):
    torch.save({f"layer{i}.weight": torch.zeros(2) for i in range(500)}, tmp_path / "foreign.pth")
    argv = ["eval", "--preset", "SciceVPR-S", "--weights", str(tmp_path / "foreign.pth"), "--vg-root", str(vg_copy),
            "--dataset", "synthetic", "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "is not a DINOv2 vits14 state dict" in err and len(err) < 800


@pytest.mark.parametrize("argv,match", [
    (["eval", "--vg-root", "{tmp}/nowhere", "--dataset", "synthetic"], "nowhere"),
    (["eval", "--vg-root", "{vg}", "--dataset", "synthetic", "--pca-dim", "8"], "--pca-dim needs --pca-images"),
    (["eval", "--vg-root", "{vg}", "--dataset", "synthetic", "--pca-dim", "8", "--pca-images", "{tmp}/nowhere"],
     "--pca-images '.*nowhere' does not exist"),
    (["stability", "--vg-root", "{vg}", "--dataset", "pitts30k"], "pitts30k"),
    (["extract", "--images", "{tmp}/nowhere", "--out", "{tmp}/d.npy"], "--images '.*nowhere' does not exist"),
    (["search", "--database", "{tmp}/nowhere", "--queries", "{tmp}/empty"], "--database '.*nowhere' does not exist"),
    (["extract", "--images", "{tmp}/empty", "--out", "{tmp}/d.npy"], "--images folder .*empty' has no images: it is empty"),
    (["eval", "--vg-root", "{vg}", "--dataset", "synthetic", "--weights", "{tmp}/dinov2.pth"], "--weights '.*dinov2.pth' does not exist"),
])
def test_path_errors_come_before_the_model_is_built(argv, match, vg_copy, tmp_path, capsys, no_model):
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, vg=vg_copy) for a in argv]
    code, _, err = run_cli([*argv, "--preset", "SciceVPR-S", "--quiet"], capsys)
    assert code == 2 and re.search(match, err), err


@pytest.mark.parametrize("argv,match", [
    (["eval", "--vg-root", "{vg}", "--dataset", "synthetic", "--radius", "nan"], "argument --radius: expected a finite number > 0"),
    (["eval", "--vg-root", "{vg}", "--dataset", "synthetic", "--recall-values", "0"], "recall_values must be integers N >= 1"),
    (["eval", "--vg-root", "{vg}", "--dataset", "synthetic", "--pca-dim", "-4", "--pca-images", "{tmp}/empty"],
     "pca_dim must be an integer >= 1"),
    (["eval", "--vg-root", "{vg}", "--dataset", "synthetic", "--plot", "{tmp}/curve.jpg"], "--plot .*expected a .png file name"),
    (["eval", "--vg-root", "{vg}", "--dataset", "synthetic", "--save-descriptors", "{tmp}/afile"], "is an existing file"),
    (["eval", "--vg-root", "{vg}", "--dataset", "synthetic", "--out", "{tmp}/afile/r.csv"], "'.*afile' is a file, not a folder"),
    (["eval", "--vg-root", "{vg}", "--dataset", "synthetic", "--descriptors", "{tmp}/a", "{tmp}/b", "--names", "M", "M"],
     "names of the --descriptors folders repeat"),
    (["eval", "--vg-root", "{vg}", "--dataset", "synthetic", "--checkpoint", "{tmp}/ck.pt", "--set", "image_size=112"],
     "--checkpoint records its model .*: --set would be ignored"),
    (["stability", "--vg-root", "{vg}", "--dataset", "synthetic", "--batch-sizes", "0,2"], "argument --batch-sizes: expected"),
    (["stability", "--vg-root", "{vg}", "--dataset", "synthetic", "--orders", "0"], "argument --orders: expected an integer >= 1"),
    (["extract", "--images", "{tmp}/empty", "--out", "{tmp}/d.txt"], "--out .*expected a .npy file name"),
    (["search", "--database", "{tmp}/empty", "--queries", "{tmp}/empty", "--top-k", "0"], "argument --top-k"),
    (["search", "--database", "{tmp}/empty", "--queries", "{tmp}/empty", "--sheet-queries", "-1"], "argument --sheet-queries"),
    (["eval", "--vg-root", "{vg}", "--dataset", "synthetic", "--batch-size", "abc"], "argument --batch-size: invalid int value"),
])
def test_bad_values_and_output_paths_are_refused_before_any_work(argv, match, vg_copy, tmp_path, capsys, no_model):
    """One message naming the option, exit status 2, before a model is built or a file written
    (argparse's own errors for values it parses)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "ck.pt").write_bytes(b"")  # exists: the options that it would ignore are the fault
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()  # exist: the repeated names are the fault
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        code = main([a.format(tmp=tmp_path, vg=vg_copy) for a in argv] + ["--quiet"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err) and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_debug_works_after_the_command_too(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("epoch\n1\n")
    with pytest.raises(FileExistsError):
        main(["train-teacher", "--run-dir", str(run), "--device", "cpu", "--quiet", "--debug"])


# --------------------------------------------------------------------------------------------
# Installing
# --------------------------------------------------------------------------------------------


def test_eval_with_pca_writes_the_recall_plot(tiny_benchmark, tmp_path, capsys):
    """--pca-dim with --plot: the curve is drawn from the projected descriptors of the
    evaluation (projected once)."""
    split = tiny_benchmark.load_split("test")
    argv = ["eval", *SMALL, "--vg-root", str(tiny_benchmark.vg_root), "--dataset", "synthetic", "--pca-dim", "4",
            "--pca-images", str(split.folder / "database"), "--plot", str(tmp_path / "curve.png"),
            "--out", str(tmp_path / "r.csv"), "--num-workers", "0", "--quiet"]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and (tmp_path / "curve.png").is_file() and "curve.png" in out
    assert pd.read_csv(tmp_path / "r.csv").loc[0, "dim"] == 4


def test_the_cpu_only_install_is_documented_and_wired():
    readme = (ROOT / "README.md").read_text()
    assert "about 6 GB" in readme
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in readme
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    cpu = "https://download.pytorch.org/whl/cpu"
    lines = subprocess.run(["make", "-n", "-B", ".venv/.installed", f"TORCH_INDEX={cpu}"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    first_cpu = next(i for i, line in enumerate(lines) if f"pip install torch torchvision --index-url {cpu}" in line)
    assert first_cpu < next(i for i, line in enumerate(lines) if "pip install -e" in line)


def test_demo_strips_widget_state_and_merges_streams_so_an_unchanged_notebook_stays_unchanged(tmp_path):
    import nbformat

    from scicevpr.lab.runner import WIDGET_VIEW, tidy_outputs

    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"a1b2": {}}}}
    cell = nbformat.v4.new_code_cell("# NBVAL_IGNORE_OUTPUT\nwidget")
    cell.outputs = [nbformat.v4.new_output("display_data", data={WIDGET_VIEW: {"model_id": "a1b2"}, "text/plain": "VBox()"})]
    nb.cells.append(cell)
    printed = nbformat.v4.new_code_cell("print(1); print(2)")  # one print's text cut in two by timing, then stderr
    printed.outputs = [nbformat.v4.new_output("stream", name="stdout", text="a\nb"),
                       nbformat.v4.new_output("stream", name="stdout", text="c\n"),
                       nbformat.v4.new_output("stream", name="stderr", text="warning\n"),
                       nbformat.v4.new_output("stream", name="stdout", text="d\n")]
    nb.cells.append(printed)
    assert tidy_outputs(nb)
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    cleaned = nbformat.read(path, as_version=4)
    assert "widgets" not in cleaned.metadata
    assert cleaned.cells[0].outputs[0]["data"] == {"text/plain": "VBox()"}
    assert [(o["name"], o["text"]) for o in cleaned.cells[1].outputs] == [("stdout", "a\nbc\n"), ("stderr", "warning\n"),
                                                                         ("stdout", "d\n")]
    assert not tidy_outputs(cleaned), "a tidy notebook is left as it is"


def test_stored_notebooks_hold_no_random_widget_ids():
    """What `make demo` stores: no widget state, so re-running leaves `git status` clean."""
    from scicevpr.lab.runner import WIDGET_VIEW

    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb")):
        text = path.read_text()
        assert WIDGET_VIEW not in text and "widget-state+json" not in text, path.name


def test_demo_keeps_the_stored_notebook_when_a_cell_fails(tmp_path, monkeypatch, capsys):
    """A failing notebook leaves the stored file as it was and its executed cells, with the
    error, in runs/demo-failed/ (one message, exit status 2)."""
    import nbformat

    import scicevpr.cli as cli

    (tmp_path / "notebooks").mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    ok = nbformat.v4.new_code_cell("print('stored')")
    ok.outputs = [nbformat.v4.new_output("stream", name="stdout", text="stored\n")]
    nb.cells = [ok, nbformat.v4.new_code_cell("1 / 0")]
    path = tmp_path / "notebooks" / "01_fails.ipynb"
    nbformat.write(nb, path)
    before = path.read_bytes()
    monkeypatch.setattr(cli, "repo_root", lambda: tmp_path)
    monkeypatch.setattr(cli, "demo_environment", lambda: {})
    monkeypatch.setenv("JUPYTER_PATH", os.environ.get("JUPYTER_PATH", ""))  # restored after the test
    code = main(["demo"])
    err = capsys.readouterr().err
    assert code == 2 and "did not run to the end (error: ZeroDivisionError" in err and "runs/demo-failed/01_fails.ipynb" in err
    assert path.read_bytes() == before
    failed = nbformat.read(tmp_path / "runs" / "demo-failed" / "01_fails.ipynb", as_version=4)
    assert failed.cells[1].outputs[0]["ename"] == "ZeroDivisionError"
    assert not [p for p in (tmp_path / "notebooks").iterdir() if p.name.startswith(".demo-")]
    from scicevpr.lab.runner import run_notebook

    row = run_notebook(path, tmp_path / "again.ipynb", record_timing=False)  # the demo's way: no timing stored
    assert row["status"].startswith("error: ZeroDivisionError") and (row["cells_run"], row["cells"]) == (2, 2)


@pytest.mark.skipif(os.name != "posix", reason="Unix sockets: Windows kernels keep local TCP")
def test_notebook_kernels_talk_over_private_unix_sockets(tmp_path, monkeypatch, capfd):
    """The runner's kernels use IPC sockets in a temporary folder, not plain-text local TCP
    (ipykernel's "running over TCP without encryption" warning at every start of `scicevpr demo`);
    the folder and the kernelspec's folder are gone afterwards."""
    import tempfile

    import nbformat

    from scicevpr.lab.runner import run_notebook, use_this_python

    monkeypatch.setenv("JUPYTER_PATH", os.environ.get("JUPYTER_PATH", ""))  # restored after the test
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the runner's temporary folders land here
    use_this_python()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from ipykernel.kernelapp import IPKernelApp\nprint(IPKernelApp.instance().transport)")]
    path = tmp_path / "transport.ipynb"
    nbformat.write(nb, path)
    row = run_notebook(path, path, record_timing=False)
    assert row["status"] == "ok"
    assert nbformat.read(path, as_version=4).cells[0].outputs[0]["text"] == "ipc\n"
    assert "without encryption" not in capfd.readouterr().err
    assert not list(tmp_path.glob("scicevpr-kernel-*"))  # the sockets' folder, removed with the kernel
    code = "from scicevpr.lab.runner import use_this_python; print(use_this_python())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    folder = Path(out.strip())
    assert folder.name.startswith("scicevpr-kernels-") and not folder.exists()
