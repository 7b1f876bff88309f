"""DINOv2 backbone: official parity, multi-layer extraction, weight resolution."""

from __future__ import annotations

import urllib.error
import warnings

import pytest
import torch

from scicevpr import backbone as bb
from scicevpr import weights as wts
from scicevpr.config import BACKBONE_ARCHS, BackboneConfig

dinov2_vt = pytest.importorskip("dinov2.models.vision_transformer")

REFERENCE_BUILDERS = {
    "vits14": lambda: dinov2_vt.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0, drop_path_uniform=True),
    "vitb14": lambda: dinov2_vt.vit_base(patch_size=14, img_size=518, init_values=1.0, block_chunks=0, drop_path_uniform=True),
    "vitl14": lambda: dinov2_vt.vit_large(patch_size=14, img_size=518, init_values=1.0, block_chunks=0, drop_path_uniform=True),
    "vitg14": lambda: dinov2_vt.vit_giant2(
        patch_size=14, img_size=518, init_values=1.0, block_chunks=0, ffn_layer="swiglufused", drop_path_uniform=True
    ),
}


def _random_reference(arch: str, seed: int = 0) -> torch.nn.Module:
    """The official DINOv2 model with random, non-trivial weights (LayerScale and norms too)."""
    torch.manual_seed(seed)
    ref = REFERENCE_BUILDERS[arch]().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma") or "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return ref


@pytest.mark.parametrize("arch", sorted(BACKBONE_ARCHS))
def test_official_state_dict_layout_matches(arch):
    """Every architecture has the official parameter names and shapes (strict loading)."""
    with torch.device("meta"):
        ref = REFERENCE_BUILDERS[arch]()
        ours = bb.DinoVisionTransformer(BackboneConfig(arch=arch))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes


