"""Pretraining the compact backbone (scicevpr.offline.pretrain, its augment and objectives modules):
objectives, resume, time budget, export, the weight file's manifest, the command line, and the
pretraining data's disjointness.

Runs on the ``tiny`` synthetic benchmark with a one-block ViT-S/14 at 56 px (28 px local crops)
and a small DINO head, so that a step takes a few hundredths of a second on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scicevpr
from scicevpr.backbone import DinoVisionTransformer, build_backbone
from scicevpr.cli import main
from scicevpr.config import BackboneConfig, get_config
from scicevpr.offline.synthetic import PRESETS, build_plan
from scicevpr.data.transforms import normalize_uint8_batch, normalize_unit
from scicevpr.files import holds_files, save_torch_file
from scicevpr.offline.augment import CropSpec, MultiCropAugment, random_masks, view_specs
from scicevpr.offline.config import OFFLINE_BACKBONE, PretrainConfig
from scicevpr.offline.objectives import dino_losses, koleo_loss
from scicevpr.offline.pretrain import export_backbone, pretrain, read_pretrain_checkpoint, schedule
from scicevpr.weights import PACKAGE_WEIGHTS_DIR, check_manifest, file_sha256, manifest_path

TINY = dict(num_blocks=1, image_size=56, local_size=28, local_crops=2, head_hidden=64, head_bottleneck=32,
            prototypes=128, batch_size=8, cache_size=64, num_workers=0, device="cpu", progress=False, log_every=1)


def tiny_config(bench, run_dir, **overrides) -> PretrainConfig:
    return PretrainConfig(**{**TINY, "data": str(bench.root), "run_dir": str(run_dir), **overrides})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: two busy-waiting OpenMP threads on a loaded 2-core machine are slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dino_run(tiny_benchmark, tmp_path_factory):
    """DINO + iBOT + KoLeo for 16 steps at a fixed teacher temperature (a stationary objective)."""
    config = tiny_config(tiny_benchmark, tmp_path_factory.mktemp("runs") / "dino", steps=16, lr=2e-3,
                         teacher_temp_warmup_fraction=0.0)
    return config, pretrain(config)


def _early_late(history, column: str) -> tuple[float, float]:
    values = history[column].dropna().to_numpy()  # rows of a retrieval check alone hold no loss
    return float(values[:3].mean()), float(values[-3:].mean())


# --------------------------------------------------------------------------------------------
# Configuration and schedules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (dict(objective="mae"), "objective='mae'"),
    (dict(image_size=100), "multiple of the patch size 14"),
    (dict(local_size=30), "local_size=30"),
    (dict(global_scale=(0.5, 1.5)), "global_scale"),
    (dict(steps=None), "give max_minutes"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(objective="supervised", batch_size=10), "multiple of img_per_place"),
    (dict(objective="supervised", img_per_place=1), "img_per_place"),
    (dict(pooling="max"), "pooling='max'"),
    (dict(num_blocks=13), "num_blocks=13"),
    (dict(momentum=0.999, momentum_end=0.99), "momentum"),
    (dict(max_minutes=0), "max_minutes"),
    (dict(seed=-1), "seed must be an int >= 0"),
])
def test_config_errors_say_what_to_do(bad, match):
    with pytest.raises(ValueError, match=match):
        PretrainConfig(**bad)


def test_defaults_build_the_offline_backbone():
    config = PretrainConfig()
    assert config.backbone_config() == OFFLINE_BACKBONE
    assert config.objective == "dino" and config.image_size == 112 and config.local_size == 56
    with torch.device("meta"):
        model = DinoVisionTransformer(OFFLINE_BACKBONE)
    n = sum(p.numel() for p in model.parameters())
    assert 2 * n <= 16e6  # the fp16 file stays within 16 MB
    assert len(model.blocks) == 4 and model.pos_embed.shape == (1, 1 + 8 * 8, 384)



def test_every_objective_has_the_losses_of_its_step():
    from scicevpr.offline.config import OBJECTIVES
    from scicevpr.offline.objectives import STEP_LOSSES

    assert sorted(STEP_LOSSES) == sorted(OBJECTIVES)

def test_schedules_warm_up_then_follow_their_cosines():
    c = PretrainConfig(lr=1e-3, min_lr=1e-6, warmup_fraction=0.1, teacher_temp_warmup_fraction=0.5)
    s = [schedule(c, i, 100) for i in range(101)]
    assert s[0]["lr"] == pytest.approx(1e-4) and s[9]["lr"] == pytest.approx(1e-3)
    assert s[100]["lr"] == pytest.approx(1e-6) and all(a["lr"] >= b["lr"] for a, b in zip(s[10:], s[11:]))
    assert s[0]["teacher_temp"] == pytest.approx(0.04) and s[50]["teacher_temp"] == pytest.approx(0.07)
    assert s[0]["momentum"] == pytest.approx(0.992) and s[100]["momentum"] == pytest.approx(1.0)
    assert s[0]["weight_decay"] == pytest.approx(0.04) and s[100]["weight_decay"] == pytest.approx(0.4)


def test_augmentations_and_masks_have_the_asked_shapes_and_are_reproducible():
    x = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    spec = CropSpec(28, (0.2, 1.0), blur=0.5, solarize=0.5)

    def views(seed):
        g = torch.Generator().manual_seed(seed)
        return MultiCropAugment.apply(x, MultiCropAugment.params(g, 5, spec), spec)

    a, b = views(0), views(0)
    assert a.shape == (5, 3, 28, 28) and torch.equal(a, b) and not torch.equal(a, views(1))
    m = random_masks(torch.Generator().manual_seed(0), 400, 16, 0.5, (0.25, 0.5))
    per_crop = m.sum(1)
    assert m.shape == (400, 16) and 0.4 < (per_crop > 0).float().mean() < 0.6
    assert per_crop[per_crop > 0].min() >= 4 and per_crop.max() <= 8


def test_ibot_loss_averaged_over_ranks_is_the_one_process_loss():
    """DDP averages the ranks' losses: with the global count of masked crops, the mean over 2
    ranks is the one-process L_iBOT, also when the ranks hold different numbers of masked crops."""
    g = torch.Generator().manual_seed(0)
    n, hw, k = 4, 16, 32  # images, patches per crop, prototypes
    masks = torch.zeros(2, n, hw, dtype=torch.bool)  # (view, image, patch); rank 0 takes images 0-1
    masks[0, 0, :5] = masks[1, 1, 3:12] = masks[0, 2, 7:9] = True  # rank 0: 2 masked crops, rank 1: 1
    s_patches, t_patches = torch.randn(2, n, hw, k, generator=g), torch.randn(2, n, hw, k, generator=g)
    s_cls, t_cls = torch.randn(2, n, k, generator=g), torch.randn(2, n, k, generator=g)
    centers = torch.zeros(k), torch.zeros(k)

    def loss(images: slice, **ddp) -> torch.Tensor:
        m = masks[:, images].reshape(-1, hw)  # (2b, HW), view-major as in a step
        rows = lambda x: x[:, images].reshape(-1, *x.shape[2:])  # noqa: E731
        return dino_losses(rows(s_cls), None, rows(s_patches)[m], rows(t_cls), rows(t_patches)[m], m, *centers,
                           0.1, 0.04, **ddp)[1]

    one = loss(slice(0, n))
    ranks = [loss(slice(r * 2, r * 2 + 2), masked_crops=3, world_size=2) for r in (0, 1)]
    assert torch.allclose((ranks[0] + ranks[1]) / 2, one, rtol=1e-6)
    own = [loss(slice(r * 2, r * 2 + 2)) for r in (0, 1)]  # each rank averaging over its own crops
    assert not torch.allclose((own[0] + own[1]) / 2, one, rtol=1e-3)


@pytest.mark.parametrize("spread", [1.0, 1e-2, 1e-3])
def test_koleo_is_exact_for_nearly_equal_features(spread):
    """KoLeo against a float64 computation from the differences, for 64 features around one
    direction: the smaller the spread, the more a matrix-product distance would lose."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 384, generator=g) + spread * torch.randn(64, 384, generator=g)  # (64, 384)
    z = F.normalize(x.double(), dim=-1)
    d = (z[:, None] - z[None]).norm(dim=-1) + torch.eye(64, dtype=torch.float64) * 1e4  # (64, 64)
    expected = -torch.log(d.min(dim=1).values + 1e-8).mean()
    assert koleo_loss(x).item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("colour_augment", [True, False])
