"""Megatron and DeepSpeed checkpoints carrying a pickled payload: loading them runs nothing, and the error
names the file. (small.pt and pytorch_model.bin payloads: tests/test_cli_bad_inputs.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli_bad_inputs import RunsCode
from warm import hyperclone_in_process

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run(*cmd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` with a checkpoint whose unpickling would create ``marker`` (checked live)."""
    torch.save({"model": RunsCode(marker), "module": RunsCode(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()  # the payload is real ...
    marker.unlink()  # ... and is gone again before the tool reads it


def assert_refused(proc: subprocess.CompletedProcess, prefix: str, names: str, marker: Path) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1 and names in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr.split(errors[0])[0][-500:]
    assert not marker.exists()


def test_legacy_megatron_checkpoint_with_code(tiny_model_dirs, tmp_path):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "code-ran"
    made = hyperclone_in_process("convert", tiny_model_dirs["llama-gqa2"], "--out", ckpt, "--format", "legacy",
                                 "--width-factor", "2", "--no-progress")
    assert made.returncode == 0, made.stderr[-2000:]
    rank_file = next(ckpt.glob("iter_*/mp_rank_00/model_optim_rng.pt"))
    plant(rank_file, marker)
    proc = hyperclone_in_process("export", ckpt, "--format", "hf", "--out", tmp_path / "hf")
    assert_refused(proc, "hyperclone export: error:", "model_optim_rng.pt", marker)
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_deepspeed_training_checkpoint_with_code(tmp_path):
    save, marker = tmp_path / "save", tmp_path / "code-ran"
    flags = ["launch/pretrain.py", "--init", "random", "--model-config", "configs/models/llama-tiny.json",
             "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2", "--no-progress",
             "--save", save]
    made = run(*flags, "--train-iters", "1")
    assert made.returncode == 0, made.stderr[-2000:]
    plant(next(save.glob("global_step1/mp_rank_00_model_states.pt")), marker)
    proc = run(*flags, "--train-iters", "2", "--load", save)
    assert_refused(proc, "pretrain.py: error:", "mp_rank_00_model_states.pt", marker)
