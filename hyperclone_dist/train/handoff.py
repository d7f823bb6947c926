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

import argparse
import json
from pathlib import Path

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.train.schedules import LRSchedule

HANDOFFS = ("paper", "no-rewarmup", "low-peak", "points")


def small_model_final_lr(clone_from: str | None) -> float | None:
    """The last LR recorded in a small.pt's meta (absent for other sources)."""
    if not clone_from or Path(clone_from).is_dir() or not Path(clone_from).is_file():
        return None
    from hyperclone_dist.checkpoint.reader import torch_load

    payload = torch_load(Path(clone_from))
    meta = payload.get("meta") if isinstance(payload, dict) else None
    value = (meta or {}).get("final_lr")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def build_schedule(args: argparse.Namespace) -> tuple[LRSchedule, str]:
    """The run's LR schedule and a one-line description of the hand-off for the log."""
    decay = args.lr_decay_iters or args.train_iters
    common = dict(style=args.lr_decay_style, decay_steps=decay, min_lr=args.min_lr,
                  wsd_decay_fraction=args.lr_wsd_decay_fraction, wsd_decay_shape=args.lr_wsd_decay_style)
    handoff = args.handoff
    if args.lr_schedule_points:
        handoff = "points"
    if handoff == "points":
        points = args.lr_schedule_points  # a list when it comes from a --config file
        if not isinstance(points, list):
            try:
                points = json.loads(points or "")
            except json.JSONDecodeError as exc:
                raise HypercloneError(f"--lr-schedule-points is not JSON: {exc}") from None
        if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 for p in points):
            raise HypercloneError("--lr-schedule-points must be a JSON list of [step, lr] pairs")
        peak = max(float(v) for _, v in points) if points else 0.0
        schedule = LRSchedule(peak_lr=peak or 1.0, style="points", points=tuple(map(tuple, points)))
        return schedule, f"hand-off: points {points[:4]}{'...' if len(points) > 4 else ''}"
    if handoff == "paper":
        schedule = LRSchedule(peak_lr=args.lr, warmup_steps=args.lr_warmup_iters, start_lr=args.lr_warmup_init,
                              **common)
        return schedule, f"hand-off: paper (warmup {args.lr_warmup_iters} steps to {args.lr:g})"
    if handoff == "no-rewarmup":
        schedule = LRSchedule(peak_lr=args.lr, warmup_steps=0, **common)
        return schedule, f"hand-off: no re-warmup, start at {args.lr:g} and decay"
    final = small_model_final_lr(args.clone_from)
    peak = final * args.handoff_peak_factor if final else args.lr * 0.5
    if peak < args.min_lr:
        raise HypercloneError(f"the hand-off peak {peak:g} is below --min-lr {args.min_lr:g}")
    schedule = LRSchedule(peak_lr=peak, warmup_steps=args.lr_warmup_iters, start_lr=args.lr_warmup_init or
                          (final or 0.0), **common)
    source = f"small model's final LR {final:g} x {args.handoff_peak_factor:g}" if final else "--lr x 0.5"
    return schedule, f"hand-off: low peak {peak:g} ({source}) after {args.lr_warmup_iters} warmup steps"
