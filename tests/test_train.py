"""Training stages, checkpoints and resume (scicevpr.train, scicevpr.checkpoint).

Runs on the synthetic ``tiny`` benchmark with a random ViT-S/14 backbone at 56 px and small
heads (C_mix = 64), so that a training iteration takes a fraction of a second on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

import scicevpr
from scicevpr import checkpoint as ckpt_mod
from scicevpr.checkpoint import load_model, read_checkpoint, save_checkpoint
from scicevpr.factory import create_model
from scicevpr.data.gsv import GSVCitiesDataset
from scicevpr.offline.synthetic import generate
from scicevpr.files import RunDirInUseError, lock_run_dir
from scicevpr.config import TrainConfig
from scicevpr.train import PlaceBatchSampler, make_optimizer, make_scheduler, train_student, train_teacher

SMALL_HEADS = {"image_size": 56, "mix_dim": 64, "encoder_heads": 4, "encoder_ffn": 128}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic") / "tiny", "tiny", progress=False)


def quick_config(tiny, run_dir, **overrides) -> TrainConfig:
    base = dict(
        preset="SciceVPR-S", model_overrides=SMALL_HEADS, weights=None, gsv_root=str(tiny.gsv_root),
        places_per_batch=4, img_per_place=4, num_workers=0, val_root=str(tiny.vg_root),
        val_dataset=tiny.dataset, device="cpu", progress=False, epochs=1, max_iters_per_epoch=1,
        run_dir=str(run_dir),
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a loaded 2-core machine two OpenMP threads that busy-wait for each
    other make these small models 10-30x slower (unless OMP_WAIT_POLICY=PASSIVE)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("quiet_random_weights")


@pytest.fixture(scope="module")
def teacher_run(tiny, tmp_path_factory):
    """Stage 1 for 4 epochs of 1 iteration (the lr halves after 3), validated each epoch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scicevpr.RandomWeightsWarning)
        config = quick_config(tiny, tmp_path_factory.mktemp("runs") / "teacher", epochs=4)
        return config, train_teacher(config)


def _groups(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        group = next((g for g in ("backbone.", "fusion.conv.", "fusion.token_mixers.", "pool.", "encoder.") if k.startswith(g)), k)
        out.setdefault(group, {})[k] = v
    return out


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, bool]:
    return {k: not torch.equal(before[k], after[k]) for k in before}


# --------------------------------------------------------------------------------------------
# Configuration, sampler, schedule
# --------------------------------------------------------------------------------------------


def test_train_config_defaults_are_the_papers():
    c = TrainConfig()
    assert (c.places_per_batch, c.img_per_place, c.lr, c.lr_step_epochs, c.lr_gamma) == (72, 4, 1e-4, 3, 0.5)
    assert (c.loss.gamma, c.loss.eta) == (1.0, 1.0)
    assert c.model == "SuperCricaVPR" and c.model_config().name == "SciceVPR-B"
    assert c.val_dataset == "pitts30k" and c.val_split == "val" and c.eval_batch_size == 16
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_train_config_rejects_a_model_preset_mismatch():
    with pytest.raises(ValueError, match="CricaVPR"):
        TrainConfig(model="CricaVPR", preset="SciceVPR-S").model_config()
    assert TrainConfig(model="CricaVPR").model_config().name == "CricaVPR"


def _config_classes():
    from scicevpr.config import BackboneConfig, CricaVPRConfig, EvalConfig, LossConfig, ModelConfig
    from scicevpr.index import IndexConfig
    from scicevpr.offline.config import ClaimsConfig, PretrainConfig

    return [BackboneConfig, ModelConfig, CricaVPRConfig, LossConfig, EvalConfig, TrainConfig, PretrainConfig,
            ClaimsConfig, IndexConfig]


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_number_of_every_config_refuses_a_wrong_type_by_its_name(cls):
    """``config.check_number_fields``: a string, a bool, a fractional int or a NaN in any number
    field of any config is one message naming the field, when the config is built (before a run
    folder is written), not a TypeError deep in a run."""
    import dataclasses

    numeric = [f for f in dataclasses.fields(cls) if str(f.type).removesuffix(" | None") in ("int", "float")]
    assert len(numeric) >= 2
    for f in numeric:
        is_int = str(f.type).startswith("int")
        for bad in ("3", True, 2.5 if is_int else float("nan")):
            with pytest.raises(ValueError, match=rf"\b{f.name}\S* must be (an int|a positive int|a finite number)"):
                cls(**{f.name: bad})


