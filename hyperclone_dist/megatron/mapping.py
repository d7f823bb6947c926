"""Our canonical model <-> megatron-core GPTModel parameters, and each rank's slice of them.

The table below is the whole mapping, as data: a megatron parameter name, the canonical tensors it is
made of, how tensor parallelism splits it, and how the parts are fused. ``local_tensor`` turns one row
into one rank's local tensor by asking a ``slice_fn(canonical_name, index)`` — in a converter, the
growth transforms — for exactly the rows/columns that rank owns: nobody builds a full grown tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.layout import Layout
from hyperclone_dist.params import Rule, canonical_shapes, is_tied_copy, rule_for, stored_name

SliceFn = Callable[[str, Sequence[slice]], torch.Tensor]
SliceInto = Callable[[str, Sequence[slice], torch.Tensor], object]  # (name, index, out): fills ``out``

COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"
POSITIONS = "positions"  # replicated; megatron's table is rows [offset, offset + max_positions) of ours
TP_AXIS = {COLUMN: 0, ROW: 1, VOCAB: 0, REPLICATED: None, POSITIONS: None}  # the local axis TP splits


_LAST_SHAPES: list = [None, None]  # [a copy of the config last asked about, its canonical shapes]


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``canonical_shapes``, computed once per model: it walks every layer (milliseconds for a deep model)
    and a rank asks for it several times per parameter. Read-only."""
    if _LAST_SHAPES[0] != cfg:
        _LAST_SHAPES[:] = [copy.deepcopy(cfg), canonical_shapes(cfg)]
    return _LAST_SHAPES[1]


@dataclass(frozen=True)
class MegatronParam:
    name: str  # local layer spec name; "{i}" is the layer index local to the model chunk
    parts: tuple[str, ...]  # canonical names; "{i}" is the global layer index
    split: str  # column | row | vocab | replicated
    fuse: str | None = None  # "qkv": per query group [q heads; k; v], "glu": per rank [gate_r; up_r]


_Q, _K, _V = "layers.{i}.attn.q", "layers.{i}.attn.k", "layers.{i}.attn.v"
_L = "decoder.layers.{i}."
_EMBEDDING = "embedding."

