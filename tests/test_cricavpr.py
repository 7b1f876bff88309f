"""CricaVPR, the cross-image baseline: adapter maths, aggregation, checkpoints, batch dependence."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scicevpr
from scicevpr.backbone import build_backbone
from scicevpr.config import CricaVPRConfig, get_config
from scicevpr.cricavpr import MultiConvAdapter
from scicevpr.pooling import MultiRegionGeM, region_boxes

warnings.filterwarnings("ignore", category=scicevpr.RandomWeightsWarning)

SIZE = 112  # 8 x 8 grid on ViT-S/14: fast on CPU, the same code paths as 224


def make(seed: int = 0, **kw) -> scicevpr.CricaVPR:
    torch.manual_seed(seed)
    return scicevpr.CricaVPR("CricaVPR-S", weights=None, **{"image_size": SIZE, **kw}).eval()


def randomise_adapters(model: scicevpr.CricaVPR, seed: int = 1) -> None:
    """Random values for every adapter parameter and BatchNorm buffer (the training init makes
    the adapters nearly zero, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in model.adapters():
            for name, t in adapter.state_dict().items():
                if name.endswith("num_batches_tracked"):
                    t.fill_(7)
                elif name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def model() -> scicevpr.CricaVPR:
    m = make()
    randomise_adapters(m)
    with torch.no_grad():
        m.pool.p.fill_(2.7)
    return m


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


# ---- configuration ---------------------------------------------------------------------------


def test_presets():
    b, s = get_config("CricaVPR"), get_config("CricaVPR-S")
    assert isinstance(b, CricaVPRConfig) and isinstance(s, CricaVPRConfig)
    assert (b.backbone.arch, b.layers, b.image_size, b.descriptor_dim) == ("vitb14", (11,), 224, 14 * 768)
    assert b.adapter_channels == (384, 192, 24, 96, 24, 96)  # the authors' MulConvAdapter widths
    assert (b.adapter_scale, b.adapter_bn_eps, b.teacher_layers, b.encoder_heads) == (0.2, 1e-3, 2, 16)
    assert (b.encoder_ffn, b.encoder_dropout, b.gem_p) == (2048, 0.1, 3.0)
    assert s.backbone.arch == "vits14" and s.descriptor_dim == 14 * 384
    assert s.adapter_channels == (192, 96, 12, 48, 12, 48)
    assert isinstance(get_config("CricaVPR-S", image_size=SIZE), CricaVPRConfig)


def test_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="mix_dim=384"):
        get_config("CricaVPR", backbone_arch="vits14")
    with pytest.raises(ValueError, match=r"layers=\(11,\)"):
        get_config("CricaVPR", layers=(10, 11))
    with pytest.raises(TypeError, match="CricaVPRConfig"):
        scicevpr.CricaVPR("SciceVPR-S", weights=None)
    with pytest.raises(ValueError, match="cannot share a backbone"):
        scicevpr.CricaVPR("CricaVPR-S", weights=None, backbone=nn.Identity())


# ---- shapes and interface --------------------------------------------------------------------


def test_shapes_unit_norm_and_interface(model, images):
    C, H = 384, SIZE // 14
    with torch.no_grad():
        f = model.extract_features(images[:3])
        r = model.regional_features(f)
        d = model(images[:3])
        torch.testing.assert_close(model.encode(r), d)
        torch.testing.assert_close(model.aggregate(f), d)
    assert f.shape == (3, 1 + H * H, C)
    assert r.shape == (3, 14, C) and r.dtype == torch.float32
    torch.testing.assert_close(r[:, 0], f[:, 0])  # region 0 is the CLS token as it is
    assert d.shape == (3, 14 * C) == (3, model.descriptor_dim)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(3))
    assert isinstance(model, scicevpr.VPRModel) and model.cross_image is True
    assert model.image_size == SIZE and model.is_random_init
    assert model.pool.num_regions == 13
    with pytest.raises(ValueError, match=f"\\(B, 3, {SIZE}, {SIZE}\\)"):
        model(torch.randn(1, 3, 224, 224))


