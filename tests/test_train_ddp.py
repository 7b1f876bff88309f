"""Multi-process training (torch.distributed, gloo on the CPU) equals one process.

Two ranks with P / 2 places each must train the model that one process trains with the same
global batch of P places. The per-image features are all-gathered with gradient and every
rank runs the encoder and L_MS on the global batch, with identical dropout masks (same seed),
so the only differences are floating-point summation orders. Both runs are in fp32
(``amp=False``): with the precision policy's default, a CPU with native bf16 (AMX, AVX512-BF16)
trains under bf16 autocast, whose 8-bit mantissas round differently when the batch is split
(measured with AVX-512 kernels: 2e-3 relative in the first training step's gradients, 1.2e-2 in
the weights after 2 Adam steps): that is bf16's precision, not a property of DDP.

- the first step's gradients agree to 1e-4 of each tensor's largest entry (measured: ~2e-6);
- after 2 Adam steps the weights' updates agree to 1e-3 in relative norm (measured: 6e-5 with
  AVX2 kernels, 9e-5 with AVX-512 ones). Adam divides by the gradient's running magnitude, so
  entries whose gradient is ~0 (e.g. attention's key biases) move by rounding noise / eps x lr;
  the gradient check is the strict one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from scicevpr.checkpoint import read_checkpoint
from scicevpr.factory import create_model
from scicevpr.offline.synthetic import generate
from scicevpr.config import TrainConfig

SCRIPT = Path(__file__).with_name("train_ddp_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_two_ranks_train_the_same_model_as_one_process(tmp_path):
    tiny = generate(tmp_path / "tiny", "tiny", progress=False)
    outs = {}
    for name, launcher in {
        "one": [sys.executable],
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())],
    }.items():
        out = tmp_path / name
        out.mkdir()
        config = TrainConfig(
            preset="SciceVPR-S", weights=None, places_per_batch=4, img_per_place=4, num_workers=0,
            model_overrides={"image_size": 56, "mix_dim": 64, "encoder_heads": 4, "encoder_ffn": 128},
            gsv_root=str(tiny.gsv_root), val_dataset=None, device="cpu", progress=False,
            epochs=1, max_iters_per_epoch=2, lr=1e-3, run_dir=str(out / "run"), amp=False,
        )
        (out / "config.json").write_text(json.dumps(config.to_dict()))
        _run(launcher + [str(SCRIPT), str(out / "config.json"), str(out)], cwd=tmp_path)
        outs[name] = out

    # the first step: the same global loss and gradients
    a, b = (torch.load(outs[k] / "grads.pt", weights_only=True) for k in ("one", "two"))
    assert torch.allclose(a["loss"], b["loss"], rtol=1e-5)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 0
    for k, g in a["grads"].items():
        assert (g - b["grads"][k]).abs().max() <= 1e-4 * g.abs().max(), k

    # two iterations of train_teacher: the same losses and weights
    la, lb = (pd.read_csv(outs[n] / "run" / "log.csv") for n in ("one", "two"))
    assert la["loss"].iloc[0] == pytest.approx(lb["loss"].iloc[0], rel=1e-5)
    config = TrainConfig.from_dict(json.loads((outs["one"] / "config.json").read_text()))
    init = create_model("SuperCricaVPR", config.model_config(), weights=None, seed=config.seed).state_dict()
    wa = read_checkpoint(outs["one"] / "run" / "last.pt")["model_state"]
    wb = read_checkpoint(outs["two"] / "run" / "last.pt")["model_state"]
    assert read_checkpoint(outs["two"] / "run" / "last.pt")["meta"]["world_size"] == 2
    da = torch.cat([(wa[k] - init[k]).flatten() for k in wa])
    db = torch.cat([(wb[k] - init[k]).flatten() for k in wa])
    assert da.norm() > 0
    assert (da - db).norm() <= 1e-3 * da.norm()


@pytest.mark.slow
def test_a_torchrun_pretraining_of_the_cnn_trains_on_both_ranks_and_exports_once(tmp_path):
    """``torchrun ... pretrain-backbone --objective cnn``: P places split over 2 ranks, one run
    folder, one log, and one export written by rank 0 alone (the ranks outlive the process group)."""
    tiny = generate(tmp_path / "tiny", "tiny", progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "scicevpr.cli", "pretrain-backbone", "--objective", "cnn",
           "--data", str(tiny.root), "--distil-size", "32", "--batch-size", "16", "--cache-size", "64", "--num-workers", "0",
           "--steps", "2", "--device", "cpu", "--log-every", "1", "--run-dir", str(tmp_path / "run"),
           "--export", str(tmp_path / "cnn.pt"), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("written ") == 1 and proc.stdout.count("run folder") == 1, proc.stdout
    manifest = json.loads((tmp_path / "cnn.json").read_text())
    assert manifest["steps"] == 2 and manifest["machines"][0]["world_size"] == 2
    assert list(pd.read_csv(tmp_path / "run" / "log.csv")["step"]) == [1, 2]
