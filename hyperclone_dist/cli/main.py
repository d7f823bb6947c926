"""``hyperclone``: grow, verify and inspect checkpoints.

    hyperclone convert small/ --out big/ --width-factor 2 --method noisy --format hf
    hyperclone verify small/ big/
    hyperclone verify small/ ckpt/ --tp 2 --pp 2   # megatron: starts its 4 ranks itself, or run it under torchrun
    hyperclone inspect big/
    hyperclone quickstart
    hyperclone data tokenizer --out data/tok && hyperclone data prepare --tokenizer data/tok.model --out data/stdlib
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # python -m hyperclone_dist.cli.main: no cyclic collections while the imports
    gc.disable()  # run (hyperclone_dist/process_gc.py); command() turns them back on

import argparse
import os
import select
import sys

import torch
import torch.distributed as dist

from hyperclone_dist.cli.flags import (
    EXIT_BAD_INPUT,
    OneLineErrorParser,
    add_growth_flags,
    add_layout_flags,
    growth_spec,
    layout_from_args,
)
from hyperclone_dist.cli.quickstart import run_quickstart
from hyperclone_dist.cli.ranks import local_ranks_unavailable, run_ranks, torchrun_command
from hyperclone_dist.convert import DTYPES, convert
from hyperclone_dist.data.cli import add_data_commands, run_data_command
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.inspect_ckpt import check_checkpoint, describe
from hyperclone_dist.megatron.convert import convert_to_megatron
from hyperclone_dist.megatron.export import export_checkpoint
from hyperclone_dist.megatron.light_imports import import_megatron_core
from hyperclone_dist.megatron.lm_flags import format_flags, pretrain_flags, tokenizer_missing
from hyperclone_dist.megatron.load import is_megatron_checkpoint
from hyperclone_dist.megatron.parallel import AgreedError, destroy_parallel, init_distributed
from hyperclone_dist.megatron.verify import verify_megatron
from hyperclone_dist.process_gc import run_command
from hyperclone_dist.progress import show_progress
from hyperclone_dist.sources import model_config_at
from hyperclone_dist.verify import compare_checkpoints

# `hyperclone inspect | head`: the reader left early. 128 + SIGPIPE is what the shell reports for any Unix
# tool killed by the closed pipe (`seq 1 100000 | head -1` under pipefail), so scripts treat us the same;
# a pipe that closes on purpose is no error worth a message.
EXIT_BROKEN_PIPE = 141


def _on_every_rank(command: str, work) -> int:
    """``work()`` on every rank of a multi-process job; a bad input all ranks found (``agreed``) is said
    once, by rank 0, before any rank leaves."""
    try:
        return work()
    except AgreedError as exc:
        if not dist.is_initialized():
            raise
        if dist.get_rank() == 0:
            print(f"hyperclone {command}: error: {exc}", file=sys.stderr, flush=True)
        dist.barrier()
        return EXIT_BAD_INPUT
    finally:
        destroy_parallel()


def _convert_megatron(args: argparse.Namespace) -> int:
    """Megatron output; under torchrun every process writes its share of the ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_distributed()
    return _on_every_rank("convert", lambda: _write_megatron(args))


def _write_megatron(args: argparse.Namespace) -> int:
    layout = layout_from_args(args)
    import_megatron_core()
    # this process converts once and exits: megatron-core, imported just now (after command() froze the
    # module-level imports, hyperclone_dist/process_gc.py), never dies either, and frozen it is not scanned
    # again by every full collection that building and saving the ranks' modules triggers. Not in
    # convert_to_megatron: a library call must not pin its caller's objects for good.
    gc.collect()
    gc.freeze()
    result = convert_to_megatron(args.src, args.out, growth_spec(args), layout, fmt=args.format,
                                 dtype=DTYPES.get(args.dtype), overwrite=args.overwrite,
                                 progress=show_progress(not args.no_progress),
                                 checksums=not args.no_checksums, release=args.release)
    if int(os.environ.get("RANK", "0")) == 0:
        g = result.large
        print(f"wrote {result.out}: {args.format} {layout.describe()}, {g.family} hidden {g.hidden_size}, "
              f"ffn {g.ffn_hidden_size}, layers {g.num_layers}, {str(result.dtype).removeprefix('torch.')}")
        _note_rounding(args.method, result.dtype)
    return 0


