"""The trained offline models: trained from the command line (``scicevpr train-offline``), their
heads exported as small files and loaded on the shipped compact backbone (the hub entries
``scicevpr_s_offline``, ``super_cricavpr_s_offline`` and ``cricavpr_s_offline``).

:func:`train_offline` trains what the notebooks train (04 and 05), in the same run folders:
the teacher (Super-CricaVPR-S, ``L_MS``), then the student distilled from it (SciceVPR-S,
``L_T``), then the CricaVPR-S baseline, each with the offline recipe
(:func:`scicevpr.offline.config.offline_train_config`, :meth:`scicevpr.lab.notebook.NotebookSettings.cricavpr_config`)
on the default offline world (the synthetic ``small`` benchmark, seed 0). A run interrupted or
finished is resumed from its ``last.pt``, as in the notebooks.

:func:`export_heads` writes one native checkpoint per model into a folder, without the frozen
backbone (it is referred to by its file name and fingerprint) and with the trained weights
rounded to ``dtype`` (fp16 by default: a few MB each, as the backbone itself is shipped), and
``manifest.json``::

    format, version     "scicevpr-offline-heads", 1
    command             the command that made the files
    backbone            {"file": <weight file name>, "sha256": <its SHA-256>, "label": ...}
    data                the synthetic world (preset, seed, generator format) and the recipe's run folder
    dtype               the stored precision of the trained weights
    entries             per hub entry: file, sha256, bytes, model class, descriptor_dim, best epoch
                        and its validation recalls, how many epochs of at most how many iterations
    torch, created

:func:`load_heads` checks the file against the manifest and the manifest's backbone against the
shipped one: heads trained on another backbone are refused with the command that rebuilds them.
The shipped heads live in :data:`HEADS_DIR` (``scicevpr/weights/offline/``); ``make train-offline``
makes them (:data:`REBUILD_COMMAND` with the CPU kernels pinned as for the notebooks).
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike

HEADS_DIR = Path(__file__).resolve().parents[1] / "weights" / "offline"  # scicevpr/weights/offline/
MANIFEST_FILE = "manifest.json"
FORMAT = "scicevpr-offline-heads"
VERSION = 1

# hub entry -> (model class, the run folder under NotebookSettings.run_root() that trains it)
ENTRIES: dict[str, tuple[str, str]] = {
    "super_cricavpr_s_offline": ("SuperCricaVPR", "teacher"),
    "scicevpr_s_offline": ("SciceVPR", "student"),
    "cricavpr_s_offline": ("CricaVPR", "cricavpr"),
}
EXPORT_DTYPES = ("float16", "float32")
REBUILD_COMMAND = "scicevpr train-offline --export scicevpr/weights/offline"


def train_offline(settings, cricavpr: bool = True) -> dict[str, Any]:
    """Train (or resume, or reuse when done) the offline models of ``settings``
    (:func:`scicevpr.lab.notebook.offline_settings`): the teacher, then the student, then
    (``cricavpr``) CricaVPR-S, as notebooks 04 and 05 do. Returns the
    :class:`scicevpr.train.RunResult` of each, keyed by hub entry."""
    from ..train import train_student, train_teacher

    if not settings.offline:
        raise ValueError("train_offline trains the offline configuration; got settings of mode "
                         f"{settings.mode!r} (use scicevpr train-teacher / train-student for the full one).")
    settings.benchmark()  # generated on first use, as in the notebooks
    runs: dict[str, Any] = {}
    say = lambda stage, cfg: print(f"[{stage}] " + ("SciceVPR distilled from the teacher" if cfg.teacher else
                                                    f"{cfg.model} {cfg.preset}") + f", {cfg.epochs} epochs"
                                   + (f" of at most {cfg.max_iters_per_epoch} iterations" if cfg.max_iters_per_epoch else "")
                                   + f" -> {cfg.run_dir}", flush=True)
    cfg = settings.train_config("teacher")
    say("1/3 teacher" if cricavpr else "1/2 teacher", cfg)
    runs["super_cricavpr_s_offline"] = teacher = train_teacher(cfg, settings.cache)
    cfg = settings.train_config("student", teacher=teacher.best_path or teacher.last_path)
    say("2/3 student" if cricavpr else "2/2 student", cfg)
    runs["scicevpr_s_offline"] = train_student(cfg, settings.cache)
    if cricavpr:
        cfg = settings.cricavpr_config()
        say("3/3 CricaVPR-S", cfg)
        runs["cricavpr_s_offline"] = train_teacher(cfg, settings.cache)
    return runs


def _file_sha256(path: Path) -> str:
    from ..weights import file_sha256

    return file_sha256(path)


def export_heads(runs: dict[str, Any], settings, out: PathLike, command: str | None = None,
                 dtype: str = "float16") -> Path:
    """Write the trained heads of ``runs`` (:func:`train_offline`'s result) and their manifest
    into ``out``; returns the manifest's path.

    Each file is the run's ``best.pt`` (``last.pt`` without validation) as a native checkpoint
    without its training state, its trained weights stored in ``dtype``, its backbone referred
    to by file name (found where ``weights="auto"`` finds it) and fingerprint.
    """
    import torch

    from ..checkpoint import read_checkpoint
    from ..files import atomic_write_text, save_torch_file
    from ..weights import resolve_weights, weights_record

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {EXPORT_DTYPES}")
    if settings.weights is None:
        raise ValueError("the offline heads load on the shipped compact backbone; these runs used a random one "
                         "(SCICEVPR_WEIGHTS=random): unset it and train again to export.")
    backbone = resolve_weights(settings.weights, settings.model_config().backbone)
    backbone_sha, backbone_manifest = weights_record(backbone)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = {}
    for entry, run in runs.items():
        source = run.best_path or run.last_path
        ckpt = read_checkpoint(source)
        ckpt.pop("training", None)
        ckpt["backbone"] = {**ckpt["backbone"], "path": backbone.name}  # found by weights="auto" on any machine
        ckpt["model_state"] = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
                               for k, v in ckpt["model_state"].items()}
        ckpt["meta"] = {**ckpt.get("meta", {}), "hub_entry": entry, "stored_dtype": dtype}
        path = save_torch_file(ckpt, out / f"{entry}.pt")
        cfg = run.model.config
        entries[entry] = {
            "file": path.name, "sha256": _file_sha256(path), "bytes": path.stat().st_size,
            "model_class": ckpt["model_class"], "preset": cfg.name, "descriptor_dim": cfg.descriptor_dim,
            "image_size": cfg.image_size, "from": source.name, "best_epoch": run.best_epoch,
            "val_recalls": {str(k): v for k, v in (run.best_recalls or {}).items()},
            "epochs": int(len(run.history)), "iterations_per_epoch": run.iterations_per_epoch,
        }
    from .synthetic import FORMAT_VERSION

    manifest = {
        "format": FORMAT, "version": VERSION,
        "command": command or REBUILD_COMMAND,
        "backbone": {"file": backbone.name, "sha256": backbone_sha,
                     "label": (backbone_manifest or {}).get("label")},
        "data": {"synthetic_preset": settings.synthetic_preset, "synthetic_seed": 0, "synthetic_format": FORMAT_VERSION,
                 "recipe": settings.run_root().name, "train_overrides": {k: v for k, v in settings.train_overrides.items() if k != "progress"}},
        "dtype": dtype,
        "entries": entries,
        "torch": str(torch.__version__),
        "created": datetime.date.today().isoformat(),
    }
    return atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def read_manifest(heads: PathLike | None = None) -> dict[str, Any]:
    """The manifest of the heads folder ``heads`` (default :data:`HEADS_DIR`)."""
    folder = Path(heads) if heads is not None else HEADS_DIR
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained offline heads in {str(folder)!r} ({MANIFEST_FILE} is missing). Make them with "
            f"`scicevpr train-offline --export {folder}` (the notebooks' runs are reused when present), "
            "or pass heads=<the folder an export wrote>."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a manifest of scicevpr offline heads (format {manifest.get('format')!r}).")
    if manifest.get("version", 0) > VERSION:
        raise ValueError(f"{str(path)!r} has version {manifest['version']}; this scicevpr reads <= {VERSION}. Upgrade scicevpr.")
    return manifest


def load_heads(entry: str, heads: PathLike | None = None, device: str = "cpu"):
    """The trained model of hub entry ``entry`` (:data:`ENTRIES`) in eval mode: the shipped
    compact backbone (``weights="auto"``) with the heads of ``heads`` (default :data:`HEADS_DIR`).

    Refused, with what to do: a head file whose SHA-256 differs from the manifest's, and heads
    trained on another backbone than the one ``weights="auto"`` finds.
    """
    from ..checkpoint import load_model
    from ..weights import resolve_weights, weights_record
    from .config import OFFLINE_BACKBONE

    if entry not in ENTRIES:
        raise ValueError(f"unknown offline entry {entry!r}; available: {sorted(ENTRIES)}")
    folder = Path(heads) if heads is not None else HEADS_DIR
    manifest = read_manifest(folder)
    if entry not in manifest["entries"]:
        raise ValueError(f"{str(folder / MANIFEST_FILE)!r} holds no {entry!r} (it has {sorted(manifest['entries'])}); "
                         f"export all three with `{REBUILD_COMMAND}`.")
    record = manifest["entries"][entry]
    path = folder / record["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}, listed in {MANIFEST_FILE}, does not exist; rebuild the heads with "
                                f"`{manifest['command']}`.")
    if _file_sha256(path) != record["sha256"]:
        raise ValueError(f"{str(path)!r} is not the file its manifest records (sha256 {record['sha256'][:16]}...): it was "
                         f"modified or replaced. Rebuild the heads with `{manifest['command']}`.")
    shipped = resolve_weights("auto", OFFLINE_BACKBONE)  # the three entries' backbone
    sha = weights_record(shipped)[0]
    if sha != manifest["backbone"]["sha256"]:
        raise ValueError(
            f"the offline heads in {str(folder)!r} were trained on the backbone {manifest['backbone']['file']} with sha256 "
            f"{manifest['backbone']['sha256'][:16]}..., but the backbone here ({shipped}) has sha256 {sha[:16]}...: the "
            f"backbone changed since they were trained. Rebuild them with `{manifest['command']}`."
        )
    return load_model(path, device, expected=ENTRIES[entry][0])


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (``scicevpr <args>``), for the manifest."""
    return "scicevpr " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
