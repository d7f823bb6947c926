"""Symmetry breaking by gradient noise in the first K optimizer steps (``--symmetry-noise-steps K``).

A symmetric clone gives every copy of a hidden unit the same gradient, so the copies never part (the
symmetry monitor, symmetry.py, reads cosine 1.000 forever). For the first K optimizer steps this adds
Gaussian noise to the gradient of every 2-D weight, so the copies take different updates; from step K on
nothing is added and the hooks are removed.

    launch/pretrain.py --clone-from small.pt --width-factor 2 --method symmetric \\
        --symmetry-noise-steps 50 --symmetry-noise-scale 1.0 ...

Mechanism: a tensor hook on each 2-D parameter (``param.register_hook``), which autograd runs on the
incoming gradient before it is accumulated into ``param.grad``. That is upstream of everything DeepSpeed
does with gradients (accumulation over micro-batches, ZeRO-1/2 reduction over data parallel, clipping,
master weights), so it needs no knowledge of ZeRO's flat buffers. Perturbing the weights after
``engine.step()`` instead would be overwritten: ZeRO keeps its own fp32 partition and copies it back
into the model at the next step.

The noise of one step: std = scale x the RMS of each micro-batch's gradient of that tensor (DeepSpeed has
already divided the loss by the accumulation steps, so the sum over micro-batches is scale x their mean
RMS), with ONE standard-normal draw z per (step, tensor) shared by all micro-batches and data-parallel
replicas, so the averaged gradient carries scale x mean RMS x z whatever the split. z comes from a generator
seeded by (--seed, step, pipeline rank, chunk, parameter name, TP rank for TP-split parameters): replicated
parameters get the same noise on every TP rank, and a resumed run adds exactly what an uninterrupted one
would. The step is DeepSpeed's ``engine.global_steps`` (optimizer steps of this run; restored by
``--load``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from hyperclone_dist.train.run_config import OptimOptions


@dataclass(frozen=True)
class GradientNoise:
    steps: int  # optimizer steps (from the run's first) that get noisy gradients; 0: off
    scale: float  # noise std relative to the RMS of each 2-D weight's gradient
    seed: int = 0  # --seed: the noise is a function of (seed, step, parameter) only

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"symmetry noise steps must be >= 0, got {self.steps}")
        if not self.scale >= 0:
            raise ValueError(f"symmetry noise scale must be >= 0, got {self.scale}")

    @property
    def active(self) -> bool:
        return self.steps > 0 and self.scale > 0

    @classmethod
    def from_options(cls, optim: OptimOptions, seed: int) -> GradientNoise | None:
        """The run's noise, or None when it is off."""
        noise = cls(optim.symmetry_noise_steps, optim.symmetry_noise_scale, seed)
        return noise if noise.active else None


def noise_seed(seed: int, step: int, key: str) -> int:
    """A stable 63-bit seed (Python's hash() of a str changes between processes)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class NoiseHooks:
    """The hooks on one rank's parameters; ``step_of()`` gives the index of the optimizer step whose
    gradients are being computed (0-based)."""

    def __init__(self, noise: GradientNoise, named_params, step_of, tp_rank: int = 0):
        self.noise, self.step_of = noise, step_of
        self.handles = []
        for key, param in named_params:
            if param.dim() != 2 or not param.requires_grad:
                continue
            if getattr(param, "tensor_model_parallel", False):  # split over TP: each rank's own slice
                key = f"{key}/tp{tp_rank}"
            self.handles.append(param.register_hook(self._hook(key)))

    def _hook(self, key: str):
        def add_noise(grad: torch.Tensor) -> torch.Tensor | None:
            step = self.step_of()
            if step >= self.noise.steps:
                return None
            gen = torch.Generator(device=grad.device)
            gen.manual_seed(noise_seed(self.noise.seed, step, key))
            z = torch.randn(grad.shape, generator=gen, device=grad.device, dtype=torch.float32)
            rms = grad.detach().float().pow(2).mean().sqrt()
            return grad + (self.noise.scale * rms * z).to(grad.dtype)

        return add_noise

    def retire_if_done(self) -> bool:
        """Remove the hooks once the noisy steps are over; True when none are left."""
        if self.handles and self.step_of() >= self.noise.steps:
            for handle in self.handles:
                handle.remove()
            self.handles = []
        return not self.handles


def attach(engine, chunks: list, noise: GradientNoise) -> NoiseHooks:
    """Hooks on this rank's chunks for the DeepSpeed engine's optimizer steps (PP = 1 only: RunConfig
    refuses the noise with pipeline parallelism, whose schedule and tied-embedding gradients it has not
    been tested with)."""
    from megatron.core import parallel_state as ps  # heavy: imported once a job trains

    named = [(f"chunk{i}.{name}", p) for i, chunk in enumerate(chunks) for name, p in chunk.named_parameters()]
    return NoiseHooks(noise, named, lambda: engine.global_steps, ps.get_tensor_model_parallel_rank())
