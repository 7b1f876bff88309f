"""The notebooks' single switch: ``settings = scicevpr.notebook.setup()``.

Every notebook starts with this call. It reads one environment variable, ``SCICEVPR_MODE``:

``offline`` (the default)
    Runs anywhere on a CPU in a few minutes, with no download: the synthetic benchmark
    (:mod:`scicevpr.data.synthetic`, preset ``small``) is generated under ``<repo>/data`` (or
    ``$SCICEVPR_DATA``) on first use; the model is the one :func:`scicevpr.train.offline_train_config`
    trains (the CPU-sized SciceVPR-S, DINOv2 ViT-S/14, at a small image size), and training uses
    that recipe; the DINOv2 backbone is a **random initialisation** (seeded, so every run gives
    the same numbers), unless ``SCICEVPR_WEIGHTS`` names a folder holding the official
    ``dinov2_vits14_pretrain.pth``. Figures and tables say which.

``full``
    The paper's setting on a GPU: ``SCICEVPR_PRESET`` (``SciceVPR-B``, default, or
    ``SciceVPR-L``) at 224 px with the official DINOv2 weights (``weights="auto"``: the file
    ``dinov2_vit{b,l}14_pretrain.pth`` in ``$SCICEVPR_WEIGHTS`` or torch hub's cache), real
    datasets under ``$SCICEVPR_DATA`` (``gsv_cities/`` for training, the VG-benchmark layout
    ``<dataset>/images/<split>/`` for evaluation; see ``data/README.md``), the paper's training
    recipe (:class:`scicevpr.train.TrainConfig` defaults).

Other variables (all optional): ``SCICEVPR_DATASET`` (evaluation dataset in full mode,
default ``pitts30k``), ``SCICEVPR_VAL_DATASET`` (validation dataset in full mode, default
``pitts30k``), ``SCICEVPR_THREADS`` (torch CPU threads; offline default 2, the setting the
stored notebook outputs were produced with), ``SCICEVPR_SEED`` (default 0).

Smoke runs of the full configuration (checking that it runs end to end, not reproducing the
paper), in any mode:

* ``SCICEVPR_WEIGHTS=random``: a seeded **random** DINOv2 initialisation instead of the official
  file; every figure and table then says so (``random DINOv2 backbone (full mode)`` in full
  mode).
* ``SCICEVPR_EPOCHS=n`` and ``SCICEVPR_MAX_ITERS=m``: both training stages run ``n`` epochs of
  at most ``m`` iterations (:class:`~scicevpr.train.TrainConfig` ``epochs`` and
  ``max_iters_per_epoch``) instead of the recipe's; the batches keep the recipe's P x K. The
  summary printed by :func:`setup` states the cap.

``benchmarks/device_run.sh`` uses all three with a synthetic benchmark laid out where full mode
expects the real datasets (``benchmarks/full_mode_data.py``).

:func:`setup` also seeds Python, NumPy and torch, fixes torch's thread count, silences the
random-backbone warning after stating it once, and sets the plotting style. The returned
:class:`NotebookSettings` holds everything the notebooks need (model preset and overrides,
device, data roots, dataset names, training and evaluation sizes, seeds, the figure label) and
builds the objects from it (:meth:`NotebookSettings.build`, :meth:`~NotebookSettings.benchmark`,
:meth:`~NotebookSettings.eval_config`, :meth:`~NotebookSettings.train_config`, ...).
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .data.paths import DATA_ENV, WEIGHTS_ENV, find_repo_root
from .precision import autocast, cpu_kernels_pinned, cpu_kind, resolve_amp

MODE_ENV = "SCICEVPR_MODE"
PRESET_ENV = "SCICEVPR_PRESET"
DATASET_ENV = "SCICEVPR_DATASET"
THREADS_ENV = "SCICEVPR_THREADS"
SEED_ENV = "SCICEVPR_SEED"
VAL_DATASET_ENV = "SCICEVPR_VAL_DATASET"
EPOCHS_ENV = "SCICEVPR_EPOCHS"
MAX_ITERS_ENV = "SCICEVPR_MAX_ITERS"
RANDOM_WEIGHTS = "random"  # SCICEVPR_WEIGHTS=random: random DINOv2 in any mode

MODES = ("offline", "full")
FULL_PRESETS = ("SciceVPR-B", "SciceVPR-L")

RANDOM_BACKBONE_LABEL = "random DINOv2 backbone (offline)"
RANDOM_FULL_LABEL = "random DINOv2 backbone (full mode)"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name, "").strip()
    return value if value else default


def _weights_from_env(default: str | None) -> str | None:
    """DINOv2 weights from ``SCICEVPR_WEIGHTS``: unset -> ``default``; ``random`` -> None (random
    initialisation); a folder -> ``"auto"`` (the backbone loader looks in that folder first)."""
    value = _env(WEIGHTS_ENV)
    if value is None:
        return default
    return None if value.lower() == RANDOM_WEIGHTS else "auto"


def _train_overrides_from_env() -> dict[str, int]:
    """TrainConfig fields capped by ``SCICEVPR_EPOCHS`` / ``SCICEVPR_MAX_ITERS`` (smoke runs)."""
    out = {}
    for name, fld in ((EPOCHS_ENV, "epochs"), (MAX_ITERS_ENV, "max_iters_per_epoch")):
        value = _env(name)
        if value is None:
            continue
        n = int(value) if value.isdigit() else 0
        if n < 1:
            raise ValueError(f"{name}={value!r}: expected a whole number >= 1, or unset for the recipe's {fld}.")
        out[fld] = n
    return out


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (stable across machines), else absolute."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class NotebookSettings:
    """Everything the notebooks read from the switch. Build it with :func:`setup`.

    Attributes:
        mode: ``"offline"`` or ``"full"``.
        preset: ModelConfig preset of SciceVPR / Super-CricaVPR (``SciceVPR-S`` offline).
        model_overrides: ModelConfig fields replaced in every model (offline: 112 px).
        weights: DINOv2 weights for :meth:`build`: None (random), ``"auto"`` or a path.
        device: ``"cpu"`` or ``"cuda"``.
        repo_root, data_root, figures_dir, runs_dir: folders (runs: ``runs/notebooks/offline`` or
            ``runs/notebooks/<preset>`` in full mode).
        synthetic_preset: the synthetic benchmark's preset (offline), else None.
        vg_root: the folder holding ``<dataset>/images/<split>/`` (evaluation).
        gsv_root: the GSV-Cities folder (training, PCA).
        eval_dataset, eval_split: the evaluation split; val_dataset, val_split: validation.
        eval_batch_size: images per batch in evaluation (16, the official protocol).
        stability_batch_sizes, stability_orders: the query batching sweep (paper Fig. 2).
        num_workers: DataLoader workers.
        amp: bf16 autocast (resolved by :mod:`scicevpr.precision`; offline always False: fp32 gives
            the same numbers on every CPU kind).
        pca_dim, pca_max_images: PCA of the descriptors and how many training images fit it.
        demo_images: how many images the explanatory notebooks (01, 02) look at.
        seed, threads: random seed and torch CPU threads.
        train_overrides: TrainConfig fields replaced in both stages (e.g. fewer epochs).
    """

    mode: str
    preset: str
    model_overrides: dict[str, Any]
    weights: str | None
    device: str
    repo_root: Path
    data_root: Path
    figures_dir: Path
    runs_dir: Path
    synthetic_preset: str | None
    vg_root: Path
    gsv_root: Path
    eval_dataset: str
    eval_split: str
    val_dataset: str
    val_split: str
    eval_batch_size: int = 16
    stability_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    stability_orders: int = 3
    num_workers: int = 0
    amp: bool = False
    pca_dim: int = 4096
    pca_max_images: int = 2**14
    demo_images: int = 4
    seed: int = 0
    threads: int = 2
    train_overrides: dict[str, Any] = field(default_factory=dict)

    # ---- labels --------------------------------------------------------------------------

    @property
    def offline(self) -> bool:
        return self.mode == "offline"

    @property
    def random_backbone(self) -> bool:
        """True when models are built without pretrained DINOv2 weights."""
        return self.weights is None

    @property
    def data_label(self) -> str:
        if self.synthetic_preset is not None:
            return "synthetic data"
        return f"{self.eval_dataset} {self.eval_split}"

    @property
    def random_label(self) -> str:
        """How figures name a random DINOv2 backbone in this mode."""
        return RANDOM_BACKBONE_LABEL if self.offline else RANDOM_FULL_LABEL

    @property
    def weights_label(self) -> str:
        if self.random_backbone:
            return self.random_label
        arch = self.model_config().backbone.arch  # e.g. "vitb14"
        return f"pretrained DINOv2 ViT-{arch[3].upper()}/{arch[4:]}"

    @property
    def figure_label(self) -> str:
        """What every figure and table must state: which weights and which data made it."""
        return f"{self.weights_label}, {self.data_label}"

    def label_for(self, model: torch.nn.Module | None = None) -> str:
        """The figure label for a figure built on ``model``: the random-backbone statement
        whenever the model's DINOv2 is randomly initialised, whatever the settings say."""
        if model is not None and getattr(model, "is_random_init", False):
            return f"{self.random_label}, {self.data_label}"
        return self.figure_label

    def describe(self) -> str:
        """A short, machine-independent summary (paths relative to the repository)."""
        cfg = self.model_config()
        if self.random_backbone:
            weights = "RANDOM initialisation (seeded): results are not the paper's"
        elif self.weights == "auto":
            weights = f"official {cfg.backbone.hub_name}_pretrain.pth (from ${WEIGHTS_ENV} or the torch hub cache)"
        else:
            weights = str(self.weights)
        lines = [
            f"mode            : {self.mode}  (set {MODE_ENV}=offline|full before starting Jupyter)",
            f"model preset    : {self.preset} (DINOv2 {cfg.backbone.arch}, layers {list(cfg.layers)}, "
            f"{cfg.image_size} px, C_mix {cfg.mix_dim}, {cfg.descriptor_dim}-d)",
            f"DINOv2 weights  : {weights}",
            f"device          : {self.device}, {self.threads} CPU threads, {'bf16 autocast' if self.amp else 'fp32'}"
            + (" (offline: the same arithmetic on every CPU kind)" if self.offline else ""),
            f"CPU kernels     : {_cpu_kernels_line()}",
            f"data            : {_relative(self.data_root, self.repo_root)}"
            + (f" (synthetic preset '{self.synthetic_preset}')" if self.synthetic_preset else ""),
            f"evaluation      : {self.eval_dataset} / {self.eval_split} (validation: {self.val_dataset} / {self.val_split})",
            f"figures, runs   : {_relative(self.figures_dir, self.repo_root)}/, {_relative(self.runs_dir, self.repo_root)}/",
            f"figure label    : {self.figure_label}",
        ]
        if self.train_overrides:
            capped = ", ".join(f"{k}={v}" for k, v in sorted(self.train_overrides.items()))
            lines.append(f"training        : recipe capped by ${EPOCHS_ENV} / ${MAX_ITERS_ENV}: {capped}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    # ---- models --------------------------------------------------------------------------

    def model_config(self, preset: str | None = None):
        """The ModelConfig of ``preset`` (default: the settings' preset) with the overrides."""
        from .config import get_config

        return get_config(preset or self.preset, **self.model_overrides)

    def build(self, name: str = "SciceVPR", preset: str | None = None, seed: int | None = None, **overrides: Any):
        """A fresh model (eval mode, on ``device``) whose initialisation depends only on ``seed``.

        Args:
            name: ``"SciceVPR"``, ``"SuperCricaVPR"`` or ``"CricaVPR"`` (then the preset
                defaults to the CricaVPR of the same backbone size).
            preset: another preset; default the settings' one.
            seed: default the settings' seed.
            **overrides: ModelConfig fields on top of ``model_overrides``.
        """
        from .checkpoint import build_model

        if preset is None:
            preset = self.preset
            if name == "CricaVPR":
                preset = "CricaVPR-S" if self.preset.endswith("-S") else "CricaVPR"
        kw = {**self.model_overrides, **overrides}
        if name == "CricaVPR":
            kw.pop("mix_dim", None)
        model = build_model(name, preset, weights=self.weights, seed=self.seed if seed is None else seed, **kw)
        return model.to(self.device).eval()

    # ---- data ----------------------------------------------------------------------------

    def benchmark(self):
        """Offline: generate (first call, about a minute) or reuse the synthetic benchmark and
        return it. Full: check that the real datasets are where the settings say; returns None."""
        if self.synthetic_preset is not None:
            from .data.synthetic import MANIFEST, generate

            root = self.data_root / "synthetic" / self.synthetic_preset
            try:
                return generate(root, preset=self.synthetic_preset, seed=0, progress=False)
            except FileExistsError:
                if not (root / MANIFEST).is_file():
                    raise  # a folder the generator did not write: never delete it
                print(f"note: regenerating {_relative(root, self.repo_root)}: it was written by another version "
                      "of the generator", file=sys.stderr)
                return generate(root, preset=self.synthetic_preset, seed=0, progress=False, force=True)
        for folder, what in ((self.vg_root / self.eval_dataset / "images" / self.eval_split, "evaluation split"),
                             (self.gsv_root / "Dataframes", "GSV-Cities")):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{what} folder {str(folder)!r} does not exist. In full mode the datasets live under "
                    f"${DATA_ENV} ({str(self.data_root)!r}); see data/README.md for the layouts, or run "
                    f"with {MODE_ENV}=offline."
                )
        return None

    def load_split(self, split: str | None = None, dataset: str | None = None):
        """The evaluation split (``eval_split`` by default) as a :class:`~scicevpr.data.vg.VGSplit`."""
        from .data.vg import load_vg_split

        self.benchmark()
        return load_vg_split(self.vg_root, dataset or self.eval_dataset, split or self.eval_split)

    def train_dataset(self, **kwargs: Any):
        """The training set (GSV-Cities layout) at the model's image size:
        a :class:`~scicevpr.data.gsv.GSVCitiesDataset`; ``kwargs`` go to it."""
        from .data.gsv import GSVCitiesDataset

        self.benchmark()
        kw = dict(image_size=self.model_config().image_size, seed=self.seed)
        kw.update(kwargs)
        return GSVCitiesDataset(self.gsv_root, **kw)

    def training_images(self, limit: int | None = None) -> list[Path]:
        """Training image files (GSV-Cities layout, sorted), e.g. to fit the PCA; at most
        ``limit`` (default ``pca_max_images``), evenly spaced when there are more."""
        self.benchmark()
        folder = self.gsv_root / "Images"
        paths = sorted(folder.rglob("*.jpg"), key=lambda p: p.relative_to(folder).as_posix())
        if not paths:
            raise FileNotFoundError(f"no training images under {str(folder)!r}")
        limit = self.pca_max_images if limit is None else limit
        if len(paths) > limit:
            keep = np.linspace(0, len(paths) - 1, limit).round().astype(int)
            paths = [paths[i] for i in keep]
        return paths

    # ---- evaluation and training configs -------------------------------------------------

    def eval_config(self, **overrides: Any):
        """The :class:`~scicevpr.evaluate.EvalConfig` of the notebooks (no progress bars)."""
        from .evaluate import EvalConfig

        kw = dict(batch_size=self.eval_batch_size, device=self.device, amp=self.amp,
                  num_workers=self.num_workers, progress=False)
        if not self.offline:
            kw.pop("amp")  # the CUDA fast path decides
        kw.update(overrides)
        return EvalConfig(**kw)

    def train_config(self, stage: str = "teacher", teacher: str | os.PathLike | None = None, **overrides: Any):
        """The :class:`~scicevpr.train.TrainConfig` of ``stage`` (``"teacher"`` / ``"student"``).

        Offline: :func:`scicevpr.train.offline_train_config`. Full: the paper's recipe on
        GSV-Cities with validation on ``val_dataset``. Both resume a finished or interrupted run
        in :meth:`run_root` ``/<stage>`` instead of training again (delete it to retrain).
        """
        return self._train_config(stage, self.run_root() / stage, teacher, **overrides)

    def _train_config(self, stage: str, run_dir: Path, teacher=None, **overrides: Any):
        from .train import TrainConfig, offline_train_config

        common = dict(resume=True, progress=False, seed=self.seed)
        common.update(self.train_overrides)
        common.update(overrides)
        if self.offline:
            return offline_train_config(self.gsv_root, self.vg_root, run_dir, stage=stage, teacher=teacher,
                                        dataset=self.val_dataset, weights=self.weights,
                                        model_overrides=dict(self.model_overrides), **common)
        return TrainConfig(
            model="SuperCricaVPR", preset=self.preset, model_overrides=dict(self.model_overrides),
            weights=self.weights, gsv_root=str(self.gsv_root), val_root=str(self.vg_root),
            val_dataset=self.val_dataset, val_split=self.val_split, run_dir=str(run_dir), device=self.device,
            teacher=None if teacher is None else str(teacher), **common,
        )

    def run_root(self) -> Path:
        """The folder of the notebooks' two training runs.

        Full mode: ``runs_dir`` (train into it from the command line; see notebook 05).
        Offline: ``runs_dir/recipe-<digest>``, the digest naming both stages' configurations
        (machine-specific paths left out), so that a change of the offline recipe trains anew
        instead of failing to resume an older run.
        """
        if not self.offline:
            return self.runs_dir
        import hashlib
        import json

        from .train import STAGES

        # Everything that can change the trained weights; not where files are or how fast, nor how
        # files are checked (the synthetic benchmark has no corrupt image and no place under K).
        skip = {"resume", "progress", "num_workers", "run_dir", "teacher", "gsv_root", "val_root",
                "trust_checkpoint", "skip_corrupt", "drop_small_places"}
        recipe = [{k: v for k, v in self._train_config(stage, Path(".")).to_dict().items() if k not in skip}
                  for stage in STAGES]
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return self.runs_dir / f"recipe-{digest}"

    def train(self):
        """Both training stages (reused from :meth:`run_root` when already done).

        Returns ``(teacher_run, student_run)``, two :class:`scicevpr.train.RunResult`.
        """
        from .train import train_student, train_teacher

        self.benchmark()
        teacher_run = train_teacher(self.train_config("teacher"))
        best = teacher_run.best_path or teacher_run.last_path
        student_run = train_student(self.train_config("student", teacher=best))
        return teacher_run, student_run


