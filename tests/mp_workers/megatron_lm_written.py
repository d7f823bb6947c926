"""Checkpoints laid out exactly as Megatron-LM writes them, written with megatron-core alone (CI has no
Megatron-LM tree): the other half of tests/test_megatron_lm_sources.py.

    torchrun --standalone --nproc_per_node 2 tests/mp_workers/megatron_lm_written.py plan.json

For each case of the plan: an argument Namespace shaped like Megatron-LM's (every TransformerConfig field,
its training, data and checkpoint arguments, the enums it pickles; no ``hyperclone_config``), a GPTModel built
from it the way Megatron-LM builds one (every TransformerConfig field the args carry copied into the config,
``--swiglu`` a gated SiLU, the GPTModel arguments of its GPT builder), random weights, its logits on fixed
tokens (``CASE/reference.pt``: the function the grown model must keep), and its checkpoint in ``CASE/ckpt``:
legacy ``mp_rank_*`` files holding ``state_dict_for_save_checkpoint()`` with args, RNG state (numpy's too) and
FLOP count, or torch_dist saved from ``sharded_state_dict`` with Megatron-LM's metadata and its sharded RNG
state; the tracker names the iteration or ``release``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import signal
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hyperclone_dist.layout import Layout, padded_vocab_size
from hyperclone_dist.megatron.mapping import TE_RENAMES
from hyperclone_dist.megatron.model import forward_logits
from hyperclone_dist.megatron.parallel import destroy_parallel, init_model_parallel

SEQ, BATCH = 16, 2
# Megatron-LM arguments that are not TransformerConfig fields, with its defaults (a sample of its ~650)
TRAINING_ARGS = dict(
    micro_batch_size=1, global_batch_size=8, rampup_batch_size=None, train_iters=100, lr=3e-4, min_lr=3e-5,
    lr_decay_style="cosine", lr_warmup_iters=10, weight_decay=0.1, clip_grad=1.0, adam_beta1=0.9, adam_beta2=0.95,
    adam_eps=1e-8, optimizer="adam", use_distributed_optimizer=False, seed=1234, data_parallel_random_init=False,
    seq_length=SEQ, encoder_num_layers=None, decoder_num_layers=None, data_path=["/data/corpus_text_document"],
    split="969,30,1", mock_data=False, num_workers=2, save="/ckpt", load=None, save_interval=1000,
    no_save_optim=True, no_save_rng=False, no_load_optim=None, no_load_rng=None, finetune=False,
    use_checkpoint_args=False, ckpt_format="torch", use_dist_ckpt=False, auto_detect_ckpt_format=False,
    dist_ckpt_strictness="assume_ok_unexpected", ckpt_fully_parallel_save=True, async_save=False,
    log_interval=100, eval_interval=1000, eval_iters=10, tensorboard_dir=None, wandb_project="",
    exit_interval=None, exit_duration_in_mins=None, distributed_backend="nccl", distributed_timeout_minutes=10,
    world_size=2, rank=0, local_rank=0, data_parallel_size=1, consumed_train_samples=800,
    consumed_valid_samples=80, iteration=100, bias_gelu_fusion=True, bias_swiglu_fusion=True,
    swiglu=False, squared_relu=False, quick_geglu=False, openai_gelu=False, onnx_safe=None,
    group_query_attention=False, position_embedding_type="learned_absolute", rotary_base=10000,
    rotary_percent=1.0, rotary_seq_len_interpolation_factor=None, use_rope_scaling=False, rope_scaling_factor=8.0,
    add_position_embedding=True, make_vocab_size_divisible_by=128, untie_embeddings_and_output_weights=False,
    max_position_embeddings=32, use_legacy_models=False, spec=None, transformer_impl="local",
    num_experts=None, yaml_cfg=None, heterogeneous_layers_config_path=None, mtp_num_layers=None,
    tokenizer_type="GPT2BPETokenizer", tokenizer_model=None, vocab_file=None, merge_file=None, vocab_size=None,
    vocab_extra_ids=0, padded_vocab_size=None, no_persist_layer_norm=False, overlap_p2p_comm=False,
    decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None, fp8_param_gather=False,
    init_method_xavier_uniform=False, rope_type=None, cp_comm_type=["p2p"], is_hybrid_model=False,
    fp16_lm_cross_entropy=False, masked_softmax_fusion=True, gradient_accumulation_fusion=True,
    bias_dropout_fusion=True, apply_rope_fusion=True, attention_softmax_in_fp32=False, no_rope_freq=None,
)


def megatron_lm_args(case: dict) -> argparse.Namespace:
    """Megatron-LM's Namespace after its argument checks, for the case's model flags (as a Megatron-LM user
    on a CPU machine would give them: no fused kernels that need CUDA)."""
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    values = {}
    for field in dataclasses.fields(TransformerConfig):  # Megatron-LM adds a flag for (almost) every field
        if field.default is not dataclasses.MISSING and not callable(field.default):
            values[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            values[field.name] = field.default_factory()
    values.update(TRAINING_ARGS, attention_backend=AttnBackend.auto, exit_signal=signal.SIGTERM,
                  masked_softmax_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
                  no_persist_layer_norm=True, use_cpu_initialization=True)
    values.update(case["args"])
    args = argparse.Namespace(**{k: v for k, v in values.items() if not callable(v)})
    tp, pp = case["tp"], case["pp"]
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.world_size = dist.get_world_size()
    args.data_parallel_size = args.world_size // (tp * pp)
    args.ckpt_format = case["format"]
    args.use_dist_ckpt = case["format"] != "torch"
    args.iteration = case["iteration"] if case["iteration"] != "release" else 0
    # what Megatron-LM's validate_args and tokenizer set
    args.kv_channels = args.kv_channels or args.hidden_size // args.num_attention_heads
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    if not args.add_bias_linear:
        args.bias_gelu_fusion = False
    if args.add_bias_linear:
        args.add_qkv_bias = True
    args.padded_vocab_size = padded_vocab_size(case["tokenizer_vocab"], tp, args.make_vocab_size_divisible_by)
    args.params_dtype = torch.float32
    return args


def transformer_config(args: argparse.Namespace):
    """The TransformerConfig Megatron-LM derives from its args."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    kw = {name: value for name, value in vars(args).items() if name in fields}
    kw.update(pipeline_dtype=args.params_dtype, batch_p2p_comm=not args.overlap_p2p_comm,
              persist_layer_norm=not args.no_persist_layer_norm, num_moe_experts=args.num_experts,
              num_query_groups=args.num_query_groups if args.group_query_attention else None,
              num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
              num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
              bias_activation_fusion=args.bias_swiglu_fusion if args.swiglu else args.bias_gelu_fusion)
    if args.swiglu:
        kw.update(activation_func=F.silu, gated_linear_unit=True)
    return TransformerConfig(**kw)


