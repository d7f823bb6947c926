"""Load a megatron checkpoint into GPTModel at a layout and compare its logits with the small model.

    torchrun --standalone --nproc_per_node 4 -m hyperclone_dist.cli.main verify small/ ckpt/ --tp 2 --pp 2
"""

from __future__ import annotations

from pathlib import Path

import torch

from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.hf_model import load_hf_model
from hyperclone_dist.megatron.load import LegacyCheckpoint
from hyperclone_dist.megatron.mapping import Layout
from hyperclone_dist.verify import LogitDiff, fixed_batch, logit_diff


def load_into_gpt_model(ckpt: LegacyCheckpoint, layout: Layout) -> list:
    """This rank's GPTModel chunks holding the checkpoint's weights (layout must match a legacy save)."""
    from megatron.core import parallel_state

    from hyperclone_dist.megatron.model import build_gpt_model, load_chunk_weights

    saved = ckpt.layout
    if (saved.tp, saved.pp, saved.chunks) != (layout.tp, layout.pp, layout.chunks):
        raise HypercloneError(f"{ckpt.root} is a legacy checkpoint saved at tp={saved.tp} pp={saved.pp} "
                              f"vpp={saved.vpp}; legacy checkpoints load only at that layout")
    chunks = build_gpt_model(ckpt.config, perform_initialization=False, padded_vocab=ckpt.padded_vocab)
    states = ckpt.rank_state_dicts(parallel_state.get_tensor_model_parallel_rank(),
                                   parallel_state.get_pipeline_model_parallel_rank())
    for chunk, state in zip(chunks, states):
        load_chunk_weights(chunk, state, ckpt.root)
    return chunks


@torch.inference_mode()
def verify_megatron(small: str | Path, ckpt_dir: str | Path, layout: Layout, seq_len: int | None = None,
                    batch: int = 2, seed: int = 1234) -> LogitDiff:
    """Every rank returns the same LogitDiff (reduced from the last pipeline stage)."""
    import torch.distributed as dist

    from hyperclone_dist.megatron.model import forward_logits
    from hyperclone_dist.megatron.parallel import init_model_parallel

    from hyperclone_dist.megatron import torch_dist
    from hyperclone_dist.megatron.legacy import iteration_dir
    from hyperclone_dist.megatron.load import read_iteration

    init_model_parallel(layout.tp, layout.pp, layout.vpp)
    it_dir = iteration_dir(Path(ckpt_dir), read_iteration(Path(ckpt_dir)))
    if (it_dir / "metadata.json").is_file():
        chunks, cfg = torch_dist.load_into_gpt_model(it_dir, layout)
    else:
        ckpt = LegacyCheckpoint(ckpt_dir)
        cfg = ckpt.config
        chunks = load_into_gpt_model(ckpt, layout)
    seq_len = seq_len or cfg.max_position_embeddings
    if not 1 <= seq_len <= cfg.max_position_embeddings:
        raise HypercloneError(f"--seq-len {seq_len} is outside 1..{cfg.max_position_embeddings}")
    tokens = fixed_batch(cfg.vocab_size, seq_len, batch, seed)
    micro = 1 if batch >= layout.pp else batch
    logits = forward_logits(chunks, tokens, micro_batch_size=micro)
    result = torch.zeros(2, dtype=torch.float64)
    if logits is not None:
        reference = load_hf_model(small)(tokens).logits
        if reference.shape[-1] != cfg.vocab_size:
            raise HypercloneError(f"vocab sizes differ: small {reference.shape[-1]}, checkpoint {cfg.vocab_size}")
        result = torch.tensor(logit_diff(reference, logits[..., : cfg.vocab_size]), dtype=torch.float64)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return LogitDiff(result[0].item(), result[1].item(), seq_len, batch)
