"""The pretraining job: set up the layout, build this rank's slice of the model, train, evaluate, save.

    torchrun --standalone --nproc_per_node 4 launch/pretrain.py --clone-from small.pt --width-factor 2 \\
        --tp 2 --pp 2 --train-iters 100 --global-batch-size 16 --lr 1e-3 --save runs/big

Set-up runs under ``agreed()``: a bad input found by any rank (a missing file, a layout that does not
divide) becomes the same one-line error on every rank and a clean exit, never a rank waiting forever in
a collective for a peer that already left.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from hyperclone_dist.errors import HypercloneError


def agreed(fn, *args, **kwargs):
    """Run ``fn`` on every rank; if it failed anywhere, raise the first rank's error everywhere."""
    try:
        result, error = fn(*args, **kwargs), None
    except HypercloneError as exc:
        result, error = None, str(exc)
    except OSError as exc:
        result, error = None, f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise HypercloneError(first)
    return result


def _prepare_environment() -> None:
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it, even for one plain process
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    repo_cache = Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(repo_cache))  # DeepSpeed's JIT ops, built once


class Run:
    """Everything one rank holds for the job."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    # ---- set-up ---------------------------------------------------------------------------------
    def setup_layout(self) -> None:
        from megatron.core import parallel_state as ps

        from hyperclone_dist.megatron.parallel import init_model_parallel
        from hyperclone_dist.train.checkpointing import latest_training_state
        from hyperclone_dist.train.startup import resolve_start

        args = self.args
        self.resume_state = None
        if args.load and (Path(args.load) / "latest_checkpointed_iteration.txt").is_file():
            self.resume_state = latest_training_state(args.load)
            self._check_requested_shape()
            if self.resume_state is None:  # a converted checkpoint: its model, fresh optimizer
                args.init, args.clone_from, args.model_config = "load", None, None
        elif args.load and not (args.clone_from or args.model_config):
            raise HypercloneError(f"--load {args.load}: no checkpoint there (no latest_checkpointed_iteration.txt)")
        if self.resume_state is not None:
            args.init = "load"
        self.start = resolve_start(args)
        if args.mup and args.mup_base_hidden_size is None:
            args.mup_base_hidden_size = self._mup_base_width()
        cfg = self.start.config
        from hyperclone_dist.megatron.model import transformer_config

        transformer_config(cfg, args.tp, args.pp, args.vpp)  # refuses what megatron cannot build, naming numbers
        self.seq_length = args.seq_length or cfg.max_position_embeddings
        if not 1 <= self.seq_length <= cfg.max_position_embeddings:
            raise HypercloneError(f"--seq-length {self.seq_length} is outside the model's context "
                                  f"1..{cfg.max_position_embeddings}")
        init_model_parallel(args.tp, args.pp, args.vpp, seed=args.seed)
        self.dp = ps.get_data_parallel_world_size()
        from hyperclone_dist.train.data_feed import batch_plan

        self.plan = batch_plan(args, self.dp, self.seq_length, args.pp, args.vpp)
        self.layout = {"tp": args.tp, "pp": args.pp, "vpp": args.vpp, "dp": self.dp}

    def _mup_base_width(self) -> int | None:
        """The width μP's LR multipliers are relative to: the clone source's, or on resume the one the run
        started with (recorded in its checkpoint; older checkpoints: the --clone-from source's again)."""
        from hyperclone_dist.train.startup import _config_from_path

        if self.start.small_config is not None:
            return self.start.small_config.hidden_size
        saved = (self.resume_state or {}).get("mup_base_hidden_size")
        if saved:
            return int(saved)
        if self.resume_state is not None and self.args.clone_from:
            return _config_from_path(Path(self.args.clone_from)).hidden_size
        return None

    def _check_requested_shape(self) -> None:
        """With --load, the weights come from the checkpoint; a --clone-from/--model-config given too
        must describe the same model, or the run would silently train something else than asked."""
        import copy

        from hyperclone_dist.config import ModelConfig
        from hyperclone_dist.train.startup import checkpoint_config, resolve_start

        args = self.args
        if not (args.clone_from or args.model_config):
            return
        shape_only = copy.copy(args)
        shape_only.init, shape_only.load = "random", None
        requested = resolve_start(shape_only).config
        if self.resume_state is not None:
            saved = ModelConfig.from_dict(self.resume_state["model_config"])
        else:
            saved = checkpoint_config(Path(args.load))
        if saved != requested:
            raise HypercloneError(f"--load {args.load}: the checkpoint's model differs from this run's (hidden "
                                  f"{saved.hidden_size} vs {requested.hidden_size}, layers {saved.num_layers} vs "
                                  f"{requested.num_layers}, ffn {saved.ffn_hidden_size} vs {requested.ffn_hidden_size})")

    def setup_data(self) -> None:
        from megatron.core import parallel_state as ps

        from hyperclone_dist.data.loader import DataConfig, build_datasets, parse_blend
        from hyperclone_dist.data.tokenizer import tokenizer_info
        from hyperclone_dist.train.data_feed import DataFeed, default_cache, default_data

        args, cfg = self.args, self.start.config
        cache = Path(args.data_cache_path) if args.data_cache_path else default_cache()
        if args.data_path:
            prefixes, weights = parse_blend(args.data_path)
            tokenizer = args.tokenizer_model
        else:
            (prefixes, tokenizer), weights = default_data(cache, cfg.vocab_size), None
        info = tokenizer_info(tokenizer)
        if info.vocab_size > cfg.vocab_size:
            raise HypercloneError(f"tokenizer {tokenizer} has {info.vocab_size} pieces but the model's vocabulary "
                                  f"is {cfg.vocab_size}: token ids would fall outside the embedding")
        config = DataConfig(prefixes=tuple(prefixes), tokenizer_model=str(tokenizer), cache_dir=str(cache / "index"),
                            weights=tuple(weights) if weights else None, split=args.split,
                            sequence_length=self.seq_length, seed=args.seed)
        gbs = self.plan.global_batch_size
        valid = args.eval_iters * gbs if args.eval_interval else 0
        datasets = build_datasets(config, (args.train_iters + args.data_offset_steps) * gbs, valid)
        self.feed = DataFeed(datasets, self.plan, ps.get_data_parallel_rank(), args.eval_iters, args.data_offset_steps)
        self.data_description = {"prefixes": list(prefixes), "weights": weights, "tokenizer": str(tokenizer),
                                 "split": args.split, "offset_steps": args.data_offset_steps}

    def setup_model(self) -> None:
        from megatron.core import parallel_state as ps

        from hyperclone_dist.megatron.mapping import Layout, padded_vocab_size
        from hyperclone_dist.megatron.model import build_gpt_model
        from hyperclone_dist.train.init_weights import fill_chunks
        from hyperclone_dist.train.step import mark_pipeline_replicas

        args, cfg = self.args, self.start.config
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, args.tp)
        if self.start.slice_fn is None and self.resume_state is None:
            self.padded_vocab = self._checkpoint_padded_vocab()
        overrides = {"softmax_scale": 1.0 / cfg.head_dim} if args.mup_attention_scale else {}
        self.chunks = build_gpt_model(cfg, dtype=dtype, perform_initialization=False, padded_vocab=self.padded_vocab,
                                      **overrides)
        if self.start.slice_fn is not None:
            layout = Layout(tp=args.tp, pp=args.pp, vpp=args.vpp)
            fill_chunks(self.chunks, cfg, layout, ps.get_tensor_model_parallel_rank(),
                        ps.get_pipeline_model_parallel_rank(), self.start.slice_fn)
        elif self.resume_state is None:
            from hyperclone_dist.train.checkpointing import load_model_only

            load_model_only(self.chunks, args.load)
        mark_pipeline_replicas(self.chunks)

    def _checkpoint_padded_vocab(self) -> int:
        from hyperclone_dist.megatron import torch_dist
        from hyperclone_dist.megatron.legacy import iteration_dir
        from hyperclone_dist.megatron.load import read_iteration

        root = Path(self.args.load)
        padded = int(torch_dist.read_args(iteration_dir(root, read_iteration(root))).padded_vocab_size)
        if padded % self.args.tp:
            raise HypercloneError(f"--load {root}: its padded vocabulary ({padded}) is not divisible by tp={self.args.tp}")
        return padded

    def setup_engine(self) -> None:
        from hyperclone_dist.train.engine import (
            complete_deepspeed_config,
            initialize_engine,
            parameter_groups,
            read_deepspeed_config,
        )
        from hyperclone_dist.train.handoff import build_schedule
        from hyperclone_dist.train.mup import mup_lr_multipliers

        args = self.args
        user = read_deepspeed_config(args.deepspeed_config)
        ds_config = complete_deepspeed_config(user, micro_batch_size=self.plan.micro_batch_size,
                                              num_micro_batches=self.plan.num_micro_batches, dp=self.dp,
                                              pp=args.pp, clip_grad=args.clip_grad, bf16=args.bf16)
        self.schedule, self.handoff = build_schedule(args)
        multipliers = mup_lr_multipliers(self.chunks, self.start, args) if args.mup else None
        # the scheduler scales each group's LR by schedule.factor(step) = lr(step) / peak: the groups start
        # from the schedule's peak, which is --lr only for the paper and no-rewarmup hand-offs
        peak = self.schedule.peak_lr
        groups = parameter_groups(self.chunks, args.weight_decay, peak, multipliers)
        self.engine = initialize_engine(self.chunks, ds_config, groups, self.schedule, weight_decay=args.weight_decay,
                                        lr=peak, vocab_size=self.start.config.vocab_size,
                                        seq_length=self.seq_length, logit_scale=args.mup_output_multiplier,
                                        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
        from hyperclone_dist.train.checkpointing import use_safe_loader

        use_safe_loader(self.engine)
        from hyperclone_dist.train.moments import prime_optimizer_state

        prime_optimizer_state(self.engine)
        self.moments_grown = False
        if args.init == "clone" and args.grow_optimizer_state and self.resume_state is None:
            self._grow_optimizer_state()

    def _grow_optimizer_state(self) -> None:
        """--clone-from a pretrain.py checkpoint that holds Adam's moments: continue its optimizer."""
        from megatron.core import parallel_state as ps

        from hyperclone_dist.megatron import torch_dist
        from hyperclone_dist.megatron.legacy import iteration_dir
        from hyperclone_dist.megatron.load import is_megatron_checkpoint, read_iteration
        from hyperclone_dist.megatron.mapping import Layout
        from hyperclone_dist.train.moments import grow_moments_into, has_moments
        from hyperclone_dist.train.startup import _growth_spec

        root = Path(self.args.clone_from)
        if not (root.is_dir() and is_megatron_checkpoint(root) and has_moments(root)):
            return
        saved = torch_dist.read_args(iteration_dir(root, read_iteration(root)))
        step = int(getattr(saved, "hyperclone_optimizer_step", 0))
        grow_moments_into(self.engine, self.chunks, root, _growth_spec(self.args),
                          Layout(tp=self.args.tp, pp=self.args.pp, vpp=self.args.vpp),
                          ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), step)
        self.moments_grown = True
        self.start.description += f"; Adam moments grown from its optimizer (step {step})"

    def setup_resume(self) -> None:
        from hyperclone_dist.train.checkpointing import check_resumable, resume

        self.step = 0
        if self.resume_state is None:
            return
        check_resumable(self.resume_state, self.layout, self.start.config.to_dict(), self.args.load)
        state, rng = resume(self.engine, self.args.load, self.resume_state["tag"])
        self.step = int(state["step"])
        if rng.get("torch") is not None:
            torch.set_rng_state(rng["torch"])

    # ---- the job --------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "consumed_samples": self.step * self.plan.global_batch_size,
                "layout": self.layout, "model_config": self.start.config.to_dict(), "data": self.data_description,
                "schedule": asdict(self.schedule), "handoff": self.args.handoff, "start": self.start.description,
                "seed": self.args.seed,
                "mup_base_hidden_size": self.args.mup_base_hidden_size if self.args.mup else None}

    def save(self) -> None:
        from hyperclone_dist.megatron import legacy
        from hyperclone_dist.megatron.mapping import Layout
        from hyperclone_dist.train.checkpointing import save_checkpoint

        layout = Layout(tp=self.args.tp, pp=self.args.pp, vpp=self.args.vpp)
        args = legacy.megatron_args(self.start.config, layout, torch.bfloat16 if self.args.bf16 else torch.float32,
                                    self.step)
        args.padded_vocab_size = self.padded_vocab
        args.consumed_train_samples = self.step * self.plan.global_batch_size
        path = save_checkpoint(self.engine, self.chunks, self.args.save, self.step, self.trainer_state(), args,
                               rng={"torch": torch.get_rng_state()}, moments=self.args.save_moments,
                               checksums=self.args.checksums)
        self.monitor.print(f"saved {path} (step {self.step})")

    def evaluate(self) -> float | None:
        from hyperclone_dist.train.step import eval_step

        losses = [eval_step(self.chunks, self.feed.valid_batches(i), self.seq_length, self.plan.micro_batch_size,
                            self.start.config.vocab_size, self.args.mup_output_multiplier)
                  for i in range(self.args.eval_iters)]
        return None if losses[0] is None else sum(losses) / len(losses)

    def train(self) -> dict:
        from hyperclone_dist.train.monitor import Monitor, device_peak_tflops, flops_per_token, is_logging_rank
        from hyperclone_dist.train.step import train_step
        from hyperclone_dist.train.symmetry import symmetry_stats

        args, cfg = self.args, self.start.config
        out_dir = Path(args.save) if args.save else None
        self.monitor = Monitor(enabled=is_logging_rank(), total_steps=args.train_iters, start_step=self.step,
                               out_dir=out_dir, tensorboard_dir=args.tensorboard_dir, wandb_project=args.wandb_project,
                               wandb_name=args.wandb_exp_name, metrics_file=args.metrics_file,
                               run_config={**vars(args), "layout": self.layout}, progress=not args.no_progress)
        self.monitor.print(f"pretrain: {self.start.description}; {cfg.family} hidden {cfg.hidden_size}, layers "
                           f"{cfg.num_layers}, {sum(p.numel() for c in self.chunks for p in c.parameters()):,} "
                           f"parameters on this rank; tp={args.tp} pp={args.pp} dp={self.dp}"
                           f"{f' vpp={args.vpp}' if args.vpp else ''}, global batch {self.plan.global_batch_size} "
                           f"x {self.seq_length} tokens, {self.plan.num_micro_batches} micro-batches per rank; "
                           f"{self.handoff}")
        peak = device_peak_tflops(args.peak_tflops)
        flops = flops_per_token(cfg, self.seq_length)
        symmetry_every = args.symmetry_interval or 10 * args.log_interval
        last = {}
        if args.eval_interval and self.step == 0:
            last["valid/loss"] = self.evaluate()
            self.monitor.log(0, {"valid/loss": last["valid/loss"]})
        self.monitor.restart_clock()
        from hyperclone_dist.train.symmetry_breaking import GradientNoise

        self.symmetry_noise = GradientNoise.from_args(args)
        steps_timed = 0
        while self.step < args.train_iters:
            result = train_step(self.engine, self.chunks, self.feed.train_batches(self.step), self.seq_length,
                                self.plan.micro_batch_size, cfg.vocab_size, noise=self.symmetry_noise)
            self.step += 1
            steps_timed += 1
            values = {"train/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm}
            if self.step % args.log_interval == 0 or self.step == args.train_iters:
                seconds = self.monitor.elapsed()
                tokens_per_s = steps_timed * self.plan.tokens_per_step / seconds
                steps_timed = 0
                values["perf/tokens_per_s"] = tokens_per_s
                values["perf/step_seconds"] = seconds / max(1, args.log_interval)
                if peak:
                    values["perf/mfu"] = tokens_per_s * flops / (peak * 1e12 * dist.get_world_size())
            if self.start.width_factor > 1 and (self.step % symmetry_every == 0 or self.step == 1):
                values.update(symmetry_stats(self.chunks, self.start.width_factor) or {})
            if args.eval_interval and (self.step % args.eval_interval == 0 or self.step == args.train_iters):
                values["valid/loss"] = self.evaluate()
            if self.step % args.log_interval == 0 or "valid/loss" in values or self.step == args.train_iters:
                self.monitor.log(self.step, values)
            last.update({k: v for k, v in values.items() if v is not None})
            self.monitor.advance()
            stop = args.exit_interval is not None and self.step >= args.exit_interval
            if args.save and (stop or self.step == args.train_iters
                              or (args.save_interval and self.step % args.save_interval == 0)):
                self.save()
                self.monitor.restart_clock()
            if stop:
                self.monitor.print(f"stopping at step {self.step} (--exit-interval)")
                break
        self.monitor.close()
        return last


def pretrain(args: argparse.Namespace) -> dict:
    """The whole job on this rank; returns the last logged values (on the logging rank)."""
    _prepare_environment()
    from hyperclone_dist.megatron.parallel import init_distributed

    init_distributed(timeout_minutes=args.distributed_timeout_minutes)
    run = Run(args)
    agreed(run.setup_layout)
    agreed(run.setup_data)
    agreed(run.setup_model)
    agreed(run.setup_engine)
    agreed(run.setup_resume)
    return run.train()
