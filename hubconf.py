"""torch.hub entry points of scicevpr: SciceVPR, Super-CricaVPR and CricaVPR.

    import torch
    model = torch.hub.load("<owner>/scicevpr", "scicevpr_b")              # DINOv2 ViT-B/14 weights="auto"
    model = torch.hub.load("<owner>/scicevpr", "scicevpr_b", checkpoint="SciceVPR_pitts30k.pth")
    descriptors = model(images)  # (B, 3, 224, 224) ImageNet-normalised -> (B, 10752), unit norm

Offline, with no network: the ``*_offline`` entries return TRAINED models on the compact
backbone shipped in ``scicevpr/weights/`` (112 px, 5376-d), their heads in ``scicevpr/weights/offline/``:

    model = torch.hub.load("/path/to/scicevpr", "scicevpr_s_offline", source="local")
    x = model.transform(pil_image)  # (3, 112, 112); model.data_config states size, mean, std, D

The paper-size entries take ``checkpoint`` (a native scicevpr checkpoint or the authors' one),
``weights`` (DINOv2 weights without a checkpoint: "auto", a path, or None for random ones),
``device`` and ModelConfig overrides (e.g. ``image_size=322``); see ``scicevpr.hub.create``.
``weights="auto"`` needs Meta's ``dinov2_vit{s,b,l}14_pretrain.pth`` in ``$SCICEVPR_WEIGHTS`` or
torch hub's checkpoint cache when offline (else it downloads it once). Descriptors of the
cross-image models (Super-CricaVPR, CricaVPR) depend on the other images of the batch.
"""

dependencies = ["torch", "torchvision", "numpy", "faiss", "pandas", "PIL", "tqdm", "pytorch_metric_learning"]

from scicevpr.hub import create as _create  # noqa: E402
from scicevpr.hub import create_offline as _create_offline  # noqa: E402


def scicevpr_b(checkpoint=None, weights="auto", device="cpu", **overrides):
    """SciceVPR-B (the paper's student): DINOv2 ViT-B/14, blocks 8-11 fused, 224 px, 10752-d descriptors.

    Args:
        checkpoint: None (untrained heads), a native checkpoint (``runs/student/best.pt``) or
            the authors' SciceVPR checkpoint.
        weights: DINOv2 weights when no checkpoint carries them: "auto" (offline: needs
            dinov2_vitb14_pretrain.pth in $SCICEVPR_WEIGHTS or the torch hub cache), a path or None (random).
        device: where the model is put.
        **overrides: ModelConfig fields, e.g. ``image_size=322``.
    Returns:
        the model in eval mode: (B, 3, S, S) normalised images -> (B, D) unit-norm descriptors.
    """
    return _create("scicevpr_b", checkpoint, weights, device, **overrides)


def scicevpr_l(checkpoint=None, weights="auto", device="cpu", **overrides):
    """SciceVPR-L: DINOv2 ViT-L/14, blocks 20-23 fused, 224 px, 14336-d descriptors (arguments as scicevpr_b;
    offline, weights="auto" needs dinov2_vitl14_pretrain.pth)."""
    return _create("scicevpr_l", checkpoint, weights, device, **overrides)


def scicevpr_s(checkpoint=None, weights="auto", device="cpu", **overrides):
    """SciceVPR-S, the CPU-sized variant (not a paper model): ViT-S/14, blocks 8-11 fused, 224 px, 5376-d
    (arguments as scicevpr_b; offline, weights="auto" needs dinov2_vits14_pretrain.pth; the trained offline
    model is scicevpr_s_offline)."""
    return _create("scicevpr_s", checkpoint, weights, device, **overrides)


def super_cricavpr_b(checkpoint=None, weights="auto", device="cpu", **overrides):
    """Super-CricaVPR-B (the paper's teacher, cross-image encoder): ViT-B/14, 224 px, 10752-d.

    Its descriptors depend on the other images of the batch (arguments as scicevpr_b; offline,
    weights="auto" needs dinov2_vitb14_pretrain.pth).
    """
    return _create("super_cricavpr_b", checkpoint, weights, device, **overrides)


def super_cricavpr_l(checkpoint=None, weights="auto", device="cpu", **overrides):
    """Super-CricaVPR-L: ViT-L/14, 224 px, 14336-d, descriptors depend on the batch (arguments as scicevpr_b;
    offline, weights="auto" needs dinov2_vitl14_pretrain.pth)."""
    return _create("super_cricavpr_l", checkpoint, weights, device, **overrides)


def super_cricavpr_s(checkpoint=None, weights="auto", device="cpu", **overrides):
    """Super-CricaVPR-S, the CPU-sized teacher: ViT-S/14, 224 px, 5376-d, descriptors depend on the batch
    (arguments as scicevpr_b; offline, weights="auto" needs dinov2_vits14_pretrain.pth; the trained offline
    model is super_cricavpr_s_offline)."""
    return _create("super_cricavpr_s", checkpoint, weights, device, **overrides)


def cricavpr(checkpoint=None, weights="auto", device="cpu", **overrides):
    """CricaVPR (Lu et al., CVPR 2024), the cross-image baseline: ViT-B/14 with adapters, 224 px, 10752-d.

    Its descriptors depend on the other images of the batch. ``checkpoint``: the authors' CricaVPR
    checkpoint or a native one (arguments as scicevpr_b; offline, weights="auto" needs
    dinov2_vitb14_pretrain.pth).
    """
    return _create("cricavpr", checkpoint, weights, device, **overrides)


def cricavpr_s(checkpoint=None, weights="auto", device="cpu", **overrides):
    """CricaVPR-S, the CPU-sized CricaVPR (not an official model): ViT-S/14, 224 px, 5376-d, descriptors depend
    on the batch (arguments as scicevpr_b; offline, weights="auto" needs dinov2_vits14_pretrain.pth; the trained
    offline model is cricavpr_s_offline)."""
    return _create("cricavpr_s", checkpoint, weights, device, **overrides)


def scicevpr_s_offline(heads=None, device="cpu"):
    """The trained offline SciceVPR-S (the student), no network needed: the compact backbone shipped
    in scicevpr/weights/ (ViT-S/14 widths, 4 blocks, all fused), 112 px, 5376-d descriptors that do
    not depend on the batch.

    Args:
        heads: the folder of trained heads (default scicevpr/weights/offline/, made by
            ``scicevpr train-offline --export``); heads trained on another backbone are refused.
        device: where the model is put.
    Returns:
        the model in eval mode: (B, 3, 112, 112) ImageNet-normalised images -> (B, 5376) unit-norm
        descriptors; ``model.transform`` maps a PIL image to its input.
    """
    return _create_offline("scicevpr_s_offline", heads, device)


def super_cricavpr_s_offline(heads=None, device="cpu"):
    """The trained offline Super-CricaVPR-S (the teacher), no network needed: the shipped compact
    backbone, 112 px, 5376-d descriptors that depend on the other images of the batch (evaluated
    in batches of 16). Arguments as scicevpr_s_offline."""
    return _create_offline("super_cricavpr_s_offline", heads, device)


def cricavpr_s_offline(heads=None, device="cpu"):
    """The trained offline CricaVPR-S (the cross-image baseline), no network needed: adapters in the
    shipped compact backbone, its last block pooled, 112 px, 5376-d descriptors that depend on the
    other images of the batch (evaluated in batches of 16). Arguments as scicevpr_s_offline."""
    return _create_offline("cricavpr_s_offline", heads, device)
