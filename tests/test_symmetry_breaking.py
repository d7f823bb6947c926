"""Gradient noise in the first K steps (--symmetry-noise-steps): the copies of a symmetric clone part,
as the trainer's own symmetry monitor reads it, and stay identical without it. Plus the hooks alone:
deterministic per (seed, step, parameter), off from step K on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from warm import failure_text, run_warm

from hyperclone_dist.train.symmetry_breaking import GradientNoise, NoiseHooks

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
COMMON = ["--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3",
          "--lr-decay-style", "constant", "--no-progress"]


def pretrain(name: str, *flags) -> dict:
    return {"name": name, "entry": "pretrain", "run": [*COMMON, *map(str, flags)]}


def min_cosines(metrics: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {line["step"]: line["symmetry/min_cosine"] for line in lines if "symmetry/min_cosine" in line}


def test_noise_in_first_steps_breaks_a_symmetric_clone(tmp_path):
    clone = ["--clone-from", tmp_path / "small", "--width-factor", "2", "--method", "symmetric",
             "--train-iters", "3", "--symmetry-interval", "1"]
    runs = run_warm([pretrain("small", "--init", "random", "--model-config", "configs/models/llama-tiny.json",
                              "--train-iters", "1", "--save", tmp_path / "small"),
                     pretrain("plain", *clone, "--metrics-file", tmp_path / "plain.jsonl"),
                     pretrain("noisy", *clone, "--symmetry-noise-steps", "2", "--symmetry-noise-scale", "1.0",
                              "--metrics-file", tmp_path / "noisy.jsonl")], tmp_path / "warm")
    for run in runs.values():
        assert run["status"] == 0, failure_text(run)
    plain, noisy = min_cosines(tmp_path / "plain.jsonl"), min_cosines(tmp_path / "noisy.jsonl")
    assert set(plain) == set(noisy) == {1, 2, 3}
    assert min(plain.values()) > 1 - 1e-9, plain  # copies stay copies: the width is unused
    assert noisy[3] < 0.9999, noisy  # copies parted


def _grads(noise: GradientNoise, step: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    with torch.no_grad():  # two identical copies of every hidden unit
        model[0].weight[3:] = model[0].weight[:3]
        model[0].bias[3:] = model[0].bias[:3]
        model[1].weight[:, 3:] = model[1].weight[:, :3]
    hooks = NoiseHooks(noise, model.named_parameters(), lambda: step)
    model(torch.randn(5, 4)).square().sum().backward()
    assert hooks.retire_if_done() == (step >= noise.steps)
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_hooks_deterministic_per_step_and_off_after_k():
    noise = GradientNoise(steps=2, scale=0.5, seed=7)
    first = _grads(noise, 0)
    assert torch.equal(first["0.weight"], _grads(noise, 0)["0.weight"])  # a resumed run adds the same
    assert not torch.equal(first["0.weight"], _grads(noise, 1)["0.weight"])  # a fresh draw every step
    assert not torch.allclose(first["0.weight"][3:], first["0.weight"][:3])  # the copies' updates differ
    assert torch.allclose(first["0.bias"][3:], first["0.bias"][:3], rtol=1e-6, atol=0)  # vectors untouched
    off = _grads(noise, 2)
    assert torch.allclose(off["0.weight"][3:], off["0.weight"][:3], rtol=1e-6, atol=0)
    assert torch.equal(off["0.weight"], _grads(GradientNoise(0, 0.5), 2)["0.weight"])


@pytest.mark.parametrize("steps, scale", [(-1, 1.0), (1, -0.5), (1, float("nan"))])
def test_bad_settings_refused(steps, scale):
    with pytest.raises(ValueError, match="symmetry noise"):
        GradientNoise(steps, scale)
