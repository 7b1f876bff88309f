"""scicevpr: SciceVPR, stable cross-image correlation enhanced visual place recognition.

Quick start::

    import scicevpr
    model = scicevpr.create_model("SciceVPR", "SciceVPR-B", weights="auto")  # DINOv2 ViT-B/14, 10752-d
    teacher = scicevpr.create_model("SuperCricaVPR", "SciceVPR-S", weights=None)  # random backbone, CPU-sized
    trained = scicevpr.load_model("runs/student/best.pt")  # any trained file (native or the authors')

The configs are imported at once; the models and the rest load on first use, so that importing
the package (and ``scicevpr --help``) does not import torch. Importing it changes no setting of
the process (``scicevpr.lab``, the notebooks' helpers, and the command line ask OpenMP's idle
threads to sleep: ``OMP_WAIT_POLICY=PASSIVE``).

Layout: this package holds the method (configs, backbone and its weight files, fusion, pooling,
models, CricaVPR, losses, training, evaluation, the batch-stability sweep, ``data/`` readers) and
beside it the command line, search, index and torch.hub; ``scicevpr.offline`` the synthetic world
(renderer, benchmark, its model and recipe, backbone pretraining, the trained offline models, the
claims, the backbone cache of its small runs); ``scicevpr.lab`` what the notebooks use
(the switch, measurements, plots, the notebook runner). The method imports neither.
"""

from ._lazy import install_moved_modules as _install_moved_modules
from ._lazy import lazy_attributes as _lazy_attributes
from .config import PRESETS, BackboneConfig, ModelConfig, get_config

__getattr__ = _lazy_attributes(__name__, {
    "DinoVisionTransformer": ("backbone", "DinoVisionTransformer"),
    "RandomWeightsWarning": ("backbone", "RandomWeightsWarning"),
    "build_backbone": ("backbone", "build_backbone"),
    "create_model": ("factory", "create_model"),
    "load_model": ("checkpoint", "load_model"),
    "CricaVPR": ("cricavpr", "CricaVPR"),
    "SciceVPR": ("models", "SciceVPR"),
    "SuperCricaVPR": ("models", "SuperCricaVPR"),
    "VPRModel": ("models", "VPRModel"),
}, globals())

__all__ = [
    "BackboneConfig",
    "CricaVPR",
    "DinoVisionTransformer",
    "ModelConfig",
    "PRESETS",
    "RandomWeightsWarning",
    "SciceVPR",
    "SuperCricaVPR",
    "VPRModel",
    "build_backbone",
    "create_model",
    "get_config",
    "load_model",
]
__version__ = "0.1.0"

# Modules that moved to the offline world (scicevpr.offline) and the notebooks' helpers
# (scicevpr.lab): the old names still import, with a DeprecationWarning naming the new one.
MOVED_MODULES = {
    "scicevpr.pretrain": "scicevpr.offline.pretrain",
    "scicevpr.data.synthetic": "scicevpr.offline.synthetic",
    "scicevpr.data.render": "scicevpr.offline.render",
    "scicevpr.offline_models": "scicevpr.offline.models",
    "scicevpr.claims": "scicevpr.offline.claims",
    "scicevpr.notebook": "scicevpr.lab.notebook",
    "scicevpr.analysis": "scicevpr.lab.analysis",
    "scicevpr.viz": "scicevpr.lab.viz",
}
_install_moved_modules(MOVED_MODULES)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
