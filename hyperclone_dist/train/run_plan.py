"""The checks a run passes before it builds anything, shared by ``pretrain.py`` and its ``--dry-run``: the
layout against the model (``Layout.validate``), the sequence length against the context, the batch plan.
The dry run and the job therefore give the same one-line verdict for the same command."""

from __future__ import annotations

from dataclasses import dataclass

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron.model import check_representable
from hyperclone_dist.train.data_feed import BatchPlan, batch_plan
from hyperclone_dist.train.run_config import RunConfig


@dataclass(frozen=True)
class RunPlan:
    seq_length: int
    dp: int  # data-parallel size
    batches: BatchPlan


def plan_run(config: RunConfig, cfg: ModelConfig, world_size: int) -> RunPlan:
    check_representable(cfg)
    config.parallel.validate(cfg, world_size)
    seq = config.batch.seq_length or cfg.max_position_embeddings
    if not 1 <= seq <= cfg.max_position_embeddings:
        raise HypercloneError(f"--seq-length {seq} is outside the model's context 1..{cfg.max_position_embeddings}")
    dp = world_size // config.parallel.world
    return RunPlan(seq, dp, batch_plan(config.batch, dp, seq, config.parallel))
