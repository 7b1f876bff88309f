"""The memory check before a training starts (scicevpr.memory) and the automatic choice of
activation checkpointing it makes in scicevpr.train."""

from __future__ import annotations

import json

import pytest
import torch

import scicevpr.memory as memory
from scicevpr.config import TrainConfig
from scicevpr.memory import GIB, MIB, InsufficientMemoryError, StepMemory, plan_training_memory, step_memory

pytestmark = pytest.mark.usefixtures("quiet_random_weights")

PLAIN = StepMemory(0.1 * GIB, 160 * MIB)  # about CricaVPR-B's measured line
CKPT = StepMemory(0.1 * GIB, 20 * MIB)


# ---- the decision, a pure function -----------------------------------------------------------


def test_a_batch_that_fits_trains_without_checkpointing():
    plan = plan_training_memory(PLAIN, CKPT, 8, 4, available=16 * GIB)
    assert not plan.checkpointing and plan.need == PLAIN.need(32) and plan.available == 16 * GIB


def test_checkpointing_is_chosen_when_only_it_fits():
    plan = plan_training_memory(PLAIN, CKPT, 72, 4, available=24 * GIB)
    assert plan.checkpointing and plan.need == CKPT.need(288)
    assert plan.record()["need_gib"] == round(CKPT.need(288) / GIB, 2)


def test_a_batch_that_does_not_fit_stops_with_the_need_what_there_is_and_the_choices():
    with pytest.raises(InsufficientMemoryError) as e:
        plan_training_memory(PLAIN, CKPT, 72, 4, available=24 * GIB, requested=False,
                             what="training CricaVPR (CricaVPR, 224 px, fp32)", device="this machine's memory")
    text = str(e.value)
    need = PLAIN.need(288) / GIB
    assert f"needs about {need:.1f} GiB" in text and "has 24.0 GiB free" in text and "72 x 4" in text
    fit_p = PLAIN.max_images(0.9 * 24 * GIB) // 4
    assert f"places_per_batch (P) <= {fit_p} with K = 4" in text
    assert "activation_checkpointing=True" in text and f"about {CKPT.need(288) / GIB:.1f} GiB" in text
    assert "bf16" in text and "Nothing of this run was trained or written" in text


def test_when_neither_fits_the_error_names_the_batch_that_fits_with_checkpointing():
    with pytest.raises(InsufficientMemoryError, match=r"about \d+\.\d GiB, and with it P <= \d+;"):
        plan_training_memory(PLAIN, CKPT, 72, 4, available=4 * GIB)
    with pytest.raises(InsufficientMemoryError) as e:  # forced on, and still too large
        plan_training_memory(PLAIN, CKPT, 72, 4, available=4 * GIB, requested=True)
    assert "activation_checkpointing=True" not in str(e.value) and "P) <= " in str(e.value)


def test_processes_share_the_batch():
    one = plan_training_memory(PLAIN, CKPT, 72, 4, available=24 * GIB)
    four = plan_training_memory(PLAIN, CKPT, 72, 4, available=24 * GIB, processes=4)
    assert one.checkpointing and not four.checkpointing and four.need == PLAIN.need(72)


def test_without_a_measured_row_or_a_known_memory_nothing_is_checked():
    for plain, available in ((None, 1), (PLAIN, None)):
        plan = plan_training_memory(plain, None, 72, 4, available=available)
        assert not plan.checkpointing and plan.need is None
        assert plan_training_memory(plain, None, 72, 4, available=available, requested=True).checkpointing


def test_a_frozen_backbone_offers_no_checkpointing():
    """The teacher keeps no graph through its backbone: its checkpointed line is its plain one."""
    with pytest.raises(InsufficientMemoryError) as e:
        plan_training_memory(PLAIN, PLAIN, 72, 4, available=8 * GIB)
    assert "activation_checkpointing" not in str(e.value)


def test_the_table_scales_with_the_image_and_covers_the_full_configurations():
    for key in [("CricaVPR", "CricaVPR", False), ("CricaVPR", "CricaVPR", True), ("SuperCricaVPR", "SciceVPR-B", False)]:
        assert key in memory.TRAINING_MEMORY, key
    assert step_memory("student", "SciceVPR-B", False) is not None
    row = memory.TRAINING_MEMORY[("CricaVPR", "CricaVPR", False)]
    assert step_memory("CricaVPR", "CricaVPR", False) == row
    small = step_memory("CricaVPR", "CricaVPR", False, image_size=112)
    assert small.base == row.base and small.per_image == pytest.approx(row.per_image * 65 / 257)
    assert step_memory("SciceVPR", "SciceVPR-B", False) == memory.TRAINING_MEMORY[("SuperCricaVPR", "SciceVPR-B", False)]
    assert step_memory("CricaVPR", "CricaVPR-S", False) is None
    # The paper's batch of CricaVPR-B fits 24 GB only with checkpointing (what the table says).
    big = step_memory("CricaVPR", "CricaVPR", False).need(288)
    ckpt = step_memory("CricaVPR", "CricaVPR", True).need(288)
    assert big > 24e9 > 0.9 * 24e9 > ckpt


