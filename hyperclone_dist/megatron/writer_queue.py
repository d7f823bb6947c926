"""A results queue for megatron's torch_dist writer that does not outlive a killed process.

megatron-core's ``FileSystemWriterAsync`` collects its write results through a multiprocessing Manager
(``filesystem_async._get_write_results_queue``): a server process spawned at the first save and stopped
only by its owner's exit handlers. A process killed with SIGKILL (the OOM killer, a preempted node, one
rank of a job) runs no exit handler, and the server lives on as an orphan holding a few hundred MB, for
good. ``own_results_queue()`` starts that Manager before megatron does, with the kernel asked to kill it
when its parent dies (Linux PR_SET_PDEATHSIG), and hands megatron its queue.

This module imports nothing heavy at its top: the spawned server process imports it to run
``_die_with_parent``.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from multiprocessing.managers import SyncManager

from hyperclone_dist.megatron import internals

PR_SET_PDEATHSIG = 1  # linux/prctl.h
_manager: SyncManager | None = None  # referenced for the life of the process: collecting it shuts it down
_forks_registered = False


def _die_with_parent(parent: int) -> None:
    """Runs first in the Manager's server process."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(0)


def forked_children_die_with_this_process() -> None:
    """Every process forked from this one from now on is killed when this one dies (idempotent; Linux).

    megatron's torch_dist save forks its writer processes from the rank's main thread
    (``FileSystemWriterAsync``); when a job ends a rank by a signal (torchrun stops the others once one
    fails), the writers it forked lived on as orphans, writing into a checkpoint nothing will complete.
    PR_SET_PDEATHSIG follows the forking thread: the main thread, so the rank's exit."""
    global _forks_registered
    if _forks_registered or not sys.platform.startswith("linux"):
        return
    parent = os.getpid()
    os.register_at_fork(after_in_child=lambda: _die_with_parent(parent))
    _forks_registered = True


def own_results_queue() -> None:
    """Call before the first ``dist_checkpointing.save`` of a process (later calls do nothing)."""
    global _manager
    if internals.results_queue_is_set() or not sys.platform.startswith("linux"):
        return
    _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # what megatron uses
    _manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    internals.set_results_queue(_manager.Queue())
