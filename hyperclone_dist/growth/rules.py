"""How each kind of parameter grows, declared as data (see docs/growth.md and growth-math).

Each dimension of a parameter is one of these axes; the axis decides how many copies it gets:
``vocab`` and ``pos`` never grow, ``hidden``/``q``/``kv`` grow xn (heads in copy-major order), ``ffn`` xm.
"""

from __future__ import annotations

from dataclasses import dataclass

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.params import generic_name


@dataclass(frozen=True)
class Rule:
    axes: tuple[str, ...]  # one axis name per dimension, [out, in] for matrices
    divide: bool = False  # HyperCloning: divide by the number of input copies (linear maps)
    mixable: bool = False  # noisy / diagonal variants apply (attention and MLP weights only)
    zero_on_insert: bool = False  # zero in an identity-inserted block (output projections)
    init: str = "hidden"  # muP init kind for warmstart: embed | hidden | output | one | zero


_NORM = Rule(("hidden",), init="one")
_NORM_BIAS = Rule(("hidden",), init="zero")

RULES: dict[str, Rule] = {
    "embed.weight": Rule(("vocab", "hidden"), init="embed"),
    "pos_embed.weight": Rule(("pos", "hidden"), init="embed"),
    "layers.{i}.attn_norm.weight": _NORM,
    "layers.{i}.attn_norm.bias": _NORM_BIAS,
    "layers.{i}.attn.q.weight": Rule(("q", "hidden"), divide=True, mixable=True),
    "layers.{i}.attn.k.weight": Rule(("kv", "hidden"), divide=True, mixable=True),
    "layers.{i}.attn.v.weight": Rule(("kv", "hidden"), divide=True, mixable=True),
    "layers.{i}.attn.q.bias": Rule(("q",), init="zero"),
    "layers.{i}.attn.k.bias": Rule(("kv",), init="zero"),
    "layers.{i}.attn.v.bias": Rule(("kv",), init="zero"),
    "layers.{i}.attn.o.weight": Rule(("hidden", "q"), divide=True, mixable=True, zero_on_insert=True),
    "layers.{i}.attn.o.bias": Rule(("hidden",), zero_on_insert=True, init="zero"),
    "layers.{i}.mlp_norm.weight": _NORM,
    "layers.{i}.mlp_norm.bias": _NORM_BIAS,
    "layers.{i}.mlp.gate.weight": Rule(("ffn", "hidden"), divide=True, mixable=True),
    "layers.{i}.mlp.gate.bias": Rule(("ffn",), init="zero"),
    "layers.{i}.mlp.up.weight": Rule(("ffn", "hidden"), divide=True, mixable=True),
    "layers.{i}.mlp.up.bias": Rule(("ffn",), init="zero"),
    "layers.{i}.mlp.down.weight": Rule(("hidden", "ffn"), divide=True, mixable=True, zero_on_insert=True),
    "layers.{i}.mlp.down.bias": Rule(("hidden",), zero_on_insert=True, init="zero"),
    "final_norm.weight": _NORM,
    "final_norm.bias": _NORM_BIAS,
    "head.weight": Rule(("vocab", "hidden"), divide=True, init="output"),
}


def rule_for(name: str) -> Rule:
    generic = generic_name(name)
    if generic not in RULES:
        raise HypercloneError(f"no growth rule for parameter {name}")
    return RULES[generic]


def axis_factor(axis: str, n: int, m: int) -> int:
    return {"vocab": 1, "pos": 1, "hidden": n, "q": n, "kv": n, "ffn": m}[axis]
