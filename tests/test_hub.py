"""hubconf.py: torch.hub.load(<repository>, ..., source="local") builds every model, loads
native and authors' checkpoints, and refuses the wrong ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from scicevpr.checkpoint import save_checkpoint
from scicevpr.factory import create_model

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(image_size=56, mix_dim=64)  # CPU-sized overrides of SciceVPR-S


def hub(entry: str, **kwargs):
    return torch.hub.load(str(REPO), entry, source="local", **kwargs)


def test_hubconf_declares_dependencies_and_the_paper_entry_points():
    tree = ast.parse((REPO / "hubconf.py").read_text())
    names = {n.name: ast.get_docstring(n) for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"scicevpr_b", "scicevpr_l", "super_cricavpr_b", "cricavpr"} <= set(names)
    assert all(doc for doc in names.values())  # every entry point documented
    deps = [n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "dependencies"]
    assert deps and "torch" in ast.literal_eval(deps[0].value)


@pytest.mark.parametrize("entry, cls, dim", [
    ("scicevpr_s", "SciceVPR", 14 * 64),
    ("super_cricavpr_s", "SuperCricaVPR", 14 * 64),
])
def test_hub_load_random_weights(entry, cls, dim):
    model = hub(entry, weights=None, **SMALL)
    assert type(model).__name__ == cls and not model.training and model.is_random_init
    with torch.no_grad():
        d = model(torch.randn(2, 3, 56, 56))
    assert d.shape == (2, dim)
    assert torch.allclose(d.norm(dim=1), torch.ones(2), atol=1e-5)


def test_hub_load_paper_presets_build_their_architecture():
    model = hub("scicevpr_b", weights=None, image_size=56)
    assert model.config.name == "SciceVPR-B" and model.backbone.config.arch == "vitb14" and model.descriptor_dim == 10752
    model = hub("cricavpr_s", weights=None, image_size=56)
    assert type(model).__name__ == "CricaVPR" and model.descriptor_dim == 14 * 384


def test_hub_loads_native_and_authors_checkpoints(tmp_path):
    trained = create_model("SciceVPR", "SciceVPR-S", weights=None, seed=3, **SMALL)
    with torch.no_grad():
        trained.encoder.layers[0].linear1.weight.mul_(1.5)  # "training" moved a head away from its init
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        want = trained.eval()(x)
    native = save_checkpoint(tmp_path / "best.pt", trained)
    authors = tmp_path / "authors.pth"
    torch.save({"model_state_dict": {"module." + k: v for k, v in trained.official_state_dict().items()}}, authors)
    with torch.no_grad():
        assert torch.equal(hub("scicevpr_s", checkpoint=str(native))(x), want)
        assert torch.equal(hub("scicevpr_s", checkpoint=str(authors), **SMALL)(x), want)
        assert not torch.equal(hub("scicevpr_s", weights=None, **SMALL)(x), want)


def test_hub_refuses_a_checkpoint_of_another_model(tmp_path):
    teacher = save_checkpoint(tmp_path / "t.pt", create_model("SuperCricaVPR", "SciceVPR-S", weights=None, **SMALL))
    with pytest.raises(ValueError, match="SuperCricaVPR"):
        hub("scicevpr_s", checkpoint=str(teacher))
    with pytest.raises(ValueError, match="super_cricavpr_s"):
        hub("super_cricavpr_b", checkpoint=str(teacher))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        hub("scicevpr_s", checkpoint=str(tmp_path / "nowhere.pt"))


def test_hub_refuses_a_checkpoint_carrying_a_pickled_object_unless_trusted(tmp_path):
    from fractions import Fraction

    from scicevpr.files import UntrustedFileError

    trained = create_model("SciceVPR", "SciceVPR-S", weights=None, seed=3, **SMALL)
    path = tmp_path / "authors.pth"
    torch.save({"model_state_dict": trained.official_state_dict(), "best_r5": Fraction(157, 2)}, path)
    with pytest.raises(UntrustedFileError, match=r"fractions.Fraction.*trust_checkpoint=True"):
        hub("scicevpr_s", checkpoint=str(path), **SMALL)
    assert hub("scicevpr_s", checkpoint=str(path), trust_checkpoint=True, **SMALL).descriptor_dim == trained.descriptor_dim



def test_hub_docstrings_give_each_entry_its_descriptor_size():
    from scicevpr.config import get_config
    from scicevpr.offline.config import OFFLINE_MODEL_OVERRIDES
    from scicevpr.hub import ENTRY_POINTS, OFFLINE_ENTRY_POINTS

    tree = ast.parse((REPO / "hubconf.py").read_text())
    docs = {n.name: ast.get_docstring(n) for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert set(docs) == set(ENTRY_POINTS) | set(OFFLINE_ENTRY_POINTS)
    for entry, (_, preset) in ENTRY_POINTS.items():
        cfg = get_config(preset)
        assert f"{cfg.descriptor_dim}-d" in docs[entry] and f"{cfg.image_size} px" in docs[entry], entry
        assert "weights=\"auto\" needs" in docs[entry] or "dinov2_vitb14_pretrain.pth" in docs[entry], entry
    offline = get_config("SciceVPR-S", **OFFLINE_MODEL_OVERRIDES)
    for entry in OFFLINE_ENTRY_POINTS:
        assert f"{offline.descriptor_dim}-d" in docs[entry] and f"{offline.image_size} px" in docs[entry], entry
