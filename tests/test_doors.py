"""The package's doors: create_model builds every model, load_model reads every trained file, and
every recall (models, raw pixels, per condition) goes through one search and one hit count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scicevpr
from scicevpr.checkpoint import load_model, save_checkpoint
from scicevpr.factory import DEFAULT_PRESETS, MODELS, create_model
from scicevpr.files import read_model_file, unwrap_state_dict

pytestmark = pytest.mark.usefixtures("quiet_random_weights")

SMALL = {  # CPU-sized overrides of each model's -S preset
    "SciceVPR": ("SciceVPR-S", dict(image_size=56, mix_dim=64, encoder_heads=4, encoder_ffn=128)),
    "SuperCricaVPR": ("SciceVPR-S", dict(image_size=56, mix_dim=64, encoder_heads=4, encoder_ffn=128)),
    "CricaVPR": ("CricaVPR-S", dict(image_size=56, encoder_ffn=128)),
}


def small(name: str, seed: int = 0, **kw):
    preset, overrides = SMALL[name]
    return create_model(name, preset, weights=None, seed=seed, **overrides, **kw)


# --------------------------------------------------------------------------------------------
# The model door
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_create_model_builds_each_registered_model(name):
    model = small(name)
    assert type(model) is MODELS[name] and type(model).__name__ == name
    assert isinstance(model, scicevpr.VPRModel) and model.is_random_init
    with torch.no_grad():
        d = model.eval()(torch.randn(2, 3, 56, 56))
    assert d.shape == (2, model.descriptor_dim)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(2))
    assert scicevpr.create_model is create_model


def test_create_model_refuses_an_unknown_name_and_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'NetVLAD'.*'SciceVPR', 'SuperCricaVPR', 'CricaVPR'"):
        create_model("NetVLAD", weights=None)


def test_create_model_refuses_a_preset_of_another_model():
    with pytest.raises(TypeError, match="CricaVPRConfig"):
        create_model("CricaVPR", "SciceVPR-S", weights=None)
    with pytest.raises(TypeError, match="SuperCricaVPR needs a ModelConfig"):
        create_model("SuperCricaVPR", "CricaVPR-S", weights=None)


def test_create_model_defaults_and_a_missing_weight_file(tmp_path):
    assert DEFAULT_PRESETS == {"SciceVPR": "SciceVPR-B", "SuperCricaVPR": "SciceVPR-B", "CricaVPR": "CricaVPR"}
    with pytest.raises(FileNotFoundError, match="nowhere.pth does not exist"):
        create_model("SciceVPR", "SciceVPR-S", weights=tmp_path / "nowhere.pth")


def test_the_command_line_offers_the_registered_models():
    from scicevpr.cli import MODEL_KINDS  # spelled out there: `scicevpr --help` does not import torch

    assert set(MODEL_KINDS) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_seed_gives_the_same_model_and_leaves_the_callers_rng_alone(name):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = small(name, seed=5), small(name, seed=5), small(name, seed=6)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_the_backbone_records_its_provenance_when_its_weights_are_loaded(tmp_path):
    model = small("SciceVPR", seed=7)
    assert model.backbone.provenance == {"source": "random", "seed": 7}
    weights = tmp_path / f"{model.config.backbone.hub_name}_pretrain.pth"
    torch.save(model.backbone.state_dict(), weights)
    from_file = create_model("SciceVPR", "SciceVPR-S", weights=weights, **SMALL["SciceVPR"][1])
    assert from_file.backbone.provenance == {"source": "file", "path": str(weights), "hub_name": "dinov2_vits14"}
    assert not from_file.is_random_init and from_file.backbone.fingerprint == model.backbone.fingerprint
    authors = small("SciceVPR", seed=8).load_official(model.official_state_dict())
    assert authors.backbone.provenance == {"source": "stored"} and not authors.is_random_init
    unseeded = scicevpr.SciceVPR("SciceVPR-S", weights=None, **SMALL["SciceVPR"][1])
    assert unseeded.backbone.provenance == {"source": "stored"}  # only a stored copy rebuilds it


def test_the_fingerprint_follows_the_frozen_weights():
    model = small("SuperCricaVPR")
    first = model.backbone.fingerprint
    assert model.backbone.fingerprint == first and len(first) == 64
    with torch.no_grad():
        model.encoder.layers[0].linear1.weight.add_(1.0)  # a trained head: not the backbone
    assert model.backbone.fingerprint == first
    with torch.no_grad():
        model.backbone.norm.weight.add_(1.0)
    assert model.backbone.fingerprint != first


def test_cricavpr_is_built_by_the_shared_constructor():
    model = small("CricaVPR")
    assert not hasattr(model, "fusion") and model.pool.num_regions == 13
    assert all(block.adapter is not None for block in model.backbone.blocks)
    assert all(p.requires_grad for a in model.adapters() for p in a.parameters())
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if ".adapter." not in n)


# --------------------------------------------------------------------------------------------
# The loading door
# --------------------------------------------------------------------------------------------


WRAPS = {
    "bare": lambda sd: dict(sd),
    "model_state_dict": lambda sd: {"model_state_dict": dict(sd), "epoch_num": 3},
    "state_dict": lambda sd: {"state_dict": dict(sd)},
    "module": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "model_state_dict+module": lambda sd: {"model_state_dict": {f"module.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_the_loading_door_unwraps_each_kind_of_authors_file(wrap, tmp_path):
    trained = small("SuperCricaVPR", seed=3)
    with torch.no_grad():
        trained.encoder.layers[0].linear1.weight.mul_(1.5)  # away from any initialisation
    official = trained.official_state_dict()
    assert unwrap_state_dict(WRAPS[wrap](official)).keys() == official.keys()
    path = tmp_path / "authors.pth"
    torch.save(WRAPS[wrap](official), path)
    file = read_model_file(path)
    assert not file.native and file.content.keys() == official.keys() and "authors.pth" in file.where
    loaded = load_model(path, expected="SuperCricaVPR", preset="SciceVPR-S", **SMALL["SuperCricaVPR"][1])
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained.eval()(x), atol=0, rtol=0)
    assert not loaded.training and loaded.backbone.provenance == {"source": "stored"}


def test_the_loading_door_tells_a_native_checkpoint_from_an_authors_one(tmp_path):
    model = small("SciceVPR", seed=4)
    native = save_checkpoint(tmp_path / "best.pt", model)
    file = read_model_file(native)
    assert file.native and file.content["model_class"] == "SciceVPR"
    loaded = load_model(native, expected="SciceVPR", preset="SciceVPR-B")  # a native file records its own preset
    assert loaded.config == model.config
    with pytest.raises(ValueError, match="is a native scicevpr checkpoint.*load_model"):
        small("SciceVPR").load_official(native)
    torch.save(model.official_state_dict(), tmp_path / "authors.pth")
    with pytest.raises(ValueError, match="not a scicevpr checkpoint.*expected="):
        load_model(tmp_path / "authors.pth")  # which model? an authors' file does not say
    with pytest.raises(ValueError, match="holds a SciceVPR.*SuperCricaVPR"):
        load_model(native, expected="SuperCricaVPR")


# --------------------------------------------------------------------------------------------
# One recall path
# --------------------------------------------------------------------------------------------


def test_pixel_baseline_is_in_percent_and_matches_recall_at_n(tiny_benchmark):
    from scicevpr.evaluate import recall_at_n
    from scicevpr.lab.baselines import pixel_baseline_result, pixel_descriptors

    split = tiny_benchmark.load_split("test")
    recalls = pixel_baseline_result(split, thumb=16, recall_values=(1, 5, 10)).recalls
    db, q = pixel_descriptors(split.database_paths, 16), pixel_descriptors(split.query_paths, 16)
    assert db.shape == (split.num_database, 16 * 16 * 3) and q.dtype == np.float32
    d2 = ((q[:, None, :] - db[None, :, :]) ** 2).sum(-1)  # (N_q, N_db), by hand
    ranking = np.argsort(d2, axis=1, kind="stable")[:, :10]
    assert recalls == pytest.approx(recall_at_n(ranking, split.positives, (1, 5, 10))[0])
    hits = [100.0 * np.mean([np.isin(ranking[i, :n], split.positives[i]).any() for i in range(len(q))]) for n in (1, 5, 10)]
    assert list(recalls.values()) == pytest.approx(hits)  # percent, not fractions
    assert recalls[10] > 1.0


def test_colour_histograms_see_which_hues_lie_in_which_strip(tmp_path):
    from PIL import Image

    from scicevpr.lab.baselines import colour_histogram_descriptors

    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, :32] = (255, 0, 0)  # red: hue 0 -> bin 0 of 12
    image[:, 32:] = (0, 0, 255)  # blue: hue 2/3 -> bin 8
    Image.fromarray(image).save(tmp_path / "split.png")
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(image[:, ::-1].copy()).save(tmp_path / "mirrored.png")
    d = colour_histogram_descriptors([tmp_path / "split.png", tmp_path / "grey.png", tmp_path / "mirrored.png"],
                                     strips=2, bins=12)
    assert d.shape == (3, 24) and d.dtype == np.float32
    expected = np.zeros(24, dtype=np.float32)
    expected[0] = expected[12 + 8] = 1.0
    np.testing.assert_allclose(d[0], expected, atol=1e-6)
    np.testing.assert_array_equal(d[1], 0.0)  # no pixel saturated enough: an empty histogram
    assert np.abs(d[2] - d[0]).sum() > 3.9  # the same colours in other strips: another place
    assert colour_histogram_descriptors([tmp_path / "split.png"], strips=1, bins=12)[0] == pytest.approx(
        np.sqrt(np.eye(12)[0] * 0.5 + np.eye(12)[8] * 0.5))  # one strip: half red, half blue
    with pytest.raises(ValueError, match="strips"):
        colour_histogram_descriptors([tmp_path / "split.png"], strips=0)


def test_colour_baseline_scores_its_descriptors_like_a_model(tiny_benchmark):
    from scicevpr.lab.analysis import colour_baseline_row
    from scicevpr.evaluate import recall_at_n
    from scicevpr.lab.baselines import colour_baseline_result, colour_histogram_descriptors

    split = tiny_benchmark.load_split("test")
    result = colour_baseline_result(split, strips=3, bins=12, recall_values=(1, 5, 10))
    db, q = (colour_histogram_descriptors(paths, 3, 12) for paths in (split.database_paths, split.query_paths))
    d2 = ((q[:, None, :] - db[None, :, :]) ** 2).sum(-1)  # (N_q, N_db), by hand
    ranking = np.argsort(d2, axis=1, kind="stable")[:, :10]
    assert result.recalls == pytest.approx(recall_at_n(ranking, split.positives, (1, 5, 10))[0])
    row = colour_baseline_row(split, strips=3, bins=12, ns=(1, 5), intervals=True)
    assert row["dim"] == 36 and row["R@1"] == pytest.approx(result.recalls[1])
    assert row["R@1 lo"] <= row["R@1"] <= row["R@1 hi"]


def test_recall_by_condition_counts_hits_as_recall_at_n():
    from scicevpr.evaluate import recall_at_n, recall_by_condition

    rng = np.random.default_rng(0)
    predictions = rng.integers(0, 20, size=(30, 10))
    positives = [rng.choice(20, size=2, replace=False) for _ in range(30)]
    recalls, correct = recall_at_n(predictions, positives, (1, 5, 10))
    table = recall_by_condition(correct, ["a", "b", "c"] * 10, (1, 5, 10)).set_index("condition")
    assert [table.loc["all", f"R@{n}"] for n in (1, 5, 10)] == [round(recalls[n], 2) for n in (1, 5, 10)]
    sub, _ = recall_at_n(predictions[0::3], positives[0::3], (1, 5, 10))
    assert [table.loc["a", f"R@{n}"] for n in (1, 5, 10)] == [round(sub[n], 2) for n in (1, 5, 10)]


def test_training_and_pretraining_logs_are_written_by_one_function(tmp_path):
    import pandas as pd

    from scicevpr import train
    from scicevpr.offline import pretrain
    from scicevpr.files import append_csv_row

    assert not hasattr(train, "_append_log") and not hasattr(pretrain, "_append_log")
    log = tmp_path / "log.csv"
    append_csv_row(log, {"b": 2, "a": 1}, ("a", "b", "c"))
    append_csv_row(log, {"a": 3, "unknown": 9}, ("a", "b", "c"))
    assert log.read_text().splitlines()[0] == "a,b,c"
    df = pd.read_csv(log)
    assert df["a"].tolist() == [1, 3] and df["b"].tolist()[0] == 2 and df["c"].isna().all()


def test_a_resumed_log_keeps_the_checkpoints_rows_under_the_new_columns(tmp_path):
    import pandas as pd

    from scicevpr import train
    from scicevpr.offline import pretrain
    from scicevpr.files import append_csv_row, resume_csv_log

    assert not hasattr(train, "_truncate_log") and not hasattr(pretrain, "_truncate_log")
    log = tmp_path / "log.csv"
    for step in (1, 2, 3):  # a run of an older version, killed after logging step 3 but checkpointed at step 2
        append_csv_row(log, {"step": step, "b": 10 * step}, ("step", "b"))
    resume_csv_log(log, "step", 2, ("step", "b", "c"))  # resumed by a newer version: one more column
    append_csv_row(log, {"step": 3, "c": 4}, ("step", "b", "c"))
    df = pd.read_csv(log)
    assert list(df.columns) == ["step", "b", "c"] and df["step"].tolist() == [1, 2, 3]
    assert df["b"].tolist()[:2] == [10, 20] and pd.isna(df["b"].tolist()[2]) and df["c"].tolist()[2] == 4
    resume_csv_log(tmp_path / "none.csv", "step", 2, ("step",))  # no log yet: nothing written
    assert not (tmp_path / "none.csv").exists()
    # a row cut short while it was appended ("3" of "30", its other fields lost) is not kept as step 3
    cut = tmp_path / "cut.csv"
    cut.write_text("step,b\n10,100\n20,200\n3")
    resume_csv_log(cut, "step", 20, ("step", "b"))
    assert pd.read_csv(cut)["step"].tolist() == [10, 20]