def _cpu_kernels_line() -> str:
    """The banner's statement of which CPU kernels run (machine-specific when not pinned)."""
    if cpu_kernels_pinned():
        return "AVX2, pinned (make sets it): identical numbers on every x86-64 CPU"
    return (f"native {cpu_kind()} (not pinned: numbers may differ from the stored outputs in the "
            "last digits; run through `make lab` / `make test` for identical ones)")


def _inline_figures() -> None:
    """In a Jupyter kernel, show figures inline whatever ``MPLBACKEND`` says (a headless runner
    may set it to Agg), so that a notebook's stored outputs do not depend on how it was run."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and getattr(shell, "kernel", None) is not None:
        shell.run_line_magic("matplotlib", "inline")


def setup(mode: str | None = None, *, quiet: bool = False) -> NotebookSettings:
    """Read the switch (``SCICEVPR_MODE``, or ``mode``), seed everything, fix torch's threads,
    set the plotting style and return the :class:`NotebookSettings`.

    Prints a summary (paths relative to the repository, so that stored outputs do not depend
    on the machine) unless ``quiet``.
    """
    mode = (mode or _env(MODE_ENV, "offline")).lower()
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: expected one of {MODES} (offline: CPU, synthetic data; "
                         f"full: GPU, real data and DINOv2 weights).")
    root = find_repo_root()
    data_env = _env(DATA_ENV)
    data_root = Path(data_env).expanduser() if data_env else root / "data"
    seed = int(_env(SEED_ENV, "0"))
    cuda = torch.cuda.is_available()
    train_overrides = _train_overrides_from_env()
    if mode == "offline":
        from .train import offline_train_config

        threads = int(_env(THREADS_ENV, "2"))
        synthetic = "small"
        bench_root = data_root / "synthetic" / synthetic
        # The model is the one the offline training recipe trains (single source of truth).
        recipe = offline_train_config(bench_root / "gsv_cities", bench_root / "vg", root / "runs", stage="teacher")
        settings = NotebookSettings(
            mode=mode, preset=recipe.preset, model_overrides=dict(recipe.model_overrides),
            weights=_weights_from_env(recipe.weights), device="cpu", repo_root=root,
            data_root=data_root, figures_dir=root / "figures", runs_dir=root / "runs" / "notebooks" / mode,
            synthetic_preset=synthetic, vg_root=bench_root / "vg", gsv_root=bench_root / "gsv_cities",
            eval_dataset="synthetic", eval_split="test", val_dataset="synthetic", val_split="val",
            stability_batch_sizes=(1, 2, 4, 8, 16, 32), stability_orders=3, num_workers=0, amp=False,
            pca_dim=256, pca_max_images=2**14, demo_images=4, seed=seed, threads=threads,
            train_overrides=train_overrides,
        )
    else:
        preset = _env(PRESET_ENV, "SciceVPR-B")
        if preset not in FULL_PRESETS:
            raise ValueError(f"{PRESET_ENV}={preset!r}: expected one of {FULL_PRESETS} in full mode.")
        threads = int(_env(THREADS_ENV, str(os.cpu_count() or 1)))
        dataset = _env(DATASET_ENV, "pitts30k")
        settings = NotebookSettings(
            mode=mode, preset=preset, model_overrides={}, weights=_weights_from_env("auto"),
            device="cuda" if cuda else "cpu",
            repo_root=root, data_root=data_root, figures_dir=root / "figures",
            runs_dir=root / "runs" / "notebooks" / preset, synthetic_preset=None, vg_root=data_root,
            gsv_root=data_root / "gsv_cities", eval_dataset=dataset, eval_split="test",
            val_dataset=_env(VAL_DATASET_ENV, "pitts30k"), val_split="val", num_workers=min(8, os.cpu_count() or 1),
            amp=resolve_amp("cuda" if cuda else "cpu", None),
            pca_dim=4096, pca_max_images=2**14, demo_images=4, seed=seed, threads=threads,
            train_overrides=train_overrides,
        )
    torch.set_num_threads(settings.threads)
    from .train import seed_everything

    seed_everything(seed)
    from .backbone import RandomWeightsWarning
    from . import viz

    warnings.filterwarnings("ignore", category=RandomWeightsWarning)  # stated once, below
    # A torch notice about reading a loss for the progress bar; it says nothing about the results.
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    _inline_figures()
    viz.set_style()
    if not quiet:
        print(settings.describe())
        if settings.random_backbone and settings.offline:
            print("NOTE: DINOv2 is randomly initialised (no download in offline mode). Every figure and "
                  "table\n      is stamped with this; see notebook 05 for running with the real weights.")
        elif settings.random_backbone:
            print(f"NOTE: DINOv2 is randomly initialised ({WEIGHTS_ENV}={RANDOM_WEIGHTS}): a check that the full "
                  "configuration\n      runs, not the paper's results. Every figure and table is stamped with this.")
        if mode == "full" and not cuda:
            print("NOTE: full mode without a CUDA GPU: everything runs, very slowly, on the CPU.")
    return settings


# ---------------------------------------------------------------------------------------------
# Analysis helpers of the notebooks (computations; the plots are in scicevpr.viz)
# ---------------------------------------------------------------------------------------------


def load_images(paths, image_size: int, device: str | torch.device | None = None) -> torch.Tensor:
    """Image files -> (N, 3, S, S) normalised tensor, with the evaluation transform, on
    ``device`` (default the CPU; pass ``settings.device`` to feed a model directly)."""
    from .data.decode import load_rgb
    from .data.transforms import eval_transform

    t = eval_transform(image_size)
    x = torch.stack([t(load_rgb(p)) for p in paths])
    return x if device is None else x.to(device)


def patch_maps(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 1 + H*W, C) ViT tokens (CLS first) -> (B, C, H, W) patch-feature maps."""
    B, N, C = tokens.shape
    H, W = grid
    if N != 1 + H * W:
        raise ValueError(f"{N} tokens do not fit a CLS token + a {H} x {W} grid")
    return tokens[:, 1:].transpose(1, 2).reshape(B, C, H, W)  # (B, HW, C) -> (B, C, HW) -> (B, C, H, W)