def test_colour_augment_false_keeps_every_views_colours(colour_augment):
    from scicevpr.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    x = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 200, 60, 30  # one flat orange: crops, flips and blur leave it as it is
    colour = torch.tensor([200, 60, 30]) / 255.0
    globals_, local, supervised = view_specs(PretrainConfig(colour_augment=colour_augment, image_size=28, local_size=14))
    g = torch.Generator().manual_seed(0)
    for spec in (*globals_, local, supervised):
        v = MultiCropAugment.apply(x, MultiCropAugment.params(g, 64, spec), spec)  # (64, 3, s, s) normalised
        rgb = v * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        changed = (rgb - colour.view(1, 3, 1, 1)).abs().amax(dim=(1, 2, 3)) > 1e-3  # (64,) views whose colour moved
        if colour_augment:
            assert 0.5 < changed.float().mean() < 1.0  # jitter 0.8 (and grey), not every view
        else:
            assert not changed.any()


# --------------------------------------------------------------------------------------------
# Both objectives learn
# --------------------------------------------------------------------------------------------


def test_dino_steps_lower_the_loss(dino_run):
    config, result = dino_run
    h = result.history
    assert list(h["step"]) == list(range(1, 17)) and result.stopped == "done"
    early, late = _early_late(h, "loss")
    assert late < early
    for col in ("lr", "momentum", "teacher_temp", "images_per_s", "loss_dino", "loss_ibot", "loss_koleo"):
        assert h[col].notna().all(), col
    assert not result.backbone.is_random_init


@pytest.mark.parametrize("pooling", ["gem", "regions", "grid"])
def test_supervised_steps_lower_the_loss(tiny_benchmark, tmp_path, pooling):
    config = tiny_config(tiny_benchmark, tmp_path / "sup", objective="supervised", batch_size=8, img_per_place=4,
                         steps=16, lr=2e-3, pooling=pooling)
    h = pretrain(config).history
    early, late = _early_late(h, "loss_ms")
    assert late < early


def _student(bench, tmp_path, **overrides):
    """A seeded tiny student, its config and a random input batch (2, 3, S, S)."""
    from scicevpr.offline.objectives import Student

    torch.manual_seed(0)
    config = tiny_config(bench, tmp_path / "run", **overrides)
    return Student(config).eval(), config, torch.rand(2, 3, config.image_size, config.image_size)


def test_regions_pooling_keeps_where_features_lie(tiny_benchmark, tmp_path):
    student, config, x = _student(tiny_benchmark, tmp_path, objective="supervised", pooling="regions")
    with torch.no_grad():
        d = student(x)
        C = student.backbone.embed_dim
        assert d.shape == (2, 14 * C) and torch.allclose(d.norm(dim=1), torch.ones(2))
        # the same regional features in another order (left and right 2 x 2 regions swapped) are another descriptor
        regions = d.reshape(2, 14, C)
        assert not torch.allclose(regions[:, 1:5], regions[:, [2, 1, 4, 3]])
        student.pooling = "gem"
        assert torch.allclose(student(x), F.normalize(regions[:, 0], dim=1), atol=1e-5)  # region 0: the whole map


