"""Any rectangular slice of any grown tensor, computed from the small tensors alone.

``Grower.slice(name, (rows, cols))`` is the one primitive: the HF writer asks for whole tensors, a
tensor-parallel rank for its rows or columns. Every element depends only on its position, the small
tensor it comes from and (seed, name), so all partitions of the grown model agree bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.growth.noise import field_key, mean_square, noise_rows
from hyperclone_dist.growth.spec import GrowthSpec, LayerSource, layer_plan
from hyperclone_dist.params import Rule, canonical_shapes, is_tied_copy, layer_of, rule_for, vector_fill

Index = Sequence[slice] | None


def grown_config(small: ModelConfig, spec: GrowthSpec, plan: list[LayerSource]) -> ModelConfig:
    n, m = spec.n, spec.m
    depth_changed = [p.source for p in plan] != list(range(small.num_layers))
    if depth_changed and small.hf_extra.get("scale_attn_by_inverse_layer_idx"):
        raise HypercloneError("depth growth of a GPT-2 model with scale_attn_by_inverse_layer_idx=True "
                              "would change every later layer's attention scale; grow width only")
    if any(p.identity for p in plan) and (not small.pre_norm):
        raise HypercloneError("identity layer insertion needs pre-norm blocks; this model is post-LN, "
                              "where a zeroed block is not an identity")
    extra = dict(small.hf_extra)
    if isinstance(extra.get("layer_types"), list) and len(extra["layer_types"]) == small.num_layers:
        extra["layer_types"] = [small.hf_extra["layer_types"][p.source] for p in plan]
    keep_tie = small.tie_word_embeddings and n == 1 and spec.method != "warmstart"
    return small.replace(
        hidden_size=small.hidden_size * n, num_heads=small.num_heads * n, num_kv_heads=small.num_kv_heads * n,
        ffn_hidden_size=small.ffn_hidden_size * m, num_layers=len(plan), tie_word_embeddings=keep_tie,
        hf_extra=extra)


class Grower:
    """Grown model = growth rules applied to a small model reachable through ``get_small(name)``."""

    def __init__(self, small: ModelConfig, spec: GrowthSpec, get_small: Callable[[str], torch.Tensor],
                 get_small_rows: Callable[[str, int, int], torch.Tensor] | None = None):
        """``get_small_rows(name, lo, hi)``, where given, reads rows [lo, hi) of a small tensor alone: a
        vocab-parallel rank then reads its quarter of the embedding, not all of it."""
        self.small, self.spec, self.get_small = small, spec, get_small
        self.get_small_rows = get_small_rows
        self.plan = layer_plan(spec, small.num_layers)
        self.large = grown_config(small, spec, self.plan)
        self.shapes = canonical_shapes(self.large)
        self._small_shapes = canonical_shapes(small)
        self._mean_squares: dict[str, float] = {}
        self._held: tuple[str, torch.Tensor] | None = None  # _small's cache
        self._pair_noise: tuple[tuple, torch.Tensor] | None = None  # _noise's: the field of the pair in hand

    # ---- bookkeeping ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The grown model's stored tensors in forward order (a head that stays tied is the embedding)."""
        return [name for name in self.shapes if not is_tied_copy(self.large, name)]

    def source_of(self, name: str) -> tuple[str, LayerSource | None]:
        layer = layer_of(name)
        if layer is None:
            return name, None
        source = self.plan[layer]
        return name.replace(f"layers.{layer}.", f"layers.{source.source}.", 1), source

    def factors(self, name: str) -> tuple[int, ...]:
        return tuple(self.spec.factor(a) for a in rule_for(name).axes)

    # ---- the primitive --------------------------------------------------------------------------
    def slice(self, name: str, index: Index = None, dtype: torch.dtype | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``index`` (one slice per dimension, step 1) of grown tensor ``name``, in ``dtype``: by
        default float32, what every element is computed in (float64 for a float64 source), so a bf16 or fp16
        source's clone is rounded once, to the dtype it is written in, and a float32 one not at all.
        ``out``: a tensor of the slice's shape (a view of the memory it is written from) that the elements
        are computed into, in its dtype, and returned; the same values as a copy into it."""
        if name not in self.shapes:
            raise HypercloneError(f"the grown model has no parameter {name}")
        shape = self.shapes[name]
        bounds = _bounds(index, shape, name)
        small_name, source = self.source_of(name)
        rule = rule_for(name)
        if self._rows_alone(name, rule):  # rows map 1:1 to small rows: read only those
            (r0, r1), cols = bounds
            small = self.get_small_rows(small_name, r0, r1)
            bounds = [(0, r1 - r0), cols]
        else:
            small = self._small(small_name)
        compute = torch.float64 if small.dtype == torch.float64 else torch.float32
        out_dtype = dtype or compute
        out_shape = tuple(hi - lo for lo, hi in bounds)
        if out is not None and tuple(out.shape) != out_shape:
            raise HypercloneError(f"{name}: the slice is {out_shape}, its output {tuple(out.shape)}")
        if small.is_meta:
            return torch.empty(out_shape, dtype=out_dtype, device="meta")
        if source is not None and source.identity and rule.residual_writer:
            return torch.zeros(out_shape, dtype=out_dtype) if out is None else out.zero_()
        work = small.to(compute)
        if rule.sqrt_hidden_scaled and self.small.embedding_scale:
            # the model multiplies this output by sqrt(hidden_size): sqrt(n) larger once grown
            work = work * math.sqrt(self.small.hidden_size / self.large.hidden_size)
        if self.spec.method == "warmstart":
            grown = self._warmstart(name, rule, work, bounds).to(out_dtype)
            return grown if out is None else out.copy_(grown)
        if out is not None and work.dim() == 1:
            return out.copy_(self._clone(name, rule, work, bounds, out_dtype))
        return self._clone(name, rule, work, bounds, out_dtype, out)

    def slice_into(self, name: str, index: Index, out: torch.Tensor) -> torch.Tensor:
        """``slice`` computed into ``out`` (megatron/mapping.py's ``SliceInto``)."""
        return self.slice(name, index, out=out)

    def _small(self, name: str) -> torch.Tensor:
        """A one-entry cache of whole small tensors: a rank's fused QKV rows are grown group by group
        straight into the parameter, each group asking for the same small q (then k, then v) again."""
        if self._held is None or self._held[0] != name:
            self._held = None  # the previous one goes before the next is read
            self._held = (name, self.get_small(name))
        return self._held[1]

    def _rows_alone(self, name: str, rule: Rule) -> bool:
        """A matrix whose rows are not copied (vocab, positions) and that takes no noise needs only the
        requested rows of its small tensor; every element is computed as it would be from the whole."""
        if self.get_small_rows is None or len(rule.axes) != 2 or self.spec.method == "warmstart":
            return False
        rows_copies, cols_copies = self.factors(name)
        return rows_copies == 1 and (not rule.mixable or cols_copies == 1)

    # ---- HyperCloning ---------------------------------------------------------------------------
    def _clone(self, name: str, rule: Rule, w: torch.Tensor, bounds, out_dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
        if w.dim() == 1:
            (lo, hi), = bounds
            return w[torch.arange(lo, hi) % w.shape[0]].to(out_dtype)
        (r0, r1), (c0, c1) = bounds
        o, i = w.shape
        b = self.factors(name)[1]
        # blocks are computed in float32 and cast as they land: one block-sized temporary at a time
        if out is None:
            out = torch.empty(r1 - r0, c1 - c0, dtype=out_dtype)
        for rb in range(r0 // o, (r1 - 1) // o + 1):
            lr0, lr1 = max(r0, rb * o) - rb * o, min(r1, (rb + 1) * o) - rb * o
            for cb in range(c0 // i, (c1 - 1) // i + 1):
                lc0, lc1 = max(c0, cb * i) - cb * i, min(c1, (cb + 1) * i) - cb * i
                dr, dc = rb * o + lr0 - r0, cb * i + lc0 - c0
                target = out[dr:dr + lr1 - lr0, dc:dc + lc1 - lc0]
                if not self._copy_block_into(rule, w, b, (lr0, lr1), (lc0, lc1), target):
                    self._clone_block_into(name, rule, w, b, rb, cb, (lr0, lr1), (lc0, lc1), target)
        self._pair_noise = None  # a pair's noise lives for its two blocks, not past the tensor
        return out

    def _copy_block_into(self, rule: Rule, w, b: int, rows, cols, target: torch.Tensor) -> bool:
        """A symmetric block (w or w / b) computed straight into ``target`` when that is what
        ``_clone_block`` returns and no cast follows; False where it is not."""
        method = self.spec.method if (rule.mixable and b > 1) else "symmetric"
        if method != "symmetric" or target.dtype != w.dtype:
            return False
        part = w[rows[0]:rows[1], cols[0]:cols[1]]
        if rule.divide:
            torch.div(part, b, out=target)
        else:
            target.copy_(part)
        return True

    def _clone_block_into(self, name, rule: Rule, w, b, rb, cb, rows, cols, target: torch.Tensor) -> None:
        """Block (rb, cb) of a grown matrix, restricted to small-tensor rows/cols, computed into ``target``
        (through one temporary where ``target`` has another dtype: the block is rounded once, as it lands)."""
        method = self.spec.method if (rule.mixable and b > 1) else "symmetric"
        part = w[rows[0]:rows[1], cols[0]:cols[1]]
        diagonal = cb == rb % b
        if method in ("diagonal", "noisy-diagonal"):
            base = part if diagonal else torch.zeros_like(part)
        else:
            base = part / b if rule.divide else part
        if method == "noisy" and not (b % 2 == 1 and cb == b - 1):  # odd copy count: the unpaired block is clean
            noise = self._noise(name, f"noisy/{rb}/{cb // 2}", w, b, rows, cols)
            _into(torch.add if cb % 2 == 0 else torch.sub, base, noise, target)
        elif method == "noisy-diagonal":
            noise = self._noise(name, f"noisy-diagonal/{rb}", w, 1, rows, cols)
            op, term = (torch.add, noise) if diagonal else (torch.sub, noise / (b - 1))
            _into(op, base, term, target)
        else:
            target.copy_(base)

    def _noise(self, name, tag, w, divisor, rows, cols) -> torch.Tensor:
        """Noise whose power is the block's signal power / 10^(SNR/10), the block being w/divisor."""
        small_name, _ = self.source_of(name)
        if small_name not in self._mean_squares:
            self._mean_squares[small_name] = mean_square(w)
        std = math.sqrt(self._mean_squares[small_name] / divisor**2 / 10 ** (self.snr_db(name) / 10))
        key = field_key(self.spec.seed, name, tag)
        # the two blocks of a noisy pair (+noise, -noise) draw the same field: drawn once, for both
        if self._pair_noise is None or self._pair_noise[0] != (key, rows, cols):
            self._pair_noise = None  # the previous field goes before the next is drawn
            self._pair_noise = ((key, rows, cols), noise_rows(key, range(*rows), w.shape[1], slice(*cols),
                                                              w.dtype).mul_(std))
        return self._pair_noise[1]

    def snr_db(self, name: str) -> float:
        """The SNR of ``name``'s noise: --snr-db, or per layer from --snr-db at the first grown layer to
        --snr-db-last at the last (straight in dB); tensors outside the layer stack keep --snr-db."""
        first, last = self.spec.snr_db, self.spec.snr_db_last
        layer = layer_of(name)
        if last is None or layer is None or self.large.num_layers == 1:
            return first
        return first + (last - first) * layer / (self.large.num_layers - 1)

    # ---- muP warmstart --------------------------------------------------------------------------
    def init_std(self, name: str) -> float:
        """The target width's muP init std for ``name`` (base std = the small model's init_std)."""
        rule = rule_for(name)
        base = self.small.init_std
        if rule.mup == "embed":
            return base
        fan_in_mult = self.factors(name)[-1]  # large fan-in / small fan-in
        if rule.mup == "output":
            return base / fan_in_mult  # muP output layer: variance 1/fan_in^2
        return base / math.sqrt(fan_in_mult)  # hidden matrices: variance 1/fan_in

    def _warmstart(self, name: str, rule: Rule, w: torch.Tensor, bounds) -> torch.Tensor:
        """lambda * zero_pad(small) + sigma * muP init; vectors keep their values and pad with init."""
        small_box = [range(lo, min(hi, size)) for (lo, hi), size in zip(bounds, w.shape)]
        out_shape = tuple(hi - lo for lo, hi in bounds)
        if w.dim() == 1:
            out = torch.full(out_shape, vector_fill(self.small, rule), dtype=w.dtype)
            (lo, _), = bounds
            if len(small_box[0]):
                out[: len(small_box[0])] = w[small_box[0].start:small_box[0].stop]
            return out
        (r0, r1), (c0, c1) = bounds
        key = field_key(self.spec.seed, name, "warmstart")
        out = noise_rows(key, range(r0, r1), self.shapes[name][1], slice(c0, c1), w.dtype)
        out *= self.spec.perturb * self.init_std(name)
        rows, cols = small_box
        if len(rows) and len(cols):
            part = w[rows.start:rows.stop, cols.start:cols.stop] * self.spec.shrink
            out[: len(rows), : len(cols)] += part
        return out

    def full(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.slice(name, None, dtype)


def _bounds(index: Index, shape: tuple[int, ...], name: str) -> list[tuple[int, int]]:
    if index is None:
        return [(0, s) for s in shape]
    if len(index) != len(shape):
        raise HypercloneError(f"{name} has {len(shape)} dimensions, the slice gives {len(index)}")
    bounds = []
    for sl, size in zip(index, shape):
        lo, hi, step = sl.indices(size)
        if step != 1 or hi <= lo:
            raise HypercloneError(f"slice {sl} of {name} (size {size}) must be non-empty with step 1")
        bounds.append((lo, hi))
    return bounds


def _into(op, a: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> None:
    """``target.copy_(op(a, b))`` without the temporary where ``target`` has the operands' dtype."""
    if target.dtype == a.dtype:
        op(a, b, out=target)
    else:
        target.copy_(op(a, b))