@torch.no_grad()
def layer_features(backbone, images: torch.Tensor, layers) -> dict[int, torch.Tensor]:
    """Patch features of several DINOv2 blocks (after the final LayerNorm, as SciceVPR takes
    them): block -> (N, C, H, W), float32 on the CPU. ``images`` may be on any device: they are
    moved to the backbone's."""
    layers = list(layers)
    images = images.to(next(backbone.parameters()).device)
    grid = backbone.grid_size(images.shape[-2], images.shape[-1])
    outs = backbone.get_intermediate_layers(images, layers)  # M x (N, 1 + HW, C)
    return {l: patch_maps(o, grid).float().cpu() for l, o in zip(layers, outs)}


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019) of two (n, d1), (n, d2)
    representations of the same n samples: 1 = the same up to rotation and scale."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    cross = (b.T @ a).norm() ** 2
    return float(cross / ((a.T @ a).norm() * (b.T @ b).norm()))


def layer_similarity(features: dict[int, torch.Tensor]) -> np.ndarray:
    """Linear CKA between the patch features of every pair of blocks: (L, L) matrix.
    ``features``: block -> (N, C, H, W) (all patches of all images are the samples)."""
    flat = [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in features.values()]  # (N*H*W, C)
    n = len(flat)
    m = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            m[i, j] = m[j, i] = linear_cka(flat[i], flat[j])
    return m


