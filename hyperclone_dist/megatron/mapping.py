"""Our canonical model <-> megatron-core GPTModel parameters, and each rank's slice of them.

The table below is the whole mapping, as data: a megatron parameter name, the canonical tensors it is
made of, how tensor parallelism splits it, and how the parts are fused. ``local_tensor`` turns one row
into one rank's local tensor by asking a ``slice_fn(canonical_name, index)`` — in a converter, the
growth transforms — for exactly the rows/columns that rank owns: nobody builds a full grown tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.params import canonical_shapes

SliceFn = Callable[[str, Sequence[slice]], torch.Tensor]

COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"
POSITIONS = "positions"  # replicated; megatron's table is rows [offset, offset + max_positions) of ours
TP_AXIS = {COLUMN: 0, ROW: 1, VOCAB: 0, REPLICATED: None, POSITIONS: None}  # the local axis TP splits


@dataclass(frozen=True)
class MegatronParam:
    name: str  # local layer spec name; "{i}" is the layer index local to the model chunk
    parts: tuple[str, ...]  # canonical names; "{i}" is the global layer index
    split: str  # column | row | vocab | replicated
    fuse: str | None = None  # "qkv": per query group [q heads; k; v], "glu": per rank [gate_r; up_r]


_Q, _K, _V = "layers.{i}.attn.q", "layers.{i}.attn.k", "layers.{i}.attn.v"
_L = "decoder.layers.{i}."

# First row whose parts all exist wins, so the gated fc1 row shadows the plain one for SwiGLU models.
LOCAL_SPEC: tuple[MegatronParam, ...] = (
    MegatronParam("embedding.word_embeddings.weight", ("embed.weight",), VOCAB),
    MegatronParam("embedding.position_embeddings.weight", ("pos_embed.weight",), POSITIONS),
    MegatronParam(_L + "input_layernorm.weight", ("layers.{i}.attn_norm.weight",), REPLICATED),
    MegatronParam(_L + "input_layernorm.bias", ("layers.{i}.attn_norm.bias",), REPLICATED),
    MegatronParam(_L + "self_attention.linear_qkv.weight", (_Q + ".weight", _K + ".weight", _V + ".weight"),
                  COLUMN, "qkv"),
    MegatronParam(_L + "self_attention.linear_qkv.bias", (_Q + ".bias", _K + ".bias", _V + ".bias"), COLUMN, "qkv"),
    MegatronParam(_L + "self_attention.linear_proj.weight", ("layers.{i}.attn.o.weight",), ROW),
    MegatronParam(_L + "self_attention.linear_proj.bias", ("layers.{i}.attn.o.bias",), REPLICATED),
    MegatronParam(_L + "pre_mlp_layernorm.weight", ("layers.{i}.mlp_norm.weight",), REPLICATED),
    MegatronParam(_L + "pre_mlp_layernorm.bias", ("layers.{i}.mlp_norm.bias",), REPLICATED),
    MegatronParam(_L + "mlp.linear_fc1.weight", ("layers.{i}.mlp.gate.weight", "layers.{i}.mlp.up.weight"),
                  COLUMN, "glu"),
    MegatronParam(_L + "mlp.linear_fc1.weight", ("layers.{i}.mlp.up.weight",), COLUMN),
    MegatronParam(_L + "mlp.linear_fc1.bias", ("layers.{i}.mlp.gate.bias", "layers.{i}.mlp.up.bias"), COLUMN, "glu"),
    MegatronParam(_L + "mlp.linear_fc1.bias", ("layers.{i}.mlp.up.bias",), COLUMN),
    MegatronParam(_L + "mlp.linear_fc2.weight", ("layers.{i}.mlp.down.weight",), ROW),
    MegatronParam(_L + "mlp.linear_fc2.bias", ("layers.{i}.mlp.down.bias",), REPLICATED),
    MegatronParam("decoder.final_layernorm.weight", ("final_norm.weight",), REPLICATED),
    MegatronParam("decoder.final_layernorm.bias", ("final_norm.bias",), REPLICATED),
    MegatronParam("output_layer.weight", ("head.weight",), VOCAB),
)

# TransformerEngine layer spec: the norms are fused into the following linear layer.
TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocab to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual pipeline stages (model chunks) per pipeline rank
    vocab_divisible_by: int = 128
    spec: str = "local"  # local | te

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    @property
    def world(self) -> int:
        return self.tp * self.pp


def check_layout(cfg: ModelConfig, layout: Layout) -> None:
    """Refuse layouts megatron-core cannot build for this model, naming the numbers."""
    if layout.tp < 1 or layout.pp < 1 or (layout.vpp is not None and layout.vpp < 1):
        raise HypercloneError(f"tp={layout.tp}, pp={layout.pp}, vpp={layout.vpp} must be >= 1")
    if layout.vocab_divisible_by < 1:
        raise HypercloneError(f"--vocab-divisible-by {layout.vocab_divisible_by} must be >= 1")
    if cfg.num_heads % layout.tp:
        raise HypercloneError(f"attention heads ({cfg.num_heads}) are not divisible by tp={layout.tp}")
    if cfg.num_kv_heads % layout.tp:
        raise HypercloneError(f"query groups / kv heads ({cfg.num_kv_heads}) are not divisible by tp={layout.tp}")
    if cfg.ffn_hidden_size % layout.tp:
        raise HypercloneError(f"ffn hidden size ({cfg.ffn_hidden_size}) is not divisible by tp={layout.tp}")
    stages = layout.pp * layout.chunks
    if cfg.num_layers % stages:
        raise HypercloneError(f"layers ({cfg.num_layers}) are not divisible by pp x vpp = {layout.pp} x "
                              f"{layout.chunks} = {stages}")
    if layout.vpp is not None and layout.pp < 2:
        raise HypercloneError("virtual pipeline stages (vpp) need pp >= 2")


def chunk_layers(num_layers: int, layout: Layout, pp_rank: int, chunk: int) -> list[int]:
    """Global layer indices of model chunk ``chunk`` on pipeline rank ``pp_rank`` (megatron's
    interleaved assignment: chunk v of rank p holds the (v * pp + p)-th block of layers)."""
    per_chunk = num_layers // (layout.pp * layout.chunks)
    first = (chunk * layout.pp + pp_rank) * per_chunk
    return list(range(first, first + per_chunk))


def chunk_params(cfg: ModelConfig, layout: Layout, pp_rank: int, chunk: int) -> list[tuple[str, MegatronParam, int | None]]:
    """``(local_name, row, global_layer)`` for every parameter of one model chunk, in module order."""
    existing = canonical_shapes(cfg)
    first_stage = pp_rank == 0 and chunk == 0
    last_stage = pp_rank == layout.pp - 1 and chunk == layout.chunks - 1
    tied = cfg.tie_word_embeddings
    out: list[tuple[str, MegatronParam, int | None]] = []

    def pick(rows: list[MegatronParam], layer: int | None, local: int | None):
        taken: set[str] = set()
        for row in rows:
            if row.name in taken:
                continue
            parts = [p.format(i=layer) for p in row.parts]
            if all(p in existing for p in parts):
                taken.add(row.name)
                name = row.name.format(i=local)
                out.append((_rename(name, layout.spec), row, layer))

    if first_stage:
        pick([r for r in LOCAL_SPEC if r.name.startswith("embedding.")], None, None)
    for local, layer in enumerate(chunk_layers(cfg.num_layers, layout, pp_rank, chunk)):
        pick([r for r in LOCAL_SPEC if r.name.startswith(_L)], layer, local)
    if last_stage:
        pick([r for r in LOCAL_SPEC if r.name.startswith("decoder.final")], None, None)
        if not tied:
            pick([r for r in LOCAL_SPEC if r.name == "output_layer.weight"], None, None)
        elif not first_stage:  # the last stage keeps its own copy of the shared embedding
            out.append(("output_layer.weight", LOCAL_SPEC[0], None))
    return out


def _rename(name: str, spec: str) -> str:
    if spec != "te":
        return name
    for local, te in TE_RENAMES.items():
        if name.endswith(local):
            return name[: -len(local)] + te
    return name


def local_shape(cfg: ModelConfig, layout: Layout, row: MegatronParam, layer: int | None) -> tuple[int, ...]:
    shapes = canonical_shapes(cfg)
    parts = [shapes[p.format(i=layer)] for p in row.parts]
    rows = sum(s[0] for s in parts)
    shape = [rows, *parts[0][1:]]
    if row.split == VOCAB:
        shape[0] = padded_vocab_size(cfg.vocab_size, layout.tp, layout.vocab_divisible_by)
    if row.split == POSITIONS:
        shape[0] = cfg.max_position_embeddings
    axis = TP_AXIS[row.split]
    if axis is not None:
        shape[axis] //= layout.tp
    return tuple(shape)


def local_tensor(cfg: ModelConfig, layout: Layout, row: MegatronParam, layer: int | None, tp_rank: int,
                 slice_fn: SliceFn) -> torch.Tensor:
    """This TP rank's local tensor for ``row`` (megatron's layout), built from canonical slices only."""
    parts = [p.format(i=layer) for p in row.parts]
    shapes = canonical_shapes(cfg)
    first = shapes[parts[0]]
    rest = [slice(None)] * (len(first) - 1)
    tp = layout.tp
    if row.split == REPLICATED:
        return slice_fn(parts[0], [slice(None)] * len(first))
    if row.split == POSITIONS:  # OPT reads row p + offset for position p; megatron reads row p
        offset = cfg.position_offset
        return slice_fn(parts[0], [slice(offset, offset + cfg.max_position_embeddings), *rest])
    if row.split == ROW:
        cols = first[1] // tp
        return slice_fn(parts[0], [slice(None), slice(tp_rank * cols, (tp_rank + 1) * cols)])
    if row.split == VOCAB:
        rows = padded_vocab_size(cfg.vocab_size, tp, layout.vocab_divisible_by) // tp
        lo, hi = tp_rank * rows, (tp_rank + 1) * rows
        out = torch.zeros(rows, *first[1:])  # padded rows: never looked up, logits of real tokens unaffected
        real_hi = min(hi, cfg.vocab_size)
        if real_hi > lo:
            out[: real_hi - lo] = slice_fn(parts[0], [slice(lo, real_hi), *rest])
        return out
    if row.fuse == "qkv":
        return _qkv_local(cfg, parts, tp, tp_rank, slice_fn, rest)
    blocks = [shapes[p][0] // tp for p in parts]  # glu: [gate_r; up_r]; plain column: [w_r]
    return torch.cat([slice_fn(p, [slice(tp_rank * b, (tp_rank + 1) * b), *rest]) for p, b in zip(parts, blocks)])


def _qkv_local(cfg: ModelConfig, parts, tp: int, tp_rank: int, slice_fn: SliceFn, rest) -> torch.Tensor:
    """Megatron's fused QKV rows for this rank: for each of its query groups, [q heads; k; v]."""
    groups = cfg.num_kv_heads // tp
    q_per_group = cfg.num_heads // cfg.num_kv_heads
    d = cfg.head_dim
    g0 = tp_rank * groups
    q = slice_fn(parts[0], [slice(g0 * q_per_group * d, (g0 + groups) * q_per_group * d), *rest])
    k = slice_fn(parts[1], [slice(g0 * d, (g0 + groups) * d), *rest])
    v = slice_fn(parts[2], [slice(g0 * d, (g0 + groups) * d), *rest])
    tail = tuple(q.shape[1:])
    fused = torch.cat([q.reshape(groups, q_per_group * d, *tail), k.reshape(groups, d, *tail),
                       v.reshape(groups, d, *tail)], dim=1)
    return fused.reshape(-1, *tail)


def split_local(cfg: ModelConfig, layout: Layout, row: MegatronParam, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of the fusing in ``local_tensor`` for one rank's tensor: its canonical pieces, in ``row.parts``
    order (each the rank's rows or columns of that canonical tensor)."""
    if row.fuse == "qkv":
        groups = cfg.num_kv_heads // layout.tp
        q_per_group, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        tail = tuple(tensor.shape[1:])
        per_group = tensor.reshape(groups, (q_per_group + 2) * d, *tail)
        q, k, v = torch.split(per_group, [q_per_group * d, d, d], dim=1)
        return [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]
    if row.fuse == "glu":
        return list(torch.chunk(tensor, 2, dim=0))
    return [tensor]