# ---- the adapter block, against a transcription of the formulas -------------------------------


def reference_adapter(a: MultiConvAdapter, h: torch.Tensor, grid: tuple[int, int], training: bool) -> torch.Tensor:
    """adapter(h) = D_fc2( [z_cls ; concat(b1, b2, b3)(map(z_patches))] + z ),  z = ReLU(D_fc1 h).

    Each branch step is conv -> BatchNorm(eps 1e-3) -> ReLU; the token -> map layout is
    written out position by position (row-major patches).
    """
    H, W = grid

    def cbr(m, t):
        t = F.conv2d(t, m.conv.weight, m.conv.bias, padding=m.conv.weight.shape[-1] // 2)
        rm, rv = m.bn.running_mean.clone(), m.bn.running_var.clone()
        t = F.batch_norm(t, rm, rv, m.bn.weight, m.bn.bias, training=training, eps=1e-3)
        return F.relu(t)

    z = F.relu(h @ a.D_fc1.weight.t() + a.D_fc1.bias)  # (B, 1 + HW, C')
    B, _, Ch = z.shape
    zmap = torch.zeros(B, Ch, H, W)
    for i in range(H):
        for j in range(W):
            zmap[:, :, i, j] = z[:, 1 + i * W + j]
    b1 = cbr(a.branch1, zmap)
    b2 = cbr(a.branch2[1], cbr(a.branch2[0], zmap))
    b3 = cbr(a.branch3[1], cbr(a.branch3[0], zmap))
    cat = torch.cat([b1, b2, b3], dim=1)
    out = torch.empty_like(z)
    out[:, 0] = z[:, 0]
    for i in range(H):
        for j in range(W):
            out[:, 1 + i * W + j] = cat[:, :, i, j]
    out = out + z
    return out @ a.D_fc2.weight.t() + a.D_fc2.bias


def reference_block(blk, x: torch.Tensor, grid: tuple[int, int], training: bool) -> torch.Tensor:
    """x <- x + ls1(attn(norm1 x));  x <- x + ls2(mlp(norm2 x) + 0.2 * adapter(norm2 x))."""
    B, N, C = x.shape
    nh = blk.attn.num_heads
    h = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
    q, k, v = (h @ blk.attn.qkv.weight.t() + blk.attn.qkv.bias).split(C, dim=-1)
    q, k, v = (t.reshape(B, N, nh, C // nh).transpose(1, 2) for t in (q, k, v))
    att = ((q @ k.transpose(-1, -2)) / math.sqrt(C // nh)).softmax(-1) @ v
    att = att.transpose(1, 2).reshape(B, N, C) @ blk.attn.proj.weight.t() + blk.attn.proj.bias
    x = x + blk.ls1.gamma * att
    h = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, eps=1e-6)
    mlp = F.gelu(h @ blk.mlp.fc1.weight.t() + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.t() + blk.mlp.fc2.bias
    return x + blk.ls2.gamma * (mlp + 0.2 * reference_adapter(blk.adapter, h, grid, training))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_adapter_block_matches_formula(model, training):
    blk = model.backbone.blocks[3]
    assert blk.adapter_scale == 0.2
    grid = (4, 5)  # not square: rows and columns must not be swapped
    x = torch.randn(3, 1 + 4 * 5, 384, generator=torch.Generator().manual_seed(5))
    expected = reference_block(blk, x, grid, training)
    blk.adapter.train(training)
    state = {k: v.clone() for k, v in blk.adapter.state_dict().items()}
    try:
        with torch.no_grad():
            got = blk(x, grid)
    finally:
        blk.adapter.load_state_dict(state)  # undo the running-stat update of train mode
        blk.adapter.eval()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert (got - x).abs().max() > 1e-2  # the block does something


def test_training_init_switches_adapters_off():
    m = make(seed=4)
    for a in m.adapters():
        assert torch.count_nonzero(a.D_fc2.weight) == 0 and torch.count_nonzero(a.D_fc2.bias) == 0
        convs = [mod for mod in a.modules() if isinstance(mod, nn.Conv2d)]
        assert len(convs) == 5
        for c in convs:
            assert torch.all(c.weight == 1e-5) and torch.all(c.bias == 1e-5)
    plain = build_backbone(m.config.backbone, None).eval()
    plain.load_state_dict({k: v for k, v in m.backbone.state_dict().items() if ".adapter." not in k})
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = plain.get_intermediate_layers(x, [11])[0]
        torch.testing.assert_close(m.extract_features(x), ref)
        randomise_adapters(m)  # control: switched on, the adapters change the tokens
        assert not torch.allclose(m.extract_features(x), ref, atol=1e-3)


# ---- pooling and aggregation, against the authors' forward written out at 16 x 16 ---------------


def test_region_gem_options():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8)
    pool = MultiRegionGeM((8, 8), p=2.5, whole_map=False, normalize_input=True, normalize_output=False)
    xn = x / x.norm(dim=1, keepdim=True)
    expected = [
        xn[:, :, r0:r1, c0:c1].clamp(min=1e-6).pow(2.5).mean(dim=(2, 3)).pow(1 / 2.5)
        for r0, r1, c0, c1 in region_boxes(8, 8)[1:]
    ]
    torch.testing.assert_close(pool(x), torch.stack(expected, dim=1))
    default = MultiRegionGeM((8, 8), p=2.5)
    assert default.num_regions == 14 and pool.num_regions == 13
    torch.testing.assert_close(default(x).norm(dim=-1), torch.ones(2, 14))


def test_aggregate_matches_authors_forward_at_224():
    m = make(seed=6, image_size=224)
    with torch.no_grad():
        m.pool.p.fill_(2.7)
    B, C = 3, 384
    f = torch.randn(B, 1 + 16 * 16, C, generator=torch.Generator().manual_seed(7))

    def agg(t):  # L2Norm over channels -> GeM -> flatten
        t = F.normalize(t, p=2, dim=1)
        return F.avg_pool2d(t.clamp(min=1e-6).pow(2.7), t.shape[-2:]).pow(1 / 2.7)[:, :, 0, 0]

    xp = f[:, 1:].reshape(B, 16, 16, C).permute(0, 3, 1, 2)
    two, three = [(0, 8), (8, 16)], [(0, 5), (5, 11), (11, 16)]
    parts = [f[:, 0]]
    parts += [agg(xp[:, :, r0:r1, c0:c1]) for r0, r1 in two for c0, c1 in two]
    parts += [agg(xp[:, :, r0:r1, c0:c1]) for r0, r1 in three for c0, c1 in three]
    layer = nn.TransformerEncoderLayer(C, 16, 2048, 0.1, activation="gelu", batch_first=False)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    # the authors' encoder is an nn.TransformerEncoder: our "encoder.*" keys must fit it as they are
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in m.official_state_dict().items() if k.startswith("encoder.")})
    with torch.no_grad():
        expected = F.normalize(encoder(torch.stack(parts, dim=1)).reshape(B, 14 * C), p=2, dim=-1)
        torch.testing.assert_close(m.aggregate(f), expected, atol=1e-5, rtol=1e-4)


# ---- batch dependence ----------------------------------------------------------------------------


def test_descriptors_depend_on_batch_composition(model, images):
    with torch.no_grad():
        full = model(images)
        again = model(images)
        first_two = model(images[:2])
        perm = torch.tensor([5, 4, 3, 2, 1, 0])
        shuffled = model(images[perm])[perm.argsort()]
        pairs = torch.cat([model(images[i : i + 2]) for i in range(0, 6, 2)])
    torch.testing.assert_close(again, full)  # deterministic for the same batch
    assert (full[:2] - first_two).abs().max() > 1e-3  # batch size changes descriptors
    assert (full - pairs).abs().max() > 1e-3  # so does which images share a batch
    # The encoder has no position encoding: reordering *within* a batch only reorders the
    # output. Shuffling a test set changes results because it regroups the images.
    torch.testing.assert_close(shuffled, full, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # everything before the encoder is per image (BatchNorm in eval mode)
        r_all = model.regional_features(model.extract_features(images))
        r_two = model.regional_features(model.extract_features(images[:2]))
        torch.testing.assert_close(r_two, r_all[:2], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode(r_all[:2]), first_two, atol=1e-5, rtol=1e-4)


# ---- what trains -----------------------------------------------------------------------------------


def test_only_adapters_gem_and_encoder_train():
    m = make(seed=8)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    pattern = re.compile(r"^(backbone\.blocks\.\d+\.adapter\..+|pool\.p|encoder\.layers\.\d+\..+)$")
    assert trainable and all(pattern.match(n) for n in trainable)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert not any(pattern.match(n) for n in frozen)
    assert "pool.p" in trainable and any(n.startswith("encoder.") for n in trainable)
    assert sum(".adapter." in n for n in trainable) == 12 * 24  # (weight, bias) of 2 linears, 5 convs, 5 BNs

    m.train()
    loss = m(torch.randn(4, 3, SIZE, SIZE)).pow(2).sum(dim=0).mean() + m(torch.randn(4, 3, SIZE, SIZE))[:, 0].sum()
    loss.backward()
    for a in m.adapters():
        assert a.D_fc2.weight.grad is not None and a.D_fc2.weight.grad.abs().sum() > 0
    assert m.pool.p.grad is not None
    assert all(p.grad is None for n, p in m.named_parameters() if n in frozen)


def test_train_mode_keeps_dinov2_in_eval():
    m = make(seed=9)
    m.train()
    assert m.training and m.encoder.training
    assert not m.backbone.training and not m.backbone.blocks[0].attn.training
    assert all(a.training and a.branch2[1].bn.training for a in m.adapters())
    dino_before = {k: v.clone() for k, v in m.backbone.state_dict().items() if ".adapter." not in k}
    bn = m.adapters()[5].branch3[0].bn
    before = bn.running_mean.clone()
    with torch.no_grad():
        m(torch.randn(3, 3, SIZE, SIZE))
    assert not torch.equal(bn.running_mean, before)  # adapters' BatchNorm trains
    for k, v in m.backbone.state_dict().items():
        if ".adapter." not in k:
            assert torch.equal(v, dino_before[k]), k
    m.eval()
    assert not any(mod.training for mod in m.modules())


def _training_step(checkpointing: bool, images: torch.Tensor) -> dict:
    """One L_MS step of CricaVPR-S in training mode (adapters randomised, BatchNorms on batch
    statistics): what it computed, and the bytes its autograd graph kept."""
    from scicevpr.config import LossConfig
    from scicevpr.losses import MultiSimilarityLoss

    m = make()
    randomise_adapters(m)
    m.train().set_activation_checkpointing(checkpointing)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    labels = torch.arange(len(images) // 2).repeat_interleave(2)  # (B,) two images per place
    torch.manual_seed(5)  # the encoder's dropout
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        d = m(images)  # (B, 14 * C)
    loss = MultiSimilarityLoss(LossConfig())(d, labels)
    loss.backward()
    return {"descriptors": d.detach(), "loss": loss.detach(), "saved_bytes": saved[0],
            "grads": {n: p.grad for n, p in m.named_parameters() if p.requires_grad},
            "buffers": {n: b.clone() for n, b in m.named_buffers()}}


def test_activation_checkpointing_gives_the_same_step_in_a_fraction_of_the_memory(images):
    """Checkpointing the backbone's blocks (the adapters train inside them) changes nothing the
    step computes: descriptors, loss, every gradient and the BatchNorms' running statistics
    (updated once, not again by the recomputation) are bit-identical; the graph keeps a
    fraction of the activations."""
    x = torch.cat([images, images.flip(0)])[:8]  # 8 images, 4 places
    plain, ckpt = _training_step(False, x), _training_step(True, x)
    assert torch.equal(plain["descriptors"], ckpt["descriptors"])
    assert torch.equal(plain["loss"], ckpt["loss"]) and plain["loss"] > 0
    assert plain["grads"].keys() == ckpt["grads"].keys()
    assert all(torch.equal(plain["grads"][k], ckpt["grads"][k]) for k in plain["grads"]), "gradients differ"
    assert any(plain["grads"][k].abs().sum() > 0 for k in plain["grads"] if ".adapter." in k)
    stats = [k for k in plain["buffers"] if "running_mean" in k]
    assert stats and all(torch.equal(plain["buffers"][k], ckpt["buffers"][k]) for k in plain["buffers"]), \
        "the recomputation updated the BatchNorm statistics a second time"
    assert ckpt["saved_bytes"] < plain["saved_bytes"] / 4


# ---- the authors' checkpoint format --------------------------------------------------------------


def authors_keys(depth: int = 12, encoder_layers: int = 2) -> set[str]:
    """Every key of the authors' CricaVPR state dict, written out from their code's layout."""
    keys = {"backbone.cls_token", "backbone.pos_embed", "backbone.mask_token",
            "backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias",
            "backbone.norm.weight", "backbone.norm.bias", "aggregation.1.p"}
    wb = ("weight", "bias")
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for i in range(depth):
        p = f"backbone.blocks.{i}."
        for mod in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"{p}{mod}.{s}" for s in wb}
        keys |= {f"{p}ls1.gamma", f"{p}ls2.gamma"}
        for conv in ("branch1", "branch2.0", "branch2.1", "branch3.0", "branch3.1"):
            keys |= {f"{p}adapter.{conv}.conv.{s}" for s in wb}
            keys |= {f"{p}adapter.{conv}.bn.{s}" for s in bn}
        keys |= {f"{p}adapter.D_fc{j}.{s}" for j in (1, 2) for s in wb}
    for i in range(encoder_layers):
        p = f"encoder.layers.{i}."
        keys |= {p + "self_attn.in_proj_weight", p + "self_attn.in_proj_bias"}
        for mod in ("self_attn.out_proj", "linear1", "linear2", "norm1", "norm2"):
            keys |= {f"{p}{mod}.{s}" for s in wb}
    return keys


@pytest.mark.parametrize("layout", ["dataparallel_checkpoint", "bare_state_dict"])
def test_round_trip_in_authors_layout(model, images, tmp_path, layout):
    official = model.official_state_dict()
    assert set(official) == authors_keys()
    if layout == "dataparallel_checkpoint":  # what the authors' train.py saves and hubconf loads
        obj = {"epoch_num": 3, "model_state_dict": {"module." + k: v for k, v in official.items()},
               "optimizer_state_dict": {}, "recalls": [0.0], "best_r5": 0.0, "not_improved_num": 0}
    else:
        obj = dict(official)
    path = tmp_path / "CricaVPR.pth"
    torch.save(obj, path)
    fresh = make(seed=10)
    assert fresh.is_random_init
    fresh.load_official(path)
    assert not fresh.is_random_init
    assert fresh.pool.p.item() == pytest.approx(2.7)
    torch.testing.assert_close(fresh.backbone.blocks[7].adapter.branch2[1].bn.running_var,
                               official["backbone.blocks.7.adapter.branch2.1.bn.running_var"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), model(images))


def test_loading_a_scicevpr_checkpoint_fails_clearly():
    torch.manual_seed(0)
    teacher = scicevpr.SuperCricaVPR("SciceVPR-S", weights=None, image_size=SIZE)
    m = make(seed=11)
    with pytest.raises(ValueError) as e:
        m.load_official(teacher.official_state_dict())
    msg = str(e.value)
    assert "missing keys" in msg and "unexpected keys" in msg
    assert "backbone.blocks.0.adapter.D_fc1.weight" in msg or "backbone.blocks.0.adapter" in msg
    assert "backbone.dino_model." in msg and "SuperCricaVPR" in msg


def test_load_lists_missing_unexpected_and_wrong_shapes(model):
    m = make(seed=12)
    state = dict(model.official_state_dict())
    state.pop("aggregation.1.p")
    state["aggregation.2.weight"] = torch.zeros(512, 5376)  # a checkpoint with an fc head
    with pytest.raises(ValueError, match=r"(?s)missing keys \(1\): aggregation\.1\.p.*unexpected keys \(1\): aggregation\.2\.weight"):
        m.load_official(state)
    state = dict(model.official_state_dict())
    state["backbone.blocks.0.adapter.D_fc1.weight"] = torch.zeros(384, 768)  # a ViT-B adapter
    with pytest.raises(ValueError, match="does not fit CricaVPR-S"):
        m.load_official(state)
    assert m.is_random_init


def test_batch_stability_sweep_runs_cricavpr(tiny_benchmark):
    """CricaVPR goes through the same stability sweep as the other models, and moves with the batch."""
    from scicevpr.data.vg import load_vg_split
    from scicevpr.config import EvalConfig
    from scicevpr.stability import batch_stability

    torch.manual_seed(0)
    crica = scicevpr.CricaVPR("CricaVPR-S", weights=None, image_size=56).eval()
    split = load_vg_split(tiny_benchmark.vg_root, tiny_benchmark.dataset, "test")
    table = batch_stability(crica, split, query_batch_sizes=(1, 4), num_orders=2,
                            config=EvalConfig(num_workers=0, progress=False), name="CricaVPR")
    assert len(table) == 4 and set(table["model"]) == {"CricaVPR"}
    assert table["max_abs_change"].max() > 1e-4


# ---- the controls of the claims table: without the CLS region, without adapters ----------------


def test_without_class_token_pools_the_13_regions_alone(images):
    full = make(seed=11)
    randomise_adapters(full)
    plain = make(seed=11, class_token=False)
    assert plain.config.num_regions == 13 and plain.descriptor_dim == 13 * 384
    plain.load_state_dict(full.state_dict())  # the same parameters: only the region list differs
    with torch.no_grad():
        f = full.extract_features(images[:3])
        r_full, r = full.regional_features(f), plain.regional_features(f)
        d = plain(images[:3])
    assert r.shape == (3, 13, 384)
    torch.testing.assert_close(r, r_full[:, 1:])  # the 13 GeM regions, the CLS row left out
    assert d.shape == (3, 13 * 384) == (3, plain.descriptor_dim)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(3))


def test_without_adapters_the_backbone_is_dinov2_frozen_and_unchanged(images):
    m = make(seed=12, adapters=False)
    assert m.adapters() == [] and all(b.adapter is None for b in m.backbone.blocks)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n == "pool.p" or n.startswith("encoder.") for n in trainable)
    plain = build_backbone(m.config.backbone, None).eval()
    plain.load_state_dict(m.backbone.state_dict())  # no adapter key: strict load works
    with torch.no_grad():
        torch.testing.assert_close(m.extract_features(images[:2]), plain.get_intermediate_layers(images[:2], [11])[0])
    m.train()
    m(images[:4]).pow(2).sum(dim=0).mean().backward()
    assert m.pool.p.grad is not None
    assert all(p.grad is None for p in m.backbone.parameters())  # nothing trains inside the backbone


def test_control_switches_survive_a_checkpoint(tmp_path):
    from scicevpr.checkpoint import load_model, save_checkpoint

    m = make(seed=13, class_token=False, adapters=False)
    path = save_checkpoint(tmp_path / "m.pt", m, meta={}) or tmp_path / "m.pt"
    back = load_model(path)
    assert back.config.class_token is False and back.config.adapters is False
    assert back.descriptor_dim == 13 * 384 and back.adapters() == []