def test_grid_pooling_is_a_projection_of_the_2x4_cell_means(tiny_benchmark, tmp_path):
    student, config, x = _student(tiny_benchmark, tmp_path, objective="supervised", pooling="grid")
    with torch.no_grad():
        d = student(x)
        t = student.tokens(x)[:, 1:]  # (2, HW, C), row-major
        C, g = t.shape[-1], config.image_size // student.backbone.patch_size
        grid = t.reshape(2, g, g, C)
        h, w = g // 2, g // 4
        cells = [grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w].mean((1, 2)) for r in range(2) for c in range(4)]
        expected = F.normalize(student.grid_proj(torch.stack(cells, 2).flatten(1)), dim=1)  # (2, C, 8) -> (2, 8 C)
    assert d.shape == (2, 512)
    torch.testing.assert_close(d, expected, atol=1e-5, rtol=1e-4)
    assert "grid_proj.weight" in student.state_dict() and not any("grid_proj" in k for k in student.backbone.state_dict())


# --------------------------------------------------------------------------------------------
# Distillation from a convolutional network
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    """A LayoutCNN state dict (seeded random weights: a teacher is a fixed function either way)."""
    from scicevpr.offline.objectives import LayoutCNN

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cnn") / "cnn.pt"
    save_torch_file(LayoutCNN().state_dict(), path)
    return path


def test_layout_cnn_keeps_where_features_lie():
    from scicevpr.offline.objectives import LayoutCNN

    torch.manual_seed(0)
    net = LayoutCNN().eval()
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d = net(x)
        assert d.shape == (3, 512) and torch.allclose(d.norm(dim=1), torch.ones(3), atol=1e-5)
        assert net.feature_map(x).shape == (3, 256, 8, 8)  # stride 8
        torch.testing.assert_close(net(x.float() / 255), d)  # uint8 or floats in [0, 1]
        # a bright right half and a bright left half: the same pixels, another layout, another descriptor
        right = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
        right[..., 32:] = 255
        a, b = (F.adaptive_avg_pool2d(net.feature_map(v), net.layout) for v in (right, right.flip(-1)))  # (1, 256, 2, 4)
    cos = lambda u, v: F.cosine_similarity(u.flatten(1), v.flatten(1)).item()  # noqa: E731
    assert cos(a, b) < 0.9 and cos(a.mean((2, 3)), b.mean((2, 3))) > 0.98  # a global mean would barely tell them apart


def test_distil_losses_are_one_minus_cosines_cell_by_cell():
    from scicevpr.offline.objectives import distil_losses

    torch.manual_seed(0)
    f, d = torch.randn(3, 256, 4, 4), torch.randn(3, 512)
    l_dense, l_cls = distil_losses(2.5 * f, 3 * d, f, d)  # the same directions at other scales
    assert float(l_dense) == pytest.approx(0, abs=1e-6) and float(l_cls) == pytest.approx(0, abs=1e-6)
    l_dense, l_cls = distil_losses(-f, -d, f, d)
    assert float(l_dense) == pytest.approx(2) and float(l_cls) == pytest.approx(2)
    moved = f.clone()
    moved[0, :, 1, 2] = torch.roll(f[0, :, 1, 2], 1)  # one cell of one image points elsewhere
    expected = (1 - F.cosine_similarity(moved[0, :, 1, 2], f[0, :, 1, 2], dim=0)) / (3 * 16)
    assert float(distil_losses(moved, d, f, d)[0]) == pytest.approx(float(expected), rel=1e-5)


def test_distil_targets_keep_what_tells_images_and_cells_apart():
    from scicevpr.offline.objectives import distil_targets

    torch.manual_seed(0)
    f, d = torch.rand(6, 256, 8, 8), torch.randn(6, 512)
    tf, td = distil_targets(f, d, grid=8)
    torch.testing.assert_close(tf.mean(dim=(0, 2, 3)), torch.zeros(256), atol=1e-5, rtol=0)
    torch.testing.assert_close(tf.std(dim=(0, 2, 3)), torch.ones(256), atol=1e-4, rtol=0)
    torch.testing.assert_close(td.mean(dim=0), torch.zeros(512), atol=1e-5, rtol=0)
    shifted = distil_targets(3 * f + torch.rand(1, 256, 1, 1), d + torch.randn(1, 512), grid=8)  # what all share moves
    torch.testing.assert_close(shifted[0], tf, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shifted[1], td, atol=1e-4, rtol=1e-4)
    coarse, _ = distil_targets(f, d, grid=4)  # a finer map is averaged onto the ViT's grid first
    torch.testing.assert_close(coarse, distil_targets(F.avg_pool2d(f, 2), d, grid=4)[0])


def test_distil_student_carries_patch_tokens_to_the_map_in_row_major_order(tiny_benchmark, tmp_path, cnn_file):
    student, config, x = _student(tiny_benchmark, tmp_path, objective="distil", distil_teacher=str(cnn_file))
    with torch.no_grad():
        dense, cls = student(x)
        t = student.tokens(x)  # (2, 1 + HW, C)
    g = config.image_size // student.backbone.patch_size
    assert dense.shape == (2, 256, g, g) and cls.shape == (2, 512)
    torch.testing.assert_close(dense[1, :, 0, g - 1], student.dense_proj(t[1, g]))  # row 0, last column = token g
    torch.testing.assert_close(student.describe(t), F.normalize(cls, dim=1))
    assert {"dense_proj.weight", "cls_proj.weight"} <= set(student.state_dict())
    assert not any(k.startswith(("dense_proj", "cls_proj")) for k in student.backbone.state_dict())