def _gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """GeM over the tokens of (B, C, H, W) maps -> (B, C), through the project's pooling."""
    from .pooling import MultiRegionGeM

    pool = MultiRegionGeM(tuple(x.shape[-2:]), p, eps, normalize_output=False).to(x.device)
    return pool(x)[:, 0]  # region 0: the whole map


@torch.no_grad()
def layer_descriptors(model, paths, layers, settings: NotebookSettings, fusions=None) -> dict[str, np.ndarray]:
    """Simple global descriptors from single DINOv2 blocks and from fused blocks.

    Each block's patch features are GeM-pooled (p = 3) over the whole image and
    L2-normalised; ``"blocks a-b fused"`` concatenates the descriptors of a group of blocks
    before normalising (``fusions``: groups of block indices, default the model's
    ``config.layers``). No trained weight is involved, so this measures what the frozen
    backbone's blocks carry. Returns name -> (N, D) float32.
    """
    from .evaluate import iterate_images

    fusions = [tuple(model.config.layers)] if fusions is None else [tuple(f) for f in fusions]
    layers = sorted(set(layers).union(*map(set, fusions)))
    backbone = model.backbone
    device = next(backbone.parameters()).device
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for x, _ in iterate_images(paths, model.image_size, settings.eval_batch_size, device, settings.num_workers,
                               False, progress=False):
        with autocast(device, settings.amp):
            feats = layer_features(backbone, x, layers)
        for l, f in feats.items():
            out[l].append(torch.nn.functional.normalize(_gem(f.float()), dim=-1))
    desc = {f"block {l}": torch.cat(v).numpy() for l, v in out.items()}
    for fused in dict.fromkeys(fusions):
        cat = torch.cat([torch.cat(out[l]) for l in fused], dim=1)
        desc[fusion_name(fused)] = torch.nn.functional.normalize(cat, dim=-1).numpy()
    return desc


