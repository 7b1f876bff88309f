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
from scicevpr.pretrain import LayoutCNN

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
    backbone = DinoVisionTransformer(config, weights=None, seed=0).eval()
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
    from scicevpr.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    probe = _tool("backbone_probe")
    monkeypatch.setattr(sys, "argv", ["backbone_probe.py", "--train-root", str(tmp_path), "--device", "cuda"])
    with pytest.raises(SystemExit) as stop:
        probe.main()
    assert stop.value.code == 2 and "CUDA is not available; use device='cpu'" in capsys.readouterr().err

def test_cnn_learnability_crops_and_bad_calls(tmp_path, capsys):
    tool = _tool("cnn_learnability")
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    crops = tool.random_resized_crops(x, torch.Generator().manual_seed(0))
    assert crops.shape == x.shape and crops.dtype == torch.uint8 and not torch.equal(crops, x)
    with pytest.raises(SystemExit) as stop:
        tool.parse_args(["--train-root", str(tmp_path)])
    assert stop.value.code == 2 and "has no Dataframes/ folder" in capsys.readouterr().err
    (tmp_path / "Dataframes").mkdir()
    with pytest.raises(SystemExit):
        tool.parse_args(["--train-root", str(tmp_path), "--size", "60"])
    assert "give a multiple of 8" in capsys.readouterr().err
    assert tool.parse_args(["--train-root", str(tmp_path)]).steps == 1500


def test_cnn_learnability_runs_end_to_end_on_tiny(tiny_benchmark, tmp_path, capsys):
    """Two steps on the ``tiny`` world: the recalls it prints are the library's (score,
    recall_by_condition), and a batch larger than the training split is one message, status 2."""
    tool = _tool("cnn_learnability")
    root = ["--train-root", str(tiny_benchmark.gsv_root), "--test-root", str(tiny_benchmark.vg_root), "--size", "32",
            "--threads", "1"]
    with pytest.raises(SystemExit) as stop:
        tool.main(tool.parse_args(root + ["--places-per-step", "999"]))
    assert stop.value.code == 2 and "give at most" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.parse_args(root + ["--steps", "4", "--stop-at-step", "5"])
    assert "give a step from 1 to --steps (4)" in capsys.readouterr().err
    tool.main(tool.parse_args(root + ["--steps", "4", "--stop-at-step", "2", "--eval-every", "1", "--places-per-step", "4",
                                      "--save", str(tmp_path / "net.pt")]))
    out = capsys.readouterr().out
    LayoutCNN.load(tmp_path / "net.pt")  # strict: the whole network, the teacher pretrain-backbone --objective distil reads
    steps = [line for line in out.splitlines() if line.startswith("step ") and "val R@1" in line]
    assert [line.split()[1] for line in steps] == ["0", "1", "2"]
    last = [line for line in out.splitlines() if line.startswith("test at the last step")]
    assert len(last) == 1
    r1 = float(last[0].split("R@1 ")[1].split()[0])
    assert 0.0 <= r1 <= 100.0 and f"R@1 {r1:.1f}" in steps[-1]  # the interval line and the step line agree
    assert "by condition:" in steps[-1]
