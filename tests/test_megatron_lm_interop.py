"""Megatron-LM's own code reads our checkpoints: its argument parser takes the flags `hyperclone
megatron-lm-flags` prints, its GPT builder and ``load_checkpoint`` build and fill the model (legacy at TP1,
torch_dist written at TP2 x PP2 loaded at TP1), and the logits equal the small model's.

Runs when MEGATRON_LM points at a Megatron-LM checkout (tag core_v0.16.1, the tree matching the pinned
megatron-core) and MEGATRON_LM_PYTHON (default: this Python) can import it (it also needs ``six`` and
``triton``, which Megatron-LM's training package imports):

    MEGATRON_LM=~/Megatron-LM MEGATRON_LM_PYTHON=~/mlm-env/bin/python .venv/bin/python -m pytest \\
        tests/test_megatron_lm_interop.py

No package index carries Megatron-LM's training code, so CI (which cannot fetch it) skips this file;
tests/test_megatron_lm_args.py pins the same arguments without it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hyperclone_dist.cli.main import main as hyperclone
from hyperclone_dist.megatron.load import LegacyCheckpoint
from hyperclone_dist.megatron.model import transformer_config

MEGATRON_LM = os.environ.get("MEGATRON_LM")
PYTHON = os.environ.get("MEGATRON_LM_PYTHON", sys.executable)
WORKER = Path(__file__).parent / "mp_workers" / "megatron_lm_load.py"
TOL = 1e-5

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MEGATRON_LM, reason="MEGATRON_LM names no Megatron-LM checkout")]


def _grown(small: Path, out: Path, *flags: str) -> Path:
    assert hyperclone(["convert", str(small), "--out", str(out), "--no-progress", "--width-factor", "2",
                       "--method", "noisy", *flags]) == 0
    return out


def _printed_flags(root: Path, *extra: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "hyperclone_dist.cli.main", "megatron-lm-flags", str(root), *extra],
                          capture_output=True, text=True, timeout=120, check=True)
    return shlex.split(proc.stdout.replace("\\\n", " "))


def _megatron_lm(small: Path, flags: list[str], tmp_path: Path) -> dict:
    """Megatron-LM builds and loads the model from ``flags``; the run's own --load is empty, so the
    --pretrained-checkpoint is what it starts from."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([MEGATRON_LM, str(Path(__file__).parents[1])]),
           "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, str(WORKER), "--small", str(small), "--", *flags, "--load", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same_config(result: dict, root: Path) -> None:
    ours = transformer_config(LegacyCheckpoint(root).config)
    for field, theirs in result["config"].items():
        expected = getattr(ours, field)
        expected = list(expected) if isinstance(expected, tuple) else expected
        if field == "add_qkv_bias":  # Megatron-LM sets it with --add-bias-linear; QKV has a bias either way
            theirs, expected = theirs or ours.add_bias_linear, expected or ours.add_bias_linear
        assert theirs == expected, f"Megatron-LM built {field}={theirs!r}, we build {expected!r}"


@pytest.mark.parametrize("name", ["llama-gqa2", "gpt2-untied", "gpt2-tied", "qwen3", "mistral-gqa2"])
def test_printed_flags_build_and_load_the_grown_model(tiny_model_dirs, tmp_path, name):
    small = tiny_model_dirs[name]
    root = _grown(small, tmp_path / "ckpt", "--format", "legacy", "--release")
    result = _megatron_lm(small, _printed_flags(root), tmp_path)
    assert result["finetune"] and result["iteration"] == 0  # weights only, from --pretrained-checkpoint
    _same_config(result, root)
    print(f"{name} legacy TP1 release, printed flags: max rel logit diff {result['max_rel']:.2e}")
    assert result["max_rel"] <= TOL, result


def test_checkpoint_args_build_the_model_with_the_flags_megatron_lm_does_not_read(tiny_model_dirs, tmp_path):
    """torch_dist at TP2 x PP2 loaded at TP1, the shape from the checkpoint's args. Without the printed
    --norm-epsilon, Megatron-LM 0.16.1 builds RMSNorm with its default 1e-5 instead of Llama's 1e-6: the
    control shows what that costs."""
    small = tiny_model_dirs["llama-gqa2"]
    root = _grown(small, tmp_path / "ckpt", "--format", "torch_dist", "--tp", "2", "--pp", "2")
    flags = _printed_flags(root, "--use-checkpoint-args")
    assert "--num-layers" not in flags and "--norm-epsilon" in flags
    result = _megatron_lm(small, flags, tmp_path)
    assert result["config"]["layernorm_epsilon"] == 1e-6 and result["padded_vocab"] % 256 == 0
    assert result["max_rel"] <= TOL, result
    k = flags.index("--norm-epsilon")
    control = _megatron_lm(small, flags[:k] + flags[k + 2:], tmp_path)
    print(f"llama-gqa2 torch_dist TP2xPP2 at TP1, --use-checkpoint-args: max rel {result['max_rel']:.2e}; "
          f"without --norm-epsilon {control['max_rel']:.2e}")
    assert control["config"]["layernorm_epsilon"] == 1e-5 and control["max_rel"] > 10 * TOL, control