def fusion_name(layers) -> str:
    """``"blocks 8-11 fused"`` for consecutive blocks, ``"blocks 2+5+9 fused"`` otherwise."""
    layers = list(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"blocks {layers[0]}-{layers[-1]} fused"
    return "blocks " + "+".join(map(str, layers)) + " fused"


def layer_recall_table(model, split, layers, settings: NotebookSettings, fusions=None) -> pd.DataFrame:
    """Recall@N on ``split`` of each :func:`layer_descriptors` descriptor (exact L2 search)."""

    from .evaluate import score

    db = layer_descriptors(model, split.database_paths, layers, settings, fusions)
    q = layer_descriptors(model, split.query_paths, layers, settings, fusions)
    rows = []
    for name in db:
        res = score(None, split, db[name], q[name], settings.eval_config())
        rows.append({"features": name, "dim": db[name].shape[1], **{f"R@{n}": round(v, 2) for n, v in res.recalls.items()}})
    return pd.DataFrame(rows)


@torch.no_grad()
def influence_maps(fusion, x: torch.Tensor, token: tuple[int, int], delta: float = 1.0) -> dict[str, np.ndarray]:
    """Which output tokens change when one input token changes, after each fusion step.

    ``x``: (1, M*C, H, W) concatenated block features. The token at ``token`` = (row, col) is
    shifted by ``delta`` times a fixed random direction; returns step name -> (H, W) mean
    absolute change per output token, after the 1x1 channel fusion and after the token mixers.
    """
    g = torch.Generator().manual_seed(0)
    d = torch.randn(x.shape[1], generator=g).to(x) * delta
    x2 = x.clone()
    x2[0, :, token[0], token[1]] += d
    c1, c2 = fusion.channel_fusion(x), fusion.channel_fusion(x2)
    m1, m2 = fusion.mix_tokens(c1), fusion.mix_tokens(c2)
    return {
        "after 1x1 channel fusion": (c2 - c1).abs().mean(1)[0].cpu().numpy(),
        "after the token mixers": (m2 - m1).abs().mean(1)[0].cpu().numpy(),
    }


@torch.no_grad()
def gem_analysis(fmap: torch.Tensor, ps=(1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32), shown=(1, 3, 16), eps: float = 1e-6):
    """How GeM's exponent p moves the pooled value from the mean to the max.

    ``fmap``: (C, H, W) non-negative map (the fused features). Returns ``(ps, position,
    weights)``: ``position[i]`` is the mean over channels of ``(GeM_p - mean) / (max - mean)``
    (0 = average pooling, 1 = max pooling); ``weights[p]`` the (H, W) share of each token in
    ``GeM_p`` of a typical channel (median spread) (``x^p / sum x^p``).
    """
    x = fmap.detach().float().cpu().clamp(min=eps)  # (C, H, W), any device in; a small map
    mean = x.mean((1, 2))
    mx = x.amax((1, 2))
    ok = (mx - mean) > 1e-6
    position = []
    for p in ps:
        g = _gem(x[None], p, eps)[0]
        position.append(float(((g - mean)[ok] / (mx - mean)[ok]).mean()))
    valid = torch.nonzero(ok).flatten()
    spread = (mx - mean)[valid] / mean[valid].clamp(min=eps)  # peakiness of each channel
    c = int(valid[torch.argsort(spread)[len(valid) // 2]])  # the median channel
    weights = {}
    for p in shown:
        w = x[c].double() ** p
        weights[p] = (w / w.sum()).numpy()
    return list(ps), np.array(position), weights


def parameter_counts(model) -> pd.DataFrame:
    """Parameters of each part of a model: name, parameters, trainable (in millions too)."""

    parts = [("DINOv2 backbone (frozen)", model.backbone)]
    fusion = getattr(model, "fusion", None)
    if fusion is not None:
        parts += [("1x1 channel fusion", fusion.conv), ("token mixers", fusion.token_mixers)]
    parts += [("GeM p", model.pool), (f"{type(model.encoder).__name__}", model.encoder)]
    rows = []
    for name, module in parts:
        n = sum(p.numel() for p in module.parameters())
        t = sum(p.numel() for p in module.parameters() if p.requires_grad)
        rows.append({"part": name, "parameters": n, "trainable": t})
    df = pd.DataFrame(rows)
    total = pd.DataFrame([{"part": "total", "parameters": int(df["parameters"].sum()), "trainable": int(df["trainable"].sum())}])
    return pd.concat([df, total], ignore_index=True)


def descriptor_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) descriptor matrices of the same images."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


def agreement(student, teacher) -> dict[str, float]:
    """How closely a student's evaluation result follows its teacher's on the same split:
    mean cosine similarity of the query descriptors, L_D (mean squared L2 distance), and the
    share of queries whose nearest database image is the same (percent)."""
    cos = descriptor_cosines(student.query_descriptors, teacher.query_descriptors)
    l_d = float(((student.query_descriptors - teacher.query_descriptors) ** 2).sum(1).mean())
    same = float(100.0 * (student.predictions[:, 0] == teacher.predictions[:, 0]).mean())
    return {"mean cosine": round(float(cos.mean()), 3), "L_D": round(l_d, 3), "same top-1 (%)": round(same, 1)}


def pick_queries(result, n: int = 4, success: bool = True, conditions=None) -> list[int]:
    """``n`` queries whose first retrieval is correct (``success``) or wrong, spread over the
    query conditions when the split has them; deterministic."""
    ok = result.correct[:, 0] if result.correct.shape[1] else np.zeros(len(result.correct), bool)
    idx = np.flatnonzero(ok if success else ~ok)
    if len(idx) == 0:
        return []
    conditions = conditions if conditions is not None else result.split.query_conditions
    if conditions is None:
        return idx[np.linspace(0, len(idx) - 1, min(n, len(idx))).round().astype(int)].tolist()
    chosen: list[int] = []
    by_cond: dict[str, list[int]] = {}
    for i in idx:
        by_cond.setdefault(conditions[i], []).append(int(i))
    while len(chosen) < min(n, len(idx)):
        for cond in sorted(by_cond):
            if by_cond[cond] and len(chosen) < n:
                chosen.append(by_cond[cond].pop(0))
    return sorted(chosen)


def demo_pairs(split, n_pairs: int = 2, conditions=("night", "fog", "snow", "rain", "dusk", "autumn")):
    """Example images: ``n_pairs`` queries in hard conditions, each followed by its nearest
    true-positive database image (the same place seen by day). Returns ``(paths, captions)``."""
    conds = split.query_conditions or ["query"] * split.num_queries
    paths, captions = [], []
    for cond in conditions:
        for q in range(split.num_queries):
            if conds[q] == cond and len(split.positives[q]):
                d = int(split.positives[q][0])
                dist = float(np.linalg.norm(split.query_utms[q] - split.database_utms[d]))
                paths += [split.query_paths[q], split.database_paths[d]]
                captions += [f"query {q} ({cond})", f"database {d} ({dist:.0f} m away)"]
                break
        if len(paths) >= 2 * n_pairs:
            break
    return paths, captions


def preset_table(presets=("SciceVPR-S", "SciceVPR-B", "SciceVPR-L"), **overrides) -> pd.DataFrame:
    """Sizes of each preset at its image size: channels, grid, descriptor dimension and
    parameter counts of every part (models built on the ``meta`` device: nothing is
    allocated or loaded). Parameter counts are in millions."""

    from .models import SciceVPR, SuperCricaVPR

    rows = []
    for name in presets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                teacher = SuperCricaVPR(name, weights=None, **overrides)
                student = SciceVPR(name, weights=None, **overrides)
        cfg = teacher.config

        def millions(module) -> float:
            return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)

        rows.append({
            "preset": name, "DINOv2": cfg.backbone.arch, "blocks fused": f"{cfg.layers[0]}-{cfg.layers[-1]}",
            "M*C": cfg.in_channels, "C_mix": cfg.mix_dim, "grid": f"{cfg.grid_size}x{cfg.grid_size}",
            "descriptor": cfg.descriptor_dim, "backbone (M)": millions(teacher.backbone),
            "1x1 conv (M)": millions(teacher.fusion.conv), "token mixers (M)": millions(teacher.fusion.token_mixers),
            "teacher encoder (M)": millions(teacher.encoder), "student encoder (M)": millions(student.encoder),
        })
    return pd.DataFrame(rows)


def initial_student(teacher, seed: int = 0):
    """The stage-2 student before any distillation step, exactly as training starts it:
    :meth:`SciceVPR.from_teacher` under ``torch.manual_seed(seed)`` (shared frozen backbone,
    frozen copy of the teacher's 1x1 conv, fresh token mixers, GeM and encoder)."""
    from .models import SciceVPR

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = SciceVPR.from_teacher(teacher)
    return student.eval()


def training_batch(dataset, places, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The (P, K, 3, S, S) images and (P, K) place ids that ``dataset`` (a GSVCitiesDataset)
    yields for the place indices ``places`` at ``epoch``, augmentations included."""
    dataset.set_epoch(epoch)
    items = [dataset[i] for i in places]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def pixel_baseline_row(split, thumb: int = 32, ns=(1, 5, 10, 100)) -> dict[str, Any]:
    """Recall@N (percent) of nearest neighbours on raw ``thumb`` x ``thumb`` RGB thumbnails:
    the floor any learned descriptor should beat. A table row (``features``/``model`` = name)."""
    from .data.synthetic import pixel_baseline_recall

    recalls = pixel_baseline_recall(split, thumb=thumb, ns=ns)
    name = f"raw pixels {thumb}x{thumb} (baseline)"
    return {"features": name, "model": name, "dim": thumb * thumb * 3,
            **{f"R@{n}": round(100.0 * v, 2) for n, v in recalls.items()}}
