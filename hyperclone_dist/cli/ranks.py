"""Run one ``hyperclone`` command as N local ranks, what ``torchrun --standalone --nproc_per_node N`` does.

``hyperclone verify SMALL CKPT --tp 2 --pp 2`` needs tp x pp processes. Started without a launcher, it
starts them itself: the same command line in N child processes, each with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Unlike torchrun, the children's exit status is the command's
(0 OK, 1 FAIL, 2 bad input) and no launcher report follows the verdict: rank 0's output is all there is.

The rendezvous store is this process's own TCPStore on a port the OS chose, which the children join as
clients (torchrun's agent store, ``TORCHELASTIC_USE_AGENT_STORE``): no port to guess, none to collide.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

HOST = "127.0.0.1"
STRAGGLER_GRACE_S = 10.0  # after one rank failed, how long the others get to finish before they are stopped
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this
STORE_TIMEOUT = timedelta(minutes=30)  # megatron's default process-group timeout


def torchrun_command(nproc: int, argv: list[str]) -> str:
    """The equivalent launcher command line, for messages."""
    return shlex.join(["torchrun", "--standalone", "--nproc_per_node", str(nproc), "-m", "hyperclone_dist.cli.main",
                       *argv])


def local_ranks_unavailable(nproc: int) -> str | None:
    """Why ``nproc`` ranks cannot run on this machine, or None. On GPUs each rank takes one device (nccl);
    on CPU (gloo) any number shares the cores."""
    if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        return f"{nproc} ranks need {nproc} GPUs and this machine has {torch.cuda.device_count()}"
    return None


def run_ranks(nproc: int, argv: list[str], what: str, module: str = "hyperclone_dist.cli.main",
              straggler_grace_s: float = STRAGGLER_GRACE_S) -> int:
    """``python -m module *argv`` as ``nproc`` ranks of one job; returns the job's exit status: the first
    non-zero one in rank order (a rank killed by signal S: 128 + S), else 0. ``what`` prefixes the one line
    said when a failed rank's peers had to be stopped."""
    store = dist.TCPStore(HOST, 0, world_size=nproc, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))  # as torchrun
    base = {**os.environ, "MASTER_ADDR": HOST, "MASTER_PORT": str(store.port), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "True",
            "OMP_NUM_THREADS": threads}
    procs = [subprocess.Popen([sys.executable, "-m", module, *argv],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "ROLE_RANK": str(r)})
             for r in range(nproc)]
    try:
        return _wait_all(procs, straggler_grace_s, what)
    except KeyboardInterrupt:  # the children had the same Ctrl-C (one process group): give them time to stop
        _stop(procs, STOP_GRACE_S)
        return 130
    finally:
        _stop(procs, 0.0)
        del store  # held until here: the ranks rendezvous on it as long as any runs


def _status(code: int) -> int:
    return 128 - code if code < 0 else code  # Popen reports death by signal S as -S; shells say 128 + S


def _wait_all(procs: list[subprocess.Popen], straggler_grace_s: float, what: str) -> int:
    """Wait for every rank; once one failed, the others only ``straggler_grace_s`` more (a rank that died
    leaves its peers waiting in a collective until the process-group timeout)."""
    failed, failed_at = None, 0.0
    while [p.poll() for p in procs].count(None):  # every rank polled: a returncode is set only by a poll
        if failed is None:
            failed = next((r for r, p in enumerate(procs) if p.returncode not in (None, 0)), None)
            failed_at = time.monotonic()
        elif time.monotonic() - failed_at > straggler_grace_s:
            code = _status(procs[failed].returncode)
            print(f"{what}: rank {failed} exited with status {code}; stopped the ranks still running",
                  file=sys.stderr, flush=True)
            _stop(procs, STOP_GRACE_S)
            return code
        time.sleep(0.05)
    return next((_status(p.returncode) for p in procs if p.returncode != 0), 0)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every rank still running, then SIGKILL those still there after ``grace_s``."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