def test_distil_lowers_its_losses_monitors_its_descriptor_and_exports_the_vit(tiny_benchmark, tmp_path, cnn_file):
    config = tiny_config(tiny_benchmark, tmp_path / "distil", objective="distil", distil_teacher=str(cnn_file),
                         distil_size=32, steps=16, lr=2e-3, val_root=str(tiny_benchmark.vg_root), val_every=16)
    result = pretrain(config)
    h = result.history
    for column in ("loss_dense", "loss_cls"):
        early, late = _early_late(h, column)
        assert late < early, column
    assert h.loc[h["step"].isin([0, 16]), ["R@1_desc", "R@5_desc"]].notna().all().all()
    assert h["loss_ms"].isna().all() and h["momentum"].isna().all()
    out = export_backbone(result.run_dir, tmp_path / "distil.pth")
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["objective"] == "distil" and manifest["model"] == "student"
    assert "distilled from a small CNN" in manifest["description"]
    assert manifest["distil_teacher"] == {"file": cnn_file.name, "sha256": file_sha256(cnn_file)}
    build_backbone(BackboneConfig(**manifest["backbone"]), weights=str(out))  # strict names: no heads


def test_distil_from_a_vit_teaches_the_patch_tokens_alone(dino_run, tiny_benchmark, tmp_path):
    """A backbone file as the teacher: the student's patch tokens learn its patch tokens, cell for
    cell; no token has a place objective (no W_c, no L_cls), and the export says so."""
    from scicevpr.offline.objectives import ViTMapTeacher, load_teacher

    teacher_file = export_backbone(dino_run[1].run_dir, tmp_path / "teacher.pth")
    size = TINY["image_size"]
    with pytest.raises(ValueError, match="no place descriptor"):  # a ViT has no descriptor for the CLS token
        load_teacher(teacher_file, tiny_config(tiny_benchmark, tmp_path / "a", objective="distil",
                                                distil_teacher=str(teacher_file), distil_size=size))
    with pytest.raises(ValueError, match=f"distil_size={size}"):  # it sees the student's crop
        load_teacher(teacher_file, tiny_config(tiny_benchmark, tmp_path / "b", objective="distil", distil_size=8,
                                                distil_teacher=str(teacher_file), distil_class_token=False))
    config = tiny_config(tiny_benchmark, tmp_path / "distil", objective="distil", distil_teacher=str(teacher_file),
                         distil_size=size, distil_class_token=False, steps=16, lr=2e-3,
                         val_root=str(tiny_benchmark.vg_root), val_every=16)
    net, record = load_teacher(teacher_file, config)
    assert isinstance(net, ViTMapTeacher) and record["kind"] == "vit" and record["sha256"] == file_sha256(teacher_file)
    x = torch.rand(2, 3, size, size)
    g = size // net.backbone.patch_size
    t = net.backbone.get_intermediate_layers(normalize_unit(x), [len(net.backbone.blocks) - 1])[0]  # (2, 1 + g*g, C)
    f = net.feature_map(x)
    assert f.shape == (2, net.channels, g, g)
    torch.testing.assert_close(f[1, :, 0, g - 1], t[1, g])  # row 0, last column = patch token g (token 0 is CLS)
    torch.testing.assert_close(net.feature_map((x * 255).round().to(torch.uint8)),
                               net.feature_map((x * 255).round() / 255))  # uint8 in as [0, 1] floats
    result = pretrain(config)
    h = result.history
    early, late = _early_late(h, "loss_dense")
    assert late < early
    assert "loss_cls" not in h or h["loss_cls"].isna().all()
    assert h.loc[h["step"].isin([0, 16]), ["R@1", "R@1_cls"]].notna().all().all()  # the patch mean and CLS monitored
    state = read_pretrain_checkpoint(result.last_path)["student"]
    assert "dense_proj.weight" in state and state["dense_proj.weight"].shape[0] == net.channels
    assert not any(k.startswith("cls_proj") for k in state)
    manifest = json.loads(manifest_path(export_backbone(result.run_dir, tmp_path / "vit.pth")).read_text())
    assert "no objective on the CLS token" in manifest["description"] and "no CLS objective" in manifest["label"]
    assert manifest["distil_teacher"]["kind"] == "vit" and manifest["distil_teacher"]["file"] == "teacher.pth"
    assert manifest["config"]["distil_class_token"] is False


def test_distil_needs_a_trained_network(tiny_benchmark, tmp_path, capsys):
    from scicevpr.offline.objectives import LayoutCNN

    with pytest.raises(ValueError, match="distil_teacher"):
        tiny_config(tiny_benchmark, tmp_path / "a", objective="distil")
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_config(tiny_benchmark, tmp_path / "b", objective="distil", distil_teacher="x.pt", distil_size=30)
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not the state dict of a LayoutCNN"):
        LayoutCNN.load(other)
    rc = main(["pretrain-backbone", "--objective", "distil", "--data", str(tiny_benchmark.root),
               "--run-dir", str(tmp_path / "c"), "--quiet"])
    assert rc == 2 and "distil_teacher" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------------
# objective="cnn": the teacher of the distillation, trained by the same tool
# --------------------------------------------------------------------------------------------


def _cnn_config(bench, run_dir, **overrides) -> PretrainConfig:
    """The shipped teacher's recipe (``scicevpr/weights/README.md``) at 32 px, P = 4 places a step."""
    recipe = dict(objective="cnn", distil_size=32, batch_size=16, img_per_place=4, lr=1e-3, min_lr=0.0, weight_decay=1e-4,
                  weight_decay_end=1e-4, clip_grad=0.0, supervised_scale=(0.6, 1.0), colour_augment=False, steps=16)
    return tiny_config(bench, run_dir, **{**recipe, **overrides})


