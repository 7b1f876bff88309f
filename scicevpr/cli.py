"""The ``scicevpr`` command: the long jobs a notebook should not hold.

    scicevpr synth          --preset small                       # offline synthetic benchmark
    scicevpr train-teacher  --gsv-root ... --val-root ...        # stage 1: Super-CricaVPR
    scicevpr train-student  --teacher runs/teacher/best.pt ...   # stage 2: distil SciceVPR
    scicevpr pretrain-backbone --data data/pretrain --export ... # the offline backbone
    scicevpr eval           --checkpoint runs/student/best.pt --vg-root ... --dataset pitts30k
    scicevpr stability      --checkpoint ... --vg-root ... --dataset tokyo247
    scicevpr extract        --checkpoint ... --images folder/ --out descriptors.npy
    scicevpr search         --checkpoint ... --database photos/ --queries new/ --out results/
    scicevpr index build    --checkpoint ... --database photos/ --out map/   # then: index query --index map/ ...
    scicevpr claims         --preset small --seeds 0 1 2         # the paper's claims table, trained and measured
    scicevpr demo                                                # run every notebook headlessly

Multi-GPU training: ``torchrun --nproc_per_node 4 -m scicevpr.cli train-teacher ...``.

This module only turns arguments into configs and calls the package; configs are dataclasses
whose fields become ``--options`` automatically, so every default is the paper's.

A fault (a missing folder, a bad file, a run folder in use, ...) ends the command with one line,
``scicevpr <command>: error: <what, where, and what to do>``, and exit status 2; ``--debug`` or
``SCICEVPR_DEBUG=1`` shows the traceback instead. ``--help`` answers without importing torch:
the options come from the dataclasses of :mod:`scicevpr.config`, only the command that runs
imports what it needs, and only its own parser is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shutil
import sys
import tempfile
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

DEBUG_ENV = "SCICEVPR_DEBUG"
"""Environment variable: set (to anything but 0) to see tracebacks instead of one-line errors."""

USER_ERRORS = (OSError, ValueError, RuntimeError)
"""Faults of the input or the machine: one message and exit status 2. Anything else is a bug in
scicevpr: its message, a hint to set SCICEVPR_DEBUG=1, and exit status 1."""



# --------------------------------------------------------------------------------------------
# dataclass <-> argparse
# --------------------------------------------------------------------------------------------


def _parse_bool(s: str) -> bool:
    if s.lower() in {"1", "true", "yes", "on"}:
        return True
    if s.lower() in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _parse_value(text: str, annotation: Any) -> Any:
    """Parse ``text`` for a field annotated ``annotation`` (str | int | float | bool | tuple | None)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if text.lower() in {"none", "null"} and (type(None) in typing.get_args(annotation)):
        return None
    if origin in (tuple, list):
        inner = args[0] if args else str
        return tuple(_parse_value(t, inner) for t in text.split(",") if t)
    if args and origin is not None:  # Optional[X] / X | None / Union
        for a in args:
            try:
                return _parse_value(text, a)
            except (ValueError, argparse.ArgumentTypeError):
                continue
        raise ValueError(f"cannot parse {text!r} as {annotation}")
    if annotation is bool:
        return _parse_bool(text)
    if annotation in (int, float, str):
        return annotation(text)
    return text


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (),
                          title: str = "defaults: the paper's values") -> None:
    """Add ``--field-name`` for every simple field of dataclass ``cls`` (default: unchanged)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} ({title})")
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        ann = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        flag, dest = "--" + f.name.replace("_", "-"), f"{cls.__name__}.{f.name}"
        if ann is bool:
            group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, action=argparse.BooleanOptionalAction,
                               help=f"default: {default!r}")
            continue
        group.add_argument(
            flag, dest=dest, default=argparse.SUPPRESS,
            metavar=getattr(ann, "__name__", "VALUE").upper(), type=_value_parser(ann),
            help=f"default: {default!r}",
        )


def _value_parser(annotation: Any) -> Callable[[str], Any]:
    """An argparse type for a field annotated ``annotation``, named after it (argparse's "invalid
    int value: 'x'" names the type)."""
    def parse(text: str) -> Any:
        return _parse_value(text, annotation)

    parse.__name__ = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    return parse


def dataclass_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    prefix = f"{cls.__name__}."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated ints >= 1, e.g. ``1,2,4``."""
    try:
        values = tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,2,4; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, e.g. 1,2,4; got {text!r}")
    return values


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def check_output(option: str, path: str | None, suffixes: Sequence[str] = (), folder: bool = False) -> None:
    """Check an output path before the work that fills it: its suffix (a file), that it is not an
    existing folder (a file) or file (a folder), and that no file stands where a parent folder
    must be created."""
    if path is None:
        return
    out = Path(path)
    if suffixes and out.suffix.lower() not in suffixes:
        raise ValueError(f"{option} {path!r}: expected a {' or '.join(suffixes)} file name, e.g. {out.with_suffix(suffixes[0]).name!r}.")
    if out.exists() and out.is_dir() != folder:
        raise ValueError(f"{option} {path!r} is an existing {'file' if folder else 'folder'}; "
                         f"pass a {'folder' if folder else 'file'} path.")
    for parent in ((out,) if folder and out.is_dir() else ()) + tuple(out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{option} {path!r}: {str(parent)!r} is a file, not a folder.")
            check_writable(option, path, parent)
            break


def check_writable(option: str, path: str, folder: Path) -> None:
    """Write and remove a probe file in ``folder`` (the nearest existing folder on the way to
    ``path``): a read-only place is refused before the work, not after it."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".scicevpr-probe-")
    except OSError as e:
        raise OSError(f"{option} {path!r}: cannot write in {str(folder)!r} ({e.strerror or e}); choose a writable "
                      f"place (nothing was computed).") from None
    os.close(fd)
    os.unlink(probe)


def parse_model_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["image_size=112", "mix_dim=256"]`` -> ModelConfig overrides with parsed types;
    ``backbone_<field>=`` sets a BackboneConfig field (e.g. ``backbone_num_blocks=4``)."""
    from .config import BackboneConfig, ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    hints.pop("backbone")
    hints.update({f"backbone_{k}": v for k, v in typing.get_type_hints(BackboneConfig).items()})
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        if key not in hints:
            raise ValueError(f"--set: unknown model field {key!r}; valid: {sorted(hints)}")
        try:
            out[key] = _parse_value(value, hints[key])
        except (ValueError, argparse.ArgumentTypeError):
            kind = _value_parser(hints[key]).__name__
            raise ValueError(f"--set {item}: {key} takes {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {value!r}; "
                             f"e.g. {key}={_example(key)}") from None
    return out


def _example(key: str) -> str:
    """The default of the ModelConfig field ``key`` (``backbone_<field>``: BackboneConfig's), as
    ``--set`` takes it."""
    from .config import BackboneConfig, ModelConfig

    cls, name = (BackboneConfig, key[len("backbone_"):]) if key.startswith("backbone_") else (ModelConfig, key)
    default = cls.__dataclass_fields__[name].default
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

MODEL_KINDS = ("SciceVPR", "SuperCricaVPR", "CricaVPR")
# The defaults of the options that describe an untrained or official model (--checkpoint ignores them).
MODEL_OPTION_DEFAULTS = {"model": "SciceVPR", "preset": "SciceVPR-B", "weights": "auto"}


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (a native checkpoint, an official one, or an untrained preset)")
    g.add_argument("--checkpoint", help="a scicevpr checkpoint (runs/<name>/best.pt)")
    g.add_argument("--official", help="the authors' checkpoint (needs --model and --preset)")
    g.add_argument("--model", default=MODEL_OPTION_DEFAULTS["model"], choices=MODEL_KINDS, help="model class for --official or untrained")
    g.add_argument("--preset", default=MODEL_OPTION_DEFAULTS["preset"], help="SciceVPR-B | SciceVPR-L | SciceVPR-S (| CricaVPR presets)")
    g.add_argument("--weights", default=MODEL_OPTION_DEFAULTS["weights"], help="DINOv2 weights: a path, 'auto' or 'none' (random init)")
    g.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="ModelConfig overrides, e.g. image_size=112")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="also load a --checkpoint / --official file that holds pickled Python objects, which runs code "
                        "from it: only for a file from a source you trust (default: refused)")


def build_model(args: argparse.Namespace):
    """The model the options describe, through the package's doors: a trained file with
    :func:`scicevpr.checkpoint.load_model`, an untrained preset with :func:`scicevpr.create_model`.
    Every file they name is read (or found) before the model is built, so that a wrong path fails
    at once."""
    from .checkpoint import check_described, load_model
    from .factory import create_model

    if args.checkpoint:
        given = [f"--{k}" for k, v in (("official", args.official), ("set", args.set)) if v]
        given += [f"--{k}" for k, default in MODEL_OPTION_DEFAULTS.items() if getattr(args, k) != default]
        if given:
            raise ValueError(f"--checkpoint records its model (class, configuration, weights): {', '.join(given)} would be "
                             "ignored; leave them out, or build an untrained model without --checkpoint.")
        return load_model(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    overrides = parse_model_overrides(args.set)
    if args.official:  # the authors' file carries the whole DINOv2
        model = load_model(args.official, expected=args.model, trust_checkpoint=args.trust_checkpoint,
                           preset=args.preset, **overrides)
        check_described(model, f"--official {args.official!r}", args.preset, overrides)
        return model
    weights = None if str(args.weights).lower() == "none" else args.weights
    return create_model(args.model, args.preset, weights=weights, **overrides)


def add_eval_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The dataset options and EvalConfig's, but ``skip``: EvalConfig fields the command does not use."""
    from .config import EvalConfig

    g = p.add_argument_group("dataset (VG-benchmark layout, see data/README.md)")
    g.add_argument("--vg-root", required=True, help="folder holding <dataset>/images/<split>/{database,queries}")
    g.add_argument("--dataset", required=True, help="e.g. pitts30k, msls, tokyo247, nordland, synthetic")
    g.add_argument("--split", default="test")
    g.add_argument("--radius", type=positive_float, default=25.0, help="positive radius in metres")
    g.add_argument("--queries", default="queries", help="queries folder name (SF-XL test: queries_v1)")
    g.add_argument("--skip-corrupt", action="store_true",
                   help="test-decode every image first and leave out (and count) the ones that fail; default: a corrupt "
                        "image is an error naming it")
    add_dataclass_options(p, EvalConfig, skip=("progress",) + skip)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def eval_config(args: argparse.Namespace):
    from .config import EvalConfig

    return EvalConfig(progress=not args.quiet, **dataclass_overrides(args, EvalConfig))


def load_split(args: argparse.Namespace, model=None, protocol: str = "default"):
    """The evaluation split; ``model`` (None: saved descriptors) decides the official UTM precision."""
    from .data.vg import load_vg_split
    from .protocol import utm_dtype

    model_class = None if model is None else type(model).__name__
    return load_vg_split(args.vg_root, args.dataset, args.split, radius=args.radius, queries=args.queries,
                         utm_dtype=utm_dtype(protocol, model_class), skip_corrupt=args.skip_corrupt)


def model_for_split(args: argparse.Namespace, cfg, split):
    """The model, built after ``split`` was read (a wrong path fails before the seconds a model
    takes); under the official protocol the split is read again with the model's UTM precision."""
    model = build_model(args)
    if cfg.protocol == "official":
        split = load_split(args, model, cfg.protocol)
    return model, split


def require_path(option: str, path: str | os.PathLike | None, hint: str, kind: str = "folder") -> None:
    """``option path`` must name an existing ``kind`` (``"folder"``, ``"file"`` or ``"any"``): else
    one message, what is wrong and ``hint``."""
    p = Path(path) if path else None
    if p is not None and p.exists() and (kind == "any" or p.is_dir() == (kind == "folder")):
        return
    if p is None or not p.exists():
        problem = "does not exist"
    else:
        problem = "is a file, not a folder" if kind == "folder" else "is a folder, not a file"
    raise FileNotFoundError(f"{option} {str(path) if path is not None else None!r} {problem}; pass {hint}.")


def require_run(option: str, run_dir: str | os.PathLike, verb: str, hint: str) -> None:
    """``run_dir`` must hold a run (its ``config.json``) for ``option`` to ``verb``."""
    if (Path(run_dir) / "config.json").is_file():
        return
    problem = "does not exist" if not Path(run_dir).exists() else "holds no run (no config.json)"
    raise FileNotFoundError(f"{option}: run folder {str(run_dir)!r} {problem}, so there is nothing to {verb}. {hint}")


# The model files a command reads (--weights may also name a folder, or be 'auto' or 'none').
INPUT_FILES = ("checkpoint", "official", "weights")
# The folders a command reads, and what to pass instead of a wrong one.
INPUT_FOLDERS = {
    "vg_root": "an existing folder", "images": "a folder of photos", "database": "a folder of photos",
    "queries": "a folder of photos", "index": "an index folder written by `scicevpr index build --database DIR --out FOLDER`",
    "database_root": "a folder of photos", "pca_images": "an existing folder",
}


def check_paths_first(args: argparse.Namespace) -> None:
    """The files and folders a command reads, checked before torch is imported (seconds): a
    mistyped path is reported at once. (What a model file holds is checked where the model is
    built, with the options that would be ignored.)"""
    for option in INPUT_FILES:
        path = getattr(args, option, None)
        if path is None or (option == "weights" and str(path).lower() in ("auto", "none")):
            continue
        if option == "weights":  # a file or the folder that holds it
            require_path("--weights", path, "a DINOv2 .pth file (or its folder), 'auto' or 'none'", "any")
        else:
            require_path(f"--{option}", path, "a checkpoint file (e.g. runs/<name>/best.pt)", "file")
    for folder in getattr(args, "descriptors", None) or ():
        require_path("--descriptors", folder, "a folder written by `scicevpr eval --save-descriptors FOLDER`")
    for option, hint in INPUT_FOLDERS.items():
        folder = getattr(args, option, None)
        if option == "queries" and hasattr(args, "vg_root"):  # eval's --queries names a folder of the split
            continue
        if folder is not None:
            require_path(f"--{option.replace('_', '-')}", folder, hint)


def image_files(folder: str | None, option: str, skip_corrupt: bool = False) -> list[Path]:
    """The photos under ``folder``, listed as ``search`` lists them (:func:`scicevpr.search.list_images`);
    with ``skip_corrupt`` the ones that decode, the others counted in a warning."""
    from .data.decode import warn_skipped
    from .search import list_images, readable_images

    require_path(option, folder, "a folder of .jpg/.png photos")
    paths = list_images(folder, role=option)
    if skip_corrupt:
        readable, skipped = readable_images(paths, folder, option, skip_unreadable=True)
        if skipped:
            warn_skipped(skipped, len(paths), str(folder))
        paths = readable
    return paths


def _write_table(table, out: str | None) -> None:
    print(table.to_string(index=False))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
        print(f"written {out}")


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    check_paths_first(args)
    import dataclasses

    if args.descriptors:
        return cmd_eval_descriptors(args)
    from .evaluate import evaluate, fit_pca_on_images, official_pca_images
    from .protocol import eval_batch_size
    from .search import model_label

    cfg = eval_config(args)
    check_eval_outputs(args)
    split = load_split(args, None, "default")  # paths first: the model takes seconds to build
    pca_paths = None
    if cfg.pca_dim:
        if args.pca_images:
            pca_paths = image_files(args.pca_images, "--pca-images", args.skip_corrupt)
        elif cfg.protocol == "official":
            pca_paths = official_pca_images(args.vg_root)  # the authors': <vg-root>/pitts30k/images/train
        else:
            raise ValueError("--pca-dim needs --pca-images: a folder of training images (the authors use "
                             "<vg-root>/pitts30k/images/train, the default under --protocol official)")
    if pca_paths is not None:
        check_pca_dim(cfg.pca_dim, len(pca_paths), None)
    model, split = model_for_split(args, cfg, split)
    if pca_paths is not None:
        check_pca_dim(cfg.pca_dim, len(pca_paths), model.descriptor_dim)
    print(f"{split}")
    pca = None
    if pca_paths is not None:
        bs = eval_batch_size(cfg.protocol, type(model).__name__, split.dataset, cfg.batch_size)
        pca = fit_pca_on_images(model, pca_paths, cfg.pca_dim, config=dataclasses.replace(cfg, batch_size=bs))
    result = evaluate(model, split, cfg, pca=pca)
    _write_table(result.table(), args.out)
    if result.per_condition is not None:
        print(result.per_condition.to_string(index=False))
    if args.save_descriptors:
        for p in result.save_descriptors(args.save_descriptors):
            print(f"written {p}")
    if args.plot:  # the result's descriptors are already projected by the PCA (evaluate)
        _write_recall_plot(args.plot, split, {result.model_name: (result.database_descriptors, result.query_descriptors)},
                           model_label(model))
    return 0


def check_pca_dim(dim: int, num_images: int, descriptor_dim: int | None) -> None:
    """``--pca-dim`` must be a number of components the PCA can give: at most one less than the
    images it is fitted on (up to the official 2^14) and at most the descriptor's dimension."""
    from .protocol import OFFICIAL_PCA_MAX_IMAGES

    n = min(num_images, OFFICIAL_PCA_MAX_IMAGES)
    if dim > n - 1:
        raise ValueError(f"--pca-dim {dim}: a PCA fitted on {n} images gives at most {n - 1} components; lower --pca-dim "
                         f"to <= {n - 1}, or fit it on more images (--pca-images).")
    if descriptor_dim is not None and dim > descriptor_dim:
        raise ValueError(f"--pca-dim {dim} is more than the model's {descriptor_dim}-d descriptors; lower it to "
                         f"<= {descriptor_dim}.")


def check_eval_outputs(args: argparse.Namespace) -> None:
    """``eval``'s output paths, before anything is computed or written."""
    check_output("--out", args.out, (".csv",))
    check_output("--plot", args.plot, (".png",))
    check_output("--save-descriptors", args.save_descriptors, folder=True)


def cmd_eval_descriptors(args: argparse.Namespace) -> int:
    """``eval --descriptors A B ...``: Recall@N of saved descriptor folders, no model needed."""
    import pandas as pd

    from .evaluate import load_descriptor_folder, score

    cfg = eval_config(args)
    check_eval_outputs(args)
    split = load_split(args, None, cfg.protocol)
    if cfg.pca_dim:
        raise ValueError("--pca-dim needs a model; with --descriptors, save descriptors that are already projected")
    names = args.names or list(args.descriptors)
    if len(names) != len(args.descriptors):
        raise ValueError(f"--names gives {len(names)} names for {len(args.descriptors)} --descriptors folders")
    if len(set(names)) != len(names):
        raise ValueError(f"the names of the --descriptors folders repeat ({', '.join(names)}): give each its own with --names")
    print(f"{split}")
    pairs, tables = {}, []
    for name, folder in zip(names, args.descriptors):
        db, q = load_descriptor_folder(folder, split)
        tables.append(score(None, split, db, q, cfg, name=name).table())
        pairs[name] = (db, q)
    _write_table(pd.concat(tables, ignore_index=True), args.out)
    if args.plot:
        _write_recall_plot(args.plot, split, pairs)
    return 0


def _write_recall_plot(path: str, split, descriptors: dict, model: str | None = None) -> None:
    """Recall@N for N = 1..100, one line per model, beside the eval table; ``model``: which
    model made them (:func:`scicevpr.search.model_label`), stamped on the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import chance_recall, recall_curve
    from .lab.viz import plot_recall_curves, save_png

    curves = {name: recall_curve(db, q, split.positives, 100) for name, (db, q) in descriptors.items()}
    chance = chance_recall(split.num_database, split.positives, range(1, 101))
    fig = plot_recall_curves(curves, chance=list(chance.values()),
                             title=f"Recall@N on {split.dataset}/{split.split} ({split.num_queries} queries, {split.radius:.0f} m)",
                             label=f"{split.dataset}/{split.split}" + (f"; {model}" if model else ""))
    print(f"written {save_png(fig, path)}")
    plt.close(fig)


def _model_source(args: argparse.Namespace) -> str:
    """How the command line made the model, in its own options (recorded in an index)."""
    if args.checkpoint:
        return f"--checkpoint {args.checkpoint}"
    text = f"--model {args.model} --preset {args.preset}"
    text += f" --official {args.official}" if args.official else f" --weights {args.weights}"
    return text + (f" --set {' '.join(args.set)}" if args.set else "")


def cmd_search(args: argparse.Namespace) -> int:
    check_paths_first(args)
    from .search import report, search_folders, write_search_outputs

    check_output("--out", args.out, folder=True)
    model, cfg = build_model(args), eval_config(args)
    result = search_folders(model, args.database, args.queries, args.top_k, cfg, args.skip_unreadable, args.radius)
    print(report(result, write_search_outputs(result, args.out, args.top_k, args.sheet_queries)))
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    check_paths_first(args)
    from .index import IndexConfig, build_index, describe

    check_output("--out", args.out, folder=True)
    model, cfg = build_model(args), eval_config(args)
    saved = build_index(model, args.database, args.out, IndexConfig(**dataclass_overrides(args, IndexConfig)), cfg,
                        args.skip_unreadable, _model_source(args), args.overwrite)
    print(describe(saved))
    if saved.manifest["skipped"]:
        print(f"skipped {saved.manifest['skipped']} unreadable files (listed in {saved.folder / 'skipped.txt'})")
    return 0


def cmd_index_query(args: argparse.Namespace) -> int:
    check_paths_first(args)
    from .index import describe, load_index
    from .search import report, write_search_outputs

    saved = load_index(args.index, args.database_root)
    check_output("--out", args.out, folder=True)
    model, cfg = build_model(args), eval_config(args)
    print(describe(saved))
    result = saved.query(model, args.queries, args.top_k, cfg, args.skip_unreadable, args.radius)
    print(report(result, write_search_outputs(result, args.out, args.top_k, args.sheet_queries)))
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    check_paths_first(args)
    from .stability import batch_stability, stability_summary

    cfg = eval_config(args)
    check_output("--out", args.out, (".csv",))
    model, split = model_for_split(args, cfg, load_split(args))  # paths first: the model takes seconds to build
    table = batch_stability(model, split, args.batch_sizes, args.orders, args.seed, cfg.batch_size, cfg)
    _write_table(table, args.out)
    print(stability_summary(table).to_string(index=False))
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    check_paths_first(args)
    from .evaluate import compute_descriptors, save_descriptors

    check_output("--out", args.out, (".npy",))  # the row order goes beside it, as .txt
    paths, cfg = image_files(args.images, "--images", args.skip_corrupt), eval_config(args)
    model = build_model(args)
    desc = compute_descriptors(model, paths, cfg)
    save_descriptors(args.out, desc)
    list_path = Path(args.out).with_suffix(".txt")
    list_path.write_text("".join(f"{p}\n" for p in paths))
    print(f"written {args.out} ({desc.shape[0]} x {desc.shape[1]}, fp16) and {list_path} (row order)")
    return 0


def add_train_parser(sub, stage: str) -> None:
    from .config import LossConfig, TrainConfig

    help_ = COMMANDS[f"train-{stage}"]
    p = sub.add_parser(
        f"train-{stage}", help=help_, description=help_ + ". Every option defaults to the paper's value; "
        "a run folder holds config.json, log.csv, last.pt and best.pt, and is locked while a training runs. "
        "Places with fewer than K images are dropped (--no-drop-small-places refuses them); --skip-corrupt leaves "
        "out images that do not decode; both are counted at the end. Several GPUs: "
        f"torchrun --nproc_per_node N -m scicevpr.cli train-{stage} ...",
    )
    skip = ("model_overrides", "loss", "progress") + (("teacher",) if stage == "teacher" else ())
    add_dataclass_options(p, TrainConfig, skip=skip)
    add_dataclass_options(p, LossConfig)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="ModelConfig overrides, e.g. image_size=112 mix_dim=256")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train, stage=stage)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import LossConfig, TrainConfig

    config = TrainConfig(
        model_overrides=parse_model_overrides(args.set),
        loss=LossConfig(**dataclass_overrides(args, LossConfig)),
        progress=not args.quiet,
        **dataclass_overrides(args, TrainConfig),
    )
    if args.stage == "student" and config.teacher is None:
        raise ValueError("train-student needs --teacher: stage 1's run folder or best.pt, or the authors' Super-CricaVPR checkpoint")
    check_train_paths(config, args.stage)
    from .runtime import is_main_process
    from .train import train_student, train_teacher

    result = (train_teacher if args.stage == "teacher" else train_student)(config)
    if not is_main_process():  # under torchrun only rank 0 reports
        return 0
    print(result.history.to_string(index=False))
    checked = (f"{result.num_skipped_images} corrupt image(s) skipped (every image test-decoded first)" if config.skip_corrupt
               else "every image file checked before training, none damaged (--skip-corrupt decodes each and skips the bad)")
    print(f"data: {result.num_dropped_places} place(s) with fewer than K = {config.img_per_place} images dropped, {checked}")
    print(f"run folder: {result.run_dir}")
    if result.best_path is not None:
        recalls = ", ".join(f"R@{k} {v:.2f}" for k, v in (result.best_recalls or {}).items())
        print(f"best checkpoint: {result.best_path} (epoch {result.best_epoch}: {recalls})")
    return 0


def add_train_offline_parser(sub) -> None:
    from .offline.models import EXPORT_DTYPES, HEADS_DIR, REBUILD_COMMAND

    help_ = COMMANDS["train-offline"]
    p = sub.add_parser(
        "train-offline", help=help_,
        description=help_ + ": the teacher (Super-CricaVPR-S, L_MS), then the student distilled from it (SciceVPR-S, "
        "L_T), then the CricaVPR-S baseline, with the offline recipe of notebooks 04 and 05 on the compact backbone, "
        "into the notebooks' run folders (runs/notebooks/offline/recipe-<digest>/): a run that is done is reused, an "
        "interrupted one resumes from its last.pt. The synthetic benchmark is generated on first use. --export writes "
        "the trained heads and their manifest, which torch.hub's *_offline entries load "
        f"(the shipped ones were made with: {REBUILD_COMMAND}).",
    )
    p.add_argument("--data", default=None, help="folder holding synthetic/<preset>/ (default: $SCICEVPR_DATA, else <repo>/data)")
    p.add_argument("--synthetic-preset", default="small",
                   help="the synthetic world to train on (default: small, the notebooks'; tiny for a smoke run)")
    p.add_argument("--runs", default=None, help="folder of the runs (default: <repo>/runs/notebooks/offline, the notebooks')")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="every stage trains this many epochs (as SCICEVPR_EPOCHS; default: the recipe's)")
    p.add_argument("--max-iters", type=positive_int, default=None,
                   help="at most this many iterations per epoch (as SCICEVPR_MAX_ITERS; default: every batch)")
    p.add_argument("--no-cricavpr", dest="cricavpr", action="store_false", help="train the teacher and the student only")
    p.add_argument("--seed", type=int, default=0, help="as SCICEVPR_SEED (default: 0)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: as the notebooks, 2)")
    p.add_argument("--export", metavar="FOLDER", default=None,
                   help=f"write the trained heads (<entry>.pt) and manifest.json here; {HEADS_DIR.relative_to(HEADS_DIR.parents[2])} "
                        "is where torch.hub's *_offline entries look")
    p.add_argument("--export-dtype", choices=EXPORT_DTYPES, default="float16",
                   help="precision of the exported weights (default: float16, a few MB per model)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_offline)


def cmd_train_offline(args: argparse.Namespace) -> int:
    import torch

    from .data.paths import find_repo_root
    from .lab.notebook import _env, _train_overrides_from_env, offline_settings
    from .offline.models import command_line, export_heads, train_offline
    from .data.paths import DATA_ENV

    root = find_repo_root()
    data_env = _env(DATA_ENV)
    data = Path(args.data) if args.data else (Path(data_env).expanduser() if data_env else root / "data")
    overrides = {**_train_overrides_from_env(), "progress": not args.quiet}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.max_iters is not None:
        overrides["max_iters_per_epoch"] = args.max_iters
    settings = offline_settings(root, data, args.synthetic_preset, Path(args.runs) if args.runs else None,
                                seed=args.seed, threads=args.threads or 2, train_overrides=overrides)
    torch.set_num_threads(settings.threads)
    print(settings.describe(), flush=True)
    runs = train_offline(settings, cricavpr=args.cricavpr)
    for entry, run in runs.items():
        recalls = ", ".join(f"R@{k} {v:.1f}" for k, v in (run.best_recalls or {}).items())
        print(f"{entry}: {run.best_path or run.last_path}" + (f" (epoch {run.best_epoch}: {recalls})" if recalls else ""))
    if args.export:
        manifest = export_heads(runs, settings, args.export, command_line(args.argv), args.export_dtype)
        for entry in runs:
            f = Path(args.export) / f"{entry}.pt"
            print(f"written {f} ({f.stat().st_size / 1e6:.1f} MB)")
        print(f"written {manifest}")
    return 0


def check_train_paths(config, stage: str) -> None:
    """The folders and files a training reads, before torch is imported: ``--resume`` needs a run
    to continue (a mistyped folder would start a new run without a word), and the data and
    teacher must exist."""
    run_dir = Path(config.run_dir or Path("runs") / stage)
    if config.resume:
        require_run("--resume", run_dir, "continue", "Check the --run-dir path, or leave out --resume to start a new run there.")
    for option, folder in (("--gsv-root", config.gsv_root), ("--val-root", config.val_root if config.val_dataset else None)):
        if folder is not None:
            require_path(option, folder, "the dataset folder (see data/README.md)")
    if stage == "student" and config.teacher is not None and not Path(config.teacher).exists():
        raise FileNotFoundError(f"--teacher {config.teacher!r} does not exist; pass stage 1's run folder or its best.pt.")


def add_pretrain_parser(sub) -> None:
    from .config import LossConfig
    from .offline.config import PretrainConfig

    help_ = COMMANDS["pretrain-backbone"]
    p = sub.add_parser(
        "pretrain-backbone", help=help_,
        description=help_ + ". A run folder holds config.json, log.csv and last.pt; --export writes the backbone as "
        "one fp16 weight file with its manifest, loadable with weights=<file>. Data: scicevpr synth --preset pretrain "
        "--seed 1 --splits train --out <folder>. Several GPUs: torchrun --nproc_per_node N -m scicevpr.cli "
        "pretrain-backbone ...",
    )
    add_dataclass_options(p, PretrainConfig, skip=("loss", "progress"),
                          title="defaults: the offline backbone, DINO; --objective cnn and distil start from their "
                                "recipes instead, scicevpr.offline.config.OBJECTIVE_RECIPES")
    add_dataclass_options(p, LossConfig, skip=("gamma", "eta"), title="L_MS of objective=supervised and cnn; defaults: the paper's values")
    p.add_argument("--export", metavar="PATH", default=None,
                   help="after the run, write the backbone here (a .pth file, or a folder for the default name; "
                        "--objective cnn: the network's .pt file); default: None")
    p.add_argument("--export-which", choices=("teacher", "student"), default=None,
                   help="model exported: default None = the teacher for dino (the EMA teacher), else the student")
    p.add_argument("--export-only", action="store_true",
                   help="do not train: export the run in --run-dir as it is (needs --export); default: False")
    p.add_argument("--quiet", action="store_true", help="no progress bars; default: False")
    p.set_defaults(func=cmd_pretrain)


def check_pretrain_paths(overrides: dict[str, Any], export_only: bool) -> None:
    """What a pretraining reads, before torch is imported: the data folder, the weight files and,
    with ``--resume`` or ``--export-only``, the run folder."""
    if overrides.get("data") is not None:
        require_path("--data", overrides["data"], "a synthetic benchmark folder or a GSV-Cities-layout folder (see data/README.md)")
    for option in ("init_weights", "distil_teacher"):
        path = overrides.get(option)
        if path is not None and not Path(path).is_file():
            problem = "is a folder, not a file" if Path(path).is_dir() else "does not exist"
            what = ("a backbone .pth exported by `scicevpr pretrain-backbone --export`" if option == "init_weights" else
                    "the teacher's file: a LayoutCNN .pt (`scicevpr pretrain-backbone --objective cnn --export FILE.pt` "
                    "trains one) or a backbone .pth exported by `--export`")
            raise FileNotFoundError(f"--{option.replace('_', '-')} {path!r} {problem}; pass {what}.")
    run_dir = overrides.get("run_dir")
    if (overrides.get("resume") or export_only) and run_dir:
        require_run("--export-only" if export_only else "--resume", run_dir, "export" if export_only else "continue",
                    "Check the --run-dir path.")


def cmd_pretrain(args: argparse.Namespace) -> int:
    import json

    from .config import LossConfig
    from .offline.config import PretrainConfig

    overrides = dataclass_overrides(args, PretrainConfig)
    check_pretrain_paths(overrides, args.export_only)
    from .weights import manifest_path
    from .offline.pretrain import export_backbone, pretrain
    from .runtime import is_main_process

    if args.export_only:
        if not args.export:
            raise ValueError("--export-only needs --export PATH: where to write the weight file")
        if not overrides.get("run_dir"):
            raise ValueError("--export-only needs --run-dir: the run folder to export")
        source = overrides["run_dir"]
    else:
        config = PretrainConfig.recipe(overrides.pop("objective", "dino"), loss=LossConfig(**dataclass_overrides(args, LossConfig)),
                                       progress=not args.quiet, **overrides)
        result = pretrain(config)
        if not is_main_process():  # under torchrun only rank 0 reports and exports
            return 0
        print(result.history.tail(5).to_string(index=False))
        source = result.run_dir
    if args.export:
        out = export_backbone(source, args.export, which=args.export_which)
        manifest = json.loads(manifest_path(out).read_text())
        print(f"written {out} ({manifest['bytes'] / 1e6:.1f} MB, sha256 {manifest['sha256'][:16]}...) and {manifest_path(out).name}")
        print(f"  {manifest['description']}; {manifest['steps']} steps, {manifest['images_seen']} images seen")
    return 0


def repo_root() -> Path:
    """The repository holding the notebooks (``scicevpr demo`` runs them)."""
    from .data.paths import find_repo_root

    root = find_repo_root()
    if not (root / "notebooks").is_dir():
        raise FileNotFoundError(f"{str(root)!r} has no notebooks/ folder; run `scicevpr demo` from a clone of "
                                "the scicevpr repository.")
    return root


def demo_environment() -> dict[str, str]:
    """The notebook kernels' environment: the same as ``make test`` gives nbval (CPU kernels
    pinned to AVX2, passive OpenMP waiting, headless plots), so ``scicevpr demo`` reproduces the
    stored outputs whichever way it is started."""
    from .precision import PINNED_CPU_KERNELS

    return {**os.environ, **PINNED_CPU_KERNELS, "OMP_WAIT_POLICY": "PASSIVE", "MPLBACKEND": "Agg"}


def cmd_demo(args: argparse.Namespace) -> int:
    """Execute every notebook headlessly, in order, then print the final results table."""
    import importlib.util

    if importlib.util.find_spec("nbclient") is None or importlib.util.find_spec("ipykernel") is None:
        raise RuntimeError("scicevpr demo runs the notebooks with Jupyter, which is not installed: install the "
                           "notebook stack with pip install -e '.[notebooks]' (make does).")
    root = repo_root()
    notebooks = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no notebooks in {str(root / 'notebooks')!r}; run `scicevpr demo` from the repository's folder.")
    from .lab.runner import run_notebook, use_this_python

    os.environ.update(demo_environment())  # the kernels inherit it
    use_this_python()
    out_dir = None if args.inplace else Path(args.output_dir).resolve()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    for nb in notebooks:
        print(f"running {nb.relative_to(root)} ...", flush=True)
        with tempfile.TemporaryDirectory(dir=nb.parent, prefix=".demo-") as scratch:
            row = run_notebook(nb, Path(scratch), record_timing=False)
            if row["status"] != "ok":  # the stored notebook stays as it was; the executed cells are kept
                failed = root / "runs" / "demo-failed" / nb.name
                failed.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(Path(scratch) / nb.name), str(failed))
                raise RuntimeError(f"notebook {str(nb.relative_to(root))!r} did not run to the end ({row['status']}); "
                                   f"its executed cells, with the error, are in {str(failed.relative_to(root))!r}.")
            shutil.move(str(Path(scratch) / nb.name), str(nb if out_dir is None else out_dir / nb.name))
        print(f"  {nb.name}: {row['seconds']:.0f} s", flush=True)
    results = root / "figures" / "results.md"
    print(f"\nfigures written to {root / 'figures'}")
    if results.is_file():
        print(f"\nFinal results ({results.relative_to(root)}):\n")
        print(results.read_text())
    return 0


def _search_options(p, what: str, queries: bool = True) -> None:
    """Options shared by ``search``, ``index build`` and ``index query`` (``queries``: the
    command encodes queries, so ``--query-batch-size`` applies)."""
    from .config import EvalConfig

    add_model_options(p)
    add_dataclass_options(p, EvalConfig, skip=("progress", "pca_dim") + (() if queries else ("query_batch_size", "recall_values")))
    p.add_argument("--skip-unreadable", "--skip-corrupt", dest="skip_unreadable", action="store_true",
                   help=f"leave out {what} files that cannot be decoded (counted and listed in skipped.txt) instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _search_outputs(p) -> None:
    p.add_argument("--queries", required=True, help="folder of query photos (.jpg/.jpeg/.png, searched recursively)")
    p.add_argument("--out", default="search_results", help="folder for matches.csv and contact_sheet.png (default: search_results)")
    p.add_argument("--top-k", type=positive_int, default=5, help="matches per query in matches.csv (default: 5)")
    p.add_argument("--sheet-queries", type=non_negative_int, default=8, help="queries drawn in contact_sheet.png; 0: none (default: 8)")
    p.add_argument("--radius", type=positive_float, default=25.0, help="positives radius (m) when names carry UTM fields")


def add_search_parser(sub) -> None:
    """``search``: two photo folders."""
    p = sub.add_parser(
        "search", help=COMMANDS["search"],
        description="Describe every .jpg/.jpeg/.png below --database and --queries (any names, any nesting), search "
        "exactly, and write per query the top-k database files and their similarities (matches.csv) and a contact "
        "sheet of the first queries (contact_sheet.png). When the names carry UTM fields (@east@north@...@.jpg), "
        "Recall@N is printed as eval does.")
    _search_options(p, "database or query")
    p.add_argument("--database", required=True, help="folder of database photos (.jpg/.jpeg/.png, searched recursively)")
    _search_outputs(p)
    p.set_defaults(func=cmd_search)


def add_index_parser(sub) -> None:
    """``index build`` / ``index query``: a saved map."""
    from .index import IndexConfig

    p = sub.add_parser("index", help=COMMANDS["index"],
                       description="Build a FAISS index of a photo folder once, then localise new photos against it.")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    b = isub.add_parser(
        "build", help="describe a database folder and save descriptors, FAISS index, file list and model identity",
        description="Writes index.json, index.faiss, descriptors.npy and files.txt into --out. Exact search by default; "
        "--kind ivf or --kind hnsw for an approximate index (see docs/tools.md for its measured recall).")
    _search_options(b, "database", queries=False)
    add_dataclass_options(b, IndexConfig, title="defaults: exact search")
    b.add_argument("--database", required=True, help="folder of database photos (.jpg/.jpeg/.png, searched recursively)")
    b.add_argument("--out", required=True, help="the index folder")
    b.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    b.set_defaults(func=cmd_index_build)
    q = isub.add_parser(
        "query", help="localise new photos against a saved index (with the model that built it)",
        description="The database is not recomputed; a model other than the index's is refused.")
    _search_options(q, "query")
    q.add_argument("--index", required=True, help="an index folder written by `scicevpr index build`")
    q.add_argument("--database-root", help="where the database images are now, if they moved (for the contact sheet)")
    _search_outputs(q)
    q.set_defaults(func=cmd_index_query)


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------

COMMANDS: dict[str, str] = {
    "synth": "generate the offline synthetic benchmark",
    "combine-gsv": "one GSV-Cities folder from several (e.g. two pretrain seeds), their cities renamed apart",
    "train-teacher": "stage 1: train Super-CricaVPR (or CricaVPR / SciceVPR alone) with L_MS",
    "train-student": "stage 2: distil SciceVPR from a trained teacher with L_T = gamma L_MS + eta L_D",
    "train-offline": "train the offline models of the notebooks (teacher, student, CricaVPR-S) on the synthetic world",
    "pretrain-backbone": "pretrain the compact DINOv2-architecture backbone (DINO + iBOT, L_MS on places, or distilled from a small CNN, which --objective cnn trains)",
    "eval": "Recall@N of a model on a VG-layout dataset",
    "stability": "R@N under other query batch sizes and orders (paper Fig. 1-2)",
    "extract": "descriptors of a folder of images, saved as fp16 .npy",
    "search": "nearest database photos of each query photo (folders without labels)",
    "index": "a saved map: index build (database once), index query (new photos later)",
    "claims": "the paper's claims tested offline: controls at equal budget, paired statistics over seeds, a verdict table",
    "demo": "execute every notebook headlessly and print the final results",
}
"""Every command and its one-line help (``scicevpr --help``)."""


def add_synth_parser(sub) -> argparse.ArgumentParser:
    """``synth``: the offline benchmark (:func:`scicevpr.offline.synthetic.generate`); no torch."""
    from .offline.synthetic import PRESETS, SPLITS

    p = sub.add_parser(
        "synth",
        help=COMMANDS["synth"],
        description="Render the synthetic place-recognition benchmark in the GSV-Cities and VG layouts.",
    )
    p.add_argument("--out", default=None, help="output folder (default: $SCICEVPR_DATA/synthetic/<preset>, else data/synthetic/<preset>)")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS),
                   help="size: tiny (tests), small (CPU notebooks), small-hard (the former small: harder viewpoints, "
                        "more aliasing), full (GPU training), pretrain (backbone pretraining, train split only)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files")
    p.add_argument("--force", action="store_true", help="regenerate even if a matching benchmark exists")
    p.add_argument("--workers", type=non_negative_int, default=None, help="rendering processes (default: automatic; 0 = none)")
    p.add_argument("--splits", nargs="+", default=None, choices=SPLITS, help="write only these splits (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)
    return p


def cmd_synth(args: argparse.Namespace) -> int:
    from .offline.synthetic import SPLITS, generate

    bench = generate(args.out, preset=args.preset, seed=args.seed, progress=not args.quiet, force=args.force,
                     workers=args.workers, splits=args.splits)
    print(f"synthetic benchmark ({bench.preset}, seed {bench.seed}) in {bench.root}")
    for k, v in bench.counts.items():
        print(f"  {k}: {v}")
    written = set(args.splits or SPLITS)
    if "train" in written:
        print(f"  GSV-Cities layout: {bench.gsv_root}")
    vg = [s for s in ("val", "test") if s in written]
    if vg:
        print(f"  VG layout:         {bench.vg_root} (dataset '{bench.dataset}', splits {', '.join(vg)})")
    return 0


def add_combine_parser(sub) -> None:
    p = sub.add_parser("combine-gsv", help=COMMANDS["combine-gsv"],
                       description="Link the cities of several GSV-Cities-layout folders into one (nothing is copied); "
                       "the cities of the second folder are renamed <city>Two, of the third <city>Three, and so on.")
    p.add_argument("out", help="the new folder (must not exist, or be empty)")
    p.add_argument("folders", nargs="+", help="GSV-Cities-layout folders (Dataframes/ + Images/), e.g. <benchmark>/gsv_cities")
    p.add_argument("--suffixes", nargs="+", default=None,
                   help="one per folder, appended to its city names (default: '' Two Three ...)")
    p.set_defaults(func=cmd_combine)


def cmd_combine(args: argparse.Namespace) -> int:
    from .data.gsv import combine_gsv_folders, list_cities

    resolved = [Path(f).resolve() for f in args.folders]
    twice = next((f for f, r in zip(args.folders, resolved) if resolved.count(r) > 1), None)
    if twice is not None:  # the library allows it (two copies of one world, in tests); a user means two folders
        raise ValueError(f"{twice!r} is given twice: its places would count twice, as places of different cities. "
                         "Give each folder once (nothing was written).")
    out = combine_gsv_folders(args.out, args.folders, args.suffixes)
    print(f"{len(list_cities(out))} cities in {out}")
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help=COMMANDS["eval"],
                       description="Recall@1/5/10/100 under the VG-benchmark protocol (file order, batches of 16, exact L2 "
                       "search); --protocol official: the authors' code to the detail (docs/protocol.md).")
    add_model_options(p)
    add_eval_options(p)
    p.add_argument("--pca-images", help="folder of training images to fit the PCA on (with --pca-dim); "
                   "under --protocol official, default: <vg-root>/pitts30k/images/train")
    p.add_argument("--out", help="write the results table to this CSV")
    p.add_argument("--save-descriptors", help="folder for database.npy / queries.npy (fp16)")
    p.add_argument("--descriptors", nargs="+", metavar="FOLDER",
                   help="score saved descriptor folders (database.npy, queries.npy) instead of a model, one row each")
    p.add_argument("--names", nargs="+", help="names of the --descriptors folders in the table and plot (default: the paths)")
    p.add_argument("--plot", metavar="PNG", help="also write the Recall@N curve for N = 1..100 (one line per model)")
    p.set_defaults(func=cmd_eval)


def add_stability_parser(sub) -> None:
    p = sub.add_parser("stability", help=COMMANDS["stability"],
                       description="Database in file order, batches of 16; queries re-encoded with each batch size and order.")
    add_model_options(p)
    add_eval_options(p, skip=("pca_dim", "query_batch_size"))  # the queries' batch sizes are --batch-sizes
    p.add_argument("--batch-sizes", type=positive_ints, default=(1, 2, 4, 8, 16, 32), help="query batch sizes, e.g. 1,2,4")
    p.add_argument("--orders", type=positive_int, default=3, help="file order + (orders - 1) random orders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the tidy table to this CSV")
    p.set_defaults(func=cmd_stability)


def add_extract_parser(sub) -> None:
    from .config import EvalConfig

    p = sub.add_parser("extract", help=COMMANDS["extract"])
    add_model_options(p)
    add_dataclass_options(p, EvalConfig, skip=("progress", "recall_values", "pca_dim", "query_batch_size"))
    p.add_argument("--images", required=True, help="folder searched recursively for .jpg, .jpeg and .png files (any case)")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="test-decode every image first and leave out (and count) the ones that fail")
    p.add_argument("--out", required=True, help="output .npy path (the file list, in row order, goes beside it as .txt)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_extract)



def _option_text(value: Any, sep: str = ",") -> str:
    """A value as its option is written on the command line (a tuple joined by ``sep``)."""
    if isinstance(value, tuple):
        return sep.join(map(str, value))
    return "none" if value is None else str(value)


def add_claims_parser(sub) -> None:
    """``claims``: :func:`scicevpr.offline.claims.run_claims` (its module docstring lists the models)."""
    from .offline.config import ClaimsConfig

    p = sub.add_parser(
        "claims", help=COMMANDS["claims"],
        description="For every seed, train with the offline recipe the teacher (M = 4), the student (L_T), the "
        "student with L_MS only, teacher and student with M = 1, and CricaVPR-S with and without its CLS region and "
        "with a frozen backbone (the stage-1 models at equal steps and images, every model kept at its last epoch); "
        "score them on the test split, under every query batching for the cross-image models; write "
        "<out>/claims.md, claims.csv and claims_runs.csv. Each model is kept in <runs>/<preset>/seed-<s>/<name>/: "
        "a stopped run resumes without training a finished model again (delete the folder to train anew).",
    )
    p.add_argument("--seeds", nargs="+", type=non_negative_int, default=None, metavar="SEED",
                   help="training seeds (default: 0 1 2)")
    add_dataclass_options(p, ClaimsConfig, skip=("seeds", "progress"), title="defaults: the offline recipe")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_claims)


def cmd_claims(args: argparse.Namespace) -> int:
    from .offline.claims import run_claims
    from .offline.config import ClaimsConfig

    overrides = dataclass_overrides(args, ClaimsConfig)
    if args.seeds is not None:
        overrides["seeds"] = tuple(args.seeds)
    config = ClaimsConfig(progress=not args.quiet, **overrides)
    check_output("--out", config.out, folder=True)
    defaults = ClaimsConfig()
    changed = [f"--{k.replace('_', '-')} {_option_text(v, ' ' if k == 'seeds' else ',')}" for k, v in dataclasses.asdict(config).items()
               if k != "progress" and v != getattr(defaults, k)]
    md, csv, runs = run_claims(config, command=" ".join(["scicevpr claims", *changed]))
    print(md.read_text())
    print(f"tables: {md}, {csv}; per seed and model: {runs}")
    return 0


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help=COMMANDS["demo"])
    p.add_argument("--inplace", action=argparse.BooleanOptionalAction, default=True,
                   help="store outputs in the notebooks (default) or, with --no-inplace, in --output-dir")
    p.add_argument("--output-dir", default="runs/notebooks")
    p.set_defaults(func=cmd_demo)


PARSERS: dict[str, Callable[[Any], None]] = {
    "synth": add_synth_parser,
    "combine-gsv": add_combine_parser,
    "train-teacher": lambda sub: add_train_parser(sub, "teacher"),
    "train-student": lambda sub: add_train_parser(sub, "student"),
    "train-offline": add_train_offline_parser,
    "pretrain-backbone": add_pretrain_parser,
    "eval": add_eval_parser,
    "stability": add_stability_parser,
    "extract": add_extract_parser,
    "search": add_search_parser,
    "index": add_index_parser,
    "claims": add_claims_parser,
    "demo": add_demo_parser,
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``scicevpr`` parser. ``commands``: the commands whose options are built (default: all);
    the others are listed with their one-line help only. :func:`main` builds the one it runs."""
    parser = argparse.ArgumentParser(
        prog="scicevpr", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"An error ends a command with one line and exit status 2; --debug or {DEBUG_ENV}=1 shows its traceback.",
    )
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of its one-line message (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = set(COMMANDS if commands is None else commands)
    for name, help_ in COMMANDS.items():
        if name in wanted:
            PARSERS[name](sub)
        else:
            sub.add_parser(name, help=help_)
    return parser


def _command_in(argv: Sequence[str]) -> list[str]:
    """The command named in ``argv`` (the first word that is not an option), if it is one."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return [word] if word in COMMANDS else []


def error_message(error: BaseException) -> str:
    """One message for ``error``: an error raised in a DataLoader worker arrives wrapped in the
    worker's traceback; only its own message is kept."""
    text = str(error).strip() or type(error).__name__
    if "Original Traceback (most recent call last):" in text:
        lines = text.rsplit("Traceback (most recent call last):", 1)[1].strip("\n").splitlines()
        first = next((i for i, line in enumerate(lines) if line and not line.startswith(" ")), 0)
        text = re.sub(r"^[\w.]+: ", "", "\n".join(lines[first:]).strip(), count=1)  # drop "module.ErrorType: "
    return text if isinstance(error, USER_ERRORS) else f"{type(error).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning (beside DataLoader workers on a small CPU,
    # spinning threads slow torch down by an order of magnitude); torch is not imported yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # before or after the command
    argv = [a for a in argv if a != "--debug"]
    args = build_parser(_command_in(argv)).parse_args(argv)
    args.argv = argv  # the command as typed (train-offline records it)
    if debug or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return int(args.func(args) or 0)
    prefix = f"scicevpr {args.command}"
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *_, **__: print(
            f"{prefix}: warning: {message}", file=sys.stderr)
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001  (every fault: one line, no traceback)
            print(f"{prefix}: error: {error_message(e)}", file=sys.stderr)
            if not isinstance(e, USER_ERRORS):
                print(f"{prefix}: this looks like a bug in scicevpr; {DEBUG_ENV}=1 shows where it happened.", file=sys.stderr)
                return 1
            return 2


if __name__ == "__main__":
    raise SystemExit(main())
