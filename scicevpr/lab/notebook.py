"""The notebooks' single switch: ``settings = scicevpr.lab.notebook.setup()``.

Every notebook starts with this call. It reads one environment variable, ``SCICEVPR_MODE``:

``offline`` (the default)
    Runs anywhere on a CPU in a few minutes, with no download: the synthetic benchmark
    (:mod:`scicevpr.offline.synthetic`, preset ``small``) is generated under ``<repo>/data`` (or
    ``$SCICEVPR_DATA``) on first use; the model is the one :func:`scicevpr.offline.config.offline_train_config`
    trains (the CPU-sized SciceVPR-S at 112 px), and training uses that recipe; the backbone is
    the compact ViT this project pretrained on synthetic streets (``offline.config.OFFLINE_BACKBONE``,
    shipped in ``scicevpr/weights/``; not Meta's DINOv2 weights). Figures and tables say so.
    The backbone's outputs are kept for reuse (``settings.cache``, a
    :class:`scicevpr.offline.cache.BackboneCache` of up to ``OFFLINE_BACKBONE_CACHE_BYTES``, that
    the notebooks pass as ``cache=``): the teacher, its student and the ablations share one
    frozen backbone and draw the same training batches, so a split or a batch passes it once;
    the numbers are those without the cache, bit for bit.

``full``
    The paper's setting on a GPU: ``SCICEVPR_PRESET`` (``SciceVPR-B``, default, or
    ``SciceVPR-L``) at 224 px with the official DINOv2 weights (``weights="auto"``: the file
    ``dinov2_vit{b,l}14_pretrain.pth`` in ``$SCICEVPR_WEIGHTS`` or torch hub's cache), real
    datasets under ``$SCICEVPR_DATA`` (``gsv_cities/`` for training, the VG-benchmark layout
    ``<dataset>/images/<split>/`` for evaluation; see ``data/README.md``), the paper's training
    recipe (:class:`scicevpr.config.TrainConfig` defaults).

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
  at most ``m`` iterations (:class:`~scicevpr.config.TrainConfig` ``epochs`` and
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

The notebooks' measurements (CKA, influence maps, baselines, ...) are in :mod:`scicevpr.lab.analysis`,
their plots in :mod:`scicevpr.lab.viz`.
"""

from __future__ import annotations

import os
import sys
import warnings
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._lazy import moved_attributes
from ..data.paths import DATA_ENV, WEIGHTS_ENV, find_repo_root
from ..offline.cache import BackboneCache
from ..precision import cpu_kernels_pinned, cpu_kind, resolve_amp

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
# CricaVPR-S offline (notebook 05): its adapters backpropagate through the backbone, so it trains
# fewer epochs than the teacher to keep the notebooks within minutes.
CRICAVPR_OFFLINE_EPOCHS = 2

# Backbone outputs kept for reuse in offline mode (settings.cache): through the SciceVPR-S
# backbone at 112 px, the small split's 1,014 evaluation images take 0.4 GB and the teacher's
# 10 epochs of training batches 1.3 GB (a student's 6 epochs are its first 6); CricaVPR-S's
# 1,014 images 0.1 GB. settings.cache.enable(0) in a notebook turns it off.
OFFLINE_BACKBONE_CACHE_BYTES = 2 * 2**30
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


def _int_from_env(name: str, default: int | None, minimum: int, unset: str) -> int | None:
    """The whole number >= ``minimum`` in environment variable ``name``; ``default`` when it is
    unset. Anything else is one message naming the variable (``unset``: what leaving it unset gives)."""
    value = _env(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) < minimum:
        raise ValueError(f"{name}={value!r}: expected a whole number >= {minimum}, or unset for {unset}.")
    return int(value)


def _train_overrides_from_env() -> dict[str, int]:
    """TrainConfig fields capped by ``SCICEVPR_EPOCHS`` / ``SCICEVPR_MAX_ITERS`` (smoke runs)."""
    out = {}
    for name, fld in ((EPOCHS_ENV, "epochs"), (MAX_ITERS_ENV, "max_iters_per_epoch")):
        n = _int_from_env(name, None, 1, f"the recipe's {fld}")
        if n is not None:
            out[fld] = n
    return out


