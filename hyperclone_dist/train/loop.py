"""The pretraining job: set up the layout, build this rank's slice of the model, train, evaluate, save.

    torchrun --standalone --nproc_per_node 4 launch/pretrain.py --clone-from small.pt --width-factor 2 \\
        --tp 2 --pp 2 --train-iters 100 --global-batch-size 16 --lr 1e-3 --save runs/big

Set-up runs under ``agreed()``: a bad input found by any rank (a missing file, a layout that does not
divide) becomes the same one-line error on every rank and a clean exit, never a rank waiting forever in
a collective for a peer that already left.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from hyperclone_dist.data.loader import DataConfig, build_datasets, parse_blend
from hyperclone_dist.data.tokenizer import HUGGINGFACE, tokenizer_info
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron import legacy, torch_dist
from hyperclone_dist.megatron.lm_args import hf_tokenizer_at, tokenizer_ref
from hyperclone_dist.megatron.load import is_megatron_checkpoint
from hyperclone_dist.megatron.model import build_gpt_model
from hyperclone_dist.megatron.parallel import agreed, init_distributed, init_model_parallel
from hyperclone_dist.megatron.weights import fill_chunks
from hyperclone_dist.megatron.writer_queue import forked_children_die_with_this_process
from hyperclone_dist.train.checkpointing import (
    check_resumable,
    load_model_only,
    resume,
    save_checkpoint,
    use_safe_loader,
)
from hyperclone_dist.train.data_feed import DataFeed, default_cache, default_data
from hyperclone_dist.train.engine import (
    complete_deepspeed_config,
    initialize_engine,
    parameter_groups,
    read_deepspeed_config,
)
from hyperclone_dist.train.handoff import build_schedule
from hyperclone_dist.train.moments import grow_moments_into, has_moments, prime_optimizer_state
from hyperclone_dist.train.monitor import Monitor, device_peak_tflops, flops_per_token, is_logging_rank
from hyperclone_dist.train.mup import mup_lr_multipliers
from hyperclone_dist.train.run_config import RunConfig
from hyperclone_dist.train.run_plan import plan_run
from hyperclone_dist.train.startup import CLONE, LOAD, RESUME, mup_base_width, resolve_start
from hyperclone_dist.train.step import eval_step, mark_pipeline_replicas, train_step
from hyperclone_dist.train.symmetry import symmetry_stats, watched_names
from hyperclone_dist.train.symmetry_breaking import GradientNoise

# megatron.core is imported inside the methods that use it: seconds to import, and bad input is refused
# before (in train/args.py, on every rank alike).


def prepare_environment() -> None:
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it, even for one plain process
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    repo_cache = Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(repo_cache))  # DeepSpeed's JIT ops, built once
    forked_children_die_with_this_process()  # megatron's checkpoint writers, should a signal end this rank


class Run:
    """Everything one rank holds for the job; ``config`` is never changed."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.layout = config.parallel

    # ---- set-up ---------------------------------------------------------------------------------
    def setup_layout(self) -> None:
        from megatron.core import parallel_state as ps

        config = self.config
        self.start = resolve_start(config.start)
        self.mup_base = (mup_base_width(self.start, config.start, config.optim.mup_base_hidden_size)
                         if config.optim.mup else None)
        self.plan = plan_run(config, self.start.config, dist.get_world_size())
        init_model_parallel(self.layout, seed=config.seed)
        self.tp_rank, self.pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        # what a resume must match: DeepSpeed's optimizer partitions are tied to it
        self.layout_record = {"tp": self.layout.tp, "pp": self.layout.pp, "vpp": self.layout.vpp, "dp": self.plan.dp}
        if self.layout.uneven:
            self.layout_record["stage_layers"] = self.layout.stage_layers(self.start.config.num_layers)

    def setup_data(self) -> None:
        data, cfg = self.config.data, self.start.config
        cache = Path(data.data_cache_path) if data.data_cache_path else default_cache()
        tokenizer = data.tokenizer_model or self.start.tokenizer
        if data.data_path:  # train/args.py made sure a tokenizer is known
            prefixes, weights = parse_blend(list(data.data_path))
        else:  # the embedded corpus, tokenized with the model's own tokenizer where it has one
            (prefixes, tokenizer), weights = default_data(cache, cfg.vocab_size, tokenizer), None
        info = tokenizer_info(tokenizer)
        if info.vocab_size > cfg.vocab_size:
            raise HypercloneError(f"tokenizer {tokenizer} has {info.vocab_size} pieces but the model's vocabulary "
                                  f"is {cfg.vocab_size}: token ids would fall outside the embedding")
        dataset = DataConfig(prefixes=tuple(prefixes), tokenizer_model=str(tokenizer), cache_dir=str(cache / "index"),
                             weights=tuple(weights) if weights else None, split=data.split,
                             sequence_length=self.plan.seq_length, seed=self.config.seed)
        logging, gbs = self.config.logging, self.plan.batches.global_batch_size
        valid = logging.eval_iters * gbs if logging.eval_interval else 0
        datasets = build_datasets(dataset, (self.config.optim.train_iters + data.data_offset_steps) * gbs, valid)
        self.feed = DataFeed(datasets, self.plan.batches, self.dp_rank, logging.eval_iters, data.data_offset_steps)
        self.data_description = {"prefixes": list(prefixes), "weights": weights, "tokenizer": str(tokenizer),
                                 "split": data.split, "offset_steps": data.data_offset_steps}
        self.hf_tokenizer = info.model if info.library == HUGGINGFACE else None  # travels with the checkpoints

    def setup_model(self) -> None:
        cfg, mode = self.start.config, self.start.mode
        dtype = torch.bfloat16 if self.config.engine.bf16 else torch.float32
        if mode == LOAD:  # the converted checkpoint's own padding (it may have been written at another tp)
            self.padded_vocab = self._checkpoint_padded_vocab()
        else:
            self.padded_vocab = self.layout.padded_vocab(cfg.vocab_size)
        overrides = {"softmax_scale": 1.0 / cfg.head_dim} if self.config.optim.mup_attention_scale else {}
        self.chunks = build_gpt_model(cfg, self.layout, dtype=dtype, perform_initialization=False,
                                      padded_vocab=self.padded_vocab,
                                      **overrides)
        if self.start.slice_fn is not None:
            fill_chunks(self.chunks, cfg, self.layout, self.tp_rank, self.pp_rank, self.start.slice_fn)
        elif mode == LOAD:
            load_model_only(self.chunks, self.config.start.load)
        mark_pipeline_replicas(self.chunks)

    def _checkpoint_padded_vocab(self) -> int:
        root = Path(self.config.start.load)
        padded = int(torch_dist.read_args(legacy.latest_dir(root)).padded_vocab_size)
        if padded % self.layout.tp:
            raise HypercloneError(f"--load {root}: its padded vocabulary ({padded}) is not divisible by "
                                  f"tp={self.layout.tp}")
        return padded

    def setup_engine(self) -> None:
        config, batches = self.config, self.plan.batches
        optim = config.optim
        ds_config = complete_deepspeed_config(read_deepspeed_config(config.engine.deepspeed_config),
                                              micro_batch_size=batches.micro_batch_size,
                                              num_micro_batches=batches.num_micro_batches, dp=self.plan.dp,
                                              pp=self.layout.pp, clip_grad=optim.clip_grad, bf16=config.engine.bf16)
        self.schedule, self.handoff = build_schedule(optim, config.start.clone_from)
        multipliers = (mup_lr_multipliers(self.start.config, self.layout, self.pp_rank, self.mup_base)
                       if optim.mup else None)
        # the scheduler scales each group's LR by schedule.factor(step) = lr(step) / peak: the groups start
        # from the schedule's peak, which is --lr only for the paper and no-rewarmup hand-offs
        peak = self.schedule.peak_lr
        groups = parameter_groups(self.chunks, optim.weight_decay, peak, multipliers)
        self.engine = initialize_engine(self.chunks, ds_config, groups, self.schedule, weight_decay=optim.weight_decay,
                                        lr=peak, vocab_size=self.start.config.vocab_size,
                                        seq_length=self.plan.seq_length, logit_scale=optim.mup_output_multiplier,
                                        betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps)
        use_safe_loader(self.engine)
        prime_optimizer_state(self.engine)
        self.description = self.start.description
        if self.start.mode == CLONE and config.start.grow_optimizer_state:
            self._grow_optimizer_state()

    def _grow_optimizer_state(self) -> None:
        """--clone-from a pretrain.py checkpoint that holds Adam's moments: continue its optimizer."""
        root = Path(self.config.start.clone_from)
        if not (root.is_dir() and is_megatron_checkpoint(root)):
            return
        if not has_moments(root):
            self.description += "; fresh Adam moments (the checkpoint has none: pretrain.py --save-moments keeps them)"
            return
        saved = torch_dist.read_args(legacy.latest_dir(root))
        step = int(getattr(saved, "hyperclone_optimizer_step", 0))
        grow_moments_into(self.engine, self.chunks, root, self.config.start.growth, self.layout, self.tp_rank,
                          self.pp_rank, step)
        self.description += f"; Adam moments grown from its optimizer (step {step})"

    def setup_resume(self) -> None:
        self.step = 0
        state = self.start.resume_state
        if self.start.mode != RESUME:
            return
        check_resumable(state, self.layout_record, self.start.config.to_dict(), self.config.start.load)
        saved, rng = resume(self.engine, self.config.start.load, state["tag"])
        self.step = int(saved["step"])
        if rng.get("torch") is not None:
            torch.set_rng_state(rng["torch"])

    # ---- the job --------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "consumed_samples": self.step * self.plan.batches.global_batch_size,
                "layout": self.layout_record, "model_config": self.start.config.to_dict(),
                "data": self.data_description, "schedule": asdict(self.schedule), "handoff": self.config.optim.handoff,
                "start": self.description, "seed": self.config.seed, "mup_base_hidden_size": self.mup_base}

    def save(self) -> None:
        dtype = torch.bfloat16 if self.config.engine.bf16 else torch.float32
        checkpoint = self.config.checkpoint
        tokenizer = (hf_tokenizer_at(checkpoint.save) if self.hf_tokenizer  # copied beside the checkpoints
                     else tokenizer_ref(self.data_description["tokenizer"]))
        args = legacy.megatron_args(self.start.config, self.layout, dtype, self.step, fmt="torch_dist",
                                    tokenizer=tokenizer)
        args.padded_vocab_size = self.padded_vocab
        args.consumed_train_samples = self.step * self.plan.batches.global_batch_size
        path = save_checkpoint(self.engine, self.chunks, checkpoint.save, self.step, self.trainer_state(), args,
                               rng={"torch": torch.get_rng_state()}, moments=checkpoint.save_moments,
                               checksums=checkpoint.checksums, tokenizer=self.hf_tokenizer)
        self.monitor.print(f"saved {path} (step {self.step})")

    def evaluate(self) -> float | None:
        losses = [eval_step(self.chunks, self.feed.valid_batches(i), self.plan.seq_length,
                            self.plan.batches.micro_batch_size, self.start.config.vocab_size,
                            self.config.optim.mup_output_multiplier)
                  for i in range(self.config.logging.eval_iters)]
        return None if losses[0] is None else sum(losses) / len(losses)

    def _open_monitor(self) -> Monitor:
        logging, save = self.config.logging, self.config.checkpoint.save
        return Monitor(enabled=is_logging_rank(), total_steps=self.config.optim.train_iters, start_step=self.step,
                       out_dir=Path(save) if save else None, tensorboard_dir=logging.tensorboard_dir,
                       wandb_project=logging.wandb_project, wandb_name=logging.wandb_exp_name,
                       metrics_file=logging.metrics_file,
                       run_config={**self.config.to_dict(), "layout": self.layout_record},
                       progress=logging.progress)

    def _start_line(self) -> str:
        cfg, layout, batches = self.start.config, self.layout, self.plan.batches
        params = sum(p.numel() for c in self.chunks for p in c.parameters())
        return (f"pretrain: {self.description}; {cfg.family} hidden {cfg.hidden_size}, layers {cfg.num_layers}, "
                f"{params:,} parameters on this rank; tp={layout.tp} pp={layout.pp} dp={self.plan.dp}"
                f"{f' vpp={layout.vpp}' if layout.vpp else ''}, global batch {batches.global_batch_size} x "
                f"{self.plan.seq_length} tokens, {batches.num_micro_batches} micro-batches per rank; {self.handoff}")

    def train(self) -> dict:
        config, cfg, batches = self.config, self.start.config, self.plan.batches
        logging, checkpoint, train_iters = config.logging, config.checkpoint, config.optim.train_iters
        self.monitor = self._open_monitor()
        self.monitor.print(self._start_line())
        peak = device_peak_tflops(logging.peak_tflops)
        flops = flops_per_token(cfg, self.plan.seq_length)
        symmetry_every = logging.symmetry_interval or 10 * logging.log_interval
        watched = watched_names(cfg, self.layout, self.pp_rank)
        noise = GradientNoise.from_options(config.optim, config.seed)
        last = {}
        if logging.eval_interval and self.step == 0:
            last["valid/loss"] = self.evaluate()
            self.monitor.log(0, {"valid/loss": last["valid/loss"]})
        self.monitor.restart_clock()
        steps_timed = 0
        while self.step < train_iters:
            result = train_step(self.engine, self.chunks, self.feed.train_batches(self.step), self.plan.seq_length,
                                batches.micro_batch_size, cfg.vocab_size, noise=noise)
            self.step += 1
            steps_timed += 1
            values = {"train/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm}
            logged = self.step % logging.log_interval == 0 or self.step == train_iters
            if logged:
                seconds = self.monitor.elapsed()
                tokens_per_s = steps_timed * batches.tokens_per_step / seconds
                steps_timed = 0
                values["perf/tokens_per_s"] = tokens_per_s
                values["perf/step_seconds"] = seconds / max(1, logging.log_interval)
                if peak:
                    values["perf/mfu"] = tokens_per_s * flops / (peak * 1e12 * dist.get_world_size())
            if self.start.width_factor > 1 and (self.step % symmetry_every == 0 or self.step == 1):
                values.update(symmetry_stats(self.chunks, watched, self.start.width_factor) or {})
            if logging.eval_interval and (self.step % logging.eval_interval == 0 or self.step == train_iters):
                values["valid/loss"] = self.evaluate()
            if logged or "valid/loss" in values:
                self.monitor.log(self.step, values)
            last.update({k: v for k, v in values.items() if v is not None})
            self.monitor.advance()
            stop = checkpoint.exit_interval is not None and self.step >= checkpoint.exit_interval
            if checkpoint.save and (stop or self.step == train_iters
                                    or (checkpoint.save_interval and self.step % checkpoint.save_interval == 0)):
                self.save()
                self.monitor.restart_clock()
            if stop:
                self.monitor.print(f"stopping at step {self.step} (--exit-interval)")
                break
        self.monitor.close()
        return last


def pretrain(config: RunConfig) -> dict:
    """The whole job on this rank; returns the last logged values (on the logging rank)."""
    prepare_environment()
    init_distributed(timeout_minutes=config.engine.distributed_timeout_minutes)
    run = Run(config)
    agreed(run.setup_layout)
    agreed(run.setup_data)
    agreed(run.setup_model)
    agreed(run.setup_engine)
    agreed(run.setup_resume)
    return run.train()
