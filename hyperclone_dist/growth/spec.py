"""What to grow: width/FFN factors, the width method, and the depth plan."""

from __future__ import annotations

from dataclasses import dataclass

from hyperclone_dist.errors import HypercloneError

METHODS = ("symmetric", "noisy", "diagonal", "noisy-diagonal", "warmstart")


@dataclass(frozen=True)
class GrowthSpec:
    width_factor: int = 1  # n: hidden size, query heads and kv heads all grow xn; head_dim unchanged
    ffn_factor: int | None = None  # m: MLP inner width xm; None -> n (keeps the model's d:ffn ratio)
    method: str = "symmetric"  # one of METHODS
    snr_db: float = 10.0  # noisy variants: signal-to-noise ratio of each noised block, in dB
    snr_db_last: float | None = None  # noisy: the last layer's SNR, layers between interpolated in dB
    shrink: float = 0.5  # warmstart: lambda, the factor on the zero-padded small weights
    perturb: float = 1.0  # warmstart: sigma, the factor on the target width's muP init
    insert_layers: str | None = None  # identity depth growth, see parse_insert_spec
    stack: int = 1  # G_stack depth growth: repeat the whole layer stack g times
    seed: int = 0  # every random number is a function of (seed, parameter name, position)

    def __post_init__(self):
        for name in ("width_factor", "stack"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HypercloneError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.ffn_factor is not None and (not isinstance(self.ffn_factor, int) or self.ffn_factor < 1):
            raise HypercloneError(f"ffn-factor must be an integer >= 1, got {self.ffn_factor!r}")
        if self.method not in METHODS:
            raise HypercloneError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.insert_layers and self.stack > 1:
            raise HypercloneError("--insert-layers and --stack are alternatives; give one")
        if self.method == "warmstart" and not (self.shrink >= 0 and self.perturb >= 0):
            raise HypercloneError(f"shrink ({self.shrink}) and perturb ({self.perturb}) must be >= 0")

    @property
    def n(self) -> int:
        return self.width_factor

    @property
    def m(self) -> int:
        return self.width_factor if self.ffn_factor is None else self.ffn_factor

    def factor(self, axis: str) -> int:
        """Copies of a dimension that counts ``axis`` (params.py): the width factor for hidden units and
        heads, the FFN factor for MLP units; vocabulary, positions and units within a head never grow."""
        return {"vocab": 1, "pos": 1, "head": 1, "hidden": self.n, "q": self.n, "kv": self.n, "ffn": self.m}[axis]

    @property
    def function_preserving(self) -> bool:
        return self.method != "warmstart" and self.stack == 1


@dataclass(frozen=True)
class LayerSource:
    source: int  # index of the small layer this grown layer is built from
    identity: bool = False  # inserted block: its attention-output and MLP-down projections are zero


def parse_insert_spec(spec: str, num_layers: int) -> list[int]:
    """Positions after which identity blocks go, as small-layer indices (-1: before the first layer).

    ``every:K``   a new block after every K-th layer (K, 2K, ...; 1-based, so after layers K-1, 2K-1, ...)
    ``end:N``     N new blocks appended after the last layer
    ``3,7,7``     after layers 3 and 7 (0-based), twice after 7; ``-1`` puts one before layer 0
    """
    spec = spec.strip()
    try:
        if spec.startswith("every:"):
            k = int(spec.split(":", 1)[1])
            if k < 1:
                raise ValueError
            return [j - 1 for j in range(k, num_layers + 1, k)]
        if spec.startswith("end:"):
            count = int(spec.split(":", 1)[1])
            if count < 1:
                raise ValueError
            return [num_layers - 1] * count
        positions = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise HypercloneError(f"bad --insert-layers {spec!r} (use every:K, end:N or a list like 3,7)") from None
    if not positions:
        raise HypercloneError(f"--insert-layers {spec!r} names no position")
    for p in positions:
        if not -1 <= p < num_layers:
            raise HypercloneError(f"--insert-layers position {p} is outside the small model's layers "
                                  f"(-1..{num_layers - 1})")
    return sorted(positions)


def layer_plan(spec: GrowthSpec, num_layers: int) -> list[LayerSource]:
    """Which small layer each grown layer comes from, in order."""
    if spec.stack > 1:
        return [LayerSource(j) for _ in range(spec.stack) for j in range(num_layers)]
    plan = [LayerSource(j) for j in range(num_layers)]
    if not spec.insert_layers:
        return plan
    after = parse_insert_spec(spec.insert_layers, num_layers)
    grown: list[LayerSource] = [LayerSource(0, identity=True) for p in after if p == -1]
    for j in range(num_layers):
        grown.append(LayerSource(j))
        # an inserted block copies the inner weights of the layer it follows
        grown.extend(LayerSource(j, identity=True) for p in after if p == j)
    return grown
