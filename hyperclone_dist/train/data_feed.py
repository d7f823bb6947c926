"""The batches a data-parallel rank trains on at a step: a pure function of (step, layout), so a resumed
run reads exactly what an uninterrupted one would, and every layout sees the same global batch.

Global batch ``s`` is samples ``[s * gbs, (s + 1) * gbs)`` of the train split; data-parallel rank r takes
its contiguous 1/dp of them, cut into micro-batches. Validation always reads the same first
``eval_iters * gbs`` samples of the valid split, so every evaluation (and every run) is comparable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from hyperclone_dist.data.loader import batch_at, data_parallel_slice
from hyperclone_dist.data.prepare import prepare_dataset
from hyperclone_dist.data.tokenizer import MIN_VOCAB_SIZE, tokenizer_info, train_tokenizer
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.layout import Layout
from hyperclone_dist.train.run_config import BatchOptions


def default_cache() -> Path:
    """Tokenized default corpus and dataset index caches: $HYPERCLONE_CACHE, else ~/.cache/hyperclone."""
    return Path(os.environ.get("HYPERCLONE_CACHE") or Path.home() / ".cache" / "hyperclone")


@dataclass(frozen=True)
class BatchPlan:
    global_batch_size: int  # sequences per optimizer step
    micro_batch_size: int
    data_parallel_size: int
    seq_length: int

    @property
    def num_micro_batches(self) -> int:  # per data-parallel rank
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length


def batch_plan(batch: BatchOptions, dp: int, seq_length: int, layout: Layout) -> BatchPlan:
    gbs = batch.global_batch_size
    if gbs is None:
        if batch.global_batch_tokens % seq_length:
            raise HypercloneError(f"--global-batch-tokens {batch.global_batch_tokens} is not a multiple of the "
                                  f"sequence length {seq_length}")
        gbs = batch.global_batch_tokens // seq_length
    per_step = batch.micro_batch_size * dp
    if gbs < 1 or gbs % per_step:
        raise HypercloneError(f"global batch {gbs} sequences is not divisible by micro batch "
                              f"{batch.micro_batch_size} x data-parallel size {dp} = {per_step}")
    plan = BatchPlan(gbs, batch.micro_batch_size, dp, seq_length)
    if layout.vpp and plan.num_micro_batches % layout.pp:
        raise HypercloneError(f"the interleaved schedule needs the micro-batches per rank "
                              f"({plan.num_micro_batches}) to be a multiple of pp={layout.pp}")
    return plan


def default_corpus(cache_root: Path, vocab_size: int, build: bool = True,
                   tokenizer: Path | None = None) -> tuple[Path, Path]:
    """(prefix, tokenizer) of the embedded corpus (Python's standard library sources), built under
    ``cache_root`` the first time (``build``): tokenized with ``tokenizer`` (a model's own), or else with a
    sentencepiece tokenizer of ``vocab_size`` pieces trained on it."""
    if tokenizer is not None:
        root = cache_root / f"default-corpus-{tokenizer_info(tokenizer).fingerprint[:16]}"
        prefix = root / "stdlib"
        if build and not Path(f"{prefix}.idx").is_file():
            root.mkdir(parents=True, exist_ok=True)
            prepare_dataset(None, tokenizer, prefix, progress=False)
        return prefix, tokenizer
    if vocab_size < MIN_VOCAB_SIZE:
        raise HypercloneError(f"the embedded corpus needs a vocabulary of at least {MIN_VOCAB_SIZE} (the "
                              f"model has {vocab_size}); bring data with --data-path/--tokenizer-model")
    root = cache_root / f"default-corpus-v{vocab_size}"
    prefix, model = root / "stdlib", root / "stdlib.model"
    if build and not Path(f"{prefix}.idx").is_file():
        root.mkdir(parents=True, exist_ok=True)
        if not model.is_file():
            train_tokenizer(None, prefix, vocab_size)
        prepare_dataset(None, model, prefix, progress=False)
    return prefix, model


def default_data(cache_root: Path, vocab_size: int, tokenizer: Path | None = None) -> tuple[list[str], str]:
    """The embedded corpus for a job: rank 0 builds it if needed, everyone else waits for it."""
    error = [None]
    try:
        prefix, model = default_corpus(cache_root, vocab_size, build=dist.get_rank() == 0, tokenizer=tokenizer)
    except (HypercloneError, OSError) as exc:
        error = [str(exc)]
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise HypercloneError(error[0])
    return [str(prefix)], str(model)


class DataFeed:
    def __init__(self, datasets, plan: BatchPlan, dp_rank: int, eval_iters: int, offset_steps: int = 0):
        self.train, self.valid = datasets.train, datasets.valid
        self.plan, self.dp_rank, self.eval_iters = plan, dp_rank, eval_iters
        self.offset_steps = offset_steps  # global batches of the train split skipped before step 0

    def _micro_batches(self, dataset, step: int) -> list[dict]:
        first, count = data_parallel_slice(step, self.plan.global_batch_size, self.dp_rank,
                                           self.plan.data_parallel_size)
        batch = batch_at(dataset, first, count)
        mbs = self.plan.micro_batch_size
        return [{k: v[i:i + mbs] for k, v in batch.items()} for i in range(0, count, mbs)]

    def train_batches(self, step: int) -> list[dict]:
        return self._micro_batches(self.train, step + self.offset_steps)

    def valid_batches(self, index: int) -> list[dict]:
        return self._micro_batches(self.valid, index)
