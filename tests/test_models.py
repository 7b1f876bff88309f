"""Fusion, pooling, encoders and the two assembled models (docs/method.md, "Architecture")."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import scicevpr
from scicevpr.fusion import TokenMixer
from scicevpr.pooling import MultiRegionGeM, region_boxes

warnings.filterwarnings("ignore", category=scicevpr.RandomWeightsWarning)

SMALL = dict(image_size=112)  # 8 x 8 grid: fast on CPU, same code paths as 224


def make(cls, preset="SciceVPR-S", seed=0, **kw):
    torch.manual_seed(seed)
    return cls(preset, weights=None, **{**SMALL, **kw}).eval()


# ---- pooling -------------------------------------------------------------------------------


def test_region_boxes_equal_official_slices_at_16():
    s = [(0, 8), (8, 16)]
    t = [(0, 5), (5, 11), (11, 16)]
    official = [(0, 16, 0, 16)]
    official += [(r0, r1, c0, c1) for r0, r1 in s for c0, c1 in s]
    official += [(r0, r1, c0, c1) for r0, r1 in t for c0, c1 in t]
    assert region_boxes(16, 16) == official


@pytest.mark.parametrize("h,w", [(16, 16), (8, 8), (23, 17), (37, 37)])
def test_region_boxes_tile_the_grid_at_every_scale(h, w):
    boxes = region_boxes(h, w)
    assert len(boxes) == 14
    for scale in (boxes[:1], boxes[1:5], boxes[5:]):
        cover = torch.zeros(h, w, dtype=torch.int64)
        for r0, r1, c0, c1 in scale:
            assert r1 > r0 and c1 > c0
            cover[r0:r1, c0:c1] += 1
        assert torch.equal(cover, torch.ones(h, w, dtype=torch.int64))


def test_multi_region_gem_equals_per_region_gem():
    torch.manual_seed(0)
    pool = MultiRegionGeM((16, 16), p=3.0)
    with torch.no_grad():
        pool.p.fill_(2.5)
    x = torch.randn(3, 5, 16, 16).relu()
    got = pool(x)
    expected = []
    for r0, r1, c0, c1 in region_boxes(16, 16):
        g = x[:, :, r0:r1, c0:c1].clamp(min=1e-6).pow(2.5).mean(dim=(2, 3)).pow(1 / 2.5)
        expected.append(F.normalize(g, dim=-1))
    torch.testing.assert_close(got, torch.stack(expected, dim=1), atol=1e-6, rtol=1e-5)
    assert got.shape == (3, 14, 5)


def test_token_mixer_formula():
    torch.manual_seed(0)
    m = TokenMixer(channels=6, num_tokens=9, mlp_ratio=2.0)
    x = torch.randn(2, 6, 9)
    h = F.layer_norm(x.transpose(1, 2), (6,), m.norm.weight, m.norm.bias).transpose(1, 2)
    expected = x + m.mix[2](torch.relu(m.mix[0](h)))
    torch.testing.assert_close(m(x), expected)
    assert m.mix[0].weight.shape == (18, 9)


# ---- models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [scicevpr.SciceVPR, scicevpr.SuperCricaVPR])
@pytest.mark.parametrize("image_size", [224, 154])
def test_shapes_and_unit_norm(cls, image_size):
    m = make(cls, image_size=image_size)
    x = torch.randn(3, 3, image_size, image_size)
    with torch.no_grad():
        f = m.backbone_features(x)
        d = m(x)
    g = image_size // 14
    assert f.shape == (3, 4 * 384, g, g)
    assert m.extract_features(x).shape == (3, 384, g, g)
    assert d.shape == (3, 14 * 384) == (3, m.descriptor_dim)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(3))


def test_preset_dimensions():
    for name, (arch, layers, cin, cmix) in {
        "SciceVPR-B": ("vitb14", (8, 9, 10, 11), 3072, 768),
        "SciceVPR-L": ("vitl14", (20, 21, 22, 23), 4096, 1024),
        "SciceVPR-S": ("vits14", (8, 9, 10, 11), 1536, 384),
    }.items():
        cfg = scicevpr.get_config(name)
        assert (cfg.backbone.arch, cfg.layers, cfg.in_channels, cfg.mix_dim) == (arch, layers, cin, cmix)
        assert cfg.num_token_mixers == 2 and cfg.grid_size == 16
        assert cfg.descriptor_dim == 14 * cmix


def _batchings(model) -> dict[str, torch.Tensor]:
    """Descriptors of the same 8 images encoded as one batch, one by one, in pairs, shuffled."""
    torch.manual_seed(1)
    x = torch.randn(8, 3, 112, 112)
    perm = torch.randperm(8)
    with torch.no_grad():
        return {
            "batch": model(x),
            "single": torch.cat([model(x[i : i + 1]) for i in range(8)]),
            "pairs": torch.cat([model(x[i : i + 2]) for i in range(0, 8, 2)]),
            "shuffled": model(x[perm])[torch.argsort(perm)],
        }


def test_student_descriptors_do_not_depend_on_the_batch():
    d = _batchings(make(scicevpr.SciceVPR))
    for other in ("single", "pairs", "shuffled"):
        assert (d["batch"] - d[other]).abs().max() <= 1e-6


def test_student_encoder_is_bit_for_bit_the_same_in_every_batch():
    """What the batch-stability sweep re-runs (notebooks 02, 03, 05): the encoder on the same
    regional features. In eval mode it runs image by image, so no matrix kernel can round an
    image's rows differently with the batch's size (MKL on an Intel Xeon does)."""
    m = make(scicevpr.SciceVPR, encoder_dropout=0.0)
    torch.manual_seed(2)
    r = torch.randn(40, 14, m.config.mix_dim)  # (B, 14, C_mix) regional features
    perm = torch.randperm(40)
    with torch.no_grad():
        batch = m.encode(r)
        for size in (1, 3, 16):
            assert torch.equal(torch.cat([m.encode(r[i : i + size]) for i in range(0, 40, size)]), batch), size
        assert torch.equal(m.encode(r[perm])[torch.argsort(perm)], batch)
        m.encoder.train()  # training mode: one product over the whole batch, the same values up to rounding
        torch.testing.assert_close(m.encode(r), batch, rtol=0, atol=1e-6)


def test_teacher_descriptors_change_with_the_batch():
    d = _batchings(make(scicevpr.SuperCricaVPR))
    assert (d["batch"] - d["single"]).abs().max() > 1e-3
    assert (d["batch"] - d["pairs"]).abs().max() > 1e-3
    # attention is permutation-equivariant: the order alone does not change a descriptor
    assert (d["batch"] - d["shuffled"]).abs().max() <= 1e-5


def test_only_fusion_pooling_encoder_are_trainable():
    m = make(scicevpr.SuperCricaVPR)
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"fusion", "pool", "encoder"}
    m.train()
    assert m.training and not m.backbone.training


def test_student_from_teacher_shares_backbone_and_freezes_conv():
    t = make(scicevpr.SuperCricaVPR)
    s = scicevpr.SciceVPR.from_teacher(t)
    assert s.backbone is t.backbone
    torch.testing.assert_close(s.fusion.conv.weight, t.fusion.conv.weight)
    assert not s.fusion.conv.weight.requires_grad and not s.fusion.conv.bias.requires_grad
    assert s.fusion.token_mixers[0].mix[0].weight.requires_grad
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(s.extract_features(x), t.extract_features(x))


# ---- errors ----------------------------------------------------------------------------------


def test_wrong_input_size_is_rejected_with_the_fix():
    m = make(scicevpr.SciceVPR)
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 112, 112\).*image_size"):
        m(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        scicevpr.get_config("SciceVPR-S", image_size=225)


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="Unknown preset 'SciceVPR-XL'.*SciceVPR-B"):
        scicevpr.SciceVPR("SciceVPR-XL", weights=None)
    with pytest.raises(ValueError, match="Unknown ModelConfig fields"):
        scicevpr.get_config("SciceVPR-S", mixdim=3)


# ---- official checkpoints --------------------------------------------------------------------


def _authors_layout(model: scicevpr.VPRModel, encoder_layers: int) -> dict:
    """A checkpoint in the authors' key layout, built independently of our key mapping."""
    sd = model.state_dict()
    out = {}
    for k, v in model.backbone.state_dict().items():
        out[f"backbone.dino_model.{k}"] = v.clone()
    out["conv.weight"], out["conv.bias"] = sd["fusion.conv.weight"], sd["fusion.conv.bias"]
    for i in range(model.config.num_token_mixers):
        for part in ("norm.weight", "norm.bias", "mix.0.weight", "mix.0.bias", "mix.2.weight", "mix.2.bias"):
            out[f"tokenmix.{i}.{part}"] = sd[f"fusion.token_mixers.{i}.{part}"]
    out["gem.p"] = sd["pool.p"]
    for k, v in sd.items():
        if k.startswith("encoder.layers."):
            assert int(k.split(".")[2]) < encoder_layers
            out[k] = v
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("cls,layers", [(scicevpr.SciceVPR, 1), (scicevpr.SuperCricaVPR, 2)])
@pytest.mark.parametrize("wrap", ["bare", "model_state_dict", "module"])
def test_official_checkpoint_round_trip(tmp_path, cls, layers, wrap):
    src = make(cls, seed=1)
    ckpt = _authors_layout(src, layers)
    assert ckpt.keys() == src.official_state_dict().keys()
    if wrap == "module":
        ckpt = {f"module.{k}": v for k, v in ckpt.items()}
    if wrap == "model_state_dict":
        ckpt = {"model_state_dict": ckpt, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    dst = make(cls, seed=2)
    x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        before = dst(x)
        dst.load_official(path)
        assert not dst.is_random_init
        after, expected = dst(x), src(x)
    assert (before - expected).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, atol=0, rtol=0)


