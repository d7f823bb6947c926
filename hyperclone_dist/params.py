"""The canonical parameter list of a ModelConfig: unfused names, [out, in] shapes."""

from __future__ import annotations

from hyperclone_dist.config import ModelConfig


def layer_of(name: str) -> int | None:
    """Layer index of a canonical name (``layers.3.attn.q.weight`` -> 3), None outside the stack."""
    return int(name.split(".")[1]) if name.startswith("layers.") else None


def generic_name(name: str) -> str:
    """``layers.3.attn.q.weight`` -> ``layers.{i}.attn.q.weight`` (the key of per-kind tables)."""
    layer = layer_of(name)
    return name if layer is None else name.replace(f"layers.{layer}.", "layers.{i}.", 1)


def layer_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    d, f, p = cfg.hidden_size, cfg.ffn_hidden_size, f"layers.{i}."
    shapes: dict[str, tuple[int, ...]] = {p + "attn_norm.weight": (d,)}
    if cfg.norm_bias:
        shapes[p + "attn_norm.bias"] = (d,)
    shapes[p + "attn.q.weight"] = (cfg.q_size, d)
    shapes[p + "attn.k.weight"] = (cfg.kv_size, d)
    shapes[p + "attn.v.weight"] = (cfg.kv_size, d)
    if cfg.qkv_bias:
        shapes[p + "attn.q.bias"] = (cfg.q_size,)
        shapes[p + "attn.k.bias"] = (cfg.kv_size,)
        shapes[p + "attn.v.bias"] = (cfg.kv_size,)
    shapes[p + "attn.o.weight"] = (d, cfg.q_size)
    if cfg.attn_out_bias:
        shapes[p + "attn.o.bias"] = (d,)
    shapes[p + "mlp_norm.weight"] = (d,)
    if cfg.norm_bias:
        shapes[p + "mlp_norm.bias"] = (d,)
    if cfg.gated_mlp:
        shapes[p + "mlp.gate.weight"] = (f, d)
        if cfg.mlp_bias:
            shapes[p + "mlp.gate.bias"] = (f,)
    shapes[p + "mlp.up.weight"] = (f, d)
    if cfg.mlp_bias:
        shapes[p + "mlp.up.bias"] = (f,)
    shapes[p + "mlp.down.weight"] = (d, f)
    if cfg.mlp_bias:
        shapes[p + "mlp.down.bias"] = (d,)
    return shapes


def canonical_shapes(cfg: ModelConfig, with_head: bool = True) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model in forward order. ``head.weight`` is listed even when tied to the
    embedding (``with_head=False`` leaves it out, as a tied checkpoint stores it)."""
    d = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, d)}
    if cfg.position_embedding == "learned":
        shapes["pos_embed.weight"] = (cfg.max_position_embeddings + cfg.position_offset, d)
    for i in range(cfg.num_layers):
        shapes.update(layer_shapes(cfg, i))
    if cfg.final_norm:
        shapes["final_norm.weight"] = (d,)
        if cfg.norm_bias:
            shapes["final_norm.bias"] = (d,)
    if with_head:
        shapes["head.weight"] = (cfg.vocab_size, d)
    return shapes


def parameter_count(cfg: ModelConfig) -> int:
    shapes = canonical_shapes(cfg, with_head=not cfg.tie_word_embeddings)
    total = 0
    for shape in shapes.values():
        count = 1
        for size in shape:
            count *= size
        total += count
    return total
