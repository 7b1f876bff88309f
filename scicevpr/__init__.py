"""scicevpr: SciceVPR, stable cross-image correlation enhanced visual place recognition.

Quick start::

    import scicevpr
    model = scicevpr.SciceVPR("SciceVPR-B", weights="auto")   # DINOv2 ViT-B/14, 10752-d
    teacher = scicevpr.SuperCricaVPR("SciceVPR-S", weights=None)  # random backbone, CPU-sized
"""

import os as _os

# Idle OpenMP threads sleep instead of spinning. Beside DataLoader workers on a small CPU,
# spinning threads slow torch down by an order of magnitude. Only takes effect when scicevpr is
# imported before torch; an explicit setting is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .backbone import DinoVisionTransformer, RandomWeightsWarning, build_backbone
from .checkpoint import load_model
from .config import PRESETS, BackboneConfig, ModelConfig, get_config
from .cricavpr import CricaVPR
from .models import SciceVPR, SuperCricaVPR, VPRModel

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
    "get_config",
    "load_model",
]
__version__ = "0.1.0"