def test_checkpoint_of_the_other_architecture_is_rejected():
    teacher = make(scicevpr.SuperCricaVPR)
    student = make(scicevpr.SciceVPR)
    with pytest.raises(ValueError, match=r"unexpected keys \(12\): encoder\.layers\.1\."):
        student.load_official(teacher.official_state_dict())
    with pytest.raises(ValueError, match=r"missing keys \(12\): encoder\.layers\.1\."):
        teacher.load_official(student.official_state_dict())
    with pytest.raises(ValueError, match="unexpected keys.*aggregation"):
        student.load_official({**student.official_state_dict(), "aggregation.weight": torch.zeros(1)})


def test_bf16_autocast_inference_runs_and_agrees():
    m = make(scicevpr.SciceVPR)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = m(x)
    assert fast.dtype == torch.float32
    assert F.cosine_similarity(ref, fast).min() > 0.99


def test_package_has_no_hard_coded_cuda_calls():
    root = Path(scicevpr.__file__).parent
    offenders = [
        str(p) for p in root.rglob("*.py") if re.search(r"\.cuda\(", p.read_text())
    ]
    assert offenders == []


@pytest.mark.parametrize("name, preset, batch_dependent", [
    ("SciceVPR", "SciceVPR-S", False), ("SuperCricaVPR", "SciceVPR-S", True), ("CricaVPR", "CricaVPR-S", True),
])
def test_every_model_states_its_input_and_output_and_serves_pil_images(name, preset, batch_dependent):
    import numpy as np
    from PIL import Image

    from scicevpr import create_model
    from scicevpr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, transform_from_data_config

    model = create_model(name, preset, weights=None, image_size=56).eval()
    cfg = model.data_config
    assert cfg["input_size"] == (3, 56, 56) and cfg["mean"] == IMAGENET_MEAN and cfg["std"] == IMAGENET_STD
    assert cfg["descriptor_dim"] == model.descriptor_dim and cfg["batch_dependent"] is batch_dependent
    image = Image.fromarray((np.random.default_rng(0).random((90, 150, 3)) * 255).astype(np.uint8))
    x = model.transform(image)
    assert torch.equal(x, eval_transform(56)(image))
    with torch.no_grad():
        assert model(torch.stack([x, x])).shape == (2, cfg["descriptor_dim"])
    with pytest.raises(ValueError, match="mean"):
        transform_from_data_config({**cfg, "mean": (0.5, 0.5, 0.5)})
