"""Safe loading of PyTorch files and run-folder locks (scicevpr.files)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import scicevpr
from scicevpr.checkpoint import checkpoint_dict, load_model
from scicevpr.factory import create_model
from scicevpr.files import LOCK_NAME, RunDirInUseError, UntrustedFileError, load_torch_file, lock_run_dir

SMALL = {"image_size": 56, "mix_dim": 64, "encoder_heads": 4, "encoder_ffn": 128}
ROOT = Path(__file__).resolve().parents[1]


class RunsCode:
    """A pickled object whose loading runs code: it creates the folder it names."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def small_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scicevpr.RandomWeightsWarning)
        return create_model("SciceVPR", scicevpr.get_config("SciceVPR-S", **SMALL), weights=None, seed=3)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_a_checkpoint_carrying_a_pickled_object_is_refused_by_default(small_model, tmp_path):
    marker = tmp_path / "code-ran"
    ckpt = checkpoint_dict(small_model, meta={"note": RunsCode(marker)})
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(UntrustedFileError, match=r"evil.pt' holds pickled Python objects \(posix.mkdir\).*"
                                                 r"trust_checkpoint=True \(command line: --trust-checkpoint\)"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()  # refused before anything ran
    model = load_model(tmp_path / "evil.pt", trust_checkpoint=True)  # the explicit opt-in
    assert marker.exists() and model.descriptor_dim == small_model.descriptor_dim


def test_an_authors_checkpoint_carrying_a_pickled_object_is_refused_by_default(small_model, tmp_path):
    marker = tmp_path / "code-ran"
    obj = {"epoch_num": 1, "model_state_dict": small_model.official_state_dict(), "hook": RunsCode(marker)}
    torch.save(obj, tmp_path / "authors.pth")
    fresh = scicevpr.SciceVPR("SciceVPR-S", weights=None, **SMALL)
    with pytest.raises(UntrustedFileError, match="trust_checkpoint=True"):
        fresh.load_official(tmp_path / "authors.pth")
    assert not marker.exists()
    fresh.load_official(tmp_path / "authors.pth", trust_checkpoint=True)
    assert marker.exists()


def _as_numpy1_pickle(src: Path, dst: Path) -> None:
    """Rewrite a torch file as NumPy 1 would have pickled it (``numpy.core`` instead of ``numpy._core``)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)


def test_the_authors_layout_with_numpy_recalls_loads_without_trust(small_model, tmp_path):
    """The authors' train.py saves ``recalls`` (a NumPy array) and ``best_r5`` (a NumPy float) beside
    the weights; such a file loads with weights_only=True, from NumPy 1 or 2."""
    obj = {"epoch_num": 3, "model_state_dict": {"module." + k: v for k, v in small_model.official_state_dict().items()},
           "optimizer_state_dict": {}, "recalls": np.array([61.2, 78.5, 83.1, 91.0]), "best_r5": np.float64(78.5),
           "not_improved_num": 0}
    torch.save(obj, tmp_path / "numpy2.pth")
    _as_numpy1_pickle(tmp_path / "numpy2.pth", tmp_path / "numpy1.pth")
    x = torch.randn(2, 3, 56, 56)
    for name in ("numpy2.pth", "numpy1.pth"):
        loaded = load_torch_file(tmp_path / name)
        assert loaded["recalls"].tolist() == [61.2, 78.5, 83.1, 91.0] and loaded["best_r5"] == 78.5
        fresh = scicevpr.SciceVPR("SciceVPR-S", weights=None, **SMALL).eval()
        fresh.load_official(tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), small_model.eval()(x), atol=0, rtol=0)


def test_a_missing_truncated_or_foreign_file_is_named(small_model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nope.pth' does not exist"):
        small_model.load_official(tmp_path / "nope.pth")
    torch.save({"model_state_dict": small_model.official_state_dict()}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"checkpoint '.*cut.pth' cannot be read as a PyTorch file .*truncated.*again"):
        small_model.load_official(tmp_path / "cut.pth")
    for name, data in (("photo.pth", b"\xff\xd8\xff\xe0 not a checkpoint"), ("short.pth", b"abc")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}' cannot be read as a PyTorch file"):
            load_model(tmp_path / name)


def test_a_uint8_image_tensor_is_a_clear_error(small_model):
    with pytest.raises(TypeError, match=r"expects float images .* got a torch.uint8 tensor.*normalize_uint8_batch"):
        small_model(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------
# Run-folder locks
# --------------------------------------------------------------------------------------------


def test_a_run_folder_is_held_by_one_process_at_a_time(tmp_path):
    run = tmp_path / "run"
    with lock_run_dir(run):
        assert (run / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(RunDirInUseError, match=rf"run folder '.*run' is in use by another training \(process {os.getpid()}\)"):
            with lock_run_dir(run):
                pass
    with lock_run_dir(run):  # released on exit
        pass
    assert not run.exists()  # created here and left empty: removed again
    run.mkdir()
    with lock_run_dir(run):
        (run / "log.csv").write_text("epoch\n")
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME, "log.csv"]


def test_a_killed_process_leaves_no_stuck_lock(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from scicevpr.files import lock_run_dir\n"
            "with lock_run_dir(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUseError, match=f"process {holder.pid}"):
            with lock_run_dir(run):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    with lock_run_dir(run):  # the kernel released it with the process
        pass


def test_an_unwritable_run_folder_is_named(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith(LOCK_NAME):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OSError, match=r"cannot write to run folder '.*run' \(Read-only file system\)\. Choose a writable"):
        with lock_run_dir(tmp_path / "run"):
            pass


def test_a_refused_path_is_named_as_such_not_as_a_full_disk(tmp_path, monkeypatch):
    """``files.write_error``: a read-only file system reports 0 bytes free (Linux's /sys), so
    only a failure that is not the path's own is checked against the free space."""
    import errno
    import shutil
    from types import SimpleNamespace

    from scicevpr.files import atomic_write, write_error

    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=0, used=0, free=0))  # as /sys reports
    denied = write_error(tmp_path / "x.pt", PermissionError(errno.EACCES, "Permission denied"))
    assert "Permission denied. Choose a folder this user can write" in str(denied) and "full" not in str(denied)
    full = write_error(tmp_path / "x.pt", OSError(errno.ENOSPC, "No space left on device"))
    assert "the disk is full (0 MiB free). Free space on its disk" in str(full) and full.errno == errno.ENOSPC
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError, match=r"'.*folder': Is a directory\. Pass the path of a file, not a folder"):
        atomic_write(tmp_path / "folder", lambda f: f.write(b"x"))
    assert (tmp_path / "folder").is_dir() and not list(tmp_path.glob(".folder*"))  # nothing destroyed or left
