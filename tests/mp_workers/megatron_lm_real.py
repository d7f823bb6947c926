"""Checkpoints written by Megatron-LM itself: the opt-in half of tests/test_megatron_lm_sources.py, run with
the Megatron-LM tree on the path (``MEGATRON_LM``).

    PYTHONPATH=$MEGATRON_LM torchrun --standalone --nproc_per_node 2 tests/mp_workers/megatron_lm_real.py plan.json

For each model of the plan: Megatron-LM's own argument parser and checks (``parse_args``, ``validate_args``)
on the plan's flags, its globals and tokenizer (``set_global_variables``, which sets ``padded_vocab_size``),
the model from its ``model_provider`` and ``gpt_builder``, and ``megatron.training.checkpointing.
save_checkpoint`` in each format of the plan. Its training start-up (``initialize_megatron``) needs CUDA, so
the process groups are ours on gloo (hyperclone_dist.megatron.parallel, megatron-core's parallel state) and
``torch.cuda.get_rng_state``, which save_checkpoint stores and a CPU-only torch cannot give, returns the
CPU generator's state; validate_args asks the GPU's architecture, answered with 0. The logits of the model on
fixed tokens go to ``MODEL/reference.pt``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron_lm_written import randomise_vectors

from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron.model import forward_logits
from hyperclone_dist.megatron.parallel import destroy_parallel, init_model_parallel

SEQ, BATCH = 16, 2


def parsed_args(flags: list[str]):
    from megatron.training import arguments
    from megatron.training.arguments import parse_args, validate_args

    arguments.get_device_arch_version = lambda: 0  # it reads the GPU's; what a CPU has in its place
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"  # which validate_args then asks of a TP > 1 job
    sys.argv = ["pretrain_gpt.py", *flags]
    args = parse_args()
    validate_args(args, {})
    return args


def write_model(name: str, model_plan: dict, out: Path) -> None:
    from gpt_builders import gpt_builder
    from megatron.core import parallel_state
    from megatron.training import checkpointing
    from megatron.training.global_vars import set_global_variables, unset_global_variables
    from model_provider import model_provider

    args = parsed_args(model_plan["flags"])
    init_model_parallel(Layout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size))
    set_global_variables(args)
    model = model_provider(gpt_builder, pre_process=parallel_state.is_pipeline_first_stage(),
                           post_process=parallel_state.is_pipeline_last_stage())
    randomise_vectors(model, parallel_state.get_tensor_model_parallel_rank())
    vocab = model_plan["tokenizer_vocab"]
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    logits = forward_logits([model], tokens)
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        (out / name).mkdir(parents=True, exist_ok=True)
        torch.save({"tokens": tokens, "logits": logits[..., :vocab], "padded_vocab_size": args.padded_vocab_size},
                   out / name / "reference.pt")
    for save in model_plan["saves"]:
        args.ckpt_format, args.use_dist_ckpt = save["format"], save["format"] != "torch"
        args.save = str(out / name / save["dir"])
        checkpointing.save_checkpoint(save["iteration"], [model], None, None, 0, release=save.get("release", False))
    dist.barrier()
    unset_global_variables()


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # CPU-only torch: see the docstring
    for name, model_plan in plan["models"].items():
        write_model(name, model_plan, Path(plan["out"]))
    destroy_parallel()


if __name__ == "__main__":  # dist_checkpointing.save starts a spawn-context Manager: keep this guard
    main()