def test_free_memory_on_the_cpu(tmp_path):
    assert memory.available_memory("cpu") > 0
    (tmp_path / "meminfo").write_text("MemTotal:       24000000 kB\nMemAvailable:   12345678 kB\n")
    assert memory._meminfo_available(str(tmp_path / "meminfo")) == 12345678 * 1024
    (tmp_path / "memory.max").write_text("max\n")
    assert memory._cgroup_free(str(tmp_path)) is None
    (tmp_path / "memory.max").write_text(f"{8 * GIB}\n")
    (tmp_path / "memory.current").write_text(f"{3 * GIB}\n")
    assert memory._cgroup_free(str(tmp_path)) == 5 * GIB


# ---- in training -----------------------------------------------------------------------------


def _config(bench, run_dir, **overrides) -> TrainConfig:
    base = dict(model="CricaVPR", preset="CricaVPR-S", model_overrides={"image_size": 56}, weights=None,
                gsv_root=str(bench.gsv_root), places_per_batch=4, img_per_place=4, num_workers=0,
                val_dataset=None, device="cpu", progress=False, epochs=1, max_iters_per_epoch=2,
                run_dir=str(run_dir))
    return TrainConfig(**{**base, **overrides})


@pytest.fixture
def small_machine(monkeypatch):
    """CricaVPR-S given lines that need 100 MiB per image at 224 px without checkpointing (6.6 at
    56 px) and 10 MiB with it, on a machine with 50 MiB free: a batch of 16 fits only checkpointed."""
    import scicevpr.train as train

    monkeypatch.setitem(memory.TRAINING_MEMORY, ("CricaVPR", "CricaVPR-S", False), StepMemory(0, 100 * MIB))
    monkeypatch.setitem(memory.TRAINING_MEMORY, ("CricaVPR", "CricaVPR-S", True), StepMemory(0, 10 * MIB))
    monkeypatch.setattr(train, "available_memory", lambda device: 50 * MIB)


def test_training_chooses_checkpointing_records_it_and_trains_the_same_weights(tiny_benchmark, tmp_path, small_machine,
                                                                                monkeypatch):
    import scicevpr.train as train
    from scicevpr.train import train_teacher

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        auto = train_teacher(_config(tiny_benchmark, tmp_path / "auto"))
        with pytest.raises(InsufficientMemoryError, match="activation_checkpointing=True"):
            train_teacher(_config(tiny_benchmark, tmp_path / "off", activation_checkpointing=False))
        assert not (tmp_path / "off").exists()  # stopped before anything was written
        monkeypatch.setattr(train, "available_memory", lambda device: 10 * GIB)  # room for the plain step
        plain = train_teacher(_config(tiny_benchmark, tmp_path / "plain"))
    finally:
        torch.set_num_threads(old)
    recorded = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert recorded["activation_checkpointing"] is True and recorded["train"]["activation_checkpointing"] is None
    assert recorded["memory"]["need_gib"] is not None and recorded["memory"]["available_gib"] == round(50 / 1024, 2)
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["activation_checkpointing"] is False
    a, b = auto.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "checkpointing changed the weights"
    assert auto.model.activation_checkpointing and not plain.model.activation_checkpointing


def test_a_finished_run_is_read_back_without_a_check(tiny_benchmark, tmp_path, monkeypatch):
    """Notebooks resume a finished run to read it: a machine too small to train it again reads it."""
    import scicevpr.train as train

    config = _config(tiny_benchmark, tmp_path / "run", max_iters_per_epoch=1, resume=True)
    first = train.train_teacher(config)
    monkeypatch.setitem(memory.TRAINING_MEMORY, ("CricaVPR", "CricaVPR-S", False), StepMemory(0, 100 * GIB))
    monkeypatch.setattr(train, "available_memory", lambda device: GIB)
    again = train.train_teacher(config)
    assert again.history.equals(first.history)
    with pytest.raises(InsufficientMemoryError):
        train.train_teacher(config.replace(epochs=2))  # training left to do: checked