def build_model(args: argparse.Namespace):
    """This rank's GPTModel, as Megatron-LM's GPT builder makes it (local layer spec)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config(args)
    spec = get_gpt_layer_local_spec(normalization=args.normalization, qk_layernorm=args.qk_layernorm)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(),
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                    rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling)


def randomise_vectors(model: torch.nn.Module, tp_rank: int) -> None:
    """Norm gains away from 1 and nonzero biases, so a misplaced norm or bias changes the logits; megatron's
    own init (std init_method_std) keeps the matrices, tied copies included. A replicated vector is the same
    on every TP rank (seeded by name), a split one differs per rank."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 1:
                continue
            split = getattr(param, "tensor_model_parallel", False)
            generator = torch.Generator().manual_seed(zlib.crc32(f"{name}/{tp_rank if split else 0}".encode()))
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if "layernorm" in name else 0.2 * noise)


def rng_state() -> dict:
    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {}}


def te_names(state: dict) -> dict:
    """The same tensors under the TransformerEngine spec's names (norms fused into the next linear layer),
    with the empty ``_extra_state`` entries its modules save."""
    out = {}
    for name, value in state.items():
        for local, te in TE_RENAMES.items():
            if name.endswith(local):
                name = name[: -len(local)] + te
        out[name] = value
        if name.endswith("linear_qkv.weight"):
            out[name.replace("weight", "_extra_state")] = None
    return out


def save_legacy(case: dict, args, model, it_dir: Path) -> None:
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{tp_rank:02d}" if case["pp"] == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    state = model.state_dict_for_save_checkpoint()
    payload = {"args": args, "checkpoint_version": 3.0, "iteration": args.iteration,
               "model": te_names(state) if case.get("te_names") else state, "rng_state": [rng_state()],
               "num_floating_point_operations_so_far": 1.5e15}
    (it_dir / name).mkdir(parents=True, exist_ok=True)
    torch.save(payload, it_dir / name / "model_optim_rng.pt")


def save_torch_dist(case: dict, args, model, it_dir: Path) -> None:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    rng = ShardedObject("rng_state", [rng_state()], (case["pp"], case["tp"]),
                        (parallel_state.get_pipeline_model_parallel_rank(),
                         parallel_state.get_tensor_model_parallel_rank()),
                        replica_id=parallel_state.get_data_parallel_rank())
    state = {"args": args, "checkpoint_version": 3.0, "iteration": args.iteration, "rng_state": rng,
             "model": model.sharded_state_dict(metadata={**metadata,
                                                         "dp_cp_group": parallel_state.get_data_parallel_group()}),
             "num_floating_point_operations_so_far": 1.5e15}
    if dist.get_rank() == 0:
        it_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, str(it_dir), content_metadata=metadata)


def write_case(name: str, case: dict, out: Path) -> None:
    from megatron.core import parallel_state

    init_model_parallel(Layout(tp=case["tp"], pp=case["pp"]), seed=case.get("seed", 5))
    args = megatron_lm_args(case)
    model = build_model(args)
    randomise_vectors(model, parallel_state.get_tensor_model_parallel_rank())
    tokens = torch.randint(0, case["tokenizer_vocab"], (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    logits = forward_logits([model], tokens)
    root = out / name / "ckpt"
    tag = case["iteration"]
    it_dir = root / ("release" if tag == "release" else f"iter_{tag:07d}")
    (save_legacy if case["format"] == "torch" else save_torch_dist)(case, args, model, it_dir)
    dist.barrier()
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save({"tokens": tokens, "logits": logits[..., : case["tokenizer_vocab"]]}, out / name / "reference.pt")
    if dist.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(tag))
    dist.barrier()


def main() -> None:
    plan = json.loads(Path(__import__("sys").argv[1]).read_text())
    torch.set_num_threads(1)
    for name, case in plan["cases"].items():
        case["args"] = {k: tuple(v) if k == "window_size" and v else v for k, v in case["args"].items()}
        write_case(name, case, Path(plan["out"]))
    destroy_parallel()


if __name__ == "__main__":  # dist_checkpointing.save starts a spawn-context Manager: keep this guard
    main()
