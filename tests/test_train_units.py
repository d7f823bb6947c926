"""The trainer's pure parts, in one process: LR schedules and hand-offs, the DeepSpeed config it
completes, flag files, layout-invariant random init, and the symmetry monitor's arithmetic."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from hyperclone_dist.builtin import BUILTIN, random_state_dict
from hyperclone_dist.checkpoint import small_pt
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.train.args import parse_args
from hyperclone_dist.train.engine import complete_deepspeed_config
from hyperclone_dist.train.handoff import build_schedule
from hyperclone_dist.train.init_weights import random_init
from hyperclone_dist.train.schedules import LRSchedule
from hyperclone_dist.train.symmetry import _block_sums

BASE = ["--train-iters", "100", "--global-batch-size", "8", "--model-config", "configs/models/llama-tiny.json"]


def test_cosine_with_warmup():
    s = LRSchedule(peak_lr=1e-3, style="cosine", warmup_steps=10, decay_steps=110, min_lr=1e-4)
    assert s.lr(0) == pytest.approx(1e-4)  # linear warmup from 0: step 0 already takes 1/10 of the peak
    assert s.lr(9) == pytest.approx(1e-3)
    assert s.lr(60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half-way down the cosine
    assert s.lr(110) == pytest.approx(1e-4) and s.lr(500) == pytest.approx(1e-4)
    assert all(s.lr(k) >= s.lr(k + 1) for k in range(10, 120))


def test_wsd_is_flat_then_decays_over_its_fraction():
    s = LRSchedule(peak_lr=2.0, style="wsd", warmup_steps=0, decay_steps=100, min_lr=0.0, wsd_decay_fraction=0.2,
                   wsd_decay_shape="linear")
    assert s.lr(0) == s.lr(79) == 2.0
    assert s.lr(90) == pytest.approx(1.0)
    assert s.lr(100) == 0.0


def test_points_interpolate_linearly():
    s = LRSchedule(peak_lr=1.0, style="points", points=((0, 1.0), (10, 0.5), (20, 0.1)))
    assert [s.lr(k) for k in (0, 5, 10, 15, 20, 99)] == pytest.approx([1.0, 0.75, 0.5, 0.3, 0.1, 0.1])
    with pytest.raises(HypercloneError):
        LRSchedule(peak_lr=1.0, style="points", points=((10, 1.0), (5, 0.5)))


@pytest.mark.parametrize("kwargs, words", [
    (dict(peak_lr=0.0), "peak > 0"), (dict(peak_lr=1.0, min_lr=2.0), "min_lr"),
    (dict(peak_lr=1.0, warmup_steps=50, decay_steps=10), "longer than the decay"),
    (dict(peak_lr=1.0, style="step"), "unknown LR schedule"),
])
def test_bad_schedules_are_refused(kwargs, words):
    with pytest.raises(HypercloneError, match=words):
        LRSchedule(**kwargs)


def test_low_peak_handoff_reads_the_small_models_final_lr(tmp_path):
    small = small_pt.save(tmp_path / "small.pt", BUILTIN, random_state_dict(BUILTIN), {"final_lr": 2e-4})
    args = parse_args([*BASE[:4], "--clone-from", str(small), "--width-factor", "2", "--handoff", "low-peak",
                       "--handoff-peak-factor", "3", "--lr-warmup-iters", "5", "--lr", "1e-2"])
    schedule, text = build_schedule(args.optim, args.start.clone_from)
    assert schedule.peak_lr == pytest.approx(6e-4) and schedule.lr(0) > 2e-4 and schedule.lr(4) == pytest.approx(6e-4)
    assert "final LR 0.0002 x 3" in text
    paper, _ = build_schedule(parse_args([*BASE[:4], "--clone-from", str(small), "--lr", "1e-2",
                                          "--lr-warmup-iters", "5"]).optim, str(small))
    assert paper.lr(4) == pytest.approx(1e-2)
    flat, _ = build_schedule(parse_args([*BASE[:4], "--clone-from", str(small), "--lr", "1e-3",
                                         "--handoff", "no-rewarmup"]).optim, str(small))
    assert flat.lr(0) == pytest.approx(1e-3)


def test_deepspeed_config_is_completed_and_checked():
    config = complete_deepspeed_config({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 0}},
                                       micro_batch_size=2, num_micro_batches=4, dp=2, pp=2, clip_grad=1.0, bf16=False)
    assert config["train_batch_size"] == 16 and config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"]["stage"] == 1  # stage 0's fp32 clipping miscounts TP x PP norms
    assert config["managed_gradient_accumulation"] is False  # PP > 1: engine.step() is the boundary
    with pytest.raises(HypercloneError, match="train_micro_batch_size_per_gpu=3"):
        complete_deepspeed_config({"train_micro_batch_size_per_gpu": 3}, micro_batch_size=2, num_micro_batches=1,
                                  dp=1, pp=1, clip_grad=1.0, bf16=False)
    with pytest.raises(HypercloneError, match="ZeRO-2"):
        complete_deepspeed_config({"zero_optimization": {"stage": 2}}, micro_batch_size=1, num_micro_batches=2,
                                  dp=1, pp=2, clip_grad=1.0, bf16=False)
    with pytest.raises(HypercloneError, match="stage 3"):
        complete_deepspeed_config({"zero_optimization": {"stage": 3}}, micro_batch_size=1, num_micro_batches=2,
                                  dp=1, pp=1, clip_grad=1.0, bf16=False)


def test_config_file_sets_flags_and_the_command_line_wins(tmp_path):
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"lr": 5e-4, "tensor-model-parallel-size": 2, "global_batch_size": 32,
                                "train_iters": 7, "model_config": "configs/models/llama-tiny.json"}))
    args = parse_args(["--config", str(file), "--lr", "1e-3"])
    assert (args.optim.lr, args.parallel.tp, args.batch.global_batch_size, args.optim.train_iters) == (1e-3, 2, 32, 7)
    file.write_text(json.dumps({"learning_rate": 1.0}))
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(file)])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("values, words", [
    ({"lr": "fast"}, "argument --lr: invalid float value: 'fast'"),
    ({"train_iters": 2.5}, "argument --train-iters: invalid int value: '2.5'"),
    ({"handoff": "sideways"}, "argument --handoff: invalid choice: 'sideways'"),
    ({"bf16": "yes"}, "bf16 must be true or false, got 'yes'"),
    ({"lr_warmup_iters": -1}, "argument --lr-warmup-iters: must be >= 0, got -1"),
    ({"lr_schedule_points": [[0, "a"]]}, "argument --lr-schedule-points: steps must be integers and LRs numbers"),
    ({"tp": 0}, "--tp 0 must be a positive integer"),
])
def test_config_file_values_are_checked_like_flags(tmp_path, capsys, values, words):
    """A --config file's values meet the same type, choice and range checks as the flags they set."""
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"train_iters": 2, "global_batch_size": 4, **values}))
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(file), "--model-config", "configs/models/llama-tiny.json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and words in err[0], err


