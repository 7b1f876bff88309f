"""Faults and bad inputs of the `scicevpr` command, one row each.

Every row runs one command line on the tiny synthetic benchmark (and a tiny trained teacher) and
asserts what the user sees and what stays on disk: the exit status, one error line that names
the file or value and the fix (a regex on it), and that no file that existed before was changed
(every byte, every file under the row's folder, the benchmark and the teacher run). A row may add
a ``check`` of what was (or was not) written. Library calls that users make directly have their
own table at the end.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from scicevpr.cli import main

TINY_MODEL = ["--preset", "SciceVPR-S", "--weights", "none", "--set", "image_size=56", "mix_dim=64",
              "encoder_heads=4", "encoder_ffn=128"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("quiet_random_weights")


@dataclass
class World:
    """What a row works on: ``tmp`` is its own folder; ``data`` the tiny benchmark and
    ``teacher_run`` a one-step teacher run, shared (read-only: a row that changes one copies it)."""

    tmp: Path
    data: Path
    teacher_run: Path
    index: Path | None = None

    @property
    def vg(self) -> Path:
        return self.data / "vg"

    @property
    def gsv(self) -> Path:
        return self.data / "gsv_cities"

    def split(self, role: str = "database") -> Path:
        return self.vg / "synthetic" / "images" / "test" / role

    def train(self, *extra: str, run: str = "run") -> list[str]:
        """A one-epoch, one-iteration training of the tiny model into ``tmp/run``."""
        return ["--gsv-root", str(self.gsv), "--val-root", str(self.vg), "--val-dataset", "synthetic",
                "--places-per-batch", "4", "--img-per-place", "2", "--epochs", "1", "--max-iters-per-epoch", "1",
                "--num-workers", "0", "--device", "cpu", "--quiet", "--run-dir", str(self.tmp / run), *extra]

    def eval_on(self, root: Path | None = None) -> list[str]:
        return ["--vg-root", str(root or self.vg), "--dataset", "synthetic", "--num-workers", "0", "--quiet"]

    def copy_teacher(self) -> Path:
        return Path(shutil.copytree(self.teacher_run, self.tmp / "teacher"))

    def copy_vg(self) -> Path:
        return Path(shutil.copytree(self.vg, self.tmp / "vg"))


@dataclass
class Fault:
    """One row: ``args(w)`` is the command line (after ``setup(w)``, which may return None);
    ``message`` a regex the one error line must match; ``check(w)`` what must hold afterwards;
    ``patch(monkeypatch, w)`` a fault of the machine that a command line cannot cause."""

    name: str
    args: Callable[[World], list[str]]
    message: str
    setup: Callable[[World], object] | None = None
    check: Callable[[World], None] | None = None
    patch: Callable[[pytest.MonkeyPatch, World], None] | None = None
    code: int = 2
    marks: tuple = field(default_factory=tuple)


# --------------------------------------------------------------------------------------------
# Setups
# --------------------------------------------------------------------------------------------


def _nan_checkpoint(w: World) -> None:
    ckpt = torch.load(w.teacher_run / "best.pt", weights_only=True)
    for v in ckpt["model_state"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(ckpt, w.tmp / "nan.pt")


def _nan_descriptors(w: World) -> None:
    from scicevpr.data.vg import load_vg_split

    split = load_vg_split(w.vg, "synthetic", "test")
    (w.tmp / "d").mkdir()
    db = np.ones((split.num_database, 8), np.float16)
    db[1, 3] = np.nan
    np.save(w.tmp / "d" / "database.npy", db)
    np.save(w.tmp / "d" / "queries.npy", np.ones((split.num_queries, 8), np.float16))


def _without_last(w: World) -> None:
    (w.copy_teacher() / "last.pt").unlink()


def _loss_nan_at_step(n: int):
    """The metric-learning loss turns NaN at its n-th call (a diverging run, at a known step)."""
    def patch(mp: pytest.MonkeyPatch, w: World) -> None:
        from scicevpr.losses import MultiSimilarityLoss

        real, calls = MultiSimilarityLoss.forward, [0]

        def forward(self, *a, **k):
            calls[0] += 1
            out = real(self, *a, **k)
            return out * float("nan") if calls[0] >= n else out

        mp.setattr(MultiSimilarityLoss, "forward", forward)
    return patch


def _last_is_epoch_1_and_finite(w: World) -> None:
    ckpt = torch.load(w.tmp / "run" / "last.pt", weights_only=True)
    assert ckpt["meta"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model_state"].values() if v.is_floating_point())


def _no_checkpoint(w: World) -> None:
    assert not (w.tmp / "run" / "best.pt").exists() and not (w.tmp / "run" / "last.pt").exists()


def _disk_full(error: BaseException):
    """torch.save fails as it does on a full disk."""
    def patch(mp: pytest.MonkeyPatch, w: World) -> None:
        def save(*a, **k):
            raise error

        mp.setattr(torch, "save", save)
    return patch


def _no_temporary_files(w: World) -> None:
    assert not [p for p in (w.tmp / "run").iterdir() if p.name.endswith(".tmp")]


def _edit_city_csv(edit: Callable[[list[str]], list[str]]):
    """A copy of the GSV-Cities folder (in ``tmp/gsv``) whose first city's CSV is edited."""
    def setup(w: World) -> None:
        gsv = Path(shutil.copytree(w.gsv, w.tmp / "gsv"))
        csv = sorted((gsv / "Dataframes").glob("*.csv"))[0]
        csv.write_text("\n".join(edit(csv.read_text().splitlines())) + "\n")
    return setup


