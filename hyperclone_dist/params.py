"""The canonical parameters of a decoder-only LM, one row each, and every fact about them as a column.

Canonical names are unfused and ``[out, in]``: ``layers.{i}.attn.q.weight``. This table is the only place
that knows what each parameter is; everything else (growth, the megatron mapping, initialisation, μP,
the optimizer-state growth, the symmetry monitor, tied heads) reads its columns. The HF names of each
family are in families.py, the megatron names in megatron/mapping.py.

Axes name what a dimension counts: ``vocab``, ``pos`` and ``head`` (within one attention head) never
grow, ``hidden``/``q``/``kv`` grow with the width, ``ffn`` with the FFN factor (growth/spec.py);
``axis_size`` gives a config's size of each.
"""

from __future__ import annotations

from dataclasses import dataclass

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError

MUP_KINDS = ("embed", "hidden", "output", "one", "zero")


@dataclass(frozen=True)
class Rule:
    axes: tuple[str, ...]  # one axis name per dimension, [out, in] for matrices
    needs: tuple[str, ...] = ()  # ModelConfig flags that must all be true for the model to have it
    divide: bool = False  # HyperCloning: divide by the number of input copies (linear maps)
    mixable: bool = False  # noisy / diagonal variants apply (attention and MLP weights only)
    residual_writer: bool = False  # adds into the residual stream: zero in an inserted identity block;
    #                                Megatron-LM's scaled init std / sqrt(2 * layers) for its matrix
    mup: str = "hidden"  # μP kind: init std and LR multiplier; "one"/"zero": a vector's fill
    output_axis: int = 0  # the axis that indexes what the tensor outputs (an embedding's: its columns)
    tied_to: str | None = None  # with tie_word_embeddings this tensor is that one (the head: the embedding)
    watched: bool = False  # the symmetry monitor compares its row blocks (rows are hidden units)
    sqrt_hidden_scaled: bool = False  # with embedding_scale the model multiplies its output by
    #                                   sqrt(hidden_size), which grows with the width (Gemma's embedding)

    def __post_init__(self):
        if self.mup not in MUP_KINDS:
            raise ValueError(f"unknown μP kind {self.mup!r}")


_NORM = Rule(("hidden",), needs=("input_norms",), mup="one")
_NORM_BIAS = Rule(("hidden",), needs=("input_norms", "norm_bias"), mup="zero")
_OUT_NORM = Rule(("hidden",), needs=("output_norms",), mup="one")
_MATRIX = dict(divide=True, mixable=True)

# Forward order: entries before the layer stack, the layer stack (templated by "{i}"), entries after it.
RULES: dict[str, Rule] = {
    "embed.weight": Rule(("vocab", "hidden"), mup="embed", output_axis=1, sqrt_hidden_scaled=True),
    "pos_embed.weight": Rule(("pos", "hidden"), needs=("learned_positions",), mup="embed", output_axis=1),
    "layers.{i}.attn_norm.weight": _NORM,
    "layers.{i}.attn_norm.bias": _NORM_BIAS,
    "layers.{i}.attn.q.weight": Rule(("q", "hidden"), **_MATRIX),
    "layers.{i}.attn.k.weight": Rule(("kv", "hidden"), **_MATRIX),
    "layers.{i}.attn.v.weight": Rule(("kv", "hidden"), **_MATRIX),
    "layers.{i}.attn.q.bias": Rule(("q",), needs=("qkv_bias",), mup="zero"),
    "layers.{i}.attn.k.bias": Rule(("kv",), needs=("qkv_bias",), mup="zero"),
    "layers.{i}.attn.v.bias": Rule(("kv",), needs=("qkv_bias",), mup="zero"),
    "layers.{i}.attn.q_norm.weight": Rule(("head",), needs=("head_qk_norm",), mup="one"),
    "layers.{i}.attn.k_norm.weight": Rule(("head",), needs=("head_qk_norm",), mup="one"),
    "layers.{i}.attn.q_proj_norm.weight": Rule(("q",), needs=("projection_qk_norm",), mup="one"),
    "layers.{i}.attn.k_proj_norm.weight": Rule(("kv",), needs=("projection_qk_norm",), mup="one"),
    "layers.{i}.attn.o.weight": Rule(("hidden", "q"), residual_writer=True, watched=True, **_MATRIX),
    "layers.{i}.attn.o.bias": Rule(("hidden",), needs=("attn_out_bias",), residual_writer=True, mup="zero"),
    "layers.{i}.attn_out_norm.weight": _OUT_NORM,
    "layers.{i}.mlp_norm.weight": _NORM,
    "layers.{i}.mlp_norm.bias": _NORM_BIAS,
    "layers.{i}.mlp.gate.weight": Rule(("ffn", "hidden"), needs=("gated_mlp",), **_MATRIX),
    "layers.{i}.mlp.gate.bias": Rule(("ffn",), needs=("gated_mlp", "mlp_bias"), mup="zero"),
    "layers.{i}.mlp.up.weight": Rule(("ffn", "hidden"), **_MATRIX),
    "layers.{i}.mlp.up.bias": Rule(("ffn",), needs=("mlp_bias",), mup="zero"),
    "layers.{i}.mlp.down.weight": Rule(("hidden", "ffn"), residual_writer=True, watched=True, **_MATRIX),
    "layers.{i}.mlp.down.bias": Rule(("hidden",), needs=("mlp_bias",), residual_writer=True, mup="zero"),
    "layers.{i}.mlp_out_norm.weight": _OUT_NORM,
    "final_norm.weight": Rule(("hidden",), needs=("final_norm",), mup="one", watched=True),
    "final_norm.bias": Rule(("hidden",), needs=("final_norm", "norm_bias"), mup="zero"),
    "head.weight": Rule(("vocab", "hidden"), divide=True, mup="output", tied_to="embed.weight"),
}
_LAYER = "layers.{i}."