def test_a_city_named_alone_is_one_city_and_recall_values_are_a_tuple():
    from scicevpr.config import EvalConfig
    from scicevpr.offline.config import PretrainConfig

    assert TrainConfig(cities="London").cities == ("London",) == PretrainConfig(cities="London").cities
    assert TrainConfig(cities=["London", "Boston"]).cities == ("London", "Boston")
    assert EvalConfig(recall_values=[1, 5]).recall_values == (1, 5) and EvalConfig(recall_values=5).recall_values == (5,)


def test_lr_halves_every_three_epochs_stepped_per_iteration():
    ipe = 5
    opt = make_optimizer(torch.nn.Linear(2, 2), TrainConfig())
    sched = make_scheduler(opt, TrainConfig(), ipe)
    lrs = []
    for _ in range(10 * ipe):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for i, lr in enumerate(lrs):
        assert lr == pytest.approx(1e-4 * 0.5 ** (i // (3 * ipe)))
    assert lrs[3 * ipe - 1] == pytest.approx(1e-4) and lrs[3 * ipe] == pytest.approx(5e-5)


def test_ranks_split_each_global_batch_of_places():
    one = list(PlaceBatchSampler(40, 8, seed=3))
    r0, r1 = list(PlaceBatchSampler(40, 8, 3, rank=0, world_size=2)), list(PlaceBatchSampler(40, 8, 3, rank=1, world_size=2))
    assert len(one) == 5 and all(len(b) == 8 for b in one)
    assert [a + b for a, b in zip(r0, r1)] == one
    assert sorted(sum(one, [])) == list(range(40))
    s = PlaceBatchSampler(40, 8, seed=3)
    s.set_epoch(1)
    assert list(s) != one  # reshuffled per epoch
    with pytest.raises(ValueError, match="divisible"):
        PlaceBatchSampler(40, 9, world_size=2)
    with pytest.raises(ValueError, match="lower places_per_batch"):
        PlaceBatchSampler(5, 8)


# --------------------------------------------------------------------------------------------
# Stage 1 and stage 2: only the intended parameters change
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stage1_trains_fusion_mixers_gem_encoder_and_not_the_backbone(teacher_run):
    config, result = teacher_run
    before = create_model("SuperCricaVPR", config.model_config(), weights=None, seed=config.seed).state_dict()
    after = result.model.state_dict()
    changed = {g: _changed({k: before[k] for k in ks}, ks) for g, ks in _groups(after).items()}
    assert not any(changed["backbone."].values())
    for group in ("fusion.conv.", "fusion.token_mixers.", "pool.", "encoder."):
        assert all(changed[group].values()), f"{group}: {[k for k, c in changed[group].items() if not c]} did not train"
    # the run folder, the log and the schedule
    assert {p.name for p in result.run_dir.iterdir()} >= {"config.json", "log.csv", "last.pt", "best.pt"}
    log = result.history
    assert list(log["epoch"]) == [1, 2, 3, 4] and list(log["iteration"]) == [1, 2, 3, 4]
    assert list(log["lr"]) == pytest.approx([1e-4, 1e-4, 1e-4, 5e-5])
    for col in ("loss", "loss_ms", "images_per_s", "R@1", "R@5", "R@10"):
        assert log[col].notna().all(), col
    assert result.best_epoch == int(log.loc[log["R@5"].idxmax(), "epoch"])  # first epoch with the best R@5


@pytest.mark.slow
def test_stage2_trains_only_the_student_heads(tiny, teacher_run, tmp_path):
    config, t_result = teacher_run
    teacher_before = load_model(t_result.best_path).state_dict()
    s_result = train_student(quick_config(tiny, tmp_path / "student", teacher=str(t_result.best_path), epochs=1))
    student, teacher = s_result.model, s_result.teacher
    assert isinstance(student, scicevpr.SciceVPR) and student.backbone is teacher.backbone
    # the teacher, its backbone and the conv copied from it are untouched
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    for k in ("weight", "bias"):
        assert torch.equal(getattr(student.fusion.conv, k), teacher_before[f"fusion.conv.{k}"])
    # the student's own heads trained: compare with its initialisation (same seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        init = scicevpr.SciceVPR.from_teacher(load_model(t_result.best_path)).state_dict()
    changed = {g: _changed({k: init[k] for k in ks}, ks) for g, ks in _groups(student.state_dict()).items()}
    assert not any(changed["backbone."].values()) and not any(changed["fusion.conv."].values())
    for group in ("fusion.token_mixers.", "pool.", "encoder."):
        assert all(changed[group].values()), f"{group}: {[k for k, c in changed[group].items() if not c]} did not train"
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(load_model(s_result.best_path, expected="SciceVPR")(x), student.eval()(x))
    log = s_result.history
    assert log[["loss", "loss_ms", "loss_d"]].notna().all().all()
    assert log["loss"].iloc[0] == pytest.approx(log["loss_ms"].iloc[0] + log["loss_d"].iloc[0], rel=1e-5)  # gamma = eta = 1


@pytest.mark.slow
def test_cricavpr_trains_its_adapters_through_the_same_loop(tiny, tmp_path):
    config = quick_config(tiny, tmp_path / "crica", model="CricaVPR", preset="CricaVPR-S",
                          model_overrides={"image_size": 56}, val_dataset=None, max_iters_per_epoch=2)
    result = train_teacher(config)
    before = create_model("CricaVPR", config.model_config(), weights=None, seed=config.seed).state_dict()
    after = result.model.state_dict()
    adapters = [k for k in after if ".adapter." in k and not k.endswith("num_batches_tracked")]
    dinov2 = [k for k in after if k.startswith("backbone.") and ".adapter." not in k]
    assert adapters and dinov2
    assert not [k for k in dinov2 if not torch.equal(before[k], after[k])]
    # D_fc2 starts at zero, so the rest of an adapter receives gradient from step 2 on (some
    # BatchNorm scales behind a ReLU that is off everywhere may never do): check the linears.
    trained = [k for k in adapters if ".D_fc" in k] + ["pool.p", "encoder.layers.0.linear1.weight"]
    unchanged = [k for k in trained if torch.equal(before[k], after[k])]
    assert len(trained) == 2 + 4 * 12 and not unchanged, unchanged
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(load_model(result.last_path, expected="CricaVPR")(x), result.model.eval()(x))


def test_backbone_cache_in_training_reuses_the_teachers_batches_and_changes_no_weight(tiny, tmp_path, cache):
    """A student draws its teacher's first batches (same seed) through the same frozen backbone:
    with a BackboneCache passed, its training reuses them and ends with exactly the weights it gets
    with the cache off. A backbone that trains (CricaVPR's adapters) is never served from it."""
    kw = dict(epochs=2, max_iters_per_epoch=2, val_dataset=None)
    t_cached = train_teacher(quick_config(tiny, tmp_path / "teacher", **kw), cache)
    assert (cache.hits, cache.misses) == (0, 4)  # 2 epochs x 2 batches, all new
    student = dict(teacher=str(t_cached.last_path), **kw)
    s_cached = train_student(quick_config(tiny, tmp_path / "student", **student), cache)
    assert (cache.hits, cache.misses) == (4, 4), "the student's batches are the teacher's"
    s_plain = train_student(quick_config(tiny, tmp_path / "student-plain", **student))  # no cache
    for k, v in s_plain.model.state_dict().items():
        assert torch.equal(v, s_cached.model.state_dict()[k]), k

    crica = quick_config(tiny, tmp_path / "crica", model="CricaVPR", preset="CricaVPR-S",
                         model_overrides={"image_size": 56}, **kw)
    train_teacher(crica, cache)
    assert (cache.hits, cache.misses) == (4, 4), "an adapted backbone's outputs need autograd: not cached"


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_load_model_rebuilds_the_trained_model_from_the_file_alone(teacher_run):
    _, result = teacher_run
    model = load_model(result.best_path)
    assert type(model) is scicevpr.SuperCricaVPR and not model.training and model.is_random_init
    ck = read_checkpoint(result.best_path)
    assert ck["backbone"]["source"] == "random" and "backbone_state" not in ck  # rebuilt from its seed
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model(x), result.model.eval()(x))


def test_checkpoint_with_a_stored_backbone_and_a_fingerprint_check(tmp_path):
    cfg = scicevpr.get_config("SciceVPR-S", **SMALL_HEADS)
    model = create_model("SciceVPR", cfg, weights=None, seed=5)
    save_checkpoint(tmp_path / "stored.pt", model, store_backbone=True)
    assert read_checkpoint(tmp_path / "stored.pt")["backbone"]["source"] == "stored"
    again = load_model(tmp_path / "stored.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    # a random backbone that can no longer be reproduced is an error, not another model
    save_checkpoint(tmp_path / "seeded.pt", model)
    ck = torch.load(tmp_path / "seeded.pt", weights_only=True)
    ck["backbone"]["seed"] = 6
    torch.save(ck, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match="fingerprint"):
        load_model(tmp_path / "tampered.pt")


def test_a_checkpoint_on_a_weight_file_replaced_at_its_path_finds_the_right_one_or_says_where(tmp_path, monkeypatch):
    """The recorded weight file exists but holds other weights (replaced, or a relative path read
    from another folder): the file weights='auto' finds ($SCICEVPR_WEIGHTS) is used when it is
    the training's; else the error names the recorded file and the way out."""
    cfg = scicevpr.get_config("SciceVPR-S", backbone_num_blocks=1, layers=(0,), **SMALL_HEADS)
    fname = f"{cfg.backbone.hub_name}_pretrain.pth"
    (tmp_path / "used").mkdir()
    (tmp_path / "right").mkdir()
    used, right = tmp_path / "used" / fname, tmp_path / "right" / fname
    torch.save(create_model("SciceVPR", cfg, weights=None, seed=1).backbone.state_dict(), used)
    shutil.copy(used, right)
    model = create_model("SciceVPR", cfg, weights=used, seed=0)
    save_checkpoint(tmp_path / "model.pt", model)
    torch.save(create_model("SciceVPR", cfg, weights=None, seed=2).backbone.state_dict(), used)  # replaced
    monkeypatch.setenv("SCICEVPR_WEIGHTS", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"weight file .*used.* is not the one used in training; point SCICEVPR_WEIGHTS"):
        load_model(tmp_path / "model.pt")
    monkeypatch.setenv("SCICEVPR_WEIGHTS", str(tmp_path / "right"))
    again = load_model(tmp_path / "model.pt")
    assert again.backbone.fingerprint == model.backbone.fingerprint


def test_native_checkpoints_hold_only_tensors_and_plain_types(teacher_run):
    """So that they load with weights_only=True and nothing allowed beyond torch's defaults."""
    _, result = teacher_run
    for path in (result.last_path, result.best_path):
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["format"] == "scicevpr-checkpoint" and isinstance(ckpt["meta"]["torch"], str)
    assert isinstance(torch.load(result.last_path, weights_only=True)["training"]["rng"]["numpy"][1], list)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    cfg = scicevpr.get_config("SciceVPR-S", **SMALL_HEADS)
    model = create_model("SuperCricaVPR", cfg, weights=None, seed=0)
    path = save_checkpoint(tmp_path / "last.pt", model, meta={"epoch": 1})
    good = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with torch.no_grad():
        model.encoder.layers[0].linear1.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, meta={"epoch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    assert read_checkpoint(path)["meta"]["epoch"] == 1


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny, tmp_path):
    common = dict(epochs=2, max_iters_per_epoch=2, num_workers=2)
    straight = train_teacher(quick_config(tiny, tmp_path / "straight", **common))
    # a run "killed" after its first epoch, then resumed
    train_teacher(quick_config(tiny, tmp_path / "resumed", **{**common, "epochs": 1}))
    resumed = train_teacher(quick_config(tiny, tmp_path / "resumed", **common, resume=True))

    a, b = read_checkpoint(straight.last_path), read_checkpoint(resumed.last_path)
    assert a["model_state"].keys() == b["model_state"].keys()
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k
    sa, sb = a["training"]["optimizer"]["state"], b["training"]["optimizer"]["state"]
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][k], sb[i][k])
    assert a["training"]["scheduler"] == b["training"]["scheduler"]
    cols = ["epoch", "iteration", "loss", "lr", "R@1", "R@5", "R@10"]
    pd.testing.assert_frame_equal(straight.history[cols], resumed.history[cols])
    # nothing left to do: resuming a finished run returns it unchanged
    again = train_teacher(quick_config(tiny, tmp_path / "resumed", **common, resume=True))
    assert len(again.history) == 2


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------


