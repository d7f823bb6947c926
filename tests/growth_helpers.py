"""Grow a checkpoint in memory and compare it with the small model (no files written)."""

from __future__ import annotations

import torch

from hyperclone_dist.growth.grow import Grower
from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.hf_model import hf_model_from_config, hf_state_dict, load_hf_model
from hyperclone_dist.sources import open_source
from hyperclone_dist.verify import fixed_batch, logit_diff


def grow_in_memory(path, spec: GrowthSpec):
    source = open_source(path)
    grower = Grower(source.config, spec, source.get)
    tensors = {name: grower.full(name) for name in grower.names()}
    model = hf_model_from_config(grower.large)
    missing, unexpected = model.load_state_dict(hf_state_dict(grower.large, tensors), strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("lm_head.weight") for k in missing) and (not missing or grower.large.tie_word_embeddings)
    if grower.large.tie_word_embeddings:
        model.tie_weights()
    return grower, model


@torch.inference_mode()
def max_rel_logit_error(small_path, grown_model, seq_len: int = 32, batch: int = 2) -> float:
    small = load_hf_model(small_path)
    ids = fixed_batch(small.config.vocab_size, seq_len, batch, seed=7)
    vocab = small.config.vocab_size
    return logit_diff(small(ids).logits[..., :vocab], grown_model(ids).logits[..., :vocab])[1]