def layer_of(name: str) -> int | None:
    """Layer index of a canonical name (``layers.3.attn.q.weight`` -> 3), None outside the stack."""
    return int(name.split(".")[1]) if name.startswith("layers.") else None


def generic_name(name: str) -> str:
    """``layers.3.attn.q.weight`` -> ``layers.{i}.attn.q.weight`` (the key of per-kind tables)."""
    layer = layer_of(name)
    return name if layer is None else name.replace(f"layers.{layer}.", _LAYER, 1)


def rule_for(name: str) -> Rule:
    generic = generic_name(name)
    if generic not in RULES:
        raise HypercloneError(f"no rule for parameter {name}")
    return RULES[generic]


def axis_size(cfg: ModelConfig, axis: str) -> int:
    return {"vocab": cfg.vocab_size, "pos": cfg.max_position_embeddings + cfg.position_offset, "head": cfg.head_dim,
            "hidden": cfg.hidden_size, "q": cfg.q_size, "kv": cfg.kv_size, "ffn": cfg.ffn_hidden_size}[axis]


def vector_fill(cfg: ModelConfig, rule: Rule) -> float:
    """What a fresh vector of this kind holds: norms multiply by 1 (stored as 0 when the model adds the
    unit itself, Gemma's ``1 + weight``), biases add 0."""
    return 1.0 if rule.mup == "one" and not cfg.norm_unit_offset else 0.0


def _present(cfg: ModelConfig, rule: Rule) -> bool:
    return all(getattr(cfg, flag) for flag in rule.needs)


def layer_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    return {template.format(i=i): tuple(axis_size(cfg, a) for a in rule.axes)
            for template, rule in RULES.items() if template.startswith(_LAYER) and _present(cfg, rule)}


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model in forward order, a tied head included (see ``stored_shapes``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    stack_done = False
    for template, rule in RULES.items():
        if template.startswith(_LAYER):
            if not stack_done:  # the whole stack where its first template stands
                for i in range(cfg.num_layers):
                    shapes.update(layer_shapes(cfg, i))
                stack_done = True
        elif _present(cfg, rule):
            shapes[template] = tuple(axis_size(cfg, a) for a in rule.axes)
    return shapes


def is_tied_copy(cfg: ModelConfig, name: str) -> bool:
    """True for a tensor that a tied model holds as another one (a tied head is the embedding)."""
    return cfg.tie_word_embeddings and rule_for(name).tied_to is not None


def stored_name(cfg: ModelConfig, name: str) -> str:
    """The tensor that holds ``name`` in a checkpoint of ``cfg``: itself, or what it is tied to."""
    return rule_for(name).tied_to if is_tied_copy(cfg, name) else name


def stored_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of ``cfg`` holds: every parameter but the tied copies."""
    return {name: shape for name, shape in canonical_shapes(cfg).items() if not is_tied_copy(cfg, name)}


def parameter_count(cfg: ModelConfig) -> int:
    total = 0
    for shape in stored_shapes(cfg).values():
        count = 1
        for size in shape:
            count *= size
        total += count
    return total
