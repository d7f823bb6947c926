"""Continue pretraining a grown (or random-init) model with megatron-core TP/PP and DeepSpeed ZeRO.

    # DeepSpeed launcher (appends --local_rank); 4 ranks as TP=2 x PP=2
    deepspeed --num_gpus 4 launch/pretrain.py --deepspeed_config configs/deepspeed/zero1.json \\
        --clone-from runs/quickstart/small.pt --width-factor 2 --tp 2 --pp 2 \\
        --train-iters 200 --global-batch-size 16 --lr 1e-3 --save runs/big

    # torchrun, one node or several (--nnodes M --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:PORT)
    torchrun --standalone --nproc_per_node 4 launch/pretrain.py --config configs/train/tiny.json --tp 2 --pp 2

    # SLURM: launch/slurm/pretrain.sbatch

Any bad input ends the whole job with one line on stderr from rank 0 and exit status 2.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # this file is the program: no cyclic collections while the imports run
    gc.disable()  # (hyperclone_dist/process_gc.py); spawned children import it as __mp_main__

import contextlib
import os
import sys
import threading
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron.parallel import AgreedError, destroy_parallel
from hyperclone_dist.process_gc import run_command
from hyperclone_dist.train.args import parse_args
from hyperclone_dist.train.dryrun import dry_run
from hyperclone_dist.train.loop import pretrain

STOPPED_WITHIN_S = 60  # a launcher stops the other ranks once one fails; one that does not, after this


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        config = parse_args(argv)
    except SystemExit as exc:
        if rank and exc.code:  # every rank parsed the same bad command line and only rank 0 printed it: the
            threading.Event().wait(STOPPED_WITHIN_S)  # others leave once rank 0's exit has stopped the job
        raise
    try:
        if config.dry.dry_run:
            return dry_run(config)
        pretrain(config)
    except AgreedError as exc:  # every rank has it: rank 0 says it before any rank leaves
        if rank == 0:
            print(f"pretrain.py: error: {exc}", file=sys.stderr, flush=True)
        dist.barrier()
        return 2
    except HypercloneError as exc:  # this rank's own
        print(f"pretrain.py: error{f' (rank {rank})' if rank else ''}: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if rank == 0:
            print("pretrain.py: interrupted; the last complete checkpoint is intact", file=sys.stderr)
        return 130
    finally:
        with contextlib.suppress(Exception):  # a peer already gone: nothing left to tear down cleanly
            destroy_parallel()
    return 0


if __name__ == "__main__":  # megatron's checkpoint writer starts a spawn-context Manager: keep this guard
    sys.exit(run_command(main))