def test_run_config_is_frozen_and_resolved_once():
    config = parse_args(["--model-config", "configs/models/llama-tiny.json", "--train-iters", "3",
                         "--global-batch-size", "4", "--lr-schedule-points", "[[0, 1e-3], [3, 1e-4]]"])
    assert config.start.init == "random" and config.optim.handoff == "points"  # defaults resolved at build
    assert config.optim.lr_schedule_points == ((0, 1e-3), (3, 1e-4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 1.0  # type: ignore[misc]


def test_random_init_is_the_same_whatever_slice_is_asked():
    fn = random_init(BUILTIN, seed=3)
    whole = fn("layers.1.mlp.down.weight", [slice(0, 64), slice(0, 176)])
    part = fn("layers.1.mlp.down.weight", [slice(10, 30), slice(88, 176)])
    assert torch.equal(whole[10:30, 88:176], part)
    assert whole.std().item() == pytest.approx(0.02 / math.sqrt(2 * BUILTIN.num_layers), rel=0.1)
    assert fn("embed.weight", [slice(0, 512), slice(0, 64)]).std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(fn("final_norm.weight", [slice(0, 64)]), torch.ones(64))
    assert not torch.equal(random_init(BUILTIN, seed=4)("embed.weight", [slice(0, 4), slice(0, 64)]),
                           fn("embed.weight", [slice(0, 4), slice(0, 64)]))


def test_symmetry_block_sums():
    block = torch.randn(3, 5)
    same = torch.cat([block, block])
    dot, norm_k, norm_0 = _block_sums(same, 2)[0].tolist()
    assert dot == pytest.approx(norm_k) and norm_k == pytest.approx(norm_0)
    moved = torch.cat([block, -block])
    assert _block_sums(moved, 2)[0, 0].item() == pytest.approx(-norm_0)
