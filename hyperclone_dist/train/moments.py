"""Adam's moments as tensors shaped like the parameters: saved beside the model in torch_dist (so they
reshard like it) and grown with it, so a clone continues the small model's optimizer instead of
restarting it.

Growth rule: a moment must scale like its parameter's *gradient*, so that the grown Adam update
m / sqrt(v) of every copy equals the small model's. In a HyperCloning clone every hidden (and FFN)
activation is held n times and its consumers divide by n, so the gradient of a parameter whose output is
such an activation is divided by n (m: /n, v: /n^2). For most matrices that is their weight's own rule;
the exceptions are the head (weight divided, gradient not: its output is the logits) and the vectors and
embedding rows that write hidden activations (weight copied, gradient divided). Inserted identity blocks
start with zero moments. Noise is never added. Each rank builds only its own slice, as for the weights.

DeepSpeed keeps the moments flattened and partitioned over data parallel; ``safe_get_full_optimizer_state``
/ ``safe_set_full_optimizer_state`` (deepspeed.utils) gather and scatter one parameter's state.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron import internals, legacy
from hyperclone_dist.megatron.mapping import chunk_params, local_tensor
from hyperclone_dist.megatron.source import TorchDistSource
from hyperclone_dist.params import rule_for

# DeepSpeed is imported inside the functions that use it: a job imports it only once it trains.

KEYS = ("exp_avg", "exp_avg_sq")
PREFIX = "optimizer."  # torch_dist key of a moment: optimizer.<exp_avg|exp_avg_sq>.<the parameter's key>


def sharded_moments(engine, chunks: list) -> dict:
    """Collective over data parallel: every parameter's two moments as megatron sharded tensors keyed
    like the parameter (same global shape, offsets and replica ids)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    internals.relink_optimizer_state(engine)
    out = {}
    for index, chunk in enumerate(chunks):
        sharded = chunk.sharded_state_dict()
        for name, param in chunk.named_parameters():
            entry = sharded.get(name)
            if entry is None or not hasattr(entry, "key"):
                continue
            for key in KEYS:
                state = safe_get_full_optimizer_state(param, key)
                if state is None:
                    raise HypercloneError(f"the optimizer holds no {key} for {name}")
                changes = dict(key=f"{PREFIX}{key}.{entry.key}", data=state.float().reshape(param.shape))
                if any(field.name == "dtype" for field in dataclasses.fields(entry)):
                    changes["dtype"] = torch.float32  # moments are fp32 even where the weights are bf16
                out[f"{PREFIX}{key}.{index}.{name}"] = dataclasses.replace(entry, **changes)
    return out


def optimizer_step_count(engine) -> int:
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def has_moments(root: Path) -> bool:
    try:
        it_dir = legacy.latest_dir(root)
    except HypercloneError:
        return False
    if not (it_dir / ".metadata").is_file():  # not torch_dist: a legacy checkpoint holds the model only
        return False
    metadata = FileSystemReader(str(it_dir)).read_metadata()
    return any(k.startswith(PREFIX + "exp_avg.") for k in metadata.state_dict_metadata)


def gradient_over_weight_scale(grower: Grower, name: str) -> float:
    """(scale of the grown gradient) / (scale the weight's growth rule applies), per canonical tensor."""
    rule = rule_for(name)
    factors = grower.factors(name)
    gradient = 1.0 / factors[rule.output_axis]
    weight = 1.0 / factors[-1] if rule.divide else 1.0
    return gradient / weight


def grow_moments_into(engine, chunks: list, small_root: Path, spec: GrowthSpec, layout: Layout, tp_rank: int,
                      pp_rank: int, step: int) -> None:
    """Set every local parameter's Adam moments to its slice of the grown small-model moments, and the
    optimizer's step count to the small model's."""
    from deepspeed.utils import safe_set_full_optimizer_state

    internals.relink_optimizer_state(engine)
    plain = dataclasses.replace(spec, method="symmetric")  # moments are grown without noise
    first = TorchDistSource(small_root, key_prefix=f"{PREFIX}exp_avg.")
    second = TorchDistSource(small_root, key_prefix=f"{PREFIX}exp_avg_sq.")
    grow_m = Grower(first.config, plain, first.get)
    grow_root_v = Grower(second.config, plain, lambda name: second.get(name).clamp(min=0).sqrt())

    def moment_slice(grower):
        def slice_fn(name, index):
            _, source = grower.source_of(name)
            grown = grower.slice(name, index)
            if source is not None and source.identity:
                return torch.zeros_like(grown)
            return grown * gradient_over_weight_scale(grower, name)
        return slice_fn

    cfg = grow_m.large
    for chunk_index, chunk in enumerate(chunks):
        params = dict(chunk.named_parameters())
        for name, row, layer in chunk_params(cfg, layout, pp_rank, chunk_index):
            param = params[name]
            m = local_tensor(cfg, layout, row, layer, tp_rank, moment_slice(grow_m))
            v = local_tensor(cfg, layout, row, layer, tp_rank, moment_slice(grow_root_v)) ** 2
            safe_set_full_optimizer_state(param, m.to(torch.float32).reshape(param.shape), "exp_avg")
            safe_set_full_optimizer_state(param, v.to(torch.float32).reshape(param.shape), "exp_avg_sq")
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            state["step"] = torch.tensor(float(step)) if torch.is_tensor(state["step"]) else step


def prime_optimizer_state(engine) -> None:
    """Create AdamW's state (zero moments, step 0) for every flat fp32 partition before the first step,
    and link DeepSpeed's per-parameter views to it.

    DeepSpeed links those views lazily, after the first parameter group has stepped; with more than one
    group (we always have two: decayed and not) the later groups' state does not exist yet then, and their
    moments can never be read or set per parameter. Torch's AdamW creates exactly this state on its first
    step, so training is unchanged."""
    optimizer = getattr(engine, "optimizer", None)
    base = getattr(optimizer, "optimizer", None)
    if base is None or not internals.links_state_lazily(optimizer):
        return
    for group in base.param_groups:
        for flat in group["params"]:
            state = base.state[flat]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    internals.relink_optimizer_state(engine)
