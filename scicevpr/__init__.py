"""scicevpr: SciceVPR, stable cross-image correlation enhanced visual place recognition.

Quick start::

    import scicevpr
    model = scicevpr.create_model("SciceVPR", "SciceVPR-B", weights="auto")  # DINOv2 ViT-B/14, 10752-d
    teacher = scicevpr.create_model("SuperCricaVPR", "SciceVPR-S", weights=None)  # random backbone, CPU-sized
    trained = scicevpr.load_model("runs/student/best.pt")  # any trained file (native or the authors')

The configs are imported at once; the models and the rest load on first use, so that importing
the package (and ``scicevpr --help``) does not import torch.
"""

import os as _os

# Idle OpenMP threads sleep instead of spinning. Beside DataLoader workers on a small CPU,
# spinning threads slow torch down by an order of magnitude. Only takes effect when scicevpr is
# imported before torch; an explicit setting is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
