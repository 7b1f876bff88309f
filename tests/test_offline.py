"""`scicevpr train-offline` trains the notebooks' offline models (teacher, student, CricaVPR-S),
resumes, and exports heads that torch.hub's *_offline entries load on the shipped backbone; heads
that do not fit the file or the backbone are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from scicevpr.checkpoint import read_checkpoint, trainable_state_dict
from scicevpr.cli import main

REPO = Path(__file__).resolve().parents[1]
ENTRIES = {"super_cricavpr_s_offline": ("SuperCricaVPR", True), "scicevpr_s_offline": ("SciceVPR", False),
           "cricavpr_s_offline": ("CricaVPR", True)}


def hub(entry: str, **kwargs):
    return torch.hub.load(str(REPO), entry, source="local", **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train-offline on the tiny world, one iteration per epoch, exported as fp16 heads."""
    root = tmp_path_factory.mktemp("offline")
    argv = ["train-offline", "--data", str(root / "data"), "--runs", str(root / "runs"), "--synthetic-preset", "tiny",
            "--epochs", "1", "--max-iters", "1", "--threads", "1", "--quiet", "--export", str(root / "heads")]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:  # the command's process-wide setting, as it was
        torch.set_num_threads(threads)
    return root, argv


@pytest.mark.slow
def test_train_offline_exports_heads_that_the_hub_entries_load(trained):
    root, argv = trained
    manifest = json.loads((root / "heads" / "manifest.json").read_text())
    assert manifest["command"] == "scicevpr " + " ".join(argv)
    assert manifest["data"]["synthetic_preset"] == "tiny" and manifest["dtype"] == "float16"
    assert len(manifest["backbone"]["sha256"]) == 64
    (recipe,) = (root / "runs").glob("recipe-*")
    for entry, (cls, batch_dependent) in ENTRIES.items():
        record = manifest["entries"][entry]
        assert record["bytes"] < 12e6  # heads only, fp16: the backbone is referred to, not stored
        model = hub(entry, heads=str(root / "heads"))
        assert type(model).__name__ == cls and not model.training and not model.is_random_init
        assert model.data_config["input_size"] == (3, 112, 112) and model.data_config["descriptor_dim"] == 5376
        assert model.data_config["batch_dependent"] is batch_dependent
        # the run's best weights, rounded to fp16, on the shipped backbone
        run = {"super_cricavpr_s_offline": "teacher", "scicevpr_s_offline": "student", "cricavpr_s_offline": "cricavpr"}[entry]
        best = read_checkpoint(recipe / run / "best.pt")["model_state"]
        loaded = trainable_state_dict(model)
        assert set(loaded) == set(best)
        for k, v in best.items():
            want = v.half().float() if v.is_floating_point() else v
            assert torch.equal(loaded[k].to(want.dtype), want), k
        with torch.no_grad():
            d = model(torch.randn(2, 3, 112, 112))
        assert d.shape == (2, 5376)


@pytest.mark.slow
def test_train_offline_reuses_finished_runs(trained, capsys):
    root, argv = trained
    logs = {p: p.read_text() for p in (root / "runs").rglob("log.csv")}
    assert len(logs) == 3  # teacher, student, CricaVPR-S
    assert main([a for a in argv if a not in ("--export", str(root / "heads"))]) == 0
    assert {p: p.read_text() for p in logs} == logs  # nothing trained again


@pytest.mark.slow
def test_offline_heads_of_another_backbone_or_modified_are_refused(trained, tmp_path):
    root, _ = trained
    heads = tmp_path / "heads"
    shutil.copytree(root / "heads", heads)
    manifest = json.loads((heads / "manifest.json").read_text())
    manifest["backbone"]["sha256"] = "0" * 64  # trained on another backbone
    (heads / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"backbone changed.*scicevpr train-offline"):
        hub("scicevpr_s_offline", heads=str(heads))
    shutil.copy(root / "heads" / "manifest.json", heads / "manifest.json")
    with open(heads / "cricavpr_s_offline.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="modified or replaced"):
        hub("cricavpr_s_offline", heads=str(heads))


def test_the_shipped_heads_load_without_heads_as_the_readme_shows():
    """``torch.hub.load(".", "scicevpr_s_offline", source="local")`` with no ``heads=``: the heads shipped
    in ``scicevpr/weights/offline/``, on the shipped backbone (the README's and the hub docstrings' call)."""
    from scicevpr.offline.models import HEADS_DIR

    assert HEADS_DIR == REPO / "scicevpr" / "weights" / "offline"
    for entry, (cls, batch_dependent) in ENTRIES.items():
        model = hub(entry)
        assert type(model).__name__ == cls and not model.training and not model.is_random_init
        assert model.data_config["batch_dependent"] is batch_dependent
        with torch.no_grad():
            d = model(torch.randn(2, 3, 112, 112))
        assert d.shape == (2, 5376) and torch.allclose(d.norm(dim=1), torch.ones(2))


def test_offline_entry_without_heads_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"scicevpr train-offline --export"):
        hub("super_cricavpr_s_offline", heads=str(tmp_path))
