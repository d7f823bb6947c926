"""``pretrain.py --dry-run``: check a full-size run on a laptop before it queues on a cluster.

Nothing is built and no process group is started: the layout is checked by the same code the job runs
(megatron's TransformerConfig divisibility, the batch plan), and every rank's shard shapes come from the
conversion mapping (``chunk_params`` / ``local_shape``), so the parameter counts per rank are exact.
Memory per GPU is then estimated from them:

- model state: bf16 weights and gradients (2 + 2 bytes/parameter) plus, partitioned over data parallel,
  DeepSpeed's fp32 gradient partition, fp32 master copy and Adam's two moments (4 x 4 bytes / dp) under
  ZeRO-1; ZeRO-2 also partitions the bf16 gradients; float32 runs keep 4-byte weights and gradients.
- activations (Korthikanti et al. 2022, no sequence parallelism, no recomputation, fused attention so no
  s^2 term): s·b·h·(10 + 24/t) bytes per layer and micro-batch in flight, scaled by ffn/(4h) for the MLP
  share; with 1F1B the first stage holds pp micro-batches in flight. Logits: fp32 s·b·V/t, twice.
- a reserve of 10% + 2 GiB for the CUDA context, NCCL buffers and fragmentation.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from hyperclone_dist.errors import HypercloneError

GIB = 1024**3


@dataclass
class RankEstimate:
    tp_rank: int
    pp_rank: int
    params: int
    model_state: float
    activations: float
    total: float


def _grown_config(args: argparse.Namespace):
    from hyperclone_dist.growth.grow import Grower
    from hyperclone_dist.train.startup import _config_from_path, _growth_spec

    from pathlib import Path

    source = args.model_config
    if args.clone_from and Path(args.clone_from).exists():
        source = args.clone_from
    if not source:
        raise HypercloneError("--dry-run needs the model's shape: --model-config (the small model's JSON when "
                              "cloning) or an existing --clone-from")
    cfg = _config_from_path(Path(source))
    if args.init == "clone" or (args.clone_from and args.model_config is None):
        cfg = Grower(cfg, _growth_spec(args), lambda name: None).large
    return cfg


def estimate(args: argparse.Namespace, world_size: int, zero_stage: int) -> tuple[object, list[RankEstimate], object]:
    from hyperclone_dist.megatron.mapping import Layout, chunk_params, local_shape
    from hyperclone_dist.megatron.model import check_representable, transformer_config
    from hyperclone_dist.megatron.parallel import check_layout
    from hyperclone_dist.train.data_feed import batch_plan

    cfg = _grown_config(args)
    check_representable(cfg)
    check_layout(world_size, args.tp, args.pp, args.vpp)
    transformer_config(cfg, args.tp, args.pp, args.vpp)
    seq = args.seq_length or cfg.max_position_embeddings
    if seq > cfg.max_position_embeddings:
        raise HypercloneError(f"--seq-length {seq} exceeds the model's context {cfg.max_position_embeddings}")
    dp = world_size // (args.tp * args.pp)
    plan = batch_plan(args, dp, seq, args.pp, args.vpp)
    layout = Layout(tp=args.tp, pp=args.pp, vpp=args.vpp)
    weight_bytes = 2 if args.bf16 else 4
    per_param = (weight_bytes + (weight_bytes / dp if zero_stage >= 2 else weight_bytes)
                 + (16 if args.bf16 else 12) / dp)
    t, s, b, h = args.tp, seq, args.micro_batch_size, cfg.hidden_size
    per_layer = s * b * h * (10 + 24 / t) * (0.5 + 0.5 * cfg.ffn_hidden_size / (4 * h))
    in_flight = min(args.pp, plan.num_micro_batches)
    out = []
    for pp_rank in range(args.pp):
        for tp_rank in range(args.tp):
            numel, layers = 0, 0
            for chunk in range(layout.chunks):
                for name, row, layer in chunk_params(cfg, layout, pp_rank, chunk):
                    shape = local_shape(cfg, layout, row, layer)
                    count = 1
                    for n in shape:
                        count *= n
                    numel += count
                layers += cfg.num_layers // (args.pp * layout.chunks)
            model_state = numel * per_param
            activations = per_layer * layers * max(1, in_flight - pp_rank)
            if pp_rank == args.pp - 1:
                activations += 2 * 4 * s * b * cfg.vocab_size / t
            total = (model_state + activations) * 1.1 + 2 * GIB
            out.append(RankEstimate(tp_rank, pp_rank, numel, model_state, activations, total))
    return cfg, out, plan


def dry_run(args: argparse.Namespace) -> int:
    """Print the per-rank table; exit status 0 when every rank fits ``--gpu-memory-gib``, 2 otherwise."""
    from hyperclone_dist.train.engine import read_deepspeed_config, zero_stage

    world = args.world_size
    if not world or world < 1:
        raise HypercloneError("--dry-run needs --world-size (GPUs in the job)")
    stage = max(1, zero_stage(read_deepspeed_config(args.deepspeed_config)))
    cfg, ranks, plan = estimate(args, world, stage)
    total_params = sum(r.params for r in ranks if r.tp_rank >= 0)
    print(f"dry run: {cfg.family} hidden {cfg.hidden_size}, {cfg.num_layers} layers, heads {cfg.num_heads}/"
          f"{cfg.num_kv_heads}, ffn {cfg.ffn_hidden_size}, vocab {cfg.vocab_size}: {total_params / 1e9:.2f}B "
          f"parameters (embeddings and a tied head's copy included)")
    print(f"layout: {world} GPUs = tp {args.tp} x pp {args.pp}{f' x vpp {args.vpp}' if args.vpp else ''} x dp "
          f"{world // (args.tp * args.pp)}; ZeRO-{stage}; {'bf16' if args.bf16 else 'float32'}; global batch "
          f"{plan.global_batch_size} x {plan.seq_length} tokens, micro {plan.micro_batch_size}, "
          f"{plan.num_micro_batches} micro-batches per rank")
    print(f"{'tp':>3} {'pp':>3} {'params':>10} {'model state':>12} {'activations':>12} {'total est.':>11}   "
          f"(GiB; GPU {args.gpu_memory_gib:g})")
    worst = max(ranks, key=lambda r: r.total)
    for r in ranks:
        if r.tp_rank == 0 or r is worst:
            print(f"{r.tp_rank:>3} {r.pp_rank:>3} {r.params / 1e6:>9.0f}M {r.model_state / GIB:>12.1f} "
                  f"{r.activations / GIB:>12.1f} {r.total / GIB:>11.1f}")
    fits = worst.total <= args.gpu_memory_gib * GIB
    print(f"largest rank (tp {worst.tp_rank}, pp {worst.pp_rank}): {worst.total / GIB:.1f} GiB of "
          f"{args.gpu_memory_gib:g}: {'fits' if fits else 'DOES NOT FIT'}")
    if not fits:
        raise HypercloneError(f"rank tp={worst.tp_rank} pp={worst.pp_rank} needs about {worst.total / GIB:.0f} GiB, "
                              f"more than the {args.gpu_memory_gib:g} GiB GPU: raise tp/pp/dp or lower the micro batch")
    return 0
