"""Grown optimizer state: a clone that continues the small model's Adam moments (and step count) with
no LR re-warmup takes, at its first step, the small model's own next update, copied into every clone:
each element of the grown tensor moves by exactly the small element it copies moved (Adam's m / sqrt(v) is
scale-free, so the update is undivided even where the weight was divided). A clone with a fresh optimizer
does not. At TP1 and at TP2 x PP2; every run a real process, forked from one warm one (tests/warm.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from warm import failure_text, run_warm

from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.megatron.source import open_megatron_source
from hyperclone_dist.params import stored_shapes

# Adam's eps 1e-16: with the default 1e-8 the grown update differs by up to 1e-3 relative where gradients are
# ~1e-5, because a gradient divided by n meets the same eps (the update is m / (sqrt(v) + eps))
COMMON = ["--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3",
          "--lr-decay-style", "constant", "--weight-decay", "0", "--clip-grad", "0", "--adam-eps", "1e-16",
          "--no-progress"]
SMALL = ["--init", "random", "--model-config", "configs/models/llama-tiny.json", "--train-iters", "6", "--save-moments"]
UPDATE_TOL = 1e-4  # relative L2 error of the grown first update against the small model's, per tensor
LR_CASES = {
    "points": (["--lr-schedule-points", "[[0, 1e-3], [2, 3e-3], [4, 2e-3]]"], [1e-3, 2e-3, 3e-3, 2.5e-3]),
    "no-rewarmup": (["--handoff", "no-rewarmup", "--lr", "5e-4", "--min-lr", "1e-4", "--lr-decay-style", "linear"],
                    [5e-4, 4e-4, 3e-4, 2e-4]),
}

pytestmark = pytest.mark.slow


def pretrain(name: str, *flags, nproc: int = 1) -> dict:
    return {"name": name, "entry": "pretrain", "run": [*COMMON, *map(str, flags)], "nproc": nproc}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The small model after 5 Adam steps (with its moments) and after its 6th; the clones' first steps; a
    clone stopped and resumed; the LR schedules."""
    root = tmp_path_factory.mktemp("grown_optimizer")
    s5, s6 = root / "s5", root / "s6"
    clone = ["--clone-from", s5, "--width-factor", "2", "--method", "symmetric", "--handoff", "no-rewarmup",
             "--train-iters", "1", "--data-offset-steps", "5"]  # global batch 5: the small model's 6th step
    resume = ["--clone-from", s5, "--width-factor", "2", "--method", "noisy", "--mup", "--handoff", "no-rewarmup",
              "--data-offset-steps", "5", "--train-iters", "4", "--log-interval", "1"]
    steps = [pretrain("s5", *SMALL, "--exit-interval", "5", "--save", s5), {"fs": ["copytree", str(s5), str(s6)]},
             pretrain("s6", *SMALL, "--load", s6, "--save", s6),
             pretrain("tp1", *clone, "--save", root / "tp1"),
             pretrain("tp2-pp2", *clone, "--tp", "2", "--pp", "2", "--save", root / "tp2-pp2", nproc=4),
             pretrain("fresh", *clone, "--no-grow-optimizer-state", "--save", root / "fresh"),
             pretrain("whole", *resume, "--save", root / "whole", "--metrics-file", root / "whole.jsonl"),
             pretrain("part", *resume, "--exit-interval", "2", "--save", root / "part", "--metrics-file",
                      root / "a.jsonl"),
             pretrain("resumed", *resume, "--load", root / "part", "--save", root / "part", "--metrics-file",
                      root / "b.jsonl")]
    steps += [pretrain(f"lr {name}", "--init", "random", "--model-config", "configs/models/llama-tiny.json",
                       "--train-iters", "4", "--log-interval", "1", *flags, "--metrics-file", root / f"{name}.jsonl")
              for name, (flags, _) in LR_CASES.items()]
    found = run_warm(steps, root / "warm")
    for run in found.values():
        assert run["status"] == 0, failure_text(run)
    return {"root": root, **found}


def canonical(ckpt: Path) -> dict[str, torch.Tensor]:
    source = open_megatron_source(ckpt)
    return {name: source.get(name).double() for name in stored_shapes(source.config)}


