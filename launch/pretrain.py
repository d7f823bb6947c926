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

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main() -> int:
    from hyperclone_dist.errors import HypercloneError
    from hyperclone_dist.train.args import parse_args

    args = parse_args()
    rank = os.environ.get("RANK", "0")
    try:
        if args.dry_run:
            from hyperclone_dist.train.dryrun import dry_run

            return dry_run(args)
        from hyperclone_dist.train.loop import pretrain

        pretrain(args)
    except HypercloneError as exc:
        if rank == "0":
            print(f"pretrain.py: error: {exc}", file=sys.stderr, flush=True)
        else:
            import time

            time.sleep(2)  # the launcher stops every rank once one exits: let rank 0 print the line first
        return 2
    except KeyboardInterrupt:
        if rank == "0":
            print("pretrain.py: interrupted; the last complete checkpoint is intact", file=sys.stderr)
        return 130
    finally:
        from hyperclone_dist.megatron.parallel import destroy_parallel

        try:
            destroy_parallel()
        except Exception:  # a peer already gone: nothing left to tear down cleanly
            pass
    return 0


if __name__ == "__main__":  # megatron's checkpoint writer starts a spawn-context Manager: keep this guard
    sys.exit(main())