def test_an_existing_run_folder_is_not_overwritten(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("epoch\n1\n")
    with pytest.raises(FileExistsError, match="resume=True"):
        train_teacher(quick_config(tiny, run))
    assert (run / "log.csv").read_text() == "epoch\n1\n"


def test_a_run_folder_in_use_is_refused_before_anything_is_written(tiny, tmp_path):
    run = tmp_path / "run"
    with lock_run_dir(run):  # another training holds it
        with pytest.raises(RunDirInUseError, match=r"run folder '.*run' is in use by another training"):
            train_teacher(quick_config(tiny, run))
        assert [p.name for p in run.iterdir()] == [".lock"]


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_a_fresh_log(tiny, tmp_path, monkeypatch):
    """The log row of epoch 1 is written before last.pt: a run killed between the two is
    resumed from scratch, and its log must not keep the row of the epoch done again."""
    import scicevpr.train as train_module

    config = quick_config(tiny, tmp_path / "run", val_dataset=None)
    real_save = train_module.save_checkpoint

    def killed(path, *args, **kwargs):
        if Path(path).name == "last.pt":
            raise KeyboardInterrupt("killed")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(config)
    assert len(pd.read_csv(tmp_path / "run" / "log.csv")) == 1 and not (tmp_path / "run" / "last.pt").exists()
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    result = train_teacher(config.replace(resume=True))
    assert list(result.history["epoch"]) == [1]


@pytest.mark.parametrize("text", ['{"pretrain": {}}', "not json"])
def test_resume_into_a_folder_of_something_else_is_one_clear_error(tiny, tmp_path, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(text)
    with pytest.raises(ValueError, match="is not a training run's configuration.*another run_dir"):
        train_teacher(quick_config(tiny, run, resume=True))


@pytest.mark.parametrize("bad, match", [(dict(seed=-1), "seed must be an int >= 0, got -1"),
                                        (dict(epochs=2.5), r"epochs must be an int or None, got 2.5 \(float\)"),
                                        (dict(num_workers=-1), "num_workers must be >= 0, got -1"),
                                        (dict(device="gpu"), "device='gpu' is not a device; use 'auto'")])
def test_a_bad_setting_is_refused_before_a_run_starts(tiny, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train_teacher(quick_config(tiny, tmp_path / "run", **bad))
    assert not (tmp_path / "run").exists()


def test_a_student_resumes_only_on_the_teacher_it_started_with(tiny, teacher_run, tmp_path):
    _, t_result = teacher_run
    teacher = tmp_path / "teacher.pt"
    shutil.copy(t_result.best_path, teacher)
    config = quick_config(tiny, tmp_path / "student", teacher=str(teacher), val_dataset=None)
    train_student(config)
    shutil.copy(t_result.last_path, teacher)  # stage 1 went on: another file at the same path
    assert (t_result.best_path.read_bytes() != teacher.read_bytes())
    with pytest.raises(ValueError, match="teacher .* has changed since the run started"):
        train_student(config.replace(epochs=2, resume=True))
    shutil.copy(t_result.best_path, teacher)  # the first teacher back: the run goes on
    assert list(train_student(config.replace(epochs=2, resume=True)).history["epoch"]) == [1, 2]


def test_resume_accepts_a_run_recorded_before_a_field_was_added(tiny, tmp_path):
    from scicevpr.train import _prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    config = quick_config(tiny, run, val_dataset=None)
    then = {k: v for k, v in config.to_dict().items() if k not in ("drop_small_places", "skip_corrupt", "trust_checkpoint")}
    (run / "config.json").write_text(json.dumps({"stage": "teacher", "train": then}))
    assert _prepare_run_dir(run, config.replace(resume=True), "teacher") is False  # nothing to resume, no refusal
    with pytest.raises(ValueError, match="drop_small_places: True then, False now"):
        _prepare_run_dir(run, config.replace(resume=True, drop_small_places=False), "teacher")


def test_resume_with_another_configuration_is_refused(tiny, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = quick_config(tiny, run, val_dataset=None)
    (run / "config.json").write_text(json.dumps({"stage": "teacher", "train": config.to_dict()}))
    with pytest.raises(ValueError, match="lr"):
        train_teacher(config.replace(lr=1e-3, resume=True))


def test_stage2_needs_an_existing_teacher_checkpoint(tiny, tmp_path):
    with pytest.raises(ValueError, match="needs a trained teacher"):
        train_student(quick_config(tiny, tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="Train the teacher first"):
        train_student(quick_config(tiny, tmp_path / "b", teacher=str(tmp_path / "missing.pt")))


def test_a_checkpoint_of_the_wrong_model_kind_is_refused(tiny, tmp_path):
    cfg = scicevpr.get_config("SciceVPR-S", **SMALL_HEADS)
    path = save_checkpoint(tmp_path / "student.pt", create_model("SciceVPR", cfg, weights=None))
    with pytest.raises(ValueError, match="holds a SciceVPR.*SuperCricaVPR"):
        train_student(quick_config(tiny, tmp_path / "run", teacher=str(path)))
    with pytest.raises(ValueError, match="holds a SciceVPR"):
        load_model(path, expected="SuperCricaVPR")
    torch.save({"model_state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a scicevpr checkpoint"):
        load_model(tmp_path / "foreign.pt")


# --------------------------------------------------------------------------------------------
# It learns
# --------------------------------------------------------------------------------------------


def _place_retrieval(model, dataset, config) -> dict[str, float]:
    """Leave-one-out retrieval among the training images (positives: the same place):
    R@1, R@5 and mean average precision, in percent."""
    from scicevpr.evaluate import compute_descriptors

    paths, labels = list(dataset.dataframe["path"]), torch.tensor(dataset.dataframe["place_id"].to_numpy().copy())
    d = torch.as_tensor(compute_descriptors(model, paths, config))  # (N, D), unit norm
    sims = d @ d.T
    sims.fill_diagonal_(-float("inf"))
    order = sims.argsort(dim=1, descending=True)[:, :-1]  # (N, N - 1) the others, nearest first
    hits = (labels[order] == labels[:, None]).float()  # (N, N - 1)
    precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1)
    ap = (precision * hits).sum(1) / hits.sum(1)
    return {"R@1": 100 * hits[:, 0].mean().item(), "R@5": 100 * hits[:, :5].amax(1).mean().item(),
            "mAP": 100 * ap.mean().item()}


@pytest.mark.slow
def test_training_improves_on_the_untrained_model(tiny, tmp_path):
    """The offline configuration on ``tiny`` (12 places, 3 iterations per epoch) for 60
    iterations. The lr is kept constant: the paper's halving every 3 epochs, stepped per
    iteration, would divide it by 64 within these 60 iterations."""
    from scicevpr.config import EvalConfig
    from scicevpr.evaluate import evaluate
    from scicevpr.offline.config import offline_train_config

    config = offline_train_config(tiny.gsv_root, tiny.vg_root, tmp_path / "teacher", dataset=tiny.dataset,
                                  places_per_batch=4, epochs=20, lr_step_epochs=1000, val_dataset=None,
                                  num_workers=0, progress=False)
    untrained = create_model("SuperCricaVPR", config.model_config(), weights=None, seed=config.seed)
    result = train_teacher(config)
    losses = result.history["loss"]
    assert losses.iloc[-5:].mean() < losses.iloc[:2].mean() - 0.1

    eval_cfg = EvalConfig(batch_size=16, amp=True, fast=False, num_workers=0, progress=False)
    data = GSVCitiesDataset(tiny.gsv_root, image_size=112)
    before, after = _place_retrieval(untrained, data, eval_cfg), _place_retrieval(result.model, data, eval_cfg)
    splits = [tiny.load_split(s) for s in ("val", "test")]
    r1_before = sum(evaluate(untrained, s, eval_cfg).recalls[1] * s.num_queries for s in splits)
    r1_after = sum(evaluate(result.model, s, eval_cfg).recalls[1] * s.num_queries for s in splits)
    print(f"training places {before} -> {after}; val+test R@1 {r1_before / 16:.1f} -> {r1_after / 16:.1f}")
    assert after["R@5"] >= before["R@5"] + 10 and after["mAP"] >= before["mAP"] + 3
    assert r1_after > r1_before
