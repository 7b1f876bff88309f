"""What only a CUDA GPU exercises: the compiled fast path of evaluation (bf16 autocast, SDPA,
``torch.compile`` of the per-image part, nvJPEG decoding of files) and the bf16 training steps
of both stages on CUDA. (nvJPEG decoding alone: ``tests/test_data_decode.py``.)

Skipped without a GPU; ``pytest -m cuda tests/`` selects every CUDA test, and
``benchmarks/device_run.sh`` runs them. Models are SciceVPR-S / Super-CricaVPR-S with random
weights at small sizes, so a compile takes seconds.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scicevpr
from scicevpr.config import EvalConfig
from scicevpr.evaluate import compute_descriptors, per_image_function
from scicevpr.config import LossConfig
from scicevpr.config import TrainConfig
from scicevpr.train import DistillationStep, train_student, train_teacher

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("quiet_random_weights"),
]

DEVICE = "cuda"
SIZE = 112  # an 8 x 8 patch grid
SMALL_HEADS = {"image_size": 56, "mix_dim": 64, "encoder_heads": 4, "encoder_ffn": 128}


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scicevpr.RandomWeightsWarning)
        return scicevpr.SciceVPR("SciceVPR-S", weights=None, image_size=SIZE).to(DEVICE).eval()


def min_cosine(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return F.cosine_similarity(a, b, dim=1).min().item()


def test_compiled_bf16_features_agree_with_fp32_eager_and_pad_the_last_batch(student):
    """The per-image function of the fast path (compiled, bf16) against the plain fp32 one, on a
    batch smaller than the compiled batch size (padded inside)."""
    x = torch.randn(6, 3, SIZE, SIZE, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    fast = per_image_function(student, EvalConfig(batch_size=8, fast=True), torch.device(DEVICE))
    plain = per_image_function(student, EvalConfig(batch_size=8, fast=False), torch.device(DEVICE))
    with torch.no_grad():
        ref = student.encode(plain(x)).float()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            got = student.encode(fast(x)).float()
    assert got.shape == ref.shape == (6, student.descriptor_dim)
    assert torch.allclose(got.norm(dim=1), torch.ones(6, device=DEVICE), atol=1e-2)
    assert min_cosine(got.cpu(), ref.cpu()) >= 0.999


def test_fast_file_path_agrees_with_the_reference_and_is_batch_stable(student, tiny_benchmark):
    """JPEG files -> descriptors: fast path (nvJPEG, compiled, bf16) vs reference (PIL, fp32,
    eager); SciceVPR's descriptors must not depend on the batch size on the fast path either."""
    paths = tiny_benchmark.load_split("test").database_paths[:11]  # 11: the last batch is partial
    common = dict(num_workers=0, progress=False)
    ref = compute_descriptors(student, paths, EvalConfig(batch_size=4, fast=False, **common))
    fast4 = compute_descriptors(student, paths, EvalConfig(batch_size=4, fast=True, **common))
    fast8 = compute_descriptors(student, paths, EvalConfig(batch_size=8, fast=True, **common))
    assert fast4.shape == ref.shape == (len(paths), student.descriptor_dim)
    assert np.isfinite(fast4).all() and np.allclose(np.linalg.norm(fast4, axis=1), 1, atol=1e-2)
    assert min_cosine(fast4, ref) >= 0.99  # decoders differ by a few grey levels, bf16 on top
    assert min_cosine(fast4, fast8) >= 0.999


def test_distillation_step_in_bf16_on_cuda_follows_fp32():
    """One stage-2 step (shared backbone pass): the bf16 loss is close to the fp32 one and every
    gradient is finite."""
    torch.manual_seed(0)
    teacher = scicevpr.SuperCricaVPR("SciceVPR-S", weights=None, **SMALL_HEADS).to(DEVICE).eval()
    student = scicevpr.SciceVPR.from_teacher(teacher)
    step = DistillationStep(student, teacher, LossConfig()).train()
    P, K, S = 4, 4, SMALL_HEADS["image_size"]
    g = torch.Generator(DEVICE).manual_seed(1)
    protos = torch.randn(P, 3, S, S, device=DEVICE, generator=g)
    x = protos.repeat_interleave(K, 0) + 0.3 * torch.randn(P * K, 3, S, S, device=DEVICE, generator=g)
    y = torch.arange(P, device=DEVICE).repeat_interleave(K)
    fp32, _ = step(x, y)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        bf16, parts = step(x, y)
    assert bf16.dtype == torch.float32  # the loss keeps its own fp32
    assert math.isfinite(bf16.item()) and bf16.item() == pytest.approx(fp32.item(), rel=0.05, abs=1e-3)
    student.zero_grad(set_to_none=True)
    bf16.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_both_training_stages_run_in_bf16_on_cuda(tiny_benchmark, tmp_path):
    """train_teacher / train_student on CUDA pick bf16 autocast by themselves and log finite
    losses and recalls."""
    common = dict(
        preset="SciceVPR-S", model_overrides=SMALL_HEADS, weights=None, gsv_root=str(tiny_benchmark.gsv_root),
        places_per_batch=4, img_per_place=4, num_workers=2, val_root=str(tiny_benchmark.vg_root),
        val_dataset=tiny_benchmark.dataset, device=DEVICE, progress=False, epochs=1, max_iters_per_epoch=2,
    )
    t = train_teacher(TrainConfig(run_dir=str(tmp_path / "teacher"), **common))
    s = train_student(TrainConfig(run_dir=str(tmp_path / "student"), teacher=str(t.best_path), **common))
    for run in (t, s):
        info = json.loads((run.run_dir / "config.json").read_text())
        assert info["amp"] is True and info["device"].startswith("cuda")
        assert run.iterations_per_epoch == 2 and next(run.model.parameters()).device.type == "cuda"
        log = run.history
        assert np.isfinite(log["loss"]).all() and np.isfinite(log["R@1"]).all()
    assert np.isfinite(s.history["loss_d"]).all()


def test_notebook_helpers_take_a_model_on_cuda(student, tiny_benchmark):
    """What notebooks 01 and 02 do with a model on the GPU (full mode): images loaded onto the
    settings' device, block features and the fusion analyses brought back to the CPU."""
    from scicevpr.lab import analysis as nb

    paths = tiny_benchmark.load_split("test").database_paths[:2]
    x = nb.load_images(paths, SIZE, DEVICE)
    assert x.device.type == "cuda" and nb.load_images(paths, SIZE).device.type == "cpu"
    feats = nb.layer_features(student.backbone, x.cpu(), student.config.layers)  # CPU images, GPU model
    assert all(f.device.type == "cpu" and f.shape[0] == 2 for f in feats.values())
    with torch.no_grad():
        stacked = student.backbone_features(x)
        mixed = student.fusion.mix_tokens(student.fusion.channel_fusion(stacked))
    maps = nb.influence_maps(student.fusion, stacked[:1], (1, 1))
    assert all(isinstance(m, np.ndarray) and m.shape == tuple(stacked.shape[-2:]) for m in maps.values())
    ps, position, weights = nb.gem_analysis(mixed[0])
    assert np.isfinite(position).all() and all(np.isfinite(w).all() for w in weights.values())
