"""Files and folders that scicevpr reads and writes: PyTorch files loaded safely, run folders
claimed by one process at a time.

**Loading.** :func:`load_torch_file` is the one place where a ``.pt`` / ``.pth`` file is read
(native checkpoints, the authors' checkpoints, DINOv2 weights, pretraining runs). It calls
``torch.load(..., weights_only=True)``: the file may hold tensors, plain Python data (dict, list,
tuple, str, int, float, bool, None) and NumPy arrays and scalars (the authors' training scripts
store their recalls as NumPy values); nothing in it can run code while it is read. A file that
holds other pickled objects is refused with :class:`UntrustedFileError` unless the caller opts in
with ``trust=True`` (``trust_checkpoint=True``, command line ``--trust-checkpoint``), which only
makes sense for a file from a source you trust. A missing, truncated or foreign file is an error
that names it.

**Trained models.** :func:`read_model_file` tells the two kinds of trained-model file apart: a
native scicevpr checkpoint (a dict whose ``format`` is :data:`NATIVE_FORMAT`, written by
:mod:`scicevpr.checkpoint`) and an authors' checkpoint (a state dict, bare or under
``model_state_dict`` / ``state_dict``, keys with or without DataParallel's ``module.``), which
it unwraps (:func:`unwrap_state_dict`). :func:`scicevpr.checkpoint.load_model` builds the model of
either.

**Writing.** :func:`atomic_write` is the one way a file is written in place of another: a
temporary file in the same folder, flushed to disk, then ``os.replace``, so that a reader (or a
crash) sees the old file or the new one, never a partial one. :func:`save_torch_file` and
:func:`atomic_write_text` write through it.

**Run folders.** :func:`lock_run_dir` holds an exclusive ``flock`` on ``<run_dir>/.lock`` while
a training writes there, so that a second training into the same folder is refused instead of
interleaving its log and checkpoints with the first. The kernel releases the lock when the
process ends, however it ends (a killed process leaves nothing stuck; forked DataLoader workers
share the lock and exit with their parent). :func:`exclusive_lock` is the lock itself; the
synthetic benchmark's generator waits on it, where a training refuses at once.

Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

try:
    import fcntl
except ImportError:  # not on Windows: run folders are then not locked
    fcntl = None

PathLike = str | os.PathLike

LOCK_NAME = ".lock"
"""The lock file inside a run folder (ignored when deciding whether the folder holds a run)."""

TRUST_HINT = "pass trust_checkpoint=True (command line: --trust-checkpoint)"

NATIVE_FORMAT = "scicevpr-checkpoint"
"""The ``format`` entry of a native scicevpr checkpoint (see :mod:`scicevpr.checkpoint`)."""


class UntrustedFileError(ValueError):
    """A PyTorch file that holds pickled Python objects beyond tensors and plain data."""


class RunDirInUseError(OSError):
    """A run folder that another process is training into."""


def _numpy_data_globals() -> list:
    """The NumPy functions and types that rebuild arrays and scalars from their bytes, under the
    names NumPy 2 (``numpy._core``) and NumPy 1 (``numpy.core``) write into pickles."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1
        from numpy.core import multiarray
    out: list = [np.ndarray, np.dtype]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        out += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}"), (fn, f"numpy._core.multiarray.{fn.__name__}")]
    out += [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"]  # dtype classes (NumPy >= 1.25)
    return out


def _safe_globals() -> list:
    from torch.torch_version import TorchVersion  # a str subclass (older checkpoints store torch.__version__)

    return _numpy_data_globals() + [TorchVersion]


def load_torch_file(path: PathLike, what: str = "file", trust: bool = False, opt_in: str | None = TRUST_HINT) -> Any:
    """``torch.load`` of ``path`` on the CPU, safely (see the module docstring).

    Args:
        path: the ``.pt`` / ``.pth`` file.
        what: what the file is, for messages (``"checkpoint"``, ``"DINOv2 weight file"``).
        trust: load with ``weights_only=False``: pickled objects are rebuilt, which runs code
            from the file. Only for files from a source you trust.
        opt_in: how the caller can pass ``trust``, named in the refusal; None when it cannot.
    Raises:
        FileNotFoundError: no such file.
        UntrustedFileError: the file holds pickled objects and ``trust`` is False.
        ValueError: the file is truncated, damaged or not a PyTorch file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{what} {str(path)!r} {problem}.")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # a reference to a class or function
        if not trust and found:
            how = f"If you trust where the file came from, {opt_in}." if opt_in else "Use a file that holds weights only."
            raise UntrustedFileError(
                f"{what} {str(path)!r} holds pickled Python objects ({found.group(1)}), not only tensors and plain "
                f"data; loading it would run code from the file, so it is refused. {how}"
            ) from None
        raise _unreadable(path, what, e) from None
    except OSError:
        raise  # e.g. permission denied: its message names the file
    except Exception as e:  # noqa: BLE001  (a damaged file fails in many ways: zip, pickle, EOF, index errors)
        raise _unreadable(path, what, e) from None


def _unreadable(path: Path, what: str, error: BaseException) -> ValueError:
    text = str(error).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)  # torch's own words, after its preamble
    reason = detail.group(1) if detail else (text.splitlines()[0] if text else type(error).__name__)
    return ValueError(
        f"{what} {str(path)!r} cannot be read as a PyTorch file ({reason[:160]}): it is truncated, damaged or "
        f"not a .pt/.pth file. Download or copy it again."
    )


# --------------------------------------------------------------------------------------------
# Trained-model files: native checkpoints and the authors' ones
# --------------------------------------------------------------------------------------------


def is_native_checkpoint(obj: Any) -> bool:
    """True for a native scicevpr checkpoint dict (``format`` = :data:`NATIVE_FORMAT`)."""
    return isinstance(obj, Mapping) and obj.get("format") == NATIVE_FORMAT


def unwrap_state_dict(obj: Any) -> dict:
    """The state dict inside an authors' checkpoint: ``{"model_state_dict": ...}``,
    ``{"state_dict": ...}`` or a bare state dict, with a DataParallel/DDP ``module.`` prefix
    removed from its keys."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a checkpoint path or a state dict, got {type(obj).__name__}")
    for key in ("model_state_dict", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """What a trained-model file holds (:func:`read_model_file`).

    Attributes:
        native: True for a native scicevpr checkpoint, False for an authors' checkpoint.
        content: the checkpoint dict (native) or the unwrapped state dict (authors').
        where: how messages name it, e.g. ``"checkpoint 'runs/student/best.pt'"``.
    """

    native: bool
    content: dict
    where: str


def read_model_file(path_or_obj: PathLike | Mapping, trust: bool = False, what: str = "checkpoint") -> ModelFile:
    """Read a trained-model file (or take a dict already in memory) and tell what it is: a
    native checkpoint, kept as it is, or an authors' checkpoint, unwrapped to its state dict.
    A path is read with :func:`load_torch_file` (``trust``: see there)."""
    if isinstance(path_or_obj, (str, os.PathLike)):
        where = f"{what} {str(Path(path_or_obj))!r}"
        obj = load_torch_file(path_or_obj, what, trust=trust)
    else:
        where, obj = what, path_or_obj
    if is_native_checkpoint(obj):
        return ModelFile(True, dict(obj), where)
    return ModelFile(False, unwrap_state_dict(obj), where)


# --------------------------------------------------------------------------------------------
# Writing files atomically
# --------------------------------------------------------------------------------------------


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, fsync, then
    ``os.replace``: readers see the old file or the new one, never a partial one. The folder is
    created if needed; the temporary file is removed if ``write`` fails. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"  # same folder: os.replace is atomic
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and not _is_write_failure(e):
            raise
        raise write_error(path, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _is_write_failure(error: RuntimeError) -> bool:
    """torch.save's writer fails with "enforce fail at inline_container.cc ... unexpected pos" or
    "file write failed" when the disk is full."""
    text = str(error)
    return "inline_container" in text or "write failed" in text or "PytorchStreamWriter" in text


# Failures of the path itself (no permission, a read-only file system, a folder where the file
# goes): the disk's free space is beside the point (a read-only /sys reports 0 bytes free).
PATH_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG)


def write_error(path: Path, error: BaseException) -> OSError:
    """The error for a file that could not be written: which file, why, the fix, and that its
    previous version (if any) is unchanged. A refused path is said as such; any other failure
    is checked against the disk's free space."""
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
    code = getattr(error, "errno", None)
    full, free = code == errno.ENOSPC, None
    if code in PATH_ERRNOS:
        fix = "Pass the path of a file, not a folder," if code == errno.EISDIR else "Choose a folder this user can write"
    else:
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            pass
        full = full or (free is not None and free < 64 * 2**20)
        fix = "Free space on its disk (or choose another folder)"
    if full:
        why = "the disk is full" + (f" ({free / 2**20:.0f} MiB free)" if free is not None else "")
    elif isinstance(error, RuntimeError):
        why = f"the write stopped part-way, as it does when the disk is full ({reason})"
    else:
        why = reason
    out = OSError(f"cannot write {str(path)!r}: {why}. {fix} and run again; the previous {path.name}, if any, is unchanged.")
    out.errno = errno.ENOSPC if full else code or errno.EIO
    return out


def atomic_write_text(path: PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_torch_file(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def append_csv_row(path: PathLike, row: Mapping[str, Any], columns: tuple[str, ...]) -> None:
    """Append ``row`` to the CSV log at ``path`` in the order of ``columns`` (missing fields
    empty), writing the header first when the file is new. A killed run loses at most the row
    it was writing; a resumed one appends after the rows :func:`resume_csv_log` kept."""
    import csv

    path = Path(path)
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in columns})


def resume_csv_log(path: PathLike, column: str, upto: int, columns: tuple[str, ...]) -> None:
    """Prepare the log of a resumed run, atomically: keep the rows whose ``column`` (the step or
    iteration) is at most ``upto`` (the checkpoint's; later rows belong to the steps a killed run
    will do again) under the header ``columns`` (a log written by an older version with other
    columns is carried over, its missing fields empty). No file: nothing to do."""
    import csv

    path = Path(path)
    if not path.is_file():
        return
    with open(path, newline="") as f:
        # a row cut short (the process killed while appending it) has missing fields: dropped,
        # since its cut-off step number could pass for an earlier one
        kept = [r for r in csv.DictReader(f)
                if None not in r.values() and r.get(column) not in (None, "") and float(r[column]) <= upto]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows({k: r.get(k) or "" for k in columns} for r in kept)
    atomic_write_text(path, out.getvalue())


# --------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------


def read_run_config(run_dir: PathLike, key: str, what: str) -> dict[str, Any]:
    """``run_dir/config.json`` as a run of ``what`` (e.g. ``"pretraining"``) wrote it, holding its
    configuration under ``key``; a folder holding another kind of ``config.json`` is an error that
    says so, not a ``KeyError``."""
    import json

    path = Path(run_dir) / "config.json"
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a {what} run's configuration (not JSON: {e}). Choose another "
                         f"run_dir (--run-dir), or delete the folder.") from None
    if not isinstance(info, dict) or not isinstance(info.get(key), dict):
        raise ValueError(f"{str(path)!r} is not a {what} run's configuration (it has no {key!r} entry): the folder "
                         f"holds something else. Choose another run_dir (--run-dir), or delete the folder.")
    return info


