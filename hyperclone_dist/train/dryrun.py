"""``pretrain.py --dry-run``: check a full-size run on a laptop before it queues on a cluster.

Nothing is built and no process group is started: the layout is checked by the same code the job runs
(megatron's TransformerConfig divisibility, the batch plan), and every rank's shard shapes come from the
conversion mapping (``chunk_params`` / ``local_shape``), so the parameter counts per rank are exact.
Memory per rank is then estimated from them, for a GPU and for a CPU (gloo) process alike:

- model state: the weights and their gradients (2 + 2 bytes/parameter in bf16, 4 + 4 in float32; ZeRO-2
  partitions the gradients over data parallel), and, partitioned over data parallel, what DeepSpeed's
  ZeRO optimizer adds even in float32: its flat fp32 master copy, fp32 gradient partition and Adam's two
  moments (4 x 4 bytes / dp), plus the temporary of torch AdamW's update over that flat partition (its
  foreach update, which the trainer asks for on GPU and CPU alike, computes sqrt(v) / bias correction out of
  place: one fp32 partition);
- activations (Korthikanti et al. 2022, no sequence parallelism, no recomputation, fused attention so no
  s^2 term): s·b·h·(10 + 24/t) bytes per layer and micro-batch in flight, scaled by ffn/(4h) for the MLP
  share; with 1F1B the first stage holds pp micro-batches in flight. Logits: fp32 s·b·V/t, twice.
- on a GPU, a reserve of 10% + 2 GiB for the CUDA context, NCCL buffers and fragmentation; on a CPU, the
  1 GiB a process holds once Python, torch, DeepSpeed and megatron-core are imported.

Measured against it (benchmarks/train_memory.py, docs/benchmarks.md): peak resident memory of one CPU
process training SmolLM2-135M grown x2 (538M parameters, float32, ZeRO-1) and not grown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.megatron.mapping import chunk_params, local_shape
from hyperclone_dist.sources import model_config_at
from hyperclone_dist.train.engine import read_deepspeed_config, zero_stage
from hyperclone_dist.train.run_config import RunConfig
from hyperclone_dist.train.run_plan import RunPlan, plan_run
from hyperclone_dist.train.startup import grown_shape

GIB = 1024**3
CPU_PROCESS_BASELINE = 1 * GIB  # resident once torch, DeepSpeed and megatron-core are imported
ADAM_TEMPORARIES = 1  # fp32 partition-sized temporaries of AdamW's (foreach) update


@dataclass
class RankEstimate:
    tp_rank: int
    pp_rank: int
    params: int
    model_state: float  # on a GPU
    activations: float
    total: float  # GPU memory, the reserve included
    cpu_total: float  # resident memory of the same rank as a CPU process


def bytes_per_parameter(bf16: bool, zero: int, dp: int) -> float:
    """Model and optimizer state per parameter on one rank (see the module docstring)."""
    weight = 2 if bf16 else 4
    gradient = weight / dp if zero >= 2 else weight
    optimizer = (4 + 4 + 8 + 4 * ADAM_TEMPORARIES) / dp  # master, gradient partition, moments, temps
    return weight + gradient + optimizer


def model_shape(config: RunConfig) -> ModelConfig:
    """The large model of the run, from its shape alone: --model-config (the small model's JSON when cloning)
    or an existing --clone-from."""
    start = config.start
    source = start.model_config
    if start.clone_from and Path(start.clone_from).exists():
        source = start.clone_from
    if not source:
        raise HypercloneError("--dry-run needs the model's shape: --model-config (the small model's JSON when "
                              "cloning) or an existing --clone-from")
    cfg = model_config_at(source)
    if start.init == "clone" or (start.clone_from and start.model_config is None):
        cfg = grown_shape(cfg, start.growth)
    return cfg


def estimate(config: RunConfig, cfg: ModelConfig, plan: RunPlan, zero: int) -> list[RankEstimate]:
    layout, bf16 = config.parallel, config.engine.bf16
    dp = plan.dp
    t, s, b, h = layout.tp, plan.seq_length, config.batch.micro_batch_size, cfg.hidden_size
    per_layer = s * b * h * (10 + 24 / t) * (0.5 + 0.5 * cfg.ffn_hidden_size / (4 * h))
    in_flight = min(layout.pp, plan.batches.num_micro_batches)
    out = []
    for pp_rank in range(layout.pp):
        for tp_rank in range(layout.tp):
            numel, layers = 0, 0
            for chunk in range(layout.chunks):
                for _, row, layer in chunk_params(cfg, layout, pp_rank, chunk):
                    count = 1
                    for n in local_shape(cfg, layout, row, layer):
                        count *= n
                    numel += count
            layers = layout.stage_layers(cfg.num_layers)[pp_rank]
            model_state = numel * bytes_per_parameter(bf16, zero, dp)
            activations = per_layer * layers * max(1, in_flight - pp_rank)
            if pp_rank == layout.pp - 1:
                activations += 2 * 4 * s * b * cfg.vocab_size / t
            total = (model_state + activations) * 1.1 + 2 * GIB
            cpu = numel * bytes_per_parameter(bf16, zero, dp) + activations + CPU_PROCESS_BASELINE
            out.append(RankEstimate(tp_rank, pp_rank, numel, model_state, activations, total, cpu))
    return out


def dry_run(config: RunConfig) -> int:
    """Print the per-rank table; exit status 0 when every rank fits ``--gpu-memory-gib``, 2 otherwise."""
    world, layout, gpu_gib = config.dry.world_size, config.parallel, config.dry.gpu_memory_gib
    if not world or world < 1:
        raise HypercloneError("--dry-run needs --world-size (GPUs in the job)")
    stage = max(1, zero_stage(read_deepspeed_config(config.engine.deepspeed_config)))
    cfg = model_shape(config)
    run = plan_run(config, cfg, world)
    ranks, plan = estimate(config, cfg, run, stage), run.batches
    total_params = sum(r.params for r in ranks if r.tp_rank >= 0)
    print(f"dry run: {cfg.family} hidden {cfg.hidden_size}, {cfg.num_layers} layers, heads {cfg.num_heads}/"
          f"{cfg.num_kv_heads}, ffn {cfg.ffn_hidden_size}, vocab {cfg.vocab_size}: {total_params / 1e9:.2f}B "
          f"parameters (embeddings and a tied head's copy included)")
    print(f"layout: {world} GPUs = tp {layout.tp} x pp {layout.pp}{f' x vpp {layout.vpp}' if layout.vpp else ''} x dp "
          f"{run.dp}; ZeRO-{stage}; {'bf16' if config.engine.bf16 else 'float32'}; global batch "
          f"{plan.global_batch_size} x {plan.seq_length} tokens, micro {plan.micro_batch_size}, "
          f"{plan.num_micro_batches} micro-batches per rank")
    print(f"{'tp':>3} {'pp':>3} {'params':>10} {'model state':>12} {'activations':>12} {'GPU total':>10} "
          f"{'CPU process':>12}   (GiB; GPU {gpu_gib:g})")
    worst = max(ranks, key=lambda r: r.total)
    for r in ranks:
        if r.tp_rank == 0 or r is worst:
            print(f"{r.tp_rank:>3} {r.pp_rank:>3} {r.params / 1e6:>9.0f}M {r.model_state / GIB:>12.1f} "
                  f"{r.activations / GIB:>12.1f} {r.total / GIB:>10.1f} {r.cpu_total / GIB:>12.1f}")
    fits = worst.total <= gpu_gib * GIB
    print(f"as CPU (gloo) processes, the largest rank would peak at about "
          f"{max(r.cpu_total for r in ranks) / GIB:.1f} GiB resident")
    print(f"largest rank (tp {worst.tp_rank}, pp {worst.pp_rank}): {worst.total / GIB:.1f} GiB of the "
          f"{gpu_gib:g} GiB GPU: {'fits' if fits else 'DOES NOT FIT'}")
    if not fits:
        raise HypercloneError(f"rank tp={worst.tp_rank} pp={worst.pp_rank} needs about {worst.total / GIB:.0f} GiB, "
                              f"more than the {gpu_gib:g} GiB GPU: raise tp/pp/dp or lower the micro batch")
    return 0
