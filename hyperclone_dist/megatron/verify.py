"""Load a megatron checkpoint into GPTModel at a layout and compare its logits with the small model.

    torchrun --standalone --nproc_per_node 4 -m hyperclone_dist.cli.main verify small/ ckpt/ --tp 2 --pp 2
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.hf_model import load_hf_model
from hyperclone_dist.layout import Layout
from hyperclone_dist.megatron import legacy, torch_dist
from hyperclone_dist.megatron.load import LegacyCheckpoint
from hyperclone_dist.megatron.model import build_gpt_model, forward_logits, load_chunk_weights
from hyperclone_dist.megatron.parallel import agreed, init_distributed, init_model_parallel
from hyperclone_dist.verify import LogitDiff, combine, window_tokens, windows


def load_into_gpt_model(ckpt: LegacyCheckpoint, layout: Layout) -> list:
    """This rank's GPTModel chunks holding the checkpoint's weights (layout must match a legacy save)."""
    from megatron.core import parallel_state  # heavy: imported once a job runs

    saved = ckpt.layout
    if saved.stage_layers(ckpt.config.num_layers) != layout.stage_layers(ckpt.config.num_layers) or (
            (saved.tp, saved.pp, saved.chunks) != (layout.tp, layout.pp, layout.chunks)):
        raise HypercloneError(f"{ckpt.root} is a legacy checkpoint saved at {saved.describe()}; legacy "
                              "checkpoints load only at that layout")
    chunks = build_gpt_model(ckpt.config, layout, perform_initialization=False, padded_vocab=ckpt.padded_vocab)
    states = ckpt.rank_state_dicts(parallel_state.get_tensor_model_parallel_rank(),
                                   parallel_state.get_pipeline_model_parallel_rank())
    for chunk, state in zip(chunks, states):
        load_chunk_weights(chunk, state, ckpt.root)
    return chunks


def _read_checkpoint(root: Path, layout: Layout) -> tuple[Path, LegacyCheckpoint | None, ModelConfig]:
    """The iteration directory, the legacy reader (None for torch_dist) and the model of ``root``, once
    ``layout`` is known to fit it on this job."""
    it_dir = legacy.latest_dir(root)
    if (it_dir / "metadata.json").is_file():
        ckpt, cfg = None, ModelConfig.from_dict(torch_dist.read_args(it_dir).hyperclone_config)
    else:
        ckpt = LegacyCheckpoint(root)
        cfg = ckpt.config
    layout.validate(cfg, dist.get_world_size())
    return it_dir, ckpt, cfg


@torch.inference_mode()
def verify_megatron(small: str | Path, ckpt_dir: str | Path, layout: Layout, seq_len: int | None = None,
                    batch: int = 2, seed: int = 1234) -> LogitDiff:
    """Every rank returns the same LogitDiff (reduced from the last pipeline stage)."""
    init_distributed()
    it_dir, ckpt, cfg = agreed(_read_checkpoint, Path(ckpt_dir), layout)
    is_torch_dist = ckpt is None
    init_model_parallel(layout)
    chunks = torch_dist.load_into_gpt_model(it_dir, layout)[0] if is_torch_dist else load_into_gpt_model(ckpt, layout)
    # GPTModel's RoPE rotates by a token's index, not its position id: the end of the context only by --seq-len
    checked = windows(cfg.max_position_embeddings, seq_len, batch, tail=cfg.position_embedding == "learned")
    reference_model = None
    result = torch.zeros(len(checked), 2, dtype=torch.float64)  # per window: max |Δ|, max |reference|
    for k, window in enumerate(checked):
        tokens, positions = window_tokens(cfg.vocab_size, window, seed)
        micro = 1 if window.batch >= layout.pp else window.batch
        logits = forward_logits(chunks, tokens, micro_batch_size=micro, positions=positions)
        if logits is not None:
            reference_model = reference_model or load_hf_model(small)
            reference = reference_model(tokens, position_ids=positions).logits.double()
            if reference.shape[-1] != cfg.vocab_size:
                raise HypercloneError(f"vocab sizes differ: small {reference.shape[-1]}, checkpoint {cfg.vocab_size}")
            other = logits[..., : cfg.vocab_size].double()
            result[k] = torch.tensor([(reference - other).abs().max().item(), reference.abs().max().item()])
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return combine([tuple(row) for row in result.tolist()], checked)
