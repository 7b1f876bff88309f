"""The notebooks' measurements (scicevpr.lab.analysis): the per-block probe of notebook 01, the preset
table of notebook 02 and the agreement comparison of notebook 04."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from scicevpr.lab import analysis
from scicevpr.offline.config import OFFLINE_MODEL_OVERRIDES


def test_probe_keeps_the_negative_half_of_a_block_output():
    """A block's output after LayerNorm is signed. Two maps that differ only in their negative
    entries must give different descriptors: GeM on the map clamped at eps cannot tell them apart."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 3, 3, generator=g)
    y = torch.where(x < 0, 3.0 * x, x)  # the same positive half, another negative half
    clamped = [torch.nn.functional.normalize(analysis._gem(t), dim=-1) for t in (x, y)]
    assert torch.allclose(*clamped)  # what the probe did before: blind to the negative half
    a, b = analysis.probe_descriptor(x), analysis.probe_descriptor(y)
    assert a.shape == (1, 12)
    assert not torch.allclose(a, b, atol=1e-3)
    assert torch.allclose(a.norm(dim=-1), torch.ones(1))
    # ReLU(x) and ReLU(-x) are GeM-pooled separately: the first C channels are GeM of ReLU(x)
    pos, neg = analysis._gem(x.relu()), analysis._gem((-x).relu())
    expected = torch.nn.functional.normalize(torch.cat([pos, neg], dim=1), dim=-1)
    torch.testing.assert_close(a, expected)


class _SignedBackbone(torch.nn.Module):
    """A stand-in backbone: a 3 x 3 grid of 3-channel patch tokens (average-pooled, normalised
    pixels: signed), one output per requested block (block l scales the tokens by l + 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def grid_size(self, h, w):
        return 3, 3

    def get_intermediate_layers(self, x, layers):
        patches = torch.nn.functional.adaptive_avg_pool2d(x, 3).flatten(2).transpose(1, 2)  # (B, 9, 3)
        tokens = torch.cat([patches.mean(1, keepdim=True), patches], dim=1) * self.w  # (B, 1 + 9, 3)
        return [tokens * (l + 1) for l in layers]


def test_layer_descriptors_pool_what_the_probe_pools(tmp_path):
    paths = []
    for i, colour in enumerate([(250, 10, 10), (10, 250, 10), (20, 20, 240)]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (28, 28), colour).save(p)
        paths.append(str(p))
    model = SimpleNamespace(backbone=_SignedBackbone(), image_size=28, config=SimpleNamespace(layers=(0, 1)))
    settings = SimpleNamespace(eval_batch_size=2, num_workers=0, amp=False)
    desc = analysis.layer_descriptors(model, paths, [0, 1], settings)
    feats = analysis.layer_features(model.backbone, analysis.load_images(paths, 28), [0, 1])
    assert desc["block 0"].shape == (3, 6)  # 2C: [ReLU(X); ReLU(-X)]
    np.testing.assert_allclose(desc["block 1"], analysis.probe_descriptor(feats[1]).detach().numpy(), atol=1e-5)
    assert desc["blocks 0-1 fused"].shape == (3, 12)


def test_preset_table_row_is_the_model_the_run_builds():
    """Notebook 02 shows the preset table beside the model it builds: the row of the run's preset
    must carry the run's overrides (offline: a 4-block backbone at 112 px, blocks 0-3 fused)."""
    from scicevpr.factory import create_model

    table = analysis.preset_table(("SciceVPR-S", "SciceVPR-B"), per_preset={"SciceVPR-S": OFFLINE_MODEL_OVERRIDES})
    row = table.set_index("preset").loc["SciceVPR-S"]
    with torch.device("meta"):
        model = create_model("SciceVPR", "SciceVPR-S", weights=None, **OFFLINE_MODEL_OVERRIDES)
    cfg = model.config
    assert row["blocks"] == cfg.backbone.depth == 4
    assert row["blocks fused"] == "0-3" and row["grid"] == f"{cfg.grid_size}x{cfg.grid_size}" == "8x8"
    assert row["image (px)"] == cfg.image_size == 112
    assert row["backbone (M)"] == round(sum(p.numel() for p in model.backbone.parameters()) / 1e6, 2)
    assert row["student encoder (M)"] == round(sum(p.numel() for p in model.encoder.parameters()) / 1e6, 2)
    paper = table.set_index("preset").loc["SciceVPR-B"]  # other presets keep the paper's sizes
    assert paper["blocks"] == 12 and paper["blocks fused"] == "8-11" and paper["grid"] == "16x16"


def _result(descriptors, top1):
    return SimpleNamespace(query_descriptors=np.asarray(descriptors, np.float32),
                           predictions=np.asarray(top1)[:, None])


def test_agreement_difference_reports_both_measures_with_paired_intervals():
    rng = np.random.default_rng(0)
    teacher = _result(rng.normal(size=(200, 16)), rng.integers(0, 50, 200))
    close = _result(teacher.query_descriptors + 0.1 * rng.normal(size=(200, 16)), teacher.predictions[:, 0])
    far = _result(rng.normal(size=(200, 16)), rng.integers(0, 50, 200))
    table = analysis.agreement_difference(close, far, teacher).set_index("measure")
    assert list(table.index) == ["mean cosine to the teacher", "same top-1 as the teacher (%)"]
    assert (table["verdict"] == "higher").all() and (table["lo"] > 0).all()
    assert table.loc["same top-1 as the teacher (%)", "a"] == pytest.approx(100.0)
    assert (analysis.agreement_difference(far, close, teacher)["verdict"] == "lower").all()
    # closer descriptors with the same top-1s: the cosine tells them apart, the top-1 count cannot
    closer = _result(teacher.query_descriptors + 0.01 * rng.normal(size=(200, 16)), teacher.predictions[:, 0])
    both = analysis.agreement_difference(closer, close, teacher).set_index("verdict")["measure"]
    assert both.to_dict() == {"higher": "mean cosine to the teacher",
                              "not distinguishable": "same top-1 as the teacher (%)"}
