"""Python's cyclic garbage collector in a command's own process (``hyperclone``, ``launch/pretrain.py``).

A command imports torch, megatron-core, DeepSpeed and transformers: ~5 x 10^5 objects that live as long as
the process. Each full collection scans all of them again, and so does the interpreter's last collection
at exit; on CPU that is ~1.2 of the ~4.5 CPU-s a command spends starting and stopping, paid by every rank
of every job. So an entry point runs its imports with collection off (``gc.disable()`` at its top, only
when it is the program being run, never when imported), then ``run_command`` freezes what the imports built
(``gc.freeze``: never scanned again), turns collection back on for the command itself, and freezes again
before the interpreter exits. What the imports leave as cyclic garbage (~8 x 10^3 objects) stays
allocated; a command's own garbage is collected as usual.
"""

from __future__ import annotations

import gc
from collections.abc import Callable


def run_command(main: Callable[[], int]) -> int:
    """``main()``'s status, run as a process's one command (see the module docstring)."""
    gc.freeze()
    gc.enable()
    try:
        return main()
    finally:
        gc.freeze()  # the objects the command built, for the interpreter's collection at exit
