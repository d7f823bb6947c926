"""Learning-rate schedules, as a factor of the peak LR per step (torch ``LambdaLR`` applies it to every
parameter group, so μP's per-group multipliers are kept).

    constant   warmup, then the peak forever
    cosine     warmup, then half a cosine from the peak down to min_lr at ``decay_steps``
    linear     warmup, then a straight line down to min_lr at ``decay_steps``
    wsd        warmup, stable at the peak, then the last ``decay_fraction`` of the steps decays to min_lr
               (warmup-stable-decay, as in MiniCPM / Megatron-LM's ``WSD``)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hyperclone_dist.errors import HypercloneError

STYLES = ("constant", "cosine", "linear", "wsd", "points")
WSD_DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass
class LRSchedule:
    peak_lr: float
    style: str = "cosine"
    warmup_steps: int = 0
    decay_steps: int = 0  # the step at which the decay ends (usually the number of training steps)
    min_lr: float = 0.0
    start_lr: float = 0.0  # LR at step 0 of the warmup (0: Megatron-LM's linear warmup from zero)
    wsd_decay_fraction: float = 0.1
    wsd_decay_shape: str = "1-sqrt"
    points: tuple[tuple[int, float], ...] = ()  # style "points": (step, lr) pairs, linear in between

    def __post_init__(self):
        if self.style not in STYLES:
            raise HypercloneError(f"unknown LR schedule {self.style!r} (choose from {', '.join(STYLES)})")
        if self.wsd_decay_shape not in WSD_DECAY_SHAPES:
            raise HypercloneError(f"unknown WSD decay shape {self.wsd_decay_shape!r} "
                                  f"(choose from {', '.join(WSD_DECAY_SHAPES)})")
        if self.peak_lr <= 0 or self.min_lr < 0 or self.min_lr > self.peak_lr:
            raise HypercloneError(f"need 0 <= min_lr ({self.min_lr}) <= peak lr ({self.peak_lr}), peak > 0")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise HypercloneError(f"warmup ({self.warmup_steps}) and decay ({self.decay_steps}) steps must be >= 0")
        if self.style != "constant" and self.decay_steps and self.warmup_steps > self.decay_steps:
            raise HypercloneError(f"warmup ({self.warmup_steps} steps) is longer than the decay "
                                  f"({self.decay_steps} steps)")
        if self.style == "points":
            self.points = tuple((int(a), float(b)) for a, b in self.points)
            steps = [a for a, _ in self.points]
            if len(self.points) < 1 or steps != sorted(set(steps)) or any(b < 0 for _, b in self.points):
                raise HypercloneError("an LR schedule of points needs increasing steps and LRs >= 0, e.g. "
                                      "[[0, 0.001], [100, 0.0001]]")
        if not 0.0 <= self.wsd_decay_fraction <= 1.0:
            raise HypercloneError(f"wsd decay fraction {self.wsd_decay_fraction} must be in [0, 1]")

    def lr(self, step: int) -> float:
        """The LR used for the update of step ``step`` (0-based)."""
        if self.style == "points":
            return _interpolate(self.points, step)
        if step < self.warmup_steps:
            return self.start_lr + (self.peak_lr - self.start_lr) * (step + 1) / self.warmup_steps
        if self.style == "constant" or self.decay_steps == 0:
            return self.peak_lr
        if step >= self.decay_steps:
            return self.min_lr
        if self.style == "wsd":
            decay_start = self.decay_steps - round(self.wsd_decay_fraction * self.decay_steps)
            decay_start = max(decay_start, self.warmup_steps)
            if step < decay_start:
                return self.peak_lr
            progress = (step - decay_start) / max(1, self.decay_steps - decay_start)
            shape = {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
                     "1-sqrt": 1.0 - math.sqrt(progress)}[self.wsd_decay_shape]
            return self.min_lr + (self.peak_lr - self.min_lr) * shape
        progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        if self.style == "linear":
            return self.peak_lr - (self.peak_lr - self.min_lr) * progress
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def factor(self, step: int) -> float:
        return self.lr(step) / self.peak_lr

    __call__ = factor  # LambdaLR's lr_lambda


def _interpolate(points: tuple[tuple[int, float], ...], step: int) -> float:
    if step <= points[0][0]:
        return points[0][1]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return points[-1][1]


def lr_scheduler(optimizer, schedule: LRSchedule):
    """A torch LambdaLR over ``optimizer``; its state (the step) travels in DeepSpeed checkpoints."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
