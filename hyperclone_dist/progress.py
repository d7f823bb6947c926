"""Progress bars: tqdm on stderr, drawn only when stderr is a terminal.

A bar in a log file or a pipe is a run of carriage returns nobody reads, and a bar left on the screen
after a command's verdict makes the verdict no longer its last line. So every bar is made here:
``show_progress`` decides whether one is drawn at all, ``progress_bar`` makes it (cleared when done,
unless ``leave=True``).
"""

from __future__ import annotations

import sys


def stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)  # a replaced stderr (a notebook's, a test's) may lack it
    return bool(isatty and isatty())


def show_progress(requested: bool = True) -> bool:
    """Whether a bar is drawn: asked for (no ``--no-progress``) and stderr is a terminal."""
    return requested and stderr_is_terminal()


def progress_bar(iterable=None, *, enabled: bool = True, **tqdm_kwargs):
    """A tqdm bar on stderr, disabled unless ``show_progress(enabled)``; ``tqdm_kwargs`` as tqdm's."""
    from tqdm import tqdm  # imported when a bar is made: ``hyperclone_dist.progress`` stays light

    tqdm_kwargs.setdefault("leave", False)
    tqdm_kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=sys.stderr, disable=not show_progress(enabled), **tqdm_kwargs)
