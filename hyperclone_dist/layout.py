"""How a model is split across ranks: megatron-core's tensor-, pipeline- and virtual-pipeline-parallel sizes
(data parallel is what is left of the world), and the one check of a layout against a model.

``Layout.validate(cfg, world_size)`` is what convert, verify, ``pretrain.py`` and its dry run all call, so
a layout is refused with the same one-line verdict wherever it is given, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError

SPECS = ("local", "te")  # megatron-core layer specs: local modules, or TransformerEngine's names
DEFAULT_VOCAB_DIVISIBLE_BY = 128  # Megatron-LM's --make-vocab-size-divisible-by default


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY) -> int:
    """Megatron pads the vocab to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _uneven_split(layers: int, pp: int) -> tuple[int, int] | None:
    """First and last stage layer counts, as close to an even split as megatron-core allows, when ``pp``
    does not divide ``layers``; None when no such split exists or none is needed."""
    if pp < 3 or layers % pp == 0:
        return None
    for share in range(layers // pp + 1, 0, -1):  # the middle stages' share, the ends take the rest
        ends = layers - share * (pp - 2)
        if ends >= 2:
            return ends // 2, ends - ends // 2
    return None


def _set(values: list[int]) -> str:
    return "{" + ", ".join(map(str, values)) + "}"


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HypercloneError(f"--{name} {value!r} must be a positive integer")


@dataclass(frozen=True)
class Layout:
    tp: int = 1  # tensor-parallel size: heads, query groups and MLP units split over this many ranks
    pp: int = 1  # pipeline-parallel size: the layer stack cut into this many stages
    vpp: int | None = None  # virtual pipeline stages (model chunks) per pipeline rank; None: one
    vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY  # the vocab is padded to a multiple of this x tp
    spec: str = "local"  # megatron parameter names: local or TransformerEngine (te) layer spec
    first_stage_layers: int | None = None  # uneven pipeline: layers of the first stage (the rest split evenly)
    last_stage_layers: int | None = None  # uneven pipeline: layers of the last stage

    def __post_init__(self):
        _positive("tp", self.tp)
        _positive("pp", self.pp)
        _positive("vocab-divisible-by", self.vocab_divisible_by)
        if self.vpp is not None:
            _positive("vpp", self.vpp)
            if self.vpp == 1:  # one chunk per rank is no interleaving: one spelling of it
                object.__setattr__(self, "vpp", None)
            elif self.pp < 2:
                raise HypercloneError(f"--vpp {self.vpp} (virtual pipeline stages) needs --pp >= 2, got pp={self.pp}")
        if self.spec not in SPECS:
            raise HypercloneError(f"--spec {self.spec!r} must be one of {', '.join(SPECS)}")
        for flag, value in (("first", self.first_stage_layers), ("last", self.last_stage_layers)):
            if value is not None:
                _positive(f"decoder-{flag}-pipeline-num-layers", value)
                if self.pp < 2:
                    raise HypercloneError(f"--decoder-{flag}-pipeline-num-layers needs --pp >= 2, got pp={self.pp}")
                if self.vpp is not None:
                    raise HypercloneError("uneven pipeline stages (--decoder-first/last-pipeline-num-layers) are "
                                          "not supported with --vpp here")

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline rank."""
        return self.vpp or 1

    @property
    def uneven(self) -> bool:
        return self.first_stage_layers is not None or self.last_stage_layers is not None

    def stage_layers(self, num_layers: int) -> list[int]:
        """Layers of each pipeline stage (with virtual stages: of each stage's chunks together), as
        megatron-core assigns them: the first and last stage's given counts, the rest split evenly."""
        first, last = self.first_stage_layers, self.last_stage_layers
        middle_stages = self.pp - (first is not None) - (last is not None)
        middle = num_layers - (first or 0) - (last or 0)
        share = middle // middle_stages if middle_stages else 0
        counts = [share] * self.pp
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
        return counts

    @property
    def world(self) -> int:
        """Model-parallel ranks: tp x pp."""
        return self.tp * self.pp

    def padded_vocab(self, vocab_size: int) -> int:
        return padded_vocab_size(vocab_size, self.tp, self.vocab_divisible_by)

    def describe(self) -> str:
        uneven = (f" (first stage {self.first_stage_layers or 'even'}, last {self.last_stage_layers or 'even'})"
                  if self.uneven else "")
        return f"tp={self.tp} pp={self.pp}" + (f" vpp={self.vpp}" if self.vpp else "") + uneven

    def validate(self, cfg: ModelConfig, world_size: int | None = None) -> None:
        """Refuse, in one line naming the numbers and the values that would work, a layout megatron-core
        cannot build for ``cfg`` (on ``world_size`` ranks, when given)."""
        allowed = [t for t in range(1, cfg.num_heads + 1) if self._splits(cfg, t)]
        if self.tp not in allowed:
            raise HypercloneError(f"{self._split_problem(cfg)}: this model allows --tp in {_set(allowed)}")
        if self.uneven:
            self._validate_uneven(cfg.num_layers)
            return self.check_world(world_size) if world_size is not None else None
        stages = self.pp * self.chunks
        if cfg.num_layers % stages:
            layers = cfg.num_layers
            if self.vpp is None:
                way_out = f"this model allows --pp in {_set([p for p in range(1, layers + 1) if layers % p == 0])}"
                uneven = _uneven_split(layers, self.pp)
                if uneven:
                    way_out += (f", or uneven stages: --decoder-first-pipeline-num-layers {uneven[0]} "
                                f"--decoder-last-pipeline-num-layers {uneven[1]}")
            else:
                vpps = [v for v in range(2, layers + 1) if layers % (self.pp * v) == 0]
                way_out = (f"at --pp {self.pp} this model allows --vpp in {_set(vpps)} or none"
                           if vpps and layers % self.pp == 0 else
                           f"at --pp {self.pp} no --vpp divides them" if layers % self.pp == 0 else
                           f"--pp {self.pp} does not divide them either")
            raise HypercloneError(f"layers ({layers}) are not divisible by pp x vpp = {self.pp} x {self.chunks} = "
                                  f"{stages}: {way_out}")
        if world_size is not None:
            self.check_world(world_size)

    @staticmethod
    def _splits(cfg: ModelConfig, tp: int) -> bool:
        """megatron-core splits heads, MLP units and the fused QKV rows evenly over tp ranks; query groups
        either split too or, fewer than the ranks, are shared by tp / groups ranks each."""
        groups = cfg.num_kv_heads
        return (cfg.num_heads % tp == 0 and cfg.ffn_hidden_size % tp == 0
                and (groups % tp == 0 or tp % groups == 0 and (cfg.q_size + 2 * cfg.kv_size) % tp == 0))

    def _split_problem(self, cfg: ModelConfig) -> str:
        tp, groups = self.tp, cfg.num_kv_heads
        if cfg.num_heads % tp:
            return f"attention heads ({cfg.num_heads}) are not divisible by tp={tp}"
        if cfg.ffn_hidden_size % tp:
            return f"the ffn hidden size ({cfg.ffn_hidden_size}) is not divisible by tp={tp}"
        if groups % tp and tp % groups:
            return f"query groups / kv heads ({groups}) are neither divisible by tp={tp} nor a divisor of it"
        return (f"the fused QKV rows ({cfg.q_size + 2 * cfg.kv_size}) are not divisible by tp={tp} "
                f"({groups} query groups shared by {tp // groups} ranks each)")

    def _validate_uneven(self, num_layers: int) -> None:
        first, last = self.first_stage_layers, self.last_stage_layers
        middle_stages = self.pp - (first is not None) - (last is not None)
        middle = num_layers - (first or 0) - (last or 0)
        given = " + ".join(f"{n} ({where})" for n, where in ((first, "first"), (last, "last")) if n is not None)
        if middle < 0 or bool(middle) != bool(middle_stages) or (middle_stages and middle % middle_stages):
            uneven = _uneven_split(num_layers, self.pp)
            hint = (f": e.g. --decoder-first-pipeline-num-layers {uneven[0]} --decoder-last-pipeline-num-layers "
                    f"{uneven[1]}" if uneven else "")
            raise HypercloneError(f"layers ({num_layers}) minus {given} leave {middle} for {middle_stages} middle "
                                  f"pipeline stages, which must split them evenly{hint}")

    def check_world(self, world_size: int) -> None:
        """The part of ``validate`` that needs no model: data parallel must be a whole number of ranks."""
        if world_size % self.world:
            raise HypercloneError(f"world size {world_size} is not divisible by tp x pp = {self.tp} x {self.pp} = "
                                  f"{self.world}")