def _with_field(line: int, column: int, value: str):
    def edit(lines: list[str]) -> list[str]:
        fields = lines[line - 1].split(",")
        fields[column] = value
        lines[line - 1] = ",".join(fields)
        return lines
    return edit


def _train_on_copy(w: World) -> list[str]:
    args = w.train()
    args[args.index("--gsv-root") + 1] = str(w.tmp / "gsv")
    return ["train-teacher", *TINY_MODEL, *args]


def _truncated_image(where: str):
    """A copy of the GSV-Cities folder (``where="gsv"``) or of the VG benchmark (``"vg"``) with
    its last image cut in half (one that a one-iteration epoch does not draw)."""
    def setup(w: World) -> None:
        folder = Path(shutil.copytree(w.gsv, w.tmp / "gsv")) if where == "gsv" else w.copy_vg()
        victim = sorted(folder.rglob("*.jpg"))[-1]
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return setup


def _train_on_vg_copy(w: World) -> list[str]:
    args = w.train()
    args[args.index("--val-root") + 1] = str(w.tmp / "vg")
    return ["train-teacher", *TINY_MODEL, *args]


def _damaged_index(name: str, content: bytes | None = None, edit: Callable[[dict], dict] | None = None):
    def setup(w: World) -> None:
        index = Path(shutil.copytree(w.index, w.tmp / "index"))
        if content is not None:
            (index / name).write_bytes(content)
        if edit is not None:
            (index / name).write_text(json.dumps(edit(json.loads((index / name).read_text()))))
    return setup


def _bad_weights_folder(mp: pytest.MonkeyPatch, w: World) -> None:
    from scicevpr.offline.config import OFFLINE_BACKBONE

    (w.tmp / "w").mkdir()
    (w.tmp / "w" / f"{OFFLINE_BACKBONE.hub_name}_pretrain.pth").write_bytes(b"not a weight file" * 100)
    mp.setenv("SCICEVPR_WEIGHTS", str(w.tmp / "w"))


OFFLINE_MODEL = ["--preset", "SciceVPR-S", "--set", "image_size=112", "backbone_num_blocks=4", "backbone_pretrain_img_size=112",
                 "layers=0,1,2,3"]


def _query_index(w: World) -> list[str]:
    return ["index", "query", "--index", str(w.tmp / "index"), "--queries", str(w.split("queries")),
            "--out", str(w.tmp / "results"), "--num-workers", "0", "--quiet", *TINY_MODEL]


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