def _note_rounding(method: str, dtype) -> None:
    """A noisy clone's paired blocks cancel exactly only where they are not rounded apart."""
    if method in ("noisy", "noisy-diagonal") and dtype in (torch.bfloat16, torch.float16):
        print(f"note: the noisy blocks were rounded to {str(dtype).removeprefix('torch.')} one by one, so they no "
              "longer cancel exactly (verify shows ~1e-3); --dtype float32 keeps the function to 1e-5")


def _verify_megatron(args: argparse.Namespace, argv: list[str]) -> int:
    """Under torchrun with tp x pp processes: load into GPTModel at that layout, compare logits. Without a
    launcher and tp x pp > 1, this command starts those processes itself (cli/ranks.py)."""
    layout = layout_from_args(args)
    nproc = layout.world
    if "WORLD_SIZE" not in os.environ and nproc > 1:
        layout.validate(model_config_at(args.grown))  # a layout the model refuses: said now, by one process
        why_not = local_ranks_unavailable(nproc)
        if why_not:
            raise HypercloneError(f"{why_not}; start the ranks with a launcher: {torchrun_command(nproc, argv)}")
        return run_ranks(nproc, argv, "hyperclone verify")
    return _on_every_rank("verify", lambda: _verify_at_layout(args))


def _verify_at_layout(args: argparse.Namespace) -> int:
    layout = layout_from_args(args)
    diff = verify_megatron(args.small, args.grown, layout, args.seq_len, args.batch, args.seed)
    if dist.get_rank() == 0:
        print(f"max abs logit diff {diff.max_abs:.3e}  max rel {diff.max_rel:.3e}  (tol {args.tol:g}, "
              f"GPTModel {layout.describe()}, {diff.checked}, float32)  "
              f"{'OK' if diff.ok(args.tol) else 'FAIL'}")
    return 0 if diff.ok(args.tol) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="hyperclone", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="grow a small checkpoint into a larger one")
    p.add_argument("src", help="HF model directory or small.pt")
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--format", choices=["hf", "torch_dist", "legacy"], default="hf",
                   help="hf: Hugging Face safetensors; torch_dist: megatron-core dist_checkpointing "
                        "(reshardable); legacy: megatron iter_*/mp_rank_*/model_optim_rng.pt")
    add_layout_flags(p, "megatron formats", padding=True)
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="of the written weights (default: the source's; verify compares in float32 either way)")
    p.add_argument("--shard-size", type=float, default=2.0, metavar="GiB", help="max safetensors shard size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--no-checksums", action="store_true",
                   help="write no hyperclone-manifest.json (its XXH3 hashing costs ~0.05 CPU-s per GB written)")
    p.add_argument("--release", action="store_true",
                   help="megatron formats: write Megatron-LM's release tag (release/, tracker 'release') instead of "
                        "iteration 0; Megatron-LM then loads the weights without optimizer or RNG state, no flags "
                        "needed")
    p.add_argument("--no-progress", action="store_true")
    add_growth_flags(p)

    p = sub.add_parser("verify", help="compare logits of a small and a grown model (exit 0 within tolerance)",
                       description="Compare logits of a small and a grown model; the last line is the verdict, OK "
                                   "(exit 0) or FAIL (exit 1). A megatron checkpoint loads into GPTModel at --tp x "
                                   "--pp: under torchrun with that many processes, or, started without a launcher, "
                                   "in that many local processes this command starts itself (exit status: theirs).")
    p.add_argument("small", help="HF model directory or small.pt")
    p.add_argument("grown", help="HF model directory or small.pt")
    p.add_argument("--tol", type=float, default=1e-5, help="max relative logit difference allowed")
    p.add_argument("--seq-len", type=int, default=None,
                   help="compare this many contiguous tokens from position 0 (the full context: a full pass); "
                        "default: 256 tokens from position 0 and 256 at the end of the context (the whole "
                        "context when it is at most 512)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234, help="seed of the token ids")
    add_layout_flags(p, "megatron checkpoints, the layout to load at")

    p = sub.add_parser("export", help="a megatron checkpoint (legacy or torch_dist) to HF or small.pt")
    p.add_argument("ckpt", help="megatron checkpoint directory (holds latest_checkpointed_iteration.txt)")
    p.add_argument("--out", required=True, help="HF output directory, or the small.pt file to write")
    p.add_argument("--format", choices=["hf", "small.pt"], default="hf")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: the checkpoint's")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("megatron-lm-flags", help="Megatron-LM pretrain_gpt.py flags that build a checkpoint's model "
                                                 "exactly and start from its weights")
    p.add_argument("ckpt", help="megatron checkpoint directory (legacy or torch_dist)")
    p.add_argument("--use-checkpoint-args", action="store_true",
                   help="print --use-checkpoint-args and only the model flags Megatron-LM does not read from a "
                        "checkpoint (norm epsilon, q/k norms, sliding window, init std, RoPE scaling, layer spec)")

    p = sub.add_parser("inspect", help="family, shapes, parameter count, dtype; --check: verify checksums")
    p.add_argument("path")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--check", action="store_true",
                   help="verify every file against the checkpoint's hyperclone-manifest.json (exit 1 on a "
                        "mismatch, naming the tensors that changed); a pretrain.py --save directory: its latest "
                        "checkpoint")

    p = sub.add_parser("quickstart", help="grow the built-in model x2 and verify it (no downloads)")
    p.add_argument("--out", default="runs/quickstart")

    add_data_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, where it is caught, not in the interpreter's exit flush
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():  # another pipe broke (a worker's, a socket's): a failure to show
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is still buffered goes nowhere
        return EXIT_BROKEN_PIPE


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on its writing end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout is no file
        return False


