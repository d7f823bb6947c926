"""Flags that ``hyperclone`` and ``pretrain.py`` share: growth and layout, each turned into its typed object
in one place, and an argparse parser whose usage errors are one line and exit 2 like every bad input."""

from __future__ import annotations

import argparse

from hyperclone_dist.growth.spec import METHODS, GrowthSpec
from hyperclone_dist.layout import DEFAULT_VOCAB_DIVISIBLE_BY, SPECS, Layout

EXIT_BAD_INPUT = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """A usage mistake is reported like every other bad input: one line, exit 2 (usage stays in --help)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def add_growth_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("growth")
    g.add_argument("--width-factor", type=int, default=1, metavar="N",
                   help="hidden size, query heads and kv heads grow xN (head_dim unchanged)")
    g.add_argument("--ffn-factor", type=int, default=None, metavar="M",
                   help="MLP inner width grows xM (default: N, keeping the hidden:ffn ratio)")
    g.add_argument("--method", choices=METHODS, default="symmetric",
                   help="HyperCloning variant, or warmstart (shrink, zero-pad, perturb; not function-preserving)")
    g.add_argument("--snr-db", type=float, default=10.0, help="noisy variants: signal-to-noise ratio in dB")
    g.add_argument("--snr-db-last", type=float, default=None, metavar="DB",
                   help="noisy: the last layer's SNR; layers in between go linearly in dB from --snr-db")
    g.add_argument("--shrink", type=float, default=0.5, help="warmstart: lambda on the zero-padded small weights")
    g.add_argument("--perturb", type=float, default=1.0, help="warmstart: sigma on the target width's muP init")
    depth = g.add_mutually_exclusive_group()
    depth.add_argument("--insert-layers", metavar="SPEC",
                       help="identity blocks: every:K (after every K-th layer), end:N, or a list like 3,7")
    depth.add_argument("--stack", type=int, default=1, metavar="G",
                       help="repeat the layer stack G times (not function-preserving)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random number (noise, perturbation)")


def growth_spec(args: argparse.Namespace) -> GrowthSpec:
    return GrowthSpec(width_factor=args.width_factor, ffn_factor=args.ffn_factor, method=args.method,
                      snr_db=args.snr_db, snr_db_last=args.snr_db_last, shrink=args.shrink, perturb=args.perturb,
                      insert_layers=args.insert_layers, stack=args.stack, seed=args.seed)


def add_layout_flags(p: argparse.ArgumentParser, what: str, megatron_names: bool = False,
                     padding: bool = False) -> None:
    """--tp/--pp/--vpp (with Megatron-LM's long names when ``megatron_names``); ``padding``: also the
    vocab padding and the layer spec, which only a checkpoint writer chooses."""
    g = p.add_argument_group("layout")
    long = {"tp": ["--tensor-model-parallel-size"], "pp": ["--pipeline-model-parallel-size"],
            "vpp": ["--virtual-pipeline-model-parallel-size"]} if megatron_names else {}
    g.add_argument(*long.get("tp", []), "--tp", dest="tp", type=int, default=1, help=f"{what}: tensor-parallel size")
    g.add_argument(*long.get("pp", []), "--pp", dest="pp", type=int, default=1,
                   help=f"{what}: pipeline-parallel size")
    g.add_argument(*long.get("vpp", []), "--vpp", dest="vpp", type=int, default=None,
                   help=f"{what}: virtual pipeline stages per pipeline rank")
    g.add_argument("--decoder-first-pipeline-num-layers", dest="first_stage_layers", type=int, default=None,
                   metavar="N", help=f"{what}: layers of the first pipeline stage (uneven stages; Megatron-LM's flag)")
    g.add_argument("--decoder-last-pipeline-num-layers", dest="last_stage_layers", type=int, default=None,
                   metavar="N", help=f"{what}: layers of the last pipeline stage")
    if padding:
        g.add_argument("--spec", choices=SPECS, default="local",
                       help=f"{what}: parameter names of the local or the TransformerEngine layer spec")
        g.add_argument("--vocab-divisible-by", type=int, default=DEFAULT_VOCAB_DIVISIBLE_BY,
                       help=f"{what}: pad the vocab to a multiple of this x tp (Megatron-LM's default)")


def layout_from_args(args: argparse.Namespace) -> Layout:
    extra = {k: getattr(args, k) for k in ("spec", "vocab_divisible_by") if hasattr(args, k)}
    return Layout(tp=args.tp, pp=args.pp, vpp=args.vpp, first_stage_layers=args.first_stage_layers,
                  last_stage_layers=args.last_stage_layers, **extra)
