"""The precision policy (scicevpr/precision.py): bf16 autocast on a CPU only where bf16 is native,
fp32 in the offline configuration, the pinned CPU kernels that make the stored notebook outputs
hold bit for bit on the AMD kinds they were made on, and how `make` checks them elsewhere."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import scicevpr
from scicevpr import precision
from scicevpr.offline.synthetic import generate
from scicevpr.config import EvalConfig
from scicevpr.evaluate import amp_enabled, compute_descriptors
from scicevpr.stability import batch_stability, encode_in_batches
from scicevpr.config import TrainConfig
from scicevpr.offline.config import offline_train_config
from scicevpr.train import train_teacher

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"image_size": 56, "mix_dim": 64, "encoder_heads": 4, "encoder_ffn": 128, "layers": (0, 1, 2, 3)}


pytestmark = pytest.mark.usefixtures("quiet_random_weights")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic") / "tiny", "tiny", progress=False)


def native(monkeypatch, value: bool) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)


class AutocastSpy:
    """Records, at every forward of every module of a model, whether CPU bf16 autocast is on."""

    def __init__(self, *models: torch.nn.Module):
        self.seen: list[bool] = []
        self.handles = [m.register_forward_pre_hook(self._hook) for model in models for m in model.modules()]

    def _hook(self, module, args):
        self.seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)

    @property
    def bf16(self) -> bool:
        return any(self.seen)


def test_resolution_follows_the_cpu(monkeypatch):
    native(monkeypatch, False)
    assert not precision.resolve_amp("cpu", None)
    with pytest.warns(UserWarning, match="without native bf16.*fp32 is used"):
        assert not precision.resolve_amp("cpu", True)
    assert not precision.resolve_amp("cpu", False)
    with pytest.raises(RuntimeError, match="without native bf16"):
        precision.autocast("cpu", True)
    assert "fp32" in precision.describe("cpu", False) and "not native" in precision.describe("cpu", False)
    native(monkeypatch, True)
    assert precision.resolve_amp("cpu", None) and precision.resolve_amp("cpu", True)
    assert not precision.resolve_amp("cpu", False)
    assert precision.resolve_amp("cuda", True) and not precision.resolve_amp("cuda", False)


def test_pinned_kernels_count_as_not_native(monkeypatch):
    precision.cpu_has_native_bf16.cache_clear()
    try:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        assert not precision.cpu_has_native_bf16()
    finally:
        precision.cpu_has_native_bf16.cache_clear()


def test_eval_flags_never_request_emulated_bf16(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    native(monkeypatch, False)
    assert not amp_enabled(EvalConfig(fast=True), cpu)
    assert not amp_enabled(EvalConfig(), cpu) and not amp_enabled(EvalConfig(fast=False), cuda)
    assert amp_enabled(EvalConfig(fast=True), cuda)
    native(monkeypatch, True)
    assert amp_enabled(EvalConfig(fast=True), cpu) and not amp_enabled(EvalConfig(), cpu)


def _student():
    torch.manual_seed(0)
    return scicevpr.SciceVPR("SciceVPR-S", weights=None, **TINY_MODEL).eval()


@pytest.mark.parametrize("is_native", [False, True])
def test_no_cpu_code_path_runs_bf16_without_native_support(monkeypatch, tiny, tmp_path, is_native):
    """Training, evaluation (plain, fast, amp=True) and the stability sweep: with native bf16
    patched off, no module ever runs under CPU bf16 autocast; patched on, amp=True does (so this
    test sees autocast when it happens)."""
    native(monkeypatch, is_native)
    split = tiny.load_split("test")
    model = _student()
    spy = AutocastSpy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for cfg in (EvalConfig(num_workers=0, progress=False), EvalConfig(num_workers=0, progress=False, fast=True),
                    EvalConfig(num_workers=0, progress=False, amp=True)):
            compute_descriptors(model, split.query_paths[:4], cfg)
        encode_in_batches(model, torch.randn(3, 14, 64), 2, amp=True)
        batch_stability(model, split, query_batch_sizes=(1, 2), num_orders=1,
                        config=EvalConfig(num_workers=0, progress=False, amp=True))
    assert spy.bf16 == is_native

    config = TrainConfig(preset="SciceVPR-S", model_overrides=TINY_MODEL, weights=None, gsv_root=str(tiny.gsv_root),
                         places_per_batch=4, img_per_place=4, num_workers=0, val_dataset=None, device="cpu",
                         progress=False, epochs=1, max_iters_per_epoch=1, run_dir=str(tmp_path / "run"), amp=None)
    seen: list[bool] = []
    original = torch.nn.Module.__call__

    def spying_call(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", spying_call)
    train_teacher(config)
    assert seen and any(seen) == is_native


def test_the_offline_recipe_and_notebooks_run_in_fp32():
    assert offline_train_config("g", "v", "r").amp is False
    from scicevpr.lab.notebook import setup

    assert setup("offline", quiet=True).amp is False


def test_the_makefile_pins_the_kernels_the_package_names():
    """``make`` exports exactly :data:`PINNED_CPU_KERNELS` (one list, two places that must agree)."""
    text = (REPO / "Makefile").read_text()
    exported = dict(re.findall(r"^export (\w+) \?= (\S+)$", text, flags=re.M))
    for name, value in precision.PINNED_CPU_KERNELS.items():
        assert exported.get(name) == value, name
    from scicevpr.cli import demo_environment

    env = demo_environment()
    assert all(env[k] == v for k, v in precision.PINNED_CPU_KERNELS.items())


def test_pinned_kernels_take_effect_in_a_fresh_process():
    """With the pinned environment torch reports AVX2 kernels, bf16 counts as not native and FAISS
    computes distances with its AVX2 code."""
    import os
    import subprocess
    import sys

    code = ("import faiss, torch, scicevpr.precision as p; "
            "print(torch.backends.cpu.get_cpu_capability(), p.cpu_has_native_bf16(), p.cpu_kernels_pinned(), "
            "faiss.SIMDConfig.get_level_name())")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **precision.PINNED_CPU_KERNELS},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["AVX2", "False", "True", "AVX2"]


def test_the_settings_banner_states_precision_and_kernels(monkeypatch):
    from scicevpr.lab.notebook import setup

    for name, value in precision.PINNED_CPU_KERNELS.items():
        monkeypatch.setenv(name, value)
    text = setup("offline", quiet=True).describe()
    assert "fp32 (offline: fp32 on every CPU kind, never emulated bf16)" in text
    assert "CPU kernels     : AVX2, pinned" in text
    monkeypatch.delenv("MKL_CBWR")
    assert "CPU kernels     : native" in setup("offline", quiet=True).describe()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_checks_the_stored_outputs_exactly_on_the_amd_kinds_and_within_tolerance_elsewhere():
    """``make test-notebooks``: nbval on every notebook where the pinned kernels give the stored
    outputs bit for bit (the AMD kinds they were made on); elsewhere nbval on the untrained 01 and
    02 and ``tests/nbcompare.py`` on 04, 05 and 03. ``make -n`` prints the commands, runs none."""
    import os
    import subprocess

    # not the choice of a make that runs these tests (`make test NOTEBOOK_CHECK=...` passes it on)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "NOTEBOOK_CHECK")}

    def commands(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-n", "--no-print-directory", "test-notebooks", *args], cwd=REPO,
                              capture_output=True, text=True, env=env)

    exact = commands("NOTEBOOK_CHECK=exact").stdout
    assert re.search(r"--nbval .* notebooks/$", exact, flags=re.M) and "nbcompare" not in exact
    tolerance = commands("NOTEBOOK_CHECK=tolerance").stdout
    assert re.search(r"--nbval .* notebooks/01_\*\.ipynb notebooks/02_\*\.ipynb$", tolerance, flags=re.M)
    assert re.search(r"nbcompare\.py notebooks/04_\*\.ipynb notebooks/05_\*\.ipynb notebooks/03_\*\.ipynb$",
                     tolerance, flags=re.M)
    amd = "AuthenticAMD" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    assert commands().stdout == (exact if amd else tolerance)
    wrong = commands("NOTEBOOK_CHECK=approximately")
    assert "expected exact or tolerance" in wrong.stdout
