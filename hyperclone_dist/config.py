"""One typed description of a decoder-only LM, independent of where its weights come from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hyperclone_dist.errors import HypercloneError

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
QK_NORMS = (None, "head", "projection")
SUBLAYER_NORMS = ("pre", "sandwich", "output")


@dataclass
class ModelConfig:
    family: str  # a key of hyperclone_dist.families.FAMILIES (gpt2, llama, qwen3, gemma3_text, olmo2, ...)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (== num_heads: MHA, 1: MQA, else GQA)
    head_dim: int  # unchanged by width growth: softmax scale and RoPE stay as they are
    ffn_hidden_size: int  # MLP inner width (per branch for gated MLPs)
    max_position_embeddings: int
    norm: str = "rmsnorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    activation: str = "silu"  # HF activation name, applied to fc1 (or to the gate of a gated MLP)
    gated_mlp: bool = True  # SwiGLU-style: down(act(gate(x)) * up(x))
    position_embedding: str = "rope"  # learned | rope
    position_offset: int = 0  # rows of the learned table before position 0 (OPT: 2)
    rotary_percent: float = 1.0  # fraction of head_dim that is rotated (GPT-NeoX partial rotary)
    rotary_base: float = 10000.0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False  # LayerNorm has a bias; RMSNorm never does
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    pre_norm: bool = True  # False: post-LN blocks (OPT-350M style)
    final_norm: bool = True  # a norm before the head (post-LN OPT has none)
    sublayer_norms: str = "pre"  # pre: norm -> sublayer; sandwich (Gemma 2/3): norm -> sublayer -> norm;
    #                              output (OLMo-2): sublayer -> norm, each before its residual add
    qk_norm: str | None = None  # RMSNorm of queries and keys: per head (Qwen3, Gemma 3) or over the
    #                             whole projection (OLMo-2)
    norm_unit_offset: bool = False  # Gemma: a norm multiplies by (1 + weight); the weight stored is the offset
    embedding_scale: bool = False  # Gemma: the embedding's output is multiplied by sqrt(hidden_size)
    init_std: float = 0.02  # base init std (HF initializer_range); used by muP warmstart
    hf_extra: dict[str, Any] = field(default_factory=dict)  # HF config keys passed through untouched

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "ffn_hidden_size", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HypercloneError(f"config field {name}={value!r} must be a positive integer")
        if self.norm not in NORMS:
            raise HypercloneError(f"config field norm={self.norm!r} must be one of {NORMS}")
        if self.position_embedding not in POSITIONS:
            raise HypercloneError(
                f"config field position_embedding={self.position_embedding!r} must be one of {POSITIONS}")
        if self.num_heads % self.num_kv_heads:
            raise HypercloneError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.sublayer_norms not in SUBLAYER_NORMS:
            raise HypercloneError(f"config field sublayer_norms={self.sublayer_norms!r} must be one of "
                                  f"{SUBLAYER_NORMS}")
        if self.qk_norm not in QK_NORMS:
            raise HypercloneError(f"config field qk_norm={self.qk_norm!r} must be one of {QK_NORMS}")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise HypercloneError(f"rotary_percent={self.rotary_percent} must be in (0, 1]")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def learned_positions(self) -> bool:
        return self.position_embedding == "learned"

    @property
    def input_norms(self) -> bool:
        """A norm before attention and before the MLP (every family but OLMo-2)."""
        return self.sublayer_norms in ("pre", "sandwich")

    @property
    def output_norms(self) -> bool:
        """A norm on the attention and MLP outputs, before each residual add (Gemma 2/3, OLMo-2)."""
        return self.sublayer_norms in ("sandwich", "output")

    @property
    def head_qk_norm(self) -> bool:
        return self.qk_norm == "head"

    @property
    def projection_qk_norm(self) -> bool:
        return self.qk_norm == "projection"

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HypercloneError(f"unknown model config fields: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # required fields missing
            raise HypercloneError(f"incomplete model config: {exc}") from None
