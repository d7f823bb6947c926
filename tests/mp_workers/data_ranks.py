"""Every rank builds the same datasets from one shared cache: the multi-process half of tests/test_data.py.

    torchrun --standalone --nproc_per_node 2 tests/mp_workers/data_ranks.py --workdir /tmp/x \\
        --tokenizer tok.model --prefix a --prefix b --cache /tmp/x/cache

A plain gloo process group and no CPU shims: the data path must not need them. Each rank writes
<workdir>/rank<R>.pt with the first train/valid samples, its data-parallel slices of a few global batches,
and whether its GPTDataset indices were loaded from rank 0's cache (np.load mmaps) or built here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hyperclone_dist.data.loader import DataConfig, batch_at, build_datasets, data_parallel_slice

SEQ, GBS, STEPS, FIRST = 32, 4, 3, 12


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--prefix", action="append", required=True)
    parser.add_argument("--cache", required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        cfg = DataConfig(prefixes=tuple(args.prefix), weights=(0.6, 0.4), tokenizer_model=args.tokenizer,
                         cache_dir=args.cache, split="80,20,0", sequence_length=SEQ, seed=5)
        ds = build_datasets(cfg, train_samples=STEPS * GBS + FIRST, valid_samples=8)
        slices = []
        for step in range(STEPS):
            first, count = data_parallel_slice(step, GBS, rank, world)
            slices.append(batch_at(ds.train, first, count)["tokens"])
        result = {
            "train": batch_at(ds.train, 0, FIRST)["tokens"],
            "valid": batch_at(ds.valid, 0, 8)["tokens"],
            "slices": slices,
            "loaded_from_cache": [isinstance(d.document_index, np.memmap) for d in ds.train.datasets],
            "cache_dir": str(ds.cache_dir),
            "cuda_initialized": torch.cuda.is_initialized(),
        }
        torch.save(result, Path(args.workdir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