def compact_backbone_label(config, weights: str | None, short: bool = True) -> str:
    """How figures name a compact backbone pretrained by :mod:`scicevpr.offline.pretrain`, as its
    manifest records it: ``short`` the figure label (e.g. "ViT-S/14 self-supervised on
    synthetic streets (not Meta's DINOv2)"), else the full description."""
    from ..weights import resolve_weights, weights_record

    path = resolve_weights(weights, config)
    manifest = None if path is None else weights_record(path)[1]
    if manifest is None:
        raise ValueError(f"weights={weights!r}: no manifest (the .json beside the weight file) to take the backbone's "
                         f"label from; export the file with `scicevpr pretrain-backbone --export`, which writes one.")
    return manifest["label"] if short else manifest["description"]


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
        amp: bf16 autocast (resolved by :mod:`scicevpr.precision`; offline always False: fp32 on
            every CPU kind, where bf16 would be emulated on most).
        pca_dim, pca_max_images: PCA of the descriptors and how many training images fit it.
        demo_images: how many images the explanatory notebooks (01, 02) look at.
        seed, threads: random seed and torch CPU threads.
        train_overrides: TrainConfig fields replaced in both stages (e.g. fewer epochs).
        cache: the backbone cache the notebooks pass as ``cache=`` to evaluation, the stability
            sweep and training (offline: a :class:`~scicevpr.offline.cache.BackboneCache`; full
            mode: None, so nothing is hashed or kept).
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
    cache: BackboneCache | None = field(default=None, repr=False, compare=False)

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
        backbone = self.model_config().backbone
        if not backbone.is_official:  # a compact backbone pretrained by scicevpr: its manifest says how
            return compact_backbone_label(backbone, self.weights)
        arch = backbone.arch  # e.g. "vitb14"
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
        elif not cfg.backbone.is_official:
            weights = f"{cfg.backbone.hub_name}_pretrain.pth: {compact_backbone_label(cfg.backbone, self.weights, short=False)}"
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
            + (" (offline: fp32 on every CPU kind, never emulated bf16)" if self.offline else ""),
            f"CPU kernels     : {_cpu_kernels_line()}",
            f"data            : {_relative(self.data_root, self.repo_root)}"
            + (f" (synthetic preset '{self.synthetic_preset}')" if self.synthetic_preset else ""),
            f"evaluation      : {self.eval_dataset} / {self.eval_split} (validation: {self.val_dataset} / {self.val_split})",
            f"figures, runs   : {_relative(self.figures_dir, self.repo_root)}/, {_relative(self.runs_dir, self.repo_root)}/",
            f"figure label    : {self.figure_label}",
        ]
        capped = ", ".join(f"{k}={v}" for k, v in sorted(self.train_overrides.items()) if k != "progress")
        if capped:
            lines.append(f"training        : recipe capped by ${EPOCHS_ENV} / ${MAX_ITERS_ENV}: {capped}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    # ---- models --------------------------------------------------------------------------

    def with_weights(self, weights: str | None) -> "NotebookSettings":
        """The same settings with other backbone weights (None: a random initialisation)."""
        return dataclasses.replace(self, weights=weights)

    def model_config(self, preset: str | None = None):
        """The ModelConfig of ``preset`` (default: the settings' preset) with the overrides."""
        from ..config import get_config

        return get_config(preset or self.preset, **self.model_overrides)

    def build(self, name: str = "SciceVPR", preset: str | None = None, seed: int | None = None, **overrides: Any):
        """A fresh model (eval mode, on ``device``) whose initialisation depends only on ``seed``
        (:func:`scicevpr.create_model` with the settings' weights and overrides).

        Args:
            name: ``"SciceVPR"``, ``"SuperCricaVPR"`` or ``"CricaVPR"`` (then the preset
                defaults to the CricaVPR of the same backbone size).
            preset: another preset; default the settings' one.
            seed: default the settings' seed.
            **overrides: ModelConfig fields on top of ``model_overrides``.
        """
        from ..factory import create_model

        if preset is None:
            preset = self.preset
            if name == "CricaVPR":
                preset = "CricaVPR-S" if self.preset.endswith("-S") else "CricaVPR"
        kw = {**self.model_overrides, **overrides}
        if name == "CricaVPR":
            kw.pop("mix_dim", None)
        model = create_model(name, preset, weights=self.weights, seed=self.seed if seed is None else seed, **kw)
        return model.to(self.device).eval()

    # ---- data ----------------------------------------------------------------------------

    def benchmark(self):
        """Offline: generate (first call, about a minute) or reuse the synthetic benchmark and
        return it. Full: check that the real datasets are where the settings say; returns None."""
        if self.synthetic_preset is not None:
            from ..offline.synthetic import MANIFEST, generate

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
        from ..data.vg import load_vg_split

        self.benchmark()
        return load_vg_split(self.vg_root, dataset or self.eval_dataset, split or self.eval_split)

    def train_dataset(self, **kwargs: Any):
        """The training set (GSV-Cities layout) at the model's image size:
        a :class:`~scicevpr.data.gsv.GSVCitiesDataset`; ``kwargs`` go to it."""
        from ..data.gsv import GSVCitiesDataset

        self.benchmark()
        kw: dict[str, Any] = {"seed": self.seed}
        if "transform" not in kwargs:  # a transform brings its own size
            kw["image_size"] = self.model_config().image_size
        kw.update(kwargs)
        return GSVCitiesDataset(self.gsv_root, **kw)

    def training_images(self, limit: int | None = None) -> list[Path]:
        """Training image files (GSV-Cities layout, sorted), e.g. to fit the PCA; at most
        ``limit`` (default ``pca_max_images``), evenly spaced when there are more."""
        self.benchmark()
        from ..data.vg import list_images

        folder = self.gsv_root / "Images"
        paths = list_images(folder)  # sorted, as the evaluation splits are listed
        if not paths:
            raise FileNotFoundError(f"no training images under {str(folder)!r}")
        limit = self.pca_max_images if limit is None else limit
        if len(paths) > limit:
            keep = np.linspace(0, len(paths) - 1, limit).round().astype(int)
            paths = [paths[i] for i in keep]
        return paths

    # ---- evaluation and training configs -------------------------------------------------

    def eval_config(self, **overrides: Any):
        """The :class:`~scicevpr.config.EvalConfig` of the notebooks (no progress bars)."""
        from ..config import EvalConfig

        kw = dict(batch_size=self.eval_batch_size, device=self.device, amp=self.amp,
                  num_workers=self.num_workers, progress=False)
        if not self.offline:
            kw.pop("amp")  # the CUDA fast path decides
        kw.update(overrides)
        return EvalConfig(**kw)

    def train_config(self, stage: str = "teacher", teacher: str | os.PathLike | None = None, **overrides: Any):
        """The :class:`~scicevpr.config.TrainConfig` of ``stage`` (``"teacher"`` / ``"student"``).

        Offline: :func:`scicevpr.offline.config.offline_train_config`. Full: the paper's recipe on
        GSV-Cities with validation on ``val_dataset``. Both resume a finished or interrupted run
        in :meth:`run_root` ``/<stage>`` instead of training again (delete it to retrain).
        """
        return self._train_config(stage, self.run_root() / stage, teacher, **overrides)

    def _train_config(self, stage: str, run_dir: Path, teacher=None, **overrides: Any):
        from ..config import TrainConfig
        from ..offline.config import offline_train_config

        common = dict(resume=True, progress=False, seed=self.seed)
        common.update(self.train_overrides)
        common.update(overrides)
        model_overrides = {**self.model_overrides, **(common.pop("model_overrides", None) or {})}
        if self.offline:
            return offline_train_config(self.gsv_root, self.vg_root, run_dir, stage=stage, teacher=teacher,
                                        dataset=self.val_dataset, weights=self.weights,
                                        model_overrides=model_overrides, **common)
        common.setdefault("model", "SuperCricaVPR")
        common.setdefault("preset", self.preset)
        return TrainConfig(
            model_overrides=model_overrides,
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

        from ..train import STAGES

        # Everything that can change the trained weights; not where files are or how fast (activation
        # checkpointing gives the same weights), nor how files are checked (the synthetic benchmark
        # has no corrupt image and no place under K).
        skip = {"resume", "progress", "num_workers", "run_dir", "teacher", "gsv_root", "val_root",
                "trust_checkpoint", "skip_corrupt", "drop_small_places", "activation_checkpointing"}
        recipe: list[Any] = [{k: v for k, v in self._train_config(stage, Path(".")).to_dict().items() if k not in skip}
                             for stage in STAGES]
        recipe.append(self._inputs_record())
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return self.runs_dir / f"recipe-{digest}"

    def _inputs_record(self) -> dict[str, Any]:
        """What the runs are trained on beyond their configuration: the backbone file's SHA-256
        (``weights="auto"`` names a file whose content may change) and the synthetic world's
        settings, so that a new backbone or world trains anew instead of reusing older runs."""
        from dataclasses import asdict

        from ..offline.synthetic import FORMAT_VERSION, get_preset
        from ..weights import resolve_weights, weights_record

        path = resolve_weights(self.weights, self.model_config().backbone)
        record: dict[str, Any] = {"backbone_sha256": None if path is None else weights_record(path)[0]}
        if self.synthetic_preset is not None:
            record["synthetic"] = {"preset": asdict(get_preset(self.synthetic_preset)), "format": FORMAT_VERSION}
        return record

    def train(self):
        """Both training stages (reused from :meth:`run_root` when already done).

        Returns ``(teacher_run, student_run)``, two :class:`scicevpr.train.RunResult`.
        """
        from ..train import train_student, train_teacher

        self.benchmark()
        teacher_run = train_teacher(self.train_config("teacher"), self.cache)
        best = teacher_run.best_path or teacher_run.last_path
        student_run = train_student(self.train_config("student", teacher=best), self.cache)
        return teacher_run, student_run

    def student_variant_config(self, name: str, teacher: str | os.PathLike, **loss: float):
        """The stage-2 :class:`~scicevpr.config.TrainConfig` of :meth:`train_student_variant`:
        :func:`scicevpr.train.loss_variant_config` of the student's, in ``run_root()/student-<name>``
        (the same steps, other loss weights, validated once after the last epoch)."""
        from ..train import loss_variant_config

        return loss_variant_config(self.train_config("student", teacher=teacher), self.run_root() / f"student-{name}", **loss)

    def train_student_variant(self, name: str, **loss: float):
        """A stage-2 student of the same teacher, trained for the same steps as :meth:`train`'s
        but with other loss weights, e.g. ``eta=0`` (``L_MS`` only) or ``gamma=0`` (``L_D``
        only): the distillation ablation. Reused from ``run_root()/student-<name>`` when done.
        Returns its :class:`scicevpr.train.RunResult`."""
        from ..train import train_student, train_teacher

        self.benchmark()
        teacher_run = train_teacher(self.train_config("teacher"), self.cache)
        best = teacher_run.best_path or teacher_run.last_path
        return train_student(self.student_variant_config(name, best, **loss), self.cache)

    def cricavpr_config(self):
        """The :class:`~scicevpr.config.TrainConfig` of :meth:`train_cricavpr`. Offline: preset
        "CricaVPR-S" (this project's ViT-S variant), pooling the last block the backbone computes,
        ``CRICAVPR_OFFLINE_EPOCHS`` epochs (its adapters train inside the backbone, so a step
        costs more than the teacher's). Full mode: preset "CricaVPR", the paper's recipe."""
        overrides: dict[str, Any] = {"model": "CricaVPR", "preset": "CricaVPR-S" if self.offline else "CricaVPR"}
        layers = self.model_overrides.get("layers")
        if layers:
            overrides["model_overrides"] = {"layers": (tuple(layers)[-1],)}
        if self.offline:
            overrides["epochs"] = CRICAVPR_OFFLINE_EPOCHS
        return self._train_config("teacher", self.run_root() / "cricavpr", **overrides)

    def train_cricavpr(self):
        """CricaVPR (the cross-image baseline of the paper's Fig. 1-2) trained with ``L_MS`` on the
        same data (:meth:`cricavpr_config`), reused from ``run_root()/cricavpr`` when done.
        Returns its :class:`scicevpr.train.RunResult`."""
        from ..train import train_teacher

        self.benchmark()
        return train_teacher(self.cricavpr_config(), self.cache)


def offline_settings(repo_root: Path, data_root: Path, synthetic: str = "small", runs_dir: Path | None = None,
                     seed: int = 0, threads: int = 2, train_overrides: dict[str, Any] | None = None) -> NotebookSettings:
    """The offline :class:`NotebookSettings` (see the module docstring) without :func:`setup`'s
    side effects: the notebooks' (``setup()``) and ``scicevpr train-offline``'s, so that both
    train the same runs into the same folders.

    Args:
        repo_root: the repository (figures, runs).
        data_root: the folder holding ``synthetic/<synthetic>/``.
        synthetic: the synthetic benchmark's preset (``small``; ``tiny`` for tests).
        runs_dir: default ``<repo_root>/runs/notebooks/offline``.
        seed, threads: as in :class:`NotebookSettings`.
        train_overrides: TrainConfig fields replaced in every stage (e.g. ``epochs``).
    """
    from ..offline.config import offline_train_config

    bench_root = Path(data_root) / "synthetic" / synthetic
    # The model is the one the offline training recipe trains (single source of truth).
    recipe = offline_train_config(bench_root / "gsv_cities", bench_root / "vg", repo_root / "runs", stage="teacher")
    return NotebookSettings(
        mode="offline", preset=recipe.preset, model_overrides=dict(recipe.model_overrides),
        weights=_weights_from_env(recipe.weights), device="cpu", repo_root=repo_root,
        data_root=Path(data_root), figures_dir=repo_root / "figures",
        runs_dir=Path(runs_dir) if runs_dir is not None else repo_root / "runs" / "notebooks" / "offline",
        synthetic_preset=synthetic, vg_root=bench_root / "vg", gsv_root=bench_root / "gsv_cities",
        eval_dataset="synthetic", eval_split="test", val_dataset="synthetic", val_split="val",
        stability_batch_sizes=(1, 2, 4, 8, 16, 32), stability_orders=3, num_workers=0, amp=False,
        pca_dim=256, pca_max_images=2**14, demo_images=4, seed=seed, threads=threads,
        train_overrides=dict(train_overrides or {}), cache=BackboneCache(OFFLINE_BACKBONE_CACHE_BYTES),
    )


def _cpu_kernels_line() -> str:
    """The banner's statement of which CPU kernels run (machine-specific when not pinned)."""
    if cpu_kernels_pinned():
        return "AVX2, pinned (make sets it), the kernels the stored outputs were made with"
    return (f"native {cpu_kind()} (not pinned: numbers may differ from the stored outputs in the "
            "last digits; run through `make lab` / `make test` for the kernels they were made with)")


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
    seed = _int_from_env(SEED_ENV, 0, 0, "seed 0")
    cuda = torch.cuda.is_available()
    train_overrides = _train_overrides_from_env()
    if mode == "offline":
        settings = offline_settings(root, data_root, seed=seed, threads=_int_from_env(THREADS_ENV, 2, 1, "2 threads"),
                                    train_overrides=train_overrides)
    else:
        preset = _env(PRESET_ENV, "SciceVPR-B")
        if preset not in FULL_PRESETS:
            raise ValueError(f"{PRESET_ENV}={preset!r}: expected one of {FULL_PRESETS} in full mode.")
        threads = _int_from_env(THREADS_ENV, os.cpu_count() or 1, 1, "all the CPU's threads")
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
    from ..runtime import seed_everything

    seed_everything(seed)
    from ..backbone import RandomWeightsWarning
    from . import viz

    warnings.filterwarnings("ignore", category=RandomWeightsWarning)  # stated once, below
    # A torch notice about reading a loss for the progress bar; it says nothing about the results.
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    _inline_figures()
    viz.set_style()
    if not quiet:
        print(settings.describe())
        if settings.random_backbone and settings.offline:
            print(f"NOTE: DINOv2 is randomly initialised ({WEIGHTS_ENV}={RANDOM_WEIGHTS}). Every figure and "
                  "table\n      is stamped with this; unset it for the pretrained compact backbone.")
        elif settings.offline:
            print("NOTE: the backbone is a compact ViT pretrained by this project on synthetic streets, not "
                  f"Meta's DINOv2\n      (nothing is downloaded offline; {WEIGHTS_ENV}={RANDOM_WEIGHTS} for a random "
                  "one). See notebook 05 for\n      running with the real weights.")
        elif settings.random_backbone:
            print(f"NOTE: DINOv2 is randomly initialised ({WEIGHTS_ENV}={RANDOM_WEIGHTS}): a check that the full "
                  "configuration\n      runs, not the paper's results. Every figure and table is stamped with this.")
        if mode == "full" and not cuda:
            print("NOTE: full mode without a CUDA GPU: everything runs, very slowly, on the CPU.")
    return settings


# The record of a weight file moved to scicevpr.weights; its name still imports from here.
__getattr__ = moved_attributes(__name__, {"scicevpr.weights": ("weights_record",)})
