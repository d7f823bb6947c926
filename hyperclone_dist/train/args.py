"""pretrain.py's command line: Megatron-LM's flag names where Megatron-LM has the flag, a few short aliases
(``--tp``, ``--pp``), and a ``--config`` JSON file whose keys are flag names (the command line wins).

Every check that needs no process group happens here, so a bad command fails identically on every rank
before any collective starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.train.symmetry_breaking import non_negative_float, non_negative_int


def _growth_flags(p: argparse.ArgumentParser) -> None:
    from hyperclone_dist.cli.main import _add_growth_flags

    _add_growth_flags(p)


def build_parser() -> argparse.ArgumentParser:
    from hyperclone_dist.cli.main import _OneLineErrorParser
    from hyperclone_dist.train.schedules import STYLES, WSD_DECAY_SHAPES

    p = _OneLineErrorParser(prog="pretrain.py", description="continue pretraining a grown (or random) model")
    p.add_argument("--config", help="JSON file of flag values (keys are flag names, - or _); flags given here win")

    m = p.add_argument_group("model and start-up")
    m.add_argument("--clone-from", metavar="SMALL",
                   help="small model (small.pt or HF directory); every rank grows its own slice in memory")
    m.add_argument("--init", choices=["clone", "random"], default=None,
                   help="clone (default with --clone-from) or random: the same large shape, fresh weights")
    m.add_argument("--model-config", metavar="PATH",
                   help="JSON model description (configs/models/*.json) for --init random without --clone-from")
    m.add_argument("--no-grow-optimizer-state", dest="grow_optimizer_state", action="store_false",
                   help="with --clone-from a pretrain.py checkpoint holding Adam's moments: start the optimizer "
                        "fresh instead of growing them")
    m.add_argument("--load", metavar="DIR", help="resume from a checkpoint written by --save (model, optimizer, "
                   "LR schedule, data position, RNG), or start from a converted megatron checkpoint")
    _growth_flags(p)

    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1)
    par.add_argument("--virtual-pipeline-model-parallel-size", "--vpp", dest="vpp", type=int, default=None)
    par.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                     help="DeepSpeed JSON (configs/deepspeed/zero1.json, zero2.json); default: ZeRO-1")
    par.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                     help=argparse.SUPPRESS)  # appended by the deepspeed launcher; LOCAL_RANK is read instead
    par.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                     help="collectives that wait longer fail the job instead of hanging")
    par.add_argument("--bf16", action="store_true", help="bf16 weights/activations, fp32 master (GPU)")

    b = p.add_argument_group("batch")
    b.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default: model context)")
    b.add_argument("--micro-batch-size", type=int, default=1)
    b.add_argument("--global-batch-size", type=int, default=None, help="sequences per optimizer step")
    b.add_argument("--global-batch-tokens", type=int, default=None,
                   help="tokens per optimizer step (an alternative to --global-batch-size)")

    o = p.add_argument_group("optimizer and schedule")
    o.add_argument("--train-iters", type=int, required=False, default=None)
    o.add_argument("--lr", type=float, default=3e-4)
    o.add_argument("--min-lr", type=float, default=0.0)
    o.add_argument("--lr-decay-style", choices=STYLES, default="cosine")
    o.add_argument("--lr-warmup-iters", type=int, default=0)
    o.add_argument("--lr-warmup-init", type=float, default=0.0, help="LR at the start of the warmup")
    o.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    o.add_argument("--lr-wsd-decay-fraction", type=float, default=0.1)
    o.add_argument("--lr-wsd-decay-style", choices=WSD_DECAY_SHAPES, default="1-sqrt")
    o.add_argument("--handoff", choices=["paper", "no-rewarmup", "low-peak", "points"], default="paper",
                   help="LR schedule of a grown model after the hand-off (docs/pretraining.md)")
    o.add_argument("--handoff-peak-factor", type=float, default=1.0,
                   help="low-peak: the peak is the small model's final LR times this")
    o.add_argument("--lr-schedule-points", default=None, metavar="JSON",
                   help="any schedule: [[step, lr], ...], linear in between (implies --handoff points)")
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--adam-beta1", type=float, default=0.9)
    o.add_argument("--adam-beta2", type=float, default=0.95)
    o.add_argument("--adam-eps", type=float, default=1e-8)
    o.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    o.add_argument("--mup", action="store_true", help="muP learning-rate multipliers for hidden matrices "
                   "(width relative to --mup-base-hidden-size, default the clone source's)")
    o.add_argument("--mup-base-hidden-size", type=int, default=None)
    o.add_argument("--mup-output-multiplier", type=float, default=1.0,
                   help="scale the logits by this (muP: base width / width; 1 keeps a clone's function)")
    o.add_argument("--mup-attention-scale", action="store_true",
                   help="attention logits scaled by 1/head_dim instead of 1/sqrt(head_dim) (muP)")
    o.add_argument("--symmetry-noise-steps", type=non_negative_int, default=0, metavar="K",
                   help="symmetry breaking: Gaussian noise on every 2-D weight's gradient in the first K "
                        "optimizer steps (pp=1; 0: off)")
    o.add_argument("--symmetry-noise-scale", type=non_negative_float, default=1.0, metavar="S",
                   help="std of that noise relative to the RMS of each weight's gradient")

    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="+", default=None, metavar="[WEIGHT] PREFIX",
                   help="megatron indexed datasets (hyperclone data prepare), optionally weighted; "
                        "default: the embedded corpus (Python's standard library sources)")
    d.add_argument("--tokenizer-model", help="the sentencepiece .model the data was prepared with")
    d.add_argument("--data-offset-steps", type=int, default=0, metavar="K",
                   help="start at global batch K of the data: a clone can continue the small model's data stream "
                        "instead of re-reading what it was trained on")
    d.add_argument("--split", default="949,50,1", help="train,valid,test shares of each dataset's documents")
    d.add_argument("--data-cache-path", default=None, help="index caches (default: beside --save or in .cache)")

    io = p.add_argument_group("checkpoints, evaluation and logging")
    io.add_argument("--save", metavar="DIR", help="checkpoint directory")
    io.add_argument("--save-interval", type=int, default=None, help="steps between checkpoints (default: at the end)")
    io.add_argument("--no-save-moments", dest="save_moments", action="store_false",
                    help="leave Adam's moments out of the torch_dist copy (they let a larger run clone this one "
                         "with its optimizer state; they triple that copy's size)")
    io.add_argument("--no-checksums", dest="checksums", action="store_false",
                    help="no checksum manifest in saved checkpoints (hashing re-reads what was written; the "
                         "ranks share it)")
    io.add_argument("--exit-interval", type=int, default=None,
                    help="stop (after saving) once this step is reached: a planned interruption")
    io.add_argument("--eval-interval", type=int, default=None, help="steps between validation passes")
    io.add_argument("--eval-iters", type=int, default=4, help="global batches per validation pass")
    io.add_argument("--log-interval", type=int, default=1)
    io.add_argument("--tensorboard-dir", default=None, help="default: SAVE/tensorboard")
    io.add_argument("--wandb-project", default=None, help="log to wandb (offline unless WANDB_MODE says otherwise)")
    io.add_argument("--wandb-exp-name", default=None)
    io.add_argument("--metrics-file", default=None, help="one JSON line per logged step (default: SAVE/metrics.jsonl)")
    io.add_argument("--symmetry-interval", type=int, default=None,
                    help="steps between symmetry-monitor readings of a cloned run (default: --log-interval x 10)")
    io.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for the MFU estimate")
    io.add_argument("--no-progress", action="store_true")

    dry = p.add_argument_group("dry run (no GPUs, no process group: shapes and memory per rank)")
    dry.add_argument("--dry-run", action="store_true", help="check divisibility, shard shapes and memory per GPU")
    dry.add_argument("--world-size", type=int, default=None, help="dry run: GPUs in the job")
    dry.add_argument("--gpu-memory-gib", type=float, default=80.0, help="dry run: memory of one GPU")
    return p


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    from hyperclone_dist.jsonfile import read_json_object

    file = Path(path)
    values = read_json_object(file, "--config")
    known = {a.dest for a in parser._actions}
    aliases = {s.lstrip("-").replace("-", "_"): a.dest for a in parser._actions for s in a.option_strings}
    out = {}
    for key, value in values.items():
        dest = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
        if dest not in known:
            raise HypercloneError(f"--config {file}: unknown setting {key!r}")
        out[dest] = value
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        try:
            parser.set_defaults(**_config_defaults(parser, first.config))
        except HypercloneError as exc:
            parser.exit(2, f"pretrain.py: error: {exc}\n")
    args = parser.parse_args(argv)
    try:
        validate(args)
    except HypercloneError as exc:
        parser.exit(2, f"pretrain.py: error: {exc}\n")
    return args


def validate(args: argparse.Namespace) -> None:
    if args.train_iters is None or args.train_iters < 1:
        raise HypercloneError(f"--train-iters must be a positive integer, got {args.train_iters}")
    if args.init is None:
        args.init = "clone" if args.clone_from else "random"
    if args.init == "clone" and not args.clone_from and not args.load and not args.dry_run:
        raise HypercloneError("--init clone needs --clone-from SMALL")
    if args.init == "random" and not (args.model_config or args.clone_from or args.load or args.dry_run):
        raise HypercloneError("--init random needs --model-config (or --clone-from for the grown shape)")
    for name in ("micro_batch_size", "eval_iters", "log_interval"):
        if getattr(args, name) < 1:
            raise HypercloneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if (args.global_batch_size is None) == (args.global_batch_tokens is None):
        raise HypercloneError("give exactly one of --global-batch-size (sequences) and --global-batch-tokens")
    for name in ("save_interval", "eval_interval", "exit_interval", "symmetry_interval"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HypercloneError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if (args.save_interval or args.exit_interval) and not args.save and not args.dry_run:
        raise HypercloneError("--save-interval/--exit-interval need --save DIR")
    if args.data_path and not args.tokenizer_model:
        raise HypercloneError("--data-path needs --tokenizer-model (the .model the data was prepared with)")
    if not args.mup_output_multiplier > 0:
        raise HypercloneError(f"--mup-output-multiplier must be > 0, got {args.mup_output_multiplier}")
    if args.data_offset_steps < 0:
        raise HypercloneError(f"--data-offset-steps must be >= 0, got {args.data_offset_steps}")
    if args.clip_grad < 0:
        raise HypercloneError(f"--clip-grad must be >= 0, got {args.clip_grad}")