@pytest.fixture(scope="module")
def cnn_run(tiny_benchmark, tmp_path_factory):
    """A LayoutCNN trained with L_MS for 16 steps at 32 px, monitored on the val split."""
    config = _cnn_config(tiny_benchmark, tmp_path_factory.mktemp("runs") / "cnn", val_root=str(tiny_benchmark.vg_root),
                         val_every=16)
    return config, pretrain(config)


def test_cnn_objective_lowers_L_MS_and_monitors_the_networks_descriptor(cnn_run):
    from scicevpr.offline.objectives import LayoutCNN

    config, result = cnn_run
    h = result.history
    early, late = _early_late(h, "loss_ms")
    assert late < early
    assert h.loc[h["step"].isin([0, 16]), ["R@1_desc", "R@5_desc"]].notna().all().all()
    assert h["R@1"].isna().all() and h["loss_dense"].isna().all()  # no ViT tokens, no distillation
    assert isinstance(result.backbone, LayoutCNN) and not result.backbone.training
    ckpt = read_pretrain_checkpoint(result.last_path)
    assert ckpt["backbone_config"] is None and ckpt["teacher"] is None
    with torch.no_grad():  # the network trained is not its initialisation
        torch.manual_seed(config.seed)
        assert not torch.equal(LayoutCNN().state_dict()["proj.weight"], ckpt["student"]["proj.weight"])


def test_cnn_resume_gives_the_same_network_as_an_uninterrupted_run(tiny_benchmark, tmp_path):
    straight = pretrain(_cnn_config(tiny_benchmark, tmp_path / "straight", steps=4))
    pretrain(_cnn_config(tiny_benchmark, tmp_path / "resumed", steps=4, stop_at_step=2))
    resumed = pretrain(_cnn_config(tiny_benchmark, tmp_path / "resumed", steps=4, resume=True))
    a, b = read_pretrain_checkpoint(straight.last_path), read_pretrain_checkpoint(resumed.last_path)
    assert a["step"] == b["step"] == 4 and len(b["sessions"]) == 2
    for k in a["student"]:  # batch norm's running statistics included
        assert torch.equal(a["student"][k], b["student"][k]), k
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    assert straight.history[["step", "loss", "lr"]].equals(resumed.history[["step", "loss", "lr"]])


def test_cnn_export_is_the_distil_teacher_and_the_vit_manifest_records_it_as_read(cnn_run, tiny_benchmark, tmp_path):
    from scicevpr.offline.objectives import LayoutCNN

    config, result = cnn_run
    out = export_backbone(result.run_dir, tmp_path)
    assert out.name == "layout_cnn_32px.pt"
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["sha256"] == file_sha256(out) and manifest["objective"] == "cnn" and manifest["steps"] == 16
    assert manifest["image_size"] == 32 and manifest["data"]["images"] > 0
    net, ckpt = LayoutCNN.load(out), read_pretrain_checkpoint(result.last_path)
    for k, v in net.state_dict().items():
        assert torch.equal(v, ckpt["student"][k]), k
    with pytest.raises(ValueError, match="no teacher"):
        export_backbone(result.run_dir, tmp_path / "x.pt", which="teacher")

    distil = tiny_config(tiny_benchmark, tmp_path / "distil", objective="distil", distil_teacher=str(out), distil_size=32,
                         steps=2)
    pretrain(distil)
    read = {"file": out.name, "sha256": manifest["sha256"]}
    torch.manual_seed(1)
    save_torch_file(LayoutCNN().state_dict(), out)  # the teacher file replaced after the run read it
    vit = json.loads(manifest_path(export_backbone(distil.run_dir, tmp_path / "vit.pth")).read_text())
    assert {k: vit["distil_teacher"][k] for k in read} == read  # the file the run read, not the one there now
    assert vit["distil_teacher"]["trained"]["steps"] == 16 and "L_MS" in vit["distil_teacher"]["trained"]["description"]
    with pytest.raises(ValueError, match="does not match its manifest"):  # the file its manifest does not describe
        LayoutCNN.load(out)
    with pytest.raises(ValueError, match="does not match its manifest"):
        pretrain(distil.replace(resume=True))
    manifest_path(out).unlink()  # a teacher without a manifest: only the hash the run recorded tells
    with pytest.raises(ValueError, match="same teacher file"):
        pretrain(distil.replace(resume=True))


def test_cnn_bad_configuration_is_one_message(tiny_benchmark, tmp_path, capsys):
    with pytest.raises(ValueError, match="multiple of img_per_place"):
        _cnn_config(tiny_benchmark, tmp_path / "a", batch_size=10)
    with pytest.raises(ValueError, match="trains a LayoutCNN from scratch"):
        _cnn_config(tiny_benchmark, tmp_path / "b", init_weights="x.pth")
    rc = main(["pretrain-backbone", "--objective", "cnn", "--distil-size", "30", "--data", str(tiny_benchmark.root),
               "--run-dir", str(tmp_path / "c"), "--quiet"])
    assert rc == 2 and "multiple of 8" in capsys.readouterr().err and not (tmp_path / "c").exists()
    rc = main(["pretrain-backbone", "--objective", "distil", "--distil-teacher", str(tmp_path / "none.pt"),
               "--data", str(tiny_benchmark.root), "--run-dir", str(tmp_path / "d"), "--quiet"])
    assert rc == 2 and "--objective cnn" in capsys.readouterr().err and not holds_files(tmp_path / "d")


