"""One pretraining run, described once: a frozen, typed configuration made of one dataclass per concern.

``train/args.py`` builds it from the command line and a ``--config`` JSON file (both through argparse, so
both are type-checked); nothing changes it afterwards. Each field's ``flag()`` metadata is its command-line
flag: Megatron-LM's name where Megatron-LM has the flag, the help text its documentation. The layout is
``hyperclone_dist.layout.Layout`` and the growth ``GrowthSpec``, shared with ``hyperclone convert``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.layout import Layout
from hyperclone_dist.train.schedules import STYLES, WSD_DECAY_SHAPES

HANDOFFS = ("paper", "no-rewarmup", "low-peak", "points")


def flag(default: Any, *names: str, help: str, **argparse_kwargs: Any):
    """A field whose command-line flag is ``names[0]`` (default: the field name with dashes); bool fields
    are switches (``--no-x`` names turn one off)."""
    return field(default=default, metadata={"flags": names, "help": help, "argparse": argparse_kwargs})


def non_negative_int(text: str) -> int:
    """argparse type: a bad value is a one-line usage error at parse time, on every rank alike."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def schedule_points(text: str) -> tuple[tuple[int, float], ...]:
    """argparse type of --lr-schedule-points: JSON ``[[step, lr], ...]``."""
    try:
        points = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 for p in points):
        raise argparse.ArgumentTypeError("must be a JSON list of [step, lr] pairs")
    try:
        return tuple((int(step), float(lr)) for step, lr in points)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError("steps must be integers and LRs numbers") from None