def start_csv_log(path: PathLike) -> None:
    """A run that starts from its first step: a log left by an earlier start that was killed
    before its first checkpoint (``resume=True`` with no ``last.pt``) is removed, since its
    steps are done again."""
    Path(path).unlink(missing_ok=True)


def unwritable_folder(folder: Path, error: OSError, what: str = "run folder", option: str = "run_dir (--run-dir)") -> OSError:
    """The error for a folder that cannot be created or written to."""
    return OSError(
        f"cannot write to {what} {str(folder)!r} ({error.strerror or error}). Choose a writable folder with "
        f"{option}, or make this one writable."
    )


def holds_files(folder: Path) -> bool:
    """True when ``folder`` exists and holds anything but its lock file."""
    return folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir())


@contextlib.contextmanager
def exclusive_lock(path: PathLike, wait: bool = True) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the ``with`` block; yields
    its file descriptor. ``wait=False``: ``BlockingIOError`` at once when another process holds
    it. The kernel releases the lock when the process ends. Without ``fcntl`` (Windows) nothing
    is locked."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield fd
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def lock_run_dir(run_dir: PathLike) -> Iterator[Path]:
    """Create ``run_dir`` if needed and hold its lock (``<run_dir>/.lock``) for the ``with`` block.

    Raises ``RunDirInUseError`` at once when another process holds it, and an ``OSError`` naming
    the folder when it cannot be created or written to. A folder created here that is still empty
    at the end (a run that failed at once) is removed again.
    """
    run_dir = Path(run_dir)
    lock = run_dir / LOCK_NAME
    created = not run_dir.exists()
    with contextlib.ExitStack() as stack:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = stack.enter_context(exclusive_lock(lock, wait=False))
        except BlockingIOError:
            holder = lock.read_text(errors="replace").strip()
            raise RunDirInUseError(
                f"run folder {str(run_dir)!r} is in use by another training"
                f"{f' (process {holder})' if holder.isdigit() else ''}. Wait for it to finish, or choose "
                f"another run_dir (--run-dir). A training that was killed releases its folder by itself."
            ) from None
        except OSError as e:
            raise unwritable_folder(run_dir, e) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield run_dir
        finally:
            if created and not holds_files(run_dir):  # a run that failed before writing anything
                with contextlib.suppress(OSError):
                    lock.unlink()
                    run_dir.rmdir()
