"""One process of ``hyperclone convert`` under torchrun, with its resident set recorded.

    OMP_NUM_THREADS=1 HYPERCLONE_BENCH_OUT=DIR .venv/bin/torchrun --standalone --nproc_per_node 8 \
        benchmarks/_rank_memory.py convert SRC --out OUT --format torch_dist --tp 4 --pp 2 --width-factor 2

Imports what a conversion imports, reads the resident set (the interpreter baseline), runs
``hyperclone_dist.cli.main.main(argv)`` unchanged (as ``python -m hyperclone_dist.cli.main`` runs it: imports
without cyclic collection, then ``process_gc.run_command``), then writes ``DIR/rank-<RANK>.json``: baseline and peak
(VmHWM) of this process, the peak of its children (forked checkpoint writers, if any), timestamps and CPU
seconds (user + system: after imports, at exit, of its children). With HYPERCLONE_BENCH_PROFILE=<rank>
that rank runs under cProfile (CPU time) and also writes ``DIR/rank-<RANK>.prof``.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

OUT_ENV, PROFILE_ENV = "HYPERCLONE_BENCH_OUT", "HYPERCLONE_BENCH_PROFILE"

if __name__ == "__main__":  # the imports without cyclic collection, as the command's own entry point runs
    gc.disable()  # them (hyperclone_dist/process_gc.py); main() runs the CLI through run_command


def import_converter() -> None:
    """Modules a megatron conversion imports whatever the model size, the way it imports them: part of the
    baseline."""
    from hyperclone_dist.megatron.light_imports import import_megatron_core

    import_megatron_core()
    import megatron.core.dist_checkpointing
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    import torch  # noqa: F401

    import hyperclone_dist.cli.main
    import hyperclone_dist.megatron.convert
    import hyperclone_dist.megatron.model
    import hyperclone_dist.megatron.parallel
    import hyperclone_dist.megatron.torch_dist  # noqa: F401


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    started = time.time()
    import_converter()
    from _common import status_kib  # here: a spawned child process re-imports this file
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "baseline": status_kib("VmRSS") * 1024, "started": started,
              "imported": time.time(), "cpu_imports": cpu_seconds(resource.RUSAGE_SELF)}
    from hyperclone_dist.cli.main import main as cli
    from hyperclone_dist.process_gc import run_command

    out = Path(os.environ[OUT_ENV])
    if os.environ.get(PROFILE_ENV) == str(rank):
        import cProfile

        profiler = cProfile.Profile(time.process_time)  # CPU seconds: 8 ranks share the cores
        code = run_command(lambda: profiler.runcall(cli, sys.argv[1:]))
        profiler.dump_stats(out / f"rank-{rank}.prof")
    else:
        code = run_command(lambda: cli(sys.argv[1:]))
    record.update(finished=time.time(), returncode=code, peak=status_kib("VmHWM") * 1024,
                  children_peak=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  cpu_self=cpu_seconds(resource.RUSAGE_SELF),
                  cpu_children=cpu_seconds(resource.RUSAGE_CHILDREN))  # those already reaped: the writers
    (out / f"rank-{rank}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(main())
