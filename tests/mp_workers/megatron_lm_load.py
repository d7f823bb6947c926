"""Load one of our checkpoints with Megatron-LM's own code (pretrain_gpt.py's path: its argument parser,
``load_args_from_checkpoint``, ``validate_args``, its GPT builder, ``load_checkpoint``) on CPU, one
process, and compare the logits with the small model's. Prints one JSON line.

    PYTHONPATH=$MEGATRON_LM python tests/mp_workers/megatron_lm_load.py --ckpt C --small S -- FLAG...

Run by tests/test_megatron_lm_interop.py under a Python that imports Megatron-LM (MEGATRON_LM_PYTHON).
Megatron-LM's training code creates a few tensors on ``device="cuda"`` literally; on a CPU-only machine
its checkpointing module sees a torch whose tensor factories put those on the CPU. Nothing else of
Megatron-LM is changed, and nothing of ours.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import types

import torch
import torch.distributed as dist

RUN_FLAGS = ["--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-4",
             "--mock-data", "--distributed-backend", "gloo", "--use-cpu-initialization",
             # the CUDA / Transformer Engine kernels these select are not on a CPU machine; the math is the
             # same (the bias-GELU fusion, which is other math, stays as the checkpoint's flags say)
             "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
             "--no-rope-fusion", "--no-persist-layer-norm"]
CONFIG_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "normalization", "layernorm_epsilon", "gated_linear_unit", "add_bias_linear",
                 "add_qkv_bias", "qk_layernorm", "hidden_dropout", "attention_dropout", "window_size",
                 "init_method_std", "rotary_interleaved", "layernorm_zero_centered_gamma")


def _on_cpu(factory):
    @functools.wraps(factory)
    def make(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)
    return make


class _TorchOnCPU(types.ModuleType):
    def __getattr__(self, name):
        value = getattr(torch, name)
        return _on_cpu(value) if name in ("tensor", "zeros", "ones", "empty", "full", "arange") else value


def _parse_megatron_args(argv: list[str]):
    import megatron.training.checkpointing as checkpointing
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    checkpointing.torch = _TorchOnCPU("torch")
    sys.argv = ["pretrain_gpt.py", *argv]
    args = parse_args()
    if args.use_checkpoint_args:  # what initialize_megatron does before validating
        if args.pretrained_checkpoint is not None:
            checkpointing.load_args_from_checkpoint(args, load_arg="pretrained_checkpoint")
        checkpointing.load_args_from_checkpoint(args)
    args = validate_args(args)
    set_global_variables(args, build_tokenizer=False)
    return args


def _describe(value):
    if isinstance(value, tuple):
        return list(value)
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", required=True, help="the small model (HF directory or small.pt)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("flags", nargs="*", help="Megatron-LM flags (after --)")
    options = parser.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))

    from hyperclone_dist.megatron.cpu_shims import apply_cpu_shims

    apply_cpu_shims()
    args = _parse_megatron_args(options.flags + RUN_FLAGS)
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1)
    from gpt_builders import gpt_builder  # Megatron-LM's top-level module (on PYTHONPATH)
    from megatron.training.checkpointing import load_checkpoint

    model = gpt_builder(args, True, True)
    iteration = load_checkpoint([model], None, None)
    model.eval()

    from hyperclone_dist.hf_model import load_hf_model

    reference_model = load_hf_model(options.small)
    vocab = reference_model.config.vocab_size
    tokens = torch.randint(0, vocab, (2, options.seq_len), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(options.seq_len).unsqueeze(0).expand(2, -1)
    mask = torch.ones(options.seq_len, options.seq_len, dtype=torch.bool).tril().logical_not()[None, None]
    with torch.no_grad():
        reference = reference_model(tokens).logits.double()
        logits = model(tokens, positions, mask).double()[..., :vocab]
    diff = (logits - reference).abs().max().item()
    print(json.dumps({
        "max_abs": diff, "max_rel": diff / reference.abs().max().item(), "iteration": iteration[0],
        "finetune": bool(args.finetune), "padded_vocab": int(args.padded_vocab_size),
        "config": {name: _describe(getattr(model.config, name)) for name in CONFIG_FIELDS},
        "activation": getattr(model.config.activation_func, "__name__", str(model.config.activation_func)),
    }))


if __name__ == "__main__":
    main()