def _at_least(section: object, minimum: int, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(section, name)
        if value is None and optional:
            continue
        if value is None or value < minimum:
            raise HypercloneError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class StartOptions:
    """Where the weights come from."""

    clone_from: str | None = flag(None, metavar="SMALL", help="small model (small.pt, HF directory or megatron "
                                  "checkpoint); every rank grows its own slice in memory")
    init: str | None = flag(None, choices=["clone", "random"],
                            help="clone (default with --clone-from) or random: the same large shape, fresh weights")
    model_config: str | None = flag(None, metavar="PATH", help="JSON model description (configs/models/*.json) "
                                    "for --init random without --clone-from")
    grow_optimizer_state: bool = flag(True, "--no-grow-optimizer-state", help="with --clone-from a pretrain.py "
                                      "checkpoint holding Adam's moments: start the optimizer fresh instead of "
                                      "growing them")
    load: str | None = flag(None, metavar="DIR", help="resume from a checkpoint written by --save (model, "
                            "optimizer, LR schedule, data position, RNG), or start from a converted megatron "
                            "checkpoint")
    growth: GrowthSpec = GrowthSpec()  # the growth flags (cli/flags.py), shared with hyperclone convert

    def __post_init__(self):
        if self.init is None:  # resolved once, here: the default follows --clone-from
            object.__setattr__(self, "init", "clone" if self.clone_from else "random")


@dataclass(frozen=True)
class EngineOptions:
    """The distributed engine: DeepSpeed around megatron-core's model."""

    deepspeed_config: str | None = flag(None, "--deepspeed_config", "--deepspeed-config",
                                        help="DeepSpeed JSON (configs/deepspeed/zero1.json, zero2.json); "
                                        "default: ZeRO-1")
    distributed_timeout_minutes: float = flag(10.0, type=non_negative_float,
                                              help="collectives that wait longer fail the job instead of hanging")
    bf16: bool = flag(False, help="bf16 weights/activations, fp32 master (GPU)")


@dataclass(frozen=True)
class BatchOptions:
    seq_length: int | None = flag(None, help="tokens per sample (default: model context)")
    micro_batch_size: int = flag(1, help="sequences per forward pass of one rank")
    global_batch_size: int | None = flag(None, help="sequences per optimizer step")
    global_batch_tokens: int | None = flag(None, help="tokens per optimizer step (instead of --global-batch-size)")

    def __post_init__(self):
        _at_least(self, 1, "micro_batch_size")
        _at_least(self, 1, "seq_length", "global_batch_size", "global_batch_tokens", optional=True)
        if (self.global_batch_size is None) == (self.global_batch_tokens is None):
            raise HypercloneError("give exactly one of --global-batch-size (sequences) and --global-batch-tokens")


@dataclass(frozen=True)
class OptimOptions:
    """AdamW, gradient clipping, μP and the LR schedule (with the hand-off of a grown model)."""

    train_iters: int | None = flag(None, help="optimizer steps of this run (required)")
    lr: float = flag(3e-4, help="peak learning rate")
    min_lr: float = flag(0.0, help="the LR the decay ends at")
    lr_decay_style: str = flag("cosine", choices=STYLES, help="shape of the decay after the warmup")
    lr_warmup_iters: int = flag(0, type=non_negative_int, help="steps of linear warmup")
    lr_warmup_init: float = flag(0.0, help="LR at the start of the warmup")
    lr_decay_iters: int | None = flag(None, help="the step the decay ends at (default: --train-iters)")
    lr_wsd_decay_fraction: float = flag(0.1, help="wsd: the share of the steps that decays")
    lr_wsd_decay_style: str = flag("1-sqrt", choices=WSD_DECAY_SHAPES, help="wsd: the shape of its decay")
    handoff: str = flag("paper", choices=HANDOFFS,
                        help="LR schedule of a grown model after the hand-off (docs/pretraining.md)")
    handoff_peak_factor: float = flag(1.0, help="low-peak: the peak is the small model's final LR times this")
    lr_schedule_points: tuple[tuple[int, float], ...] | None = flag(
        None, type=schedule_points, metavar="JSON",
        help="any schedule: [[step, lr], ...], linear in between (implies --handoff points)")
    weight_decay: float = flag(0.1, help="AdamW weight decay (matrices only)")
    adam_beta1: float = flag(0.9, help="Adam beta1")
    adam_beta2: float = flag(0.95, help="Adam beta2")
    adam_eps: float = flag(1e-8, help="Adam epsilon")
    clip_grad: float = flag(1.0, type=non_negative_float, help="global gradient-norm clip (0: off)")
    mup: bool = flag(False, help="muP learning-rate multipliers for hidden matrices (width relative to "
                     "--mup-base-hidden-size, default the clone source's)")
    mup_base_hidden_size: int | None = flag(None, help="the width the LR was tuned at")
    mup_output_multiplier: float = flag(1.0, help="scale the logits by this (muP: base width / width; 1 keeps a "
                                        "clone's function)")
    mup_attention_scale: bool = flag(False, help="attention logits scaled by 1/head_dim instead of "
                                     "1/sqrt(head_dim) (muP)")
    symmetry_noise_steps: int = flag(0, type=non_negative_int, metavar="K",
                                     help="symmetry breaking: Gaussian noise on every 2-D weight's gradient in the "
                                     "first K optimizer steps (pp=1; 0: off)")
    symmetry_noise_scale: float = flag(1.0, type=non_negative_float, metavar="S",
                                       help="std of that noise relative to the RMS of each weight's gradient")

    def __post_init__(self):
        if self.train_iters is None or self.train_iters < 1:
            raise HypercloneError(f"--train-iters must be a positive integer, got {self.train_iters}")
        if not self.mup_output_multiplier > 0:
            raise HypercloneError(f"--mup-output-multiplier must be > 0, got {self.mup_output_multiplier}")
        _at_least(self, 1, "mup_base_hidden_size", "lr_decay_iters", optional=True)
        if self.lr_schedule_points is not None:  # points are a hand-off of their own
            object.__setattr__(self, "handoff", "points")


@dataclass(frozen=True)
class DataOptions:
    data_path: tuple[str, ...] | None = flag(None, nargs="+", metavar="[WEIGHT] PREFIX",
                                             help="megatron indexed datasets (hyperclone data prepare), optionally "
                                             "weighted; default: the embedded corpus (Python's standard library "
                                             "sources)")
    tokenizer_model: str | None = flag(None, help="the tokenizer the data was prepared with: a sentencepiece .model, "
                                       "or a Hugging Face tokenizer's directory or tokenizer.json (default: the "
                                       "--clone-from model's own, when it has one)")
    data_offset_steps: int = flag(0, type=non_negative_int, metavar="K",
                                  help="start at global batch K of the data: a clone can continue the small model's "
                                  "data stream instead of re-reading what it was trained on")
    split: str = flag("949,50,1", help="train,valid,test shares of each dataset's documents")
    data_cache_path: str | None = flag(None, help="index caches (default: beside --save or in .cache)")



@dataclass(frozen=True)
class CheckpointOptions:
    save: str | None = flag(None, metavar="DIR", help="checkpoint directory")
    save_interval: int | None = flag(None, help="steps between checkpoints (default: at the end)")
    save_moments: bool = flag(False, help="also put Adam's moments in the torch_dist copy, resharded like the "
                              "weights, so that a larger run can --clone-from this one with its optimizer state "
                              "grown (DeepSpeed's checkpoint holds them for resuming already; this triples the "
                              "torch_dist copy)")
    checksums: bool = flag(True, "--no-checksums", help="no checksum manifest in saved checkpoints (hashing "
                           "re-reads what was written; the ranks share it)")
    exit_interval: int | None = flag(None, help="stop (after saving) once this step is reached: a planned "
                                     "interruption")

    def __post_init__(self):
        _at_least(self, 1, "save_interval", "exit_interval", optional=True)


@dataclass(frozen=True)
class LoggingOptions:
    """Evaluation, metrics and progress."""

    eval_interval: int | None = flag(None, help="steps between validation passes")
    eval_iters: int = flag(4, help="global batches per validation pass")
    log_interval: int = flag(1, help="steps between logged metrics")
    tensorboard_dir: str | None = flag(None, help="default: SAVE/tensorboard")
    wandb_project: str | None = flag(None, help="log to wandb (offline unless WANDB_MODE says otherwise)")
    wandb_exp_name: str | None = flag(None, help="the wandb run's name")
    metrics_file: str | None = flag(None, help="one JSON line per logged step (default: SAVE/metrics.jsonl)")
    symmetry_interval: int | None = flag(None, help="steps between symmetry-monitor readings of a cloned run "
                                         "(default: --log-interval x 10)")
    peak_tflops: float | None = flag(None, help="per-device peak for the MFU estimate")
    progress: bool = flag(True, "--no-progress", help="no progress bar")

    def __post_init__(self):
        _at_least(self, 1, "eval_iters", "log_interval")
        _at_least(self, 1, "eval_interval", "symmetry_interval", optional=True)


@dataclass(frozen=True)
class DryRunOptions:
    """No GPUs, no process group: shapes and memory per rank."""

    dry_run: bool = flag(False, help="check divisibility, shard shapes and memory per GPU")
    world_size: int | None = flag(None, help="dry run: GPUs in the job")
    gpu_memory_gib: float = flag(80.0, help="dry run: memory of one GPU")


SECTIONS = {"start": StartOptions, "engine": EngineOptions, "batch": BatchOptions, "optim": OptimOptions,
            "data": DataOptions, "checkpoint": CheckpointOptions, "logging": LoggingOptions,
            "dry": DryRunOptions}  # RunConfig field -> its dataclass, in --help order


@dataclass(frozen=True)
class RunConfig:
    start: StartOptions
    parallel: Layout
    engine: EngineOptions
    batch: BatchOptions
    optim: OptimOptions
    data: DataOptions
    checkpoint: CheckpointOptions
    logging: LoggingOptions
    dry: DryRunOptions

    def __post_init__(self):
        start, dry = self.start, self.dry.dry_run
        if start.init == "clone" and not start.clone_from and not start.load and not dry:
            raise HypercloneError("--init clone needs --clone-from SMALL")
        if start.init == "random" and not (start.model_config or start.clone_from or start.load or dry):
            raise HypercloneError("--init random needs --model-config (or --clone-from for the grown shape)")
        if self.optim.symmetry_noise_steps and self.optim.symmetry_noise_scale and self.parallel.pp > 1:
            raise HypercloneError("--symmetry-noise-steps supports pp=1 only (the gradients of a pipeline "
                                  "schedule and of tied embeddings across stages are untested)")
        save_points = self.checkpoint.save_interval or self.checkpoint.exit_interval
        if save_points and not self.checkpoint.save and not dry:
            raise HypercloneError("--save-interval/--exit-interval need --save DIR")

    @property
    def seed(self) -> int:
        """The run's one seed (--seed): growth noise, random init, data order, symmetry noise."""
        return self.start.growth.seed

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for logs (wandb's run config) and checkpoints."""
        return dataclasses.asdict(self)