def tile(small: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``small`` copied along each dimension up to ``shape``, copy-major (how a clone lays out its copies)."""
    return small.repeat(*(big // little for big, little in zip(shape, small.shape)))


def first_updates(root: Path, clone: str) -> dict[str, tuple[float, float]]:
    """Per tensor: (cosine, relative L2 error) of the clone's first update against the small model's own
    6th update tiled into every copy; the update is the clone's weights after the step minus the symmetric
    clone of s5 it started from."""
    before, after, grown = canonical(root / "s5"), canonical(root / "s6"), canonical(root / clone)
    start = Grower(open_megatron_source(root / "s5").config, GrowthSpec(width_factor=2), before.__getitem__)
    out = {}
    for name, tensor in grown.items():
        taken = tensor - start.full(name).double()
        expected = tile(after[name] - before[name], tensor.shape)
        cos = torch.nn.functional.cosine_similarity(taken.flatten(), expected.flatten(), dim=0).item()
        out[name] = (cos, ((taken - expected).norm() / expected.norm()).item())
    return out


@pytest.mark.parametrize("clone", ["tp1", "tp2-pp2"])
def test_grown_moments_continue_the_small_models_step(runs, clone):
    updates = first_updates(runs["root"], clone)
    worst_cos = min(updates, key=lambda n: updates[n][0])
    worst_rel = max(updates, key=lambda n: updates[n][1])
    print(f"\n{clone}: grown optimizer state, worst cosine {updates[worst_cos][0]:.6f} ({worst_cos}), worst "
          f"relative error of the update {updates[worst_rel][1]:.2e} ({worst_rel})")
    assert updates[worst_cos][0] > 0.9999, updates
    assert updates[worst_rel][1] <= UPDATE_TOL, updates
    if clone == "tp1":  # the control: the same clone with a fresh optimizer takes another step
        fresh = first_updates(runs["root"], "fresh")
        cosines = [cos for cos, _ in fresh.values()]
        print(f"fresh optimizer: mean cosine {sum(cosines) / len(cosines):.3f}, worst {min(cosines):.3f}")
        assert sum(cosines) / len(cosines) < 0.99


def _metrics(path: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r}


def test_grown_run_resumes_deterministically(runs):
    """A clone continuing the small model's optimizer, stopped after 2 steps and resumed with --load,
    takes steps 3-4 exactly as the uninterrupted run does (moments and step count come from its own
    checkpoint on resume, not from the small model again)."""
    whole, first, second = (_metrics(runs["root"] / f, "train/loss") for f in ("whole.jsonl", "a.jsonl", "b.jsonl"))
    assert sorted(first) == [1, 2] and sorted(second) == [3, 4], (first, second)
    assert {**first, **second} == whole


@pytest.mark.parametrize("schedule", LR_CASES)
def test_the_optimizer_runs_at_the_lr_the_schedule_names(runs, schedule):
    """Hand-off schedules whose peak is not --lr (points, low-peak) reach the optimizer as given: the
    LR of each step is the schedule's value, not --lr times its shape."""
    lrs = list(_metrics(runs["root"] / f"{schedule}.jsonl", "train/lr").values())
    assert lrs == pytest.approx(LR_CASES[schedule][1], rel=1e-6), lrs


def test_moments_are_stored_once_unless_asked_twice(runs):
    """DeepSpeed's checkpoint holds Adam's moments for resuming; the torch_dist copy holds them as well only
    with --save-moments (the small runs here), so a default save is not ~28 bytes per parameter."""
    from hyperclone_dist.train.moments import has_moments

    root = runs["root"]
    assert has_moments(root / "s5") and not has_moments(root / "fresh")
    assert list((root / "fresh").glob("global_step1/*optim_states.pt"))  # what a resume reads
    from hyperclone_dist.params import parameter_count

    def bytes_per_parameter(ckpt: Path, iteration: int) -> float:
        shards = sum(f.stat().st_size for f in ckpt.glob(f"iter_{iteration:07d}/*.distcp"))
        return shards / parameter_count(open_megatron_source(ckpt).config)

    assert 3.9 < bytes_per_parameter(root / "fresh", 1) < 4.8  # float32 weights alone (and per-tensor headers)
    assert 11.9 < bytes_per_parameter(root / "s6", 6) < 13.5  # weights and two moments