def test_cnn_and_distil_start_from_their_recipes_not_dinos_defaults(tiny_benchmark, tmp_path):
    from scicevpr.offline.config import OBJECTIVE_RECIPES

    assert PretrainConfig.recipe() == PretrainConfig() and PretrainConfig.recipe("supervised") == PretrainConfig(objective="supervised")
    cnn = PretrainConfig.recipe("cnn", lr=2e-3)
    assert cnn.lr == 2e-3 and (cnn.weight_decay, cnn.weight_decay_end, cnn.clip_grad) == (1e-4, 1e-4, 0.0)
    assert cnn.supervised_scale == (0.6, 1.0) and not cnn.colour_augment and cnn.batch_size == 256
    distil = PretrainConfig.recipe("distil", distil_teacher="cnn.pt")
    assert {k: getattr(distil, k) for k in OBJECTIVE_RECIPES["distil"]} == {**OBJECTIVE_RECIPES["distil"], "supervised_scale": (0.6, 1.0)}
    with pytest.raises(ValueError, match="objective='mae'"):
        PretrainConfig.recipe("mae")
    # the command line: the recipe under the flags given
    run = tmp_path / "run"
    assert main(["pretrain-backbone", "--objective", "cnn", "--data", str(tiny_benchmark.root), "--distil-size", "32",
                 "--batch-size", "16", "--steps", "1", "--cache-size", "64", "--num-workers", "0", "--device", "cpu",
                 "--run-dir", str(run), "--quiet"]) == 0
    ran = PretrainConfig.from_dict(read_pretrain_checkpoint(run)["config"])
    assert (ran.distil_size, ran.batch_size, ran.steps) == (32, 16, 1)  # given
    assert (ran.lr, ran.weight_decay_end, ran.clip_grad, ran.colour_augment) == (1e-3, 1e-4, 0.0, False)  # the recipe's


# --------------------------------------------------------------------------------------------
# Resume, time budget
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("minutes, saved", [(None, [3]), (1e-9, [1, 2, 3])])
def test_checkpoints_are_also_written_by_the_clock(tiny_benchmark, tmp_path, monkeypatch, minutes, saved):
    """A slow run is checkpointed every ``checkpoint_minutes`` even between ``checkpoint_every`` steps."""
    import scicevpr.offline.pretrain as pt

    steps, write = [], pt.save_torch_file
    monkeypatch.setattr(pt, "save_torch_file", lambda obj, path: (steps.append(obj["step"]), write(obj, path))[1])
    config = tiny_config(tiny_benchmark, tmp_path / "run", steps=3, checkpoint_every=1000, checkpoint_minutes=minutes)
    pretrain(config)
    assert steps == saved
    with pytest.raises(ValueError, match="checkpoint_minutes must be > 0"):
        config.replace(checkpoint_minutes=0)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_benchmark, tmp_path):
    common = dict(steps=6, checkpoint_every=2)
    straight = pretrain(tiny_config(tiny_benchmark, tmp_path / "straight", **common))
    part = pretrain(tiny_config(tiny_benchmark, tmp_path / "resumed", **common, stop_at_step=3))
    assert part.stopped == "stop_at_step" and read_pretrain_checkpoint(part.last_path)["step"] == 3
    resumed = pretrain(tiny_config(tiny_benchmark, tmp_path / "resumed", **common, resume=True))
    a, b = read_pretrain_checkpoint(straight.last_path), read_pretrain_checkpoint(resumed.last_path)
    assert a["step"] == b["step"] == 6 and a["images_seen"] == b["images_seen"]
    for model in ("student", "teacher"):
        for k in a[model]:
            assert torch.equal(a[model][k], b[model][k]), (model, k)
    assert torch.equal(a["center"], b["center"]) and torch.equal(a["patch_center"], b["patch_center"])
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
    cols = ["step", "loss", "lr", "momentum", "teacher_temp"]
    assert straight.history[cols].equals(resumed.history[cols])
    assert len(b["sessions"]) == 2  # two calls, each with its machine
    # resuming a finished run changes nothing
    again = pretrain(tiny_config(tiny_benchmark, tmp_path / "resumed", **common, resume=True))
    assert again.step == 6 and len(again.history) == 6


def test_pretraining_checkpoints_hold_only_tensors_and_plain_types(dino_run):
    config, _ = dino_run
    ckpt = torch.load(Path(config.run_dir) / "last.pt", weights_only=True)  # no allowlist needed
    assert ckpt["step"] == 16 and isinstance(ckpt["rng"]["numpy"][1], list)


def test_a_run_folder_in_use_is_refused(tiny_benchmark, tmp_path):
    from scicevpr.files import RunDirInUseError, lock_run_dir

    with lock_run_dir(tmp_path / "run"):
        with pytest.raises(RunDirInUseError, match="in use by another training"):
            pretrain(tiny_config(tiny_benchmark, tmp_path / "run", steps=2))


def test_an_existing_run_is_not_overwritten_and_resume_needs_the_same_config(tiny_benchmark, tmp_path):
    pretrain(tiny_config(tiny_benchmark, tmp_path / "run", steps=2))
    with pytest.raises(FileExistsError, match="resume=True"):
        pretrain(tiny_config(tiny_benchmark, tmp_path / "run", steps=2))
    with pytest.raises(ValueError, match="lr"):
        pretrain(tiny_config(tiny_benchmark, tmp_path / "run", steps=2, lr=1e-2, resume=True))


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_a_fresh_log(tiny_benchmark, tmp_path):
    config = tiny_config(tiny_benchmark, tmp_path / "run", steps=3, objective="supervised", batch_size=8)
    pretrain(config)
    (tmp_path / "run" / "last.pt").unlink()  # killed after its log rows, before any checkpoint
    result = pretrain(config.replace(resume=True))
    assert list(result.history["step"]) == [1, 2, 3]


