"""The offline-world tools in benchmarks/: a bad call is one message and exit status 2, and the
probe's features are the documented ones."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scicevpr.backbone import DinoVisionTransformer
from scicevpr.config import BackboneConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world_sweep():
    return _tool("world_sweep")


def test_world_sweep_reads_a_variant_and_recipe_changes(world_sweep, tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    args = world_sweep.parse_args(["near", '{"max_lateral_offset": 1.5, "train_cities": 4}', str(weights),
                                   "--train", '{"max_iters_per_epoch": 10}', "--ablation"])
    assert args == dict(name="near", changes={"max_lateral_offset": 1.5, "train_cities": 4}, weights=str(weights),
                        ablation=True, train={"max_iters_per_epoch": 10})
    assert world_sweep.parse_args(["x", "{}", "none"])["weights"] is None
    assert world_sweep.parse_args(["x", "{}"])["weights"] == "auto"


@pytest.mark.parametrize("argv, message", [
    (["x", "{lateral: 1}"], "changes: '{lateral: 1}' is not JSON"),
    (["x", "[1, 2]"], "is not a JSON object"),
    (["x", '{"lateral": 1}'], "SyntheticPreset has no field lateral; its fields are name, image_size"),
    (["x", "{}", "--train", '{"iters": 10}'], "TrainConfig has no field iters"),
    (["x", "{}", "no/such/file.pth"], "weights: no file 'no/such/file.pth'; give auto, none or the path"),
])
def test_world_sweep_bad_calls_are_one_message_and_status_2(world_sweep, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        world_sweep.parse_args(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_probe_features_are_each_blocks_class_token_and_2x2_region_means():
    probe = _tool("backbone_probe")
    config = BackboneConfig(arch="vits14", patch_size=14, pretrain_img_size=probe.IMAGE_SIZE, num_blocks=2)
    backbone = DinoVisionTransformer(config, seed=0).eval()
    images = torch.randint(0, 256, (3, 3, probe.IMAGE_SIZE, probe.IMAGE_SIZE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    features = probe.block_features(backbone, images, batch=2)
    C = backbone.embed_dim
    assert features.shape == (3, 2 * C * 5) and features.dtype == torch.float32
    x = (images.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        last = backbone.get_intermediate_layers(x, [1])[0]  # (3, 1 + 8 * 8, C)
    grid = last[:, 1:].reshape(3, 8, 8, C)  # row-major tokens
    top_left = grid[:, :4, :4].mean((1, 2))  # (3, C): the first 2 x 2 region
    expected = F.normalize(torch.stack([last[:, 0], top_left], 2), dim=1)  # (3, C, 2)
    got = features.view(3, 2, C, 5)[:, 1, :, :2]  # block 1: class token, first region
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)



def test_probe_refuses_a_missing_gpu_with_one_message(tmp_path, monkeypatch, capsys):
    from scicevpr.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    probe = _tool("backbone_probe")
    monkeypatch.setattr(sys, "argv", ["backbone_probe.py", "--train-root", str(tmp_path), "--device", "cuda"])
    with pytest.raises(SystemExit) as stop:
        probe.main()
    assert stop.value.code == 2 and "CUDA is not available; use device='cpu'" in capsys.readouterr().err

def test_cnn_learnability_scores_a_network_pretrain_backbone_trained(tiny_benchmark, tmp_path, capsys):
    """A bad call is one message, status 2; a network trained by ``pretrain-backbone --objective cnn``
    is scored at its manifest's size, and the recalls printed are the ones computed."""
    from scicevpr.offline.config import PretrainConfig
    from scicevpr.offline.pretrain import export_backbone, pretrain

    tool = _tool("cnn_learnability")
    with pytest.raises(SystemExit) as stop:
        tool.parse_args([str(tmp_path / "none.pt")])
    assert stop.value.code == 2 and "--objective cnn" in capsys.readouterr().err
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as stop:
        tool.parse_args([str(tmp_path / "other.pt")])
    assert stop.value.code == 2 and "not the state dict of a LayoutCNN" in capsys.readouterr().err

    config = PretrainConfig(objective="cnn", data=str(tiny_benchmark.root), run_dir=str(tmp_path / "run"), distil_size=32,
                            batch_size=16, steps=2, cache_size=64, num_workers=0, device="cpu", progress=False)
    net = export_backbone(pretrain(config).run_dir, tmp_path / "cnn.pt")
    args = tool.parse_args([str(net), "--test-root", str(tiny_benchmark.vg_root), "--threads", "1"])
    assert args.size == 32  # from the manifest beside the file
    results = tool.main(args)
    out = capsys.readouterr().out
    r1 = results["test"].recalls[1]
    assert 0.0 <= r1 <= 100.0
    assert f"test, 95% intervals: R@1 {r1:.1f} [" in out and f"R@1 {results['val'].recalls[1]:.1f}" in out
    assert "test R@1 by condition: " in out and "chance R@1" in out
