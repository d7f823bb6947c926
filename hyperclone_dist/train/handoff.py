"""Hand-off schedules: the LR a grown model continues with, where the small model left off.

Re-warming a grown model to the baseline's peak LR (the paper's protocol) first undoes part of what it
inherited: on a small CPU run the clone's validation loss rose 4% during the re-warmup and took more than
half of its steps to come back. The choices, selected with ``--handoff`` and recorded in the checkpoint:

    paper         fresh warmup (--lr-warmup-iters) to --lr, then the decay: what the paper did
    no-rewarmup   no warmup: start at --lr (give the small model's final LR, or a bit more) and decay
    low-peak      a short warmup to a lower peak: the small model's final LR x --handoff-peak-factor
                  (small.pt written by `hyperclone export` of a pretrain.py checkpoint carries it;
                  otherwise --lr x 0.5), then the decay
    points        any schedule: --lr-schedule-points '[[0, 1e-3], [50, 8e-4], [400, 1e-4]]'
"""

from __future__ import annotations

from pathlib import Path

from hyperclone_dist.checkpoint.torch_load import torch_load
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.train.run_config import OptimOptions
from hyperclone_dist.train.schedules import LRSchedule


def small_model_final_lr(clone_from: str | None) -> float | None:
    """The last LR recorded in a small.pt's meta (absent for other sources)."""
    if not clone_from or Path(clone_from).is_dir() or not Path(clone_from).is_file():
        return None
    payload = torch_load(Path(clone_from))
    meta = payload.get("meta") if isinstance(payload, dict) else None
    value = (meta or {}).get("final_lr")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def build_schedule(optim: OptimOptions, clone_from: str | None) -> tuple[LRSchedule, str]:
    """The run's LR schedule and a one-line description of the hand-off for the log."""
    decay = optim.lr_decay_iters or optim.train_iters
    common = dict(style=optim.lr_decay_style, decay_steps=decay, min_lr=optim.min_lr,
                  wsd_decay_fraction=optim.lr_wsd_decay_fraction, wsd_decay_shape=optim.lr_wsd_decay_style)
    if optim.handoff == "points":
        points = optim.lr_schedule_points or ()
        peak = max((lr for _, lr in points), default=0.0)
        schedule = LRSchedule(peak_lr=peak or 1.0, style="points", points=points)
        shown = [list(p) for p in points[:4]]
        return schedule, f"hand-off: points {shown}{'...' if len(points) > 4 else ''}"
    if optim.handoff == "paper":
        schedule = LRSchedule(peak_lr=optim.lr, warmup_steps=optim.lr_warmup_iters, start_lr=optim.lr_warmup_init,
                              **common)
        return schedule, f"hand-off: paper (warmup {optim.lr_warmup_iters} steps to {optim.lr:g})"
    if optim.handoff == "no-rewarmup":
        schedule = LRSchedule(peak_lr=optim.lr, warmup_steps=0, **common)
        return schedule, f"hand-off: no re-warmup, start at {optim.lr:g} and decay"
    final = small_model_final_lr(clone_from)
    peak = final * optim.handoff_peak_factor if final else optim.lr * 0.5
    if peak < optim.min_lr:
        raise HypercloneError(f"the hand-off peak {peak:g} is below --min-lr {optim.min_lr:g}")
    schedule = LRSchedule(peak_lr=peak, warmup_steps=optim.lr_warmup_iters,
                          start_lr=optim.lr_warmup_init or (final or 0.0), **common)
    source = f"small model's final LR {final:g} x {optim.handoff_peak_factor:g}" if final else "--lr x 0.5"
    return schedule, f"hand-off: low peak {peak:g} ({source}) after {optim.lr_warmup_iters} warmup steps"