def test_too_few_places_for_a_batch_names_this_commands_options(tiny_benchmark, tmp_path):
    with pytest.raises(ValueError, match=r"fewer than one batch of P = batch_size / img_per_place = 1000 places; lower batch_size"):
        pretrain(tiny_config(tiny_benchmark, tmp_path / "run", steps=1, objective="supervised", batch_size=4000))


def test_koleo_needs_two_images_on_every_process(tiny_benchmark, tmp_path):
    from scicevpr.offline.pretrain import Run
    from scicevpr.runtime import Dist

    config = tiny_config(tiny_benchmark, tmp_path / "run", steps=1, batch_size=2)
    with pytest.raises(ValueError, match="KoLeo compares the images of each process.*at least 4"):
        Run(config, torch.device("cpu"), Dist(rank=0, world_size=2), amp=False)


@pytest.mark.parametrize("text", ['{"stage": "teacher", "train": {}}', "{"])
def test_resume_into_a_folder_of_something_else_is_one_clear_error(tiny_benchmark, tmp_path, text):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(text)
    with pytest.raises(ValueError, match="is not a pretraining run's configuration.*another run_dir"):
        pretrain(tiny_config(tiny_benchmark, tmp_path / "run", steps=2, resume=True))


def test_time_budget_stops_at_a_step_boundary_with_a_checkpoint(tiny_benchmark, tmp_path):
    config = tiny_config(tiny_benchmark, tmp_path / "run", steps=1000, max_minutes=1e-4)
    result = pretrain(config)
    assert result.stopped == "time budget" and result.step < 1000
    assert read_pretrain_checkpoint(result.run_dir)["step"] == result.step


def test_steps_none_fits_the_schedule_to_the_budget(tiny_benchmark, tmp_path):
    result = pretrain(tiny_config(tiny_benchmark, tmp_path / "run", steps=None, max_minutes=0.05))
    assert result.steps >= 1 and result.step <= result.steps
    assert read_pretrain_checkpoint(result.run_dir)["steps"] == result.steps


# --------------------------------------------------------------------------------------------
# Export: one fp16 file in official names, a manifest, the weights= door
# --------------------------------------------------------------------------------------------


def _model(backbone: BackboneConfig, weights):
    cfg = get_config("SciceVPR-S", backbone=backbone, layers=tuple(range(backbone.depth)),
                     image_size=backbone.pretrain_img_size, mix_dim=64, encoder_heads=4, encoder_ffn=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scicevpr.RandomWeightsWarning)
        return scicevpr.SciceVPR(cfg, weights=weights).eval()


def test_export_loads_strictly_through_weights_and_is_not_random(dino_run, tmp_path):
    config, result = dino_run
    path = export_backbone(result.run_dir, tmp_path)
    assert path.name == f"{config.backbone_config().hub_name}_pretrain.pth"
    state = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert "blocks.0.attn.qkv.weight" in state and "mask_token" in state  # DINOv2's names
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest["objective"] == "dino" and manifest["model"] == "teacher" and manifest["steps"] == 16
    assert manifest["data"]["preset"] == "tiny" and manifest["data"]["seed"] == 0
    assert manifest["images_seen"] == 16 * config.batch_size and manifest["machines"][0]["torch"] == torch.__version__
    assert "not Meta's DINOv2 weights" in manifest["description"]
    assert check_manifest(path, config.backbone_config())["sha256"] == manifest["sha256"]

    trained, random = _model(config.backbone_config(), path), _model(config.backbone_config(), None)
    assert not trained.is_random_init and random.is_random_init
    teacher = read_pretrain_checkpoint(result.run_dir)["teacher"]
    assert torch.equal(trained.backbone.pos_embed, teacher["backbone.pos_embed"].half().float())
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert not torch.allclose(trained.backbone_features(x), random.backbone_features(x), atol=1e-3)


def test_a_modified_weight_file_or_another_backbone_is_refused(dino_run, tmp_path):
    config, result = dino_run
    path = export_backbone(result.run_dir, tmp_path / "bb.pth")
    state = torch.load(path, weights_only=True)
    state["norm.weight"] = state["norm.weight"] + 1
    torch.save(state, path)
    with pytest.raises(ValueError, match="does not match its manifest"):
        _model(config.backbone_config(), path)
    path = export_backbone(result.run_dir, tmp_path / "bb.pth")
    with pytest.raises(ValueError, match="holds a backbone built as"):
        _model(dataclasses.replace(config.backbone_config(), num_blocks=2), path)


def test_the_shipped_backbone_loads_and_matches_its_manifest():
    path = PACKAGE_WEIGHTS_DIR / f"{OFFLINE_BACKBONE.hub_name}_pretrain.pth"
    if not path.is_file():
        pytest.skip(f"no shipped backbone at {path}")
    assert path.stat().st_size <= 25e6
    manifest = check_manifest(path, OFFLINE_BACKBONE)
    assert manifest is not None and "not Meta's DINOv2 weights" in manifest["description"]
    assert "not Meta's DINOv2" in manifest["label"]  # the short form figures carry
    model = _model(OFFLINE_BACKBONE, "auto")
    assert not model.is_random_init and model.backbone.weights_path == path
    random = _model(OFFLINE_BACKBONE, None)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(model.backbone_features(x), random.backbone_features(x), atol=1e-3)


# --------------------------------------------------------------------------------------------
# Data: the pretraining world shares no street with the benchmark's val and test splits
# --------------------------------------------------------------------------------------------


def _signature(street) -> tuple:
    """A street as what a camera sees: the building sequence of both sides (widths, heights,
    signs) and its furniture."""
    sides = tuple(tuple(np.round(np.concatenate([t.cols["width"], t.cols["height"], t.cols["sign_seed"]]), 3))
                  for t in street.sides)
    return sides + (tuple(np.round(street.trees["u"], 3)),)