@pytest.mark.parametrize("arch", ["vits14", "vitb14"])
@pytest.mark.parametrize("size", [(224, 224), (168, 168), (224, 308)])
def test_parity_with_official_dinov2(arch, size):
    """Same weights and input: multi-layer outputs equal the official implementation (fp32)."""
    ref = _random_reference(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        ours = bb.build_backbone(BackboneConfig(arch=arch), weights=None).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    layers = [8, 9, 10, 11]
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = torch.cat(ref.get_intermediate_layers(x, n=layers, reshape=True, norm=True), dim=1)
        got = ours.forward_multilayer(x, layers)
        cls_expected = ref.forward_features(x)["x_norm_clstoken"]
        cls_got = ours(x)
    H, W = size[0] // 14, size[1] // 14
    assert got.shape == (2, 4 * ours.embed_dim, H, W)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(cls_got, cls_expected, atol=1e-5, rtol=0)


def test_position_embedding_uses_official_scale_factor():
    """The resize uses scale factor (grid + 0.1) / 37, which differs from resizing to a size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        m = bb.build_backbone(BackboneConfig(arch="vits14"), weights=None)
    pos = m.interpolate_pos_encoding((16, 16), torch.float32)
    table = m.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    by_size = torch.nn.functional.interpolate(table, size=(16, 16), mode="bicubic")
    by_size = by_size.permute(0, 2, 3, 1).reshape(1, 256, -1)
    assert pos.shape == (1, 257, 384)
    assert (pos[:, 1:] - by_size).abs().max() > 1e-4


def test_sides_not_multiple_of_patch_size_are_rejected():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        m = bb.build_backbone(BackboneConfig(arch="vits14"), weights=None)
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        m.forward_multilayer(torch.randn(1, 3, 224, 225), [11])


def test_backbone_is_frozen():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        m = bb.build_backbone(BackboneConfig(arch="vits14"), weights=None)
    assert not any(p.requires_grad for p in m.parameters())


# ---- weights -------------------------------------------------------------------------------


def _random_small_backbone() -> bb.DinoVisionTransformer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        return bb.build_backbone(BackboneConfig(arch="vits14"), weights=None)


def test_random_init_is_reported():
    with pytest.warns(bb.RandomWeightsWarning, match="randomly initialised") as record:
        m = bb.build_backbone(BackboneConfig(arch="vits14"), weights=None)
    assert m.is_random_init and m.weights_path is None
    assert record[0].filename == __file__  # the warning points at the caller of build_backbone


def test_the_constructor_reads_no_file(monkeypatch):
    """Building the ViT only draws its random initialisation; weights are found and loaded by
    build_backbone (scicevpr.weights)."""
    def no_file(*args, **kwargs):
        raise AssertionError("the constructor looked for a weight file")

    for name in ("resolve_weights", "load_weights"):
        monkeypatch.setattr(bb, name, no_file)
    monkeypatch.setattr(wts, "load_torch_file", no_file)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and warns of nothing
        m = bb.DinoVisionTransformer(BackboneConfig(arch="vits14"), seed=0)
    assert m.is_random_init and m.weights_path is None and m.provenance == {"source": "random", "seed": 0}
    with pytest.raises(TypeError, match=r"reads no file\. Use scicevpr.build_backbone\(config, weights=\.\.\.\)"):
        bb.DinoVisionTransformer(BackboneConfig(arch="vits14"), "auto")  # how it was called before


def test_explicit_path_loads_and_missing_path_fails(tmp_path):
    src = _random_small_backbone()
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(src.state_dict(), path)
    m = bb.build_backbone(BackboneConfig(arch="vits14"), weights=path)
    assert not m.is_random_init and m.weights_path == path
    torch.testing.assert_close(m.pos_embed, src.pos_embed)
    with pytest.raises(FileNotFoundError, match="dinov2_vits14_pretrain.pth"):
        bb.build_backbone(BackboneConfig(arch="vits14"), weights=tmp_path / "nope.pth")


def test_weights_of_another_architecture_fail_clearly(tmp_path):
    src = _random_small_backbone()
    path = tmp_path / "small.pth"
    torch.save(src.state_dict(), path)
    with pytest.raises(ValueError, match=r"not a DINOv2 vitb14 state dict.*of another shape") as e:
        bb.build_backbone(BackboneConfig(arch="vitb14"), weights=path)
    assert len(str(e.value)) < 600 and "\n" not in str(e.value)  # a summary, not every key


def test_a_file_that_is_not_a_state_dict_fails_clearly(tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save({"a": torch.zeros(3), "b": torch.ones(2)}, path)
    with pytest.raises(ValueError, match=r"2 unexpected key\(s\), e.g. a, b") as e:
        bb.build_backbone(BackboneConfig(arch="vits14"), weights=path)
    assert len(str(e.value)) < 600
    torch.save({"model_state": {"a": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="does not hold a state dict of tensors.*load_model"):
        bb.build_backbone(BackboneConfig(arch="vits14"), weights=path)


def test_auto_finds_file_in_env_folder(tmp_path, monkeypatch):
    src = _random_small_backbone()
    torch.save(src.state_dict(), tmp_path / "dinov2_vits14_pretrain.pth")
    monkeypatch.setenv("SCICEVPR_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(wts, "_download", _no_network)
    m = bb.build_backbone(BackboneConfig(arch="vits14"), weights="auto")
    assert m.weights_path == tmp_path / "dinov2_vits14_pretrain.pth"


def test_auto_finds_file_in_torch_hub_cache(tmp_path, monkeypatch):
    src = _random_small_backbone()
    (tmp_path / "checkpoints").mkdir()
    torch.save(src.state_dict(), tmp_path / "checkpoints" / "dinov2_vits14_pretrain.pth")
    monkeypatch.delenv("SCICEVPR_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(wts, "_download", _no_network)
    m = bb.build_backbone(BackboneConfig(arch="vits14"), weights="auto")
    assert not m.is_random_init


def _no_network(url, dst, timeout=20.0):
    raise urllib.error.URLError("network unreachable")


def test_auto_offline_fails_with_instructions_and_keeps_no_memory_of_it(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dst, timeout=20.0):
        calls.append(url)
        _no_network(url, dst)

    monkeypatch.setenv("SCICEVPR_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(wts, "_download", fake_download)
    for _ in range(2):
        with pytest.raises(FileNotFoundError) as e:
            wts.resolve_weights("auto", BackboneConfig(arch="vitb14"))
        msg = str(e.value)
        assert "dinov2_vitb14_pretrain.pth" in msg and "SCICEVPR_WEIGHTS" in msg
        assert str(tmp_path / "w") in msg and "weights=None" in msg
    assert len(calls) == 2  # each call tries: no module-level record of the failure