# First row whose parts all exist wins, so the gated fc1 row shadows the plain one for SwiGLU models.
LOCAL_SPEC: tuple[MegatronParam, ...] = (
    MegatronParam("embedding.word_embeddings.weight", ("embed.weight",), VOCAB),
    MegatronParam("embedding.position_embeddings.weight", ("pos_embed.weight",), POSITIONS),
    MegatronParam(_L + "input_layernorm.weight", ("layers.{i}.attn_norm.weight",), REPLICATED),
    MegatronParam(_L + "input_layernorm.bias", ("layers.{i}.attn_norm.bias",), REPLICATED),
    MegatronParam(_L + "self_attention.linear_qkv.weight", (_Q + ".weight", _K + ".weight", _V + ".weight"),
                  COLUMN, "qkv"),
    MegatronParam(_L + "self_attention.linear_qkv.bias", (_Q + ".bias", _K + ".bias", _V + ".bias"), COLUMN, "qkv"),
    MegatronParam(_L + "self_attention.q_layernorm.weight", ("layers.{i}.attn.q_norm.weight",), REPLICATED),
    MegatronParam(_L + "self_attention.k_layernorm.weight", ("layers.{i}.attn.k_norm.weight",), REPLICATED),
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


def spec_of(names) -> str:
    """The layer spec whose parameter names a state dict has: TransformerEngine's fuse the norms into the
    following linear layer (``TE_RENAMES``)."""
    te_names = tuple(TE_RENAMES.values())
    return "te" if any(name.endswith(te_names) for name in names) else "local"


def chunk_layers(num_layers: int, layout: Layout, pp_rank: int, chunk: int) -> list[int]:
    """Global layer indices of model chunk ``chunk`` on pipeline rank ``pp_rank`` (megatron's
    interleaved assignment: chunk v of rank p holds the (v * pp + p)-th block of layers; uneven stages:
    the layout's counts, in stage order)."""
    if layout.uneven:
        counts = layout.stage_layers(num_layers)
        first = sum(counts[:pp_rank])
        return list(range(first, first + counts[pp_rank]))
    per_chunk = num_layers // (layout.pp * layout.chunks)
    first = (chunk * layout.pp + pp_rank) * per_chunk
    return list(range(first, first + per_chunk))


def chunk_params(cfg: ModelConfig, layout: Layout, pp_rank: int,
                 chunk: int) -> list[tuple[str, MegatronParam, int | None]]:
    """``(local_name, row, global_layer)`` for every parameter of one model chunk, in module order."""
    existing = _shapes(cfg)
    first_stage = pp_rank == 0 and chunk == 0
    last_stage = pp_rank == layout.pp - 1 and chunk == layout.chunks - 1
    out: list[tuple[str, MegatronParam, int | None]] = []

    def pick(rows: list[MegatronParam], layer: int | None, local: int | None):
        taken: set[str] = set()
        for row in rows:
            parts = [p.format(i=layer) for p in row.parts]
            if row.name in taken or not all(p in existing for p in parts):
                continue
            taken.add(row.name)
            name = _rename(row.name.format(i=local), layout.spec)
            tied = [p for p in parts if is_tied_copy(cfg, p)]
            if tied and first_stage:
                continue  # one stage holds the shared tensor once, as what it is tied to
            if tied:  # a later stage keeps its own copy of the shared tensor, built from that tensor
                row = _row_holding(stored_name(cfg, tied[0]))
            out.append((name, row, layer))

    if first_stage:
        pick([r for r in LOCAL_SPEC if r.name.startswith(_EMBEDDING)], None, None)
    for local, layer in enumerate(chunk_layers(cfg.num_layers, layout, pp_rank, chunk)):
        pick([r for r in LOCAL_SPEC if r.name.startswith(_L)], layer, local)
    if last_stage:
        pick([r for r in LOCAL_SPEC if not r.name.startswith((_EMBEDDING, _L))], None, None)
    return out


def chunk_rules(cfg: ModelConfig, layout: Layout, pp_rank: int, chunk: int) -> dict[str, tuple[Rule, ...]]:
    """Local parameter name -> the rules (params.py) of the canonical tensors it is made of: how code
    that holds megatron's modules asks what a parameter is."""
    return {name: tuple(rule_for(p.format(i=layer)) for p in row.parts)
            for name, row, layer in chunk_params(cfg, layout, pp_rank, chunk)}


def torch_dist_key(local_name: str) -> str:
    """The checkpoint key megatron gives a local-spec parameter: layer index dropped (layers are stacked
    on a leading axis) and norms named as in the TransformerEngine spec."""
    layers = _L.split("{i}")[0]
    if not local_name.startswith(layers):
        return local_name
    rest = local_name.split(".", 3)[3]
    return layers + TE_RENAMES.get(rest, rest)


def _rename(name: str, spec: str) -> str:
    if spec != "te":
        return name
    for local, te in TE_RENAMES.items():
        if name.endswith(local):
            return name[: -len(local)] + te
    return name


def _row_holding(canonical: str) -> MegatronParam:
    """The table row whose only part is ``canonical``."""
    return next(row for row in LOCAL_SPEC if row.parts == (canonical,))


def local_shape(cfg: ModelConfig, layout: Layout, row: MegatronParam, layer: int | None) -> tuple[int, ...]:
    shapes = _shapes(cfg)
    parts = [shapes[p.format(i=layer)] for p in row.parts]
    rows = sum(s[0] for s in parts)
    shape = [rows, *parts[0][1:]]
    if row.split == VOCAB:
        shape[0] = layout.padded_vocab(cfg.vocab_size)
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
    shapes = _shapes(cfg)
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
        rows = layout.padded_vocab(cfg.vocab_size) // tp
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


def copying_into(slice_fn: SliceFn) -> SliceInto:
    """A ``SliceInto`` for a ``slice_fn`` that only returns new tensors."""
    return lambda name, index, out: out.copy_(slice_fn(name, index))


def fill_local(cfg: ModelConfig, layout: Layout, row: MegatronParam, layer: int | None, tp_rank: int,
               slice_into: SliceInto, out: torch.Tensor) -> None:
    """``local_tensor``'s values written straight into ``out`` (the rank's parameter, of ``local_shape``):
    each canonical slice is grown into the rows it occupies, padded vocab rows zeroed in place; nothing is
    concatenated or copied afterwards."""
    parts = [p.format(i=layer) for p in row.parts]
    first = _shapes(cfg)[parts[0]]
    rest = [slice(None)] * (len(first) - 1)
    if row.split in (REPLICATED, POSITIONS, ROW):
        slice_into(parts[0], local_index(cfg, layout, row, layer, tp_rank), out)
    elif row.split == VOCAB:
        rows = out.shape[0]
        real = max(0, min(rows, cfg.vocab_size - tp_rank * rows))
        if real:
            slice_into(parts[0], [slice(tp_rank * rows, tp_rank * rows + real), *rest], out[:real])
        out[real:].zero_()  # padded rows: never looked up
    else:
        pieces, at = [], 0
        for part, lo, hi in column_pieces(cfg, layout, row, layer, tp_rank):
            pieces.append((parts.index(part), part, lo, hi, at))
            at += hi - lo
        if at != out.shape[0]:
            raise ValueError(f"{row.name}: {at} rows filled of {out.shape[0]}")
        for _, part, lo, hi, at in sorted(pieces, key=lambda piece: piece[0]):  # each part's pieces in a row
            slice_into(part, [slice(lo, hi), *rest], out[at:at + hi - lo])


def local_index(cfg: ModelConfig, layout: Layout, row: MegatronParam, layer: int | None,
                tp_rank: int) -> list[slice]:
    """The canonical index of a replicated, positions or row-parallel parameter's local tensor."""
    first = _shapes(cfg)[row.parts[0].format(i=layer)]
    rest = [slice(None)] * (len(first) - 1)
    if row.split == POSITIONS:  # OPT reads row p + offset for position p; megatron reads row p
        return [slice(cfg.position_offset, cfg.position_offset + cfg.max_position_embeddings), *rest]
    if row.split == ROW:
        cols = first[1] // layout.tp
        return [slice(None), slice(tp_rank * cols, (tp_rank + 1) * cols)]
    return [slice(None)] * len(first)


def column_pieces(cfg: ModelConfig, layout: Layout, row: MegatronParam, layer: int | None,
                  tp_rank: int) -> list[tuple[str, int, int]]:
    """A column-parallel local tensor as (canonical part, first row, end row) pieces in its row order:
    the fused QKV group by group, [q heads; k; v] each, the gated fc1 as [gate_r; up_r]."""
    parts = [p.format(i=layer) for p in row.parts]
    shapes = _shapes(cfg)
    tp = layout.tp
    if row.fuse != "qkv":
        blocks = [shapes[p][0] // tp for p in parts]
        return [(p, tp_rank * b, (tp_rank + 1) * b) for p, b in zip(parts, blocks)]
    q_per_group, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    if cfg.num_kv_heads < tp:  # a rank's contiguous 1/tp of its group's [q heads; k; v]
        ranks_per_group = tp // cfg.num_kv_heads
        group, piece = divmod(tp_rank, ranks_per_group)
        rows = (q_per_group + 2) * d // ranks_per_group
        lo, hi = piece * rows, (piece + 1) * rows
        out, start = [], 0
        for part, first, size in ((parts[0], group * q_per_group * d, q_per_group * d), (parts[1], group * d, d),
                                  (parts[2], group * d, d)):
            a, b = max(lo, start), min(hi, start + size)
            if a < b:
                out.append((part, first + a - start, first + b - start))
            start += size
        return out
    groups = cfg.num_kv_heads // tp
    g0 = tp_rank * groups
    per_group = [(parts[0], q_per_group * d), (parts[1], d), (parts[2], d)]
    return [(part, (g0 + g) * size, (g0 + g + 1) * size) for g in range(groups) for part, size in per_group]


def _qkv_local(cfg: ModelConfig, parts, tp: int, tp_rank: int, slice_fn: SliceFn, rest) -> torch.Tensor:
    """Megatron's fused QKV rows for this rank: for each of its query groups, [q heads; k; v].

    With fewer query groups than TP ranks (megatron-core all-gathers the QKV output and each rank takes its
    group's heads back), a rank holds its contiguous 1/tp of the group-fused rows: part of one group."""
    q_per_group, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    if cfg.num_kv_heads < tp:
        ranks_per_group = tp // cfg.num_kv_heads
        group, piece = divmod(tp_rank, ranks_per_group)
        rows = (q_per_group + 2) * d // ranks_per_group
        lo, hi = piece * rows, (piece + 1) * rows  # within the group's [q heads; k; v]
        blocks = ((parts[0], group * q_per_group * d, q_per_group * d), (parts[1], group * d, d),
                  (parts[2], group * d, d))  # (part, first row of the group in it, rows of the group)
        pieces, start = [], 0
        for part, first, size in blocks:
            a, b = max(lo, start), min(hi, start + size)
            if a < b:
                pieces.append(slice_fn(part, [slice(first + a - start, first + b - start), *rest]))
            start += size
        return torch.cat(pieces)
    groups = cfg.num_kv_heads // tp
    g0 = tp_rank * groups
    q = slice_fn(parts[0], [slice(g0 * q_per_group * d, (g0 + groups) * q_per_group * d), *rest])
    k = slice_fn(parts[1], [slice(g0 * d, (g0 + groups) * d), *rest])
    v = slice_fn(parts[2], [slice(g0 * d, (g0 + groups) * d), *rest])
    tail = tuple(q.shape[1:])
    fused = torch.cat([q.reshape(groups, q_per_group * d, *tail), k.reshape(groups, d, *tail),
                       v.reshape(groups, d, *tail)], dim=1)
    return fused.reshape(-1, *tail)


def gathers_over_tp(cfg: ModelConfig, layout: Layout, row: MegatronParam) -> bool:
    """True where a rank's local tensor is not its own set of canonical rows (QKV with fewer query groups
    than TP ranks): its pieces are only canonical once every rank's are concatenated."""
    return row.fuse == "qkv" and cfg.num_kv_heads < layout.tp


def split_local(cfg: ModelConfig, layout: Layout, row: MegatronParam, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of the fusing in ``local_tensor`` for one rank's tensor: its canonical pieces, in ``row.parts``
    order (each the rank's rows or columns of that canonical tensor). Where ``gathers_over_tp``, pass the
    TP ranks' tensors concatenated, with ``Layout()``."""
    if gathers_over_tp(cfg, layout, row):
        raise ValueError("split the concatenation of every TP rank's tensor at Layout()")
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