@pytest.mark.parametrize("pretrain_seed", [1, 0])
def test_pretraining_streets_are_not_benchmark_val_or_test_streets(pretrain_seed):
    preset = dataclasses.replace(PRESETS["pretrain"], train_cities=2, train_streets_per_city=8)  # same streams, fewer
    assert PRESETS["pretrain"].val_streets == PRESETS["pretrain"].test_streets == 0
    streets, jobs, tables = build_plan(preset, pretrain_seed)
    assert all(key[0] == "train" for key in streets) and not tables["val"] and not tables["test"]
    bench, _, _ = build_plan(PRESETS["small"], 0)
    held_out = {_signature(s) for key, s in bench.items() if key[0] in ("val", "test")}
    assert len(held_out) == PRESETS["small"].val_streets + PRESETS["small"].test_streets
    assert not held_out & {_signature(s) for s in streets.values()}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain-backbone", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(PretrainConfig):
        if f.name not in ("loss", "progress"):
            assert "--" + f.name.replace("_", "-") in out, f.name
    assert "--export" in out and "default: 'dino'" in out and "default: 112" in out


@pytest.mark.parametrize("argv", [
    ["--objective", "mae"],
    ["--batch-size", "many"],
    ["--data", "/nonexistent/pretrain", "--steps", "1"],
    ["--export-only", "--export", "x.pth"],
])
def test_bad_input_is_one_message_and_status_2(argv, capsys):
    try:
        code = main(["pretrain-backbone", "--device", "cpu", "--quiet", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip() and "Traceback" not in err


def test_command_line_trains_and_exports(tiny_benchmark, tmp_path, capsys):
    args = ["pretrain-backbone", "--data", str(tiny_benchmark.root), "--run-dir", str(tmp_path / "run"),
            "--num-blocks", "1", "--image-size", "56", "--local-size", "28", "--local-crops", "1",
            "--head-hidden", "32", "--head-bottleneck", "16", "--prototypes", "64", "--batch-size", "4",
            "--cache-size", "64", "--steps", "2", "--num-workers", "0", "--device", "cpu", "--quiet",
            "--export", str(tmp_path / "out")]
    assert main(args) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["scicevpr_vits14_1blocks_56px_pretrain.json", "scicevpr_vits14_1blocks_56px_pretrain.pth"]
    assert "written" in capsys.readouterr().out


def test_retrieval_is_monitored_on_the_val_split(tiny_benchmark, tmp_path):
    config = tiny_config(tiny_benchmark, tmp_path / "run", steps=4, val_root=str(tiny_benchmark.vg_root),
                         val_every=2, log_every=3)
    h = pretrain(config).history
    assert list(h["step"]) == [0, 2, 3, 4]  # step 0: the random initialisation
    checked = h[h["step"].isin([0, 2, 4])]
    assert checked[["R@1", "R@5", "R@1_cls"]].notna().all().all() and h.loc[h["step"] == 3, "R@1"].isna().all()
    assert ((0 <= checked["R@1"]) & (checked["R@1"] <= checked["R@5"]) & (checked["R@5"] <= 100)).all()
    assert h["R@1_desc"].isna().all()  # DINO trains no retrieval descriptor of its own


def test_supervised_runs_also_score_the_descriptor_they_train(tiny_benchmark, tmp_path):
    from scicevpr.evaluate import recall_at_n, search
    from scicevpr.offline.objectives import Student
    from scicevpr.offline.pretrain import RetrievalCheck, vit_descriptors

    config = tiny_config(tiny_benchmark, tmp_path / "run", objective="supervised", pooling="regions", steps=2,
                         val_root=str(tiny_benchmark.vg_root), val_every=2)
    h = pretrain(config).history
    assert h.loc[h["step"].isin([0, 2]), ["R@1_desc", "R@5_desc", "R@1"]].notna().all().all()
    torch.manual_seed(0)
    student = Student(config).eval()
    check = RetrievalCheck(config.val_root, "synthetic", "val", config.image_size, torch.device("cpu"))
    got = check.recalls(vit_descriptors(student.backbone, amp=False, describe=student.describe))
    with torch.no_grad():
        x = normalize_uint8_batch(check.images, config.image_size)
        d = student(x).numpy()  # (N_db + N_q, 14 C): the regional descriptor, not a mean of the tokens
    n = check.split.num_database
    r, _ = recall_at_n(search(d[:n], d[n:], 5)[1], check.split.positives, (1, 5))
    assert (got["R@1_desc"], got["R@5_desc"]) == (r[1], r[5])


def test_init_weights_start_from_an_export_and_the_chain_is_recorded(dino_run, tiny_benchmark, tmp_path):
    config, result = dino_run
    first = export_backbone(result.run_dir, tmp_path / "dino.pth")
    tuned = tiny_config(tiny_benchmark, tmp_path / "tuned", objective="supervised", batch_size=8, img_per_place=4,
                        steps=1, stop_at_step=0, init_weights=str(first))
    start = read_pretrain_checkpoint(pretrain(tuned).run_dir)["student"]  # step 0: the weights it started from
    exported = torch.load(first, weights_only=True)
    assert torch.equal(start["backbone.blocks.0.attn.qkv.weight"].half(), exported["blocks.0.attn.qkv.weight"])
    tuned = tuned.replace(stop_at_step=None, resume=True)
    out = export_backbone(pretrain(tuned).run_dir, tmp_path / "tuned.pth")
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["objective"] == "supervised"
    assert manifest["init"]["sha256"] == json.loads(manifest_path(first).read_text())["sha256"]
    assert manifest["init"]["objective"] == "dino"
    assert "self-supervised (DINO + iBOT), then trained with L_MS on places" in manifest["description"]
