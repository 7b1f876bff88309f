"""torch.hub entry points of scicevpr: SciceVPR, Super-CricaVPR and CricaVPR.

    import torch
    model = torch.hub.load("<owner>/scicevpr", "scicevpr_b")              # DINOv2 ViT-B/14 weights="auto"
    model = torch.hub.load("<owner>/scicevpr", "scicevpr_b", checkpoint="SciceVPR_pitts30k.pth")
    descriptors = model(images)  # (B, 3, 224, 224) ImageNet-normalised -> (B, 10752), unit norm

Every entry point takes ``checkpoint`` (a native scicevpr checkpoint or the authors' one),
``weights`` (DINOv2 weights without a checkpoint: "auto", a path, or None for random ones),
``device`` and ModelConfig overrides (e.g. ``image_size=322``); see ``scicevpr.hub.create``.
"""

dependencies = ["torch", "torchvision", "numpy", "faiss", "pandas", "PIL", "tqdm", "pytorch_metric_learning"]

from scicevpr.hub import create as _create  # noqa: E402


def scicevpr_b(checkpoint=None, weights="auto", device="cpu", **overrides):
    """SciceVPR-B (the paper's student): DINOv2 ViT-B/14, blocks 8-11 fused, 10752-d descriptors.

    Args:
        checkpoint: None (untrained heads), a native checkpoint (``runs/student/best.pt``) or
            the authors' SciceVPR checkpoint.
        weights: DINOv2 weights when no checkpoint carries them: "auto", a path or None (random).
        device: where the model is put.
        **overrides: ModelConfig fields, e.g. ``image_size=322``.
    Returns:
        the model in eval mode: (B, 3, S, S) normalised images -> (B, D) unit-norm descriptors.
    """
    return _create("scicevpr_b", checkpoint, weights, device, **overrides)


def scicevpr_l(checkpoint=None, weights="auto", device="cpu", **overrides):
    """SciceVPR-L: DINOv2 ViT-L/14, blocks 20-23 fused, 14336-d descriptors (arguments as scicevpr_b)."""
    return _create("scicevpr_l", checkpoint, weights, device, **overrides)


def scicevpr_s(checkpoint=None, weights="auto", device="cpu", **overrides):
    """SciceVPR-S, the CPU-sized variant (not a paper model): ViT-S/14, 5376-d (arguments as scicevpr_b)."""
    return _create("scicevpr_s", checkpoint, weights, device, **overrides)


def super_cricavpr_b(checkpoint=None, weights="auto", device="cpu", **overrides):
    """Super-CricaVPR-B (the paper's teacher, cross-image encoder): ViT-B/14, 10752-d.

    Its descriptors depend on the other images of the batch (arguments as scicevpr_b).
    """
    return _create("super_cricavpr_b", checkpoint, weights, device, **overrides)


def super_cricavpr_l(checkpoint=None, weights="auto", device="cpu", **overrides):
    """Super-CricaVPR-L: ViT-L/14, 14336-d (arguments as scicevpr_b)."""
    return _create("super_cricavpr_l", checkpoint, weights, device, **overrides)


def super_cricavpr_s(checkpoint=None, weights="auto", device="cpu", **overrides):
    """Super-CricaVPR-S, the CPU-sized teacher: ViT-S/14, 5376-d (arguments as scicevpr_b)."""
    return _create("super_cricavpr_s", checkpoint, weights, device, **overrides)


def cricavpr(checkpoint=None, weights="auto", device="cpu", **overrides):
    """CricaVPR (Lu et al., CVPR 2024), the cross-image baseline: ViT-B/14 with adapters, 10752-d.

    ``checkpoint``: the authors' CricaVPR checkpoint or a native one (arguments as scicevpr_b).
    """
    return _create("cricavpr", checkpoint, weights, device, **overrides)


def cricavpr_s(checkpoint=None, weights="auto", device="cpu", **overrides):
    """CricaVPR-S, the CPU-sized CricaVPR (not an official model): ViT-S/14, 5376-d (arguments as scicevpr_b)."""
    return _create("cricavpr_s", checkpoint, weights, device, **overrides)