FAULTS = [
    # already handled before this table existed
    Fault("missing vg-root", lambda w: ["eval", *TINY_MODEL, *w.eval_on(w.tmp / "nowhere")], r"nowhere"),
    Fault("run folder not resumed", lambda w: ["train-teacher", *TINY_MODEL, *w.train(run="teacher")],
          r"already holds a run; refusing to overwrite it.*--resume", setup=lambda w: w.copy_teacher()),
    # 1. no NaN weights saved, no Recall@N of NaN
    Fault("lr diverges in epoch 1", lambda w: ["train-teacher", *TINY_MODEL, *w.train("--lr", "1e8", "--epochs", "2",
                                                                                       "--max-iters-per-epoch", "2")],
          r"training diverged at epoch 1, iteration 2: the loss is nan.*no checkpoint was written.*lr=1e\+08",
          check=_no_checkpoint),
    Fault("loss NaN in epoch 2", lambda w: ["train-teacher", *TINY_MODEL, *w.train("--epochs", "2")],
          r"training diverged at epoch 2, iteration 2: the loss is nan.*last good checkpoint is '.*last\.pt' \(epoch 1\)",
          patch=_loss_nan_at_step(2), check=_last_is_epoch_1_and_finite),
    Fault("gamma nan", lambda w: ["train-student", "--teacher", str(w.teacher_run), *w.train("--gamma", "nan")],
          r"loss gamma must be a finite number, got nan"),
    Fault("eta negative", lambda w: ["train-student", "--teacher", str(w.teacher_run), *w.train("--eta", "-5")],
          r"loss eta must be >= 0.*got -5"),
    Fault("lr zero", lambda w: ["train-teacher", *TINY_MODEL, *w.train("--lr", "0")], r"lr must be a finite number > 0, got 0"),
    Fault("device misspelt", lambda w: ["eval", *TINY_MODEL, *w.eval_on(), "--device", "gpu"],
          r"device='gpu' is not a device; use 'auto'"),
    Fault("eval of a NaN checkpoint", lambda w: ["eval", "--checkpoint", str(w.tmp / "nan.pt"), *w.eval_on()],
          r"nan\.pt' holds weights that are not finite.*diverged", setup=_nan_checkpoint),
    Fault("eval of NaN descriptors", lambda w: ["eval", "--descriptors", str(w.tmp / "d"), *w.eval_on()],
          r"database\.npy'.*hold NaN or infinite values in 1 of \d+ rows", setup=_nan_descriptors),
    # 2. --resume never starts again over a run
    Fault("resume without last.pt", lambda w: ["train-teacher", *TINY_MODEL, *w.train("--resume", run="teacher")],
          r"cannot resume '.*teacher': its last\.pt is missing.*best\.pt.*new run_dir", setup=_without_last),
    Fault("resume a mistyped folder", lambda w: ["train-teacher", *TINY_MODEL, *w.train("--resume", run="techer")],
          r"--resume: run folder '.*techer' does not exist, so there is nothing to continue",
          check=lambda w: not (w.tmp / "techer").exists() or pytest.fail("a run folder was created")),
    # 4. a full disk names the file; a read-only output is refused before the work
    Fault("disk full in torch.save", lambda w: ["train-teacher", *TINY_MODEL, *w.train()],
          r"cannot write '.*run/best\.pt': the write stopped part-way, as it does when the disk is full.*previous best\.pt",
          patch=_disk_full(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2624 vs 2512")),
          check=_no_temporary_files),
    Fault("disk full (ENOSPC)", lambda w: ["train-teacher", *TINY_MODEL, *w.train()],
          r"cannot write '.*run/best\.pt': the disk is full",
          patch=_disk_full(OSError(28, "No space left on device")), check=_no_temporary_files),
    Fault("read-only index --out", lambda w: ["index", "build", "--database", str(w.split()), "--out", "/sys/scicevpr-index",
                                              "--quiet", *TINY_MODEL],
          r"--out '/sys/scicevpr-index': cannot write in '/sys'.*writable", marks=(pytest.mark.skipif(
              not Path("/sys").is_dir(), reason="needs Linux's read-only /sys"),)),
    Fault("read-only eval --out", lambda w: ["eval", *TINY_MODEL, *w.eval_on(), "--out", "/sys/r.csv"],
          r"--out '/sys/r\.csv': cannot write in '/sys'", marks=(pytest.mark.skipif(
              not Path("/sys").is_dir(), reason="needs Linux's read-only /sys"),)),
    # 6. a damaged training or validation image is refused before the first step, not epochs later
    Fault("truncated JPEG in the training set", _train_on_copy,
          r"1 of \d+ images in the GSV-Cities folder '.*gsv' cannot be decoded.*\.jpg'.*--skip-corrupt", setup=_truncated_image("gsv"),
          check=_no_checkpoint),
    Fault("truncated JPEG in the validation split", _train_on_vg_copy,
          r"1 of \d+ images in the validation split synthetic/val cannot be decoded.*--skip-corrupt",
          setup=_truncated_image("vg"), check=_no_checkpoint),
    # 5. GSV-Cities CSV rows
    Fault("non-numeric place_id", _train_on_copy, r"Dataframes/\w+\.csv', line 3: place_id must be an integer, got 'abc'",
          setup=_edit_city_csv(_with_field(3, 0, "abc"))),
    Fault("short CSV row", _train_on_copy, r"Dataframes/\w+\.csv', line 4: no value for month, northdeg, city_id, lat, lon, "
          r"panoid", setup=_edit_city_csv(lambda lines: lines[:3] + ["7,2020"] + lines[3:])),
    Fault("repeated CSV row", _train_on_copy, r"Dataframes/\w+\.csv', line 3 repeats line 2",
          setup=_edit_city_csv(lambda lines: lines[:2] + lines[1:])),
    Fault("combine-gsv one folder twice", lambda w: ["combine-gsv", str(w.tmp / "both"), str(w.gsv), str(w.gsv)],
          r"gsv_cities' is given twice.*Give each folder once",
          check=lambda w: not (w.tmp / "both").exists() or pytest.fail("written")),
    # 7. a damaged index says to rebuild it
    Fault("index.json not JSON", _query_index, r"index\.json is damaged \(not JSON.*Rebuild the index: scicevpr index build",
          setup=_damaged_index("index.json", b"{ truncated")),
    Fault("index.json without model", _query_index, r"index\.json is damaged \(entries missing or malformed: model\).*Rebuild",
          setup=_damaged_index("index.json", edit=lambda m: {k: v for k, v in m.items() if k != "model"})),
    Fault("index.faiss damaged", _query_index, r"index\.faiss is damaged.*Rebuild the index",
          setup=_damaged_index("index.faiss", b"\0" * 40)),
    Fault("descriptors.npy damaged", _query_index, r"descriptors\.npy is damaged.*Rebuild the index",
          setup=_damaged_index("descriptors.npy", b"\x93NUMPY\x01\x00v\x00{'descr'")),
    # 8. numbers the work cannot use
    Fault("pca-dim above the images", lambda w: ["eval", *TINY_MODEL, *w.eval_on(), "--pca-dim", "100000",
                                                 "--pca-images", str(w.split())],
          r"--pca-dim 100000: a PCA fitted on 9 images gives at most 8 components; lower --pca-dim to <= 8"),
    Fault("--set image_size=abc", lambda w: ["eval", *TINY_MODEL, "image_size=abc", *w.eval_on()],
          r"--set image_size=abc: image_size takes an int, got 'abc'; e\.g\. image_size=224"),
    Fault("synth --workers -3", lambda w: ["synth", "--preset", "tiny", "--out", str(w.tmp / "s"), "--workers", "-3"],
          r"argument --workers: expected an integer >= 0, got '-3'"),
    # 9. options that a checkpoint would ignore
    Fault("student --preset other than the teacher's", lambda w: ["train-student", "--teacher", str(w.teacher_run),
                                                                   "--preset", "SciceVPR-B", *w.train()],
          r"teacher checkpoint '.*best\.pt' holds a SuperCricaVPR \(SciceVPR-S\).*preset=SciceVPR-B describes another",
          check=lambda w: not (w.tmp / "run" / "config.json").exists() or pytest.fail("config.json written")),
    Fault("native file as --official with another preset", lambda w: ["eval", "--official", str(w.teacher_run / "best.pt"),
                                                                       "--model", "SuperCricaVPR", *w.eval_on()],
          r"--official '.*best\.pt' holds a SuperCricaVPR \(SciceVPR-S\).*preset=SciceVPR-B describes another"),
    # 11. a folder link that reaches above the folder
    Fault("database/loop -> ..", lambda w: ["eval", *TINY_MODEL, *w.eval_on(w.tmp / "vg")],
          r"folder link '.*database/loop' points to '.*test', a folder that holds '.*database' itself.*Remove the link",
          setup=lambda w: (w.copy_vg() / "synthetic" / "images" / "test" / "database" / "loop").symlink_to("..")),
    # 10. weights
    Fault("--weights a folder", lambda w: ["eval", "--preset", "SciceVPR-S", "--weights", str(w.tmp), *w.eval_on()],
          r"DINOv2 weights .* is a folder without dinov2_vits14_pretrain\.pth.*Pass the path of the file"),
    Fault("SCICEVPR_WEIGHTS with a bad compact backbone", lambda w: ["eval", *OFFLINE_MODEL, *w.eval_on()],
          r"weight file '.*/w/scicevpr_vits14_4blocks_112px_pretrain\.pth' cannot be read", patch=_bad_weights_folder),
]


def _snapshot(*roots: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def teacher_run(tiny_benchmark, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    w = World(run.parent, tiny_benchmark.root, run)
    assert main(["train-teacher", *TINY_MODEL, *w.train()]) == 0
    return run


@pytest.fixture(scope="module")
def index(tiny_benchmark, teacher_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "index"
    w = World(out.parent, tiny_benchmark.root, teacher_run)
    assert main(["index", "build", "--database", str(w.split()), "--out", str(out), "--num-workers", "0", "--quiet",
                 *TINY_MODEL]) == 0
    return out


@pytest.mark.parametrize("fault", [pytest.param(f, marks=f.marks) for f in FAULTS], ids=[f.name for f in FAULTS])
def test_fault(fault: Fault, tiny_benchmark, teacher_run, index, tmp_path, capsys, monkeypatch):
    w = World(tmp_path, tiny_benchmark.root, teacher_run, index)
    if fault.setup is not None:
        fault.setup(w)
    if fault.patch is not None:
        fault.patch(monkeypatch, w)
    before = _snapshot(tmp_path, tiny_benchmark.root, teacher_run)
    capsys.readouterr()
    try:
        code = main(fault.args(w))
    except SystemExit as e:  # an option that argparse refuses
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == fault.code, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(fault.message, errors[0]), errors[0]
    after = _snapshot(tmp_path, tiny_benchmark.root, teacher_run)
    changed = [str(p) for p, h in before.items() if after.get(p) != h]
    assert not changed, f"changed or removed: {changed}"
    if fault.check is not None:
        fault.check(w)


# --------------------------------------------------------------------------------------------
# Images of every PIL mode decode to their 8-bit picture
# --------------------------------------------------------------------------------------------

GREY = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint8)  # (H, W), every grey level


def _image(mode: str) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(GREY.astype(np.uint16) * 257)
    if mode == "I;16B":
        return Image.frombytes(mode, (64, 48), (GREY.astype(">u2") * 257).tobytes())
    if mode == "I":
        return Image.fromarray(GREY.astype(np.int32) * 257)
    if mode == "F":
        return Image.fromarray(GREY.astype(np.float32) / 255)
    return Image.fromarray(GREY).convert(mode)


# (mode, file format that stores it): every mode that PIL opens a file in can reach the loader
# (files are opened by their content, whatever their name).
MODES = [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("PA", "TIFF"), ("RGB", "PNG"), ("RGBA", "PNG"),
         ("CMYK", "TIFF"), ("YCbCr", "TIFF"), ("LAB", "TIFF"), ("I", "TIFF"), ("I", "PPM"), ("I;16", "PNG"),
         ("I;16", "TIFF"), ("I;16B", "TIFF"), ("F", "TIFF")]


@pytest.mark.parametrize("mode,fmt", MODES, ids=[f"{m}-{f}" for m, f in MODES])
def test_every_pil_mode_decodes_to_its_8bit_picture(mode, fmt, tmp_path):
    from scicevpr.data.decode import load_rgb

    path = tmp_path / "image.png"  # a name the loaders list; the content decides the decoder
    _image(mode).save(path, format=fmt)
    with Image.open(path) as im:
        opened = im.mode
    rgb = np.asarray(load_rgb(path)).astype(int)  # (H, W, 3)
    assert rgb.shape == (48, 64, 3)
    grey = rgb.mean(axis=2)
    if mode == "1":  # black and white: the grey levels thresholded
        assert set(np.unique(rgb)) <= {0, 255}
        return
    tolerance = 3 if mode in ("LAB", "YCbCr", "CMYK") else 0  # colour-space round trips
    assert np.abs(grey - GREY).max() <= tolerance, (opened, np.abs(grey - GREY).max())


# --------------------------------------------------------------------------------------------
# A mistyped folder or file is reported before torch is imported
# --------------------------------------------------------------------------------------------

EARLY = [
    (["eval", "--vg-root", "nowhere", "--dataset", "synthetic"], "--vg-root 'nowhere' does not exist"),
    (["extract", "--images", "nowhere", "--out", "d.npy"], "--images 'nowhere' does not exist"),
    (["search", "--database", "nowhere", "--queries", "."], "--database 'nowhere' does not exist"),
    (["index", "query", "--index", "nowhere", "--queries", "."], "--index 'nowhere' does not exist"),
    (["train-teacher", "--gsv-root", "nowhere"], "--gsv-root 'nowhere' does not exist"),
    (["train-teacher", "--gsv-root", ".", "--run-dir", "nowhere", "--resume"], "run folder 'nowhere' does not exist"),
    (["eval", "--checkpoint", "nowhere.pt", "--vg-root", ".", "--dataset", "synthetic"], "--checkpoint 'nowhere.pt' does not exist"),
    (["eval", "--checkpoint", ".", "--vg-root", ".", "--dataset", "synthetic"], "--checkpoint '.' is a folder, not a file"),
    (["extract", "--official", "nowhere.pth", "--images", ".", "--out", "d.npy"], "--official 'nowhere.pth' does not exist"),
    (["search", "--weights", "nowhere.pth", "--database", ".", "--queries", "."], "--weights 'nowhere.pth' does not exist"),
    (["eval", "--descriptors", "nowhere", "--vg-root", ".", "--dataset", "synthetic"], "--descriptors 'nowhere' does not exist"),
    (["pretrain-backbone", "--data", "nowhere"], "--data 'nowhere' does not exist"),
    (["pretrain-backbone", "--objective", "distil", "--distil-teacher", "nowhere.pt"], "--distil-teacher 'nowhere.pt' does not exist"),
    (["pretrain-backbone", "--init-weights", "nowhere.pth"], "--init-weights 'nowhere.pth' does not exist"),
    (["pretrain-backbone", "--resume", "--run-dir", "nowhere"], "--resume: run folder 'nowhere' does not exist"),
    (["pretrain-backbone", "--export-only", "--export", "b.pth", "--run-dir", "nowhere"],
     "--export-only: run folder 'nowhere' does not exist"),
]


@pytest.mark.parametrize("argv,message", EARLY, ids=[" ".join(a[:3]) for a, _ in EARLY])
def test_a_mistyped_folder_is_reported_before_torch_is_imported(argv, message, tmp_path):
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom scicevpr.cli import main\n"
            f"code = main({argv!r})\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "sys.exit(code)\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and done.stderr.count(": error: ") == 1, done.stderr


# --------------------------------------------------------------------------------------------
# Library calls: one error naming the value and the fix
# --------------------------------------------------------------------------------------------


def _tiny_model():
    from scicevpr import create_model

    return create_model("SciceVPR", "SciceVPR-S", weights=None, image_size=56, mix_dim=64, encoder_heads=4,
                        encoder_ffn=128, backbone_num_blocks=1, layers=(0,)).eval()


def _images(**kwargs) -> torch.Tensor:
    return torch.zeros(2, 3, 56, 56, **kwargs)


LIBRARY = [
    ("float64 images", lambda m: m(_images(dtype=torch.float64)), TypeError, r"has torch\.float32 weights but got torch\.float64 images; convert"),
    ("fp16 images", lambda m: m(_images(dtype=torch.float16)), TypeError, r"got torch\.float16 images"),
    ("numpy images", lambda m: m(np.zeros((2, 3, 56, 56), np.float32)), TypeError, r"expects a torch\.Tensor.*torch\.from_numpy"),
    ("empty batch", lambda m: m(torch.zeros(0, 3, 56, 56)), ValueError, r"got an empty batch \(0 images\)"),
    ("NaN images", lambda m: m(torch.full((2, 3, 56, 56), float("nan"))), ValueError, r"NaN or infinite values"),
    ("image_size '112'", lambda m: __import__("scicevpr").get_config("SciceVPR-S", image_size="112"), ValueError,
     r"image_size must be an int, got '112' \(str\)"),
]


@pytest.mark.parametrize("call,error,message", [row[1:] for row in LIBRARY], ids=[row[0] for row in LIBRARY])
def test_library_call_fault(call, error, message):
    model = _tiny_model()
    with torch.no_grad(), pytest.raises(error, match=message):
        call(model)