def _run(argv: list[str]) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert" and args.format != "hf":
            return _convert_megatron(args)
        if args.command == "convert":
            if args.release:
                raise HypercloneError("--release is a megatron tag (--format legacy or torch_dist), not an hf one")
            result = convert(args.src, args.out, growth_spec(args), fmt=args.format, dtype=args.dtype,
                             overwrite=args.overwrite, shard_bytes=int(args.shard_size * 2**30),
                             progress=show_progress(not args.no_progress), checksums=not args.no_checksums)
            s, g = result.small, result.large
            print(f"wrote {result.out}: {g.family} hidden {s.hidden_size}->{g.hidden_size}, "
                  f"ffn {s.ffn_hidden_size}->{g.ffn_hidden_size}, layers {s.num_layers}->{g.num_layers}, "
                  f"{str(result.dtype).removeprefix('torch.')}")
            _note_rounding(args.method, result.dtype)
            return 0
        if args.command == "verify":
            if is_megatron_checkpoint(args.grown):
                return _verify_megatron(args, argv)
            diff = compare_checkpoints(args.small, args.grown, args.seq_len, args.batch, args.seed)
            verdict = "OK" if diff.ok(args.tol) else "FAIL"
            print(f"max abs logit diff {diff.max_abs:.3e}  max rel {diff.max_rel:.3e}  (tol {args.tol:g}, "
                  f"{diff.checked}, float32)  {verdict}")
            return 0 if diff.ok(args.tol) else 1
        if args.command == "export":
            cfg = export_checkpoint(args.ckpt, args.out, args.format, DTYPES.get(args.dtype), args.overwrite,
                                    progress=show_progress(not args.no_progress))
            print(f"wrote {args.out}: {args.format}, {cfg.family} hidden {cfg.hidden_size}, layers {cfg.num_layers}")
            return 0
        if args.command == "inspect" and args.check:
            result = check_checkpoint(args.path)
            for line in result.warnings:
                print(f"warning: {line}")
            for line in result.problems:
                print(line)
            if result.problems:
                return 1
            print(f"OK: {result.files} files, {result.tensors} tensors, {result.nbytes / 2**20:.1f} MiB verified")
            return 0
        if args.command == "inspect":
            print(describe(args.path, args.tensors))
            return 0
        if args.command == "megatron-lm-flags":
            flags = pretrain_flags(args.ckpt, args.use_checkpoint_args)
            print(format_flags(flags))
            if tokenizer_missing(flags):
                print("hyperclone megatron-lm-flags: note: the checkpoint names no tokenizer; add --tokenizer-type "
                      "and --tokenizer-model", file=sys.stderr)
            return 0
        if args.command == "quickstart":
            return run_quickstart(args.out)
        if args.command == "data":
            return run_data_command(args)
    except HypercloneError as exc:
        print(f"hyperclone {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"hyperclone {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return EXIT_BAD_INPUT


def command() -> int:
    """The ``hyperclone`` console script and ``python -m hyperclone_dist.cli.main``: ``main()`` as its
    process's one command (tests and the warm runner call ``main`` itself)."""
    return run_command(main)


if __name__ == "__main__":
    sys.exit(command())
