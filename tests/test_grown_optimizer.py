"""Grown optimizer state: a clone that continues the small model's Adam moments (and step count) with
no LR re-warmup takes, at its first step, the small model's own next update, copied into every clone
(cosine 1 per tensor); a clone with a fresh optimizer does not. At TP1 and at TP2 x PP2, real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
COMMON = ["--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3",
          "--lr-decay-style", "constant", "--weight-decay", "0", "--clip-grad", "0", "--no-progress"]

pytestmark = pytest.mark.slow


def pretrain(nproc: int, *flags) -> None:
    launcher = [sys.executable] if nproc == 1 else [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run([*launcher, "launch/pretrain.py", *COMMON, *map(str, flags)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """The small model after 5 Adam steps (with its moments) and after its 6th step."""
    root = tmp_path_factory.mktemp("grown_optimizer")
    base = ["--init", "random", "--model-config", "configs/models/llama-tiny.json", "--train-iters", "6"]
    pretrain(1, *base, "--exit-interval", "5", "--save", root / "s5")
    shutil.copytree(root / "s5", root / "s6")
    pretrain(1, *base, "--load", root / "s6", "--save", root / "s6")
    return root


def canonical(ckpt: Path) -> dict[str, torch.Tensor]:
    from hyperclone_dist.megatron.source import open_megatron_source
    from hyperclone_dist.params import stored_shapes

    source = open_megatron_source(ckpt)
    names = stored_shapes(source.config)
    return {name: source.get(name).double() for name in names}


def first_step_cosines(small_runs: Path, out: Path, nproc: int, layout: list[str], *extra) -> dict[str, float]:
    from hyperclone_dist.growth.grow import Grower
    from hyperclone_dist.growth.spec import GrowthSpec
    from hyperclone_dist.megatron.source import open_megatron_source
    from hyperclone_dist.train.moments import gradient_over_weight_scale

    # the clone reads global batch 5, the batch of the small model's 6th step
    pretrain(nproc, "--clone-from", small_runs / "s5", "--width-factor", "2", "--method", "symmetric",
             "--handoff", "no-rewarmup", "--train-iters", "1", "--data-offset-steps", "5", *layout, *extra,
             "--save", out)
    before, after = canonical(small_runs / "s5"), canonical(small_runs / "s6")
    source = open_megatron_source(small_runs / "s5")
    grower = Grower(source.config, GrowthSpec(width_factor=2), lambda name: before[name].float())
    grown_after = canonical(out)
    cosines = {}
    for name, tensor in grown_after.items():
        step_small = Grower(source.config, GrowthSpec(width_factor=2),
                            lambda n: (after[n] - before[n]).float()).full(name).double()
        # Adam's update is m/sqrt(v): each copy moves by the small model's own step, undivided
        expected = step_small / (gradient_over_weight_scale(grower, name) * _weight_scale(grower, name))
        taken = tensor - grower.full(name).double()
        cosines[name] = torch.nn.functional.cosine_similarity(taken.flatten(), expected.flatten(), dim=0).item()
    return cosines


def _weight_scale(grower, name: str) -> float:
    from hyperclone_dist.params import rule_for

    return 1.0 / grower.factors(name)[-1] if rule_for(name).divide else 1.0


@pytest.mark.parametrize("nproc, layout", [(1, []), (4, ["--tp", "2", "--pp", "2"])], ids=["tp1", "tp2-pp2"])
def test_grown_moments_continue_the_small_models_step(small_runs, tmp_path, nproc, layout):
    grown = first_step_cosines(small_runs, tmp_path / "grown", nproc, layout)
    worst = min(grown, key=grown.get)
    print(f"\n{layout or 'tp1'}: grown optimizer state, worst per-tensor cosine {grown[worst]:.6f} ({worst})")
    assert grown[worst] > 0.9999, grown
    if nproc == 1:  # the control: the same clone with a fresh optimizer takes another step
        fresh = first_step_cosines(small_runs, tmp_path / "fresh", nproc, layout, "--no-grow-optimizer-state")
        print(f"fresh optimizer: mean cosine {sum(fresh.values()) / len(fresh):.3f}, worst {min(fresh.values()):.3f}")
        assert sum(fresh.values()) / len(fresh) < 0.99


def _train_losses(metrics: Path) -> dict[int, float]:
    import json

    return {r["step"]: r["train/loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "train/loss" in r}


def test_grown_run_resumes_deterministically(small_runs, tmp_path):
    """A clone continuing the small model's optimizer, stopped after 2 steps and resumed with --load,
    takes steps 3-4 exactly as the uninterrupted run does (moments and step count come from its own
    checkpoint on resume, not from the small model again)."""
    flags = ["--clone-from", small_runs / "s5", "--width-factor", "2", "--method", "noisy", "--mup",
             "--handoff", "no-rewarmup", "--data-offset-steps", "5", "--train-iters", "4", "--log-interval", "1"]
    pretrain(1, *flags, "--save", tmp_path / "whole", "--metrics-file", tmp_path / "whole.jsonl")
    pretrain(1, *flags, "--exit-interval", "2", "--save", tmp_path / "part", "--metrics-file", tmp_path / "a.jsonl")
    pretrain(1, *flags, "--load", tmp_path / "part", "--save", tmp_path / "part", "--metrics-file",
             tmp_path / "b.jsonl")
    whole, first, second = (_train_losses(tmp_path / f) for f in ("whole.jsonl", "a.jsonl", "b.jsonl"))
    assert sorted(first) == [1, 2] and sorted(second) == [3, 4], (first, second)
    assert {**first, **second} == whole


@pytest.mark.parametrize("schedule", [["--lr-schedule-points", "[[0, 1e-3], [2, 3e-3], [4, 2e-3]]"],
                                      ["--handoff", "no-rewarmup", "--lr", "5e-4", "--min-lr", "1e-4",
                                       "--lr-decay-style", "linear"]], ids=["points", "no-rewarmup"])
def test_the_optimizer_runs_at_the_lr_the_schedule_names(tmp_path, schedule):
    """Hand-off schedules whose peak is not --lr (points, low-peak) reach the optimizer as given: the
    LR of each step is the schedule's value, not --lr times its shape."""
    import json

    pretrain(1, "--init", "random", "--model-config", "configs/models/llama-tiny.json", "--train-iters", "4",
             "--log-interval", "1", *schedule, "--metrics-file", tmp_path / "m.jsonl")
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in records if "train/lr" in r]
    expected = [1e-3, 2e-3, 3e-3, 2.5e-3] if schedule[0] == "--lr-schedule-points" else [5e-4, 4e-4, 3e-4, 2e-4]
    assert lrs == pytest.approx(expected, rel=1e-6), lrs
