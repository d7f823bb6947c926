"""Same weights, every tensor/pipeline layout, same logits: the multi-process half of
tests/test_megatron_runtime.py.

    torchrun --standalone --nproc_per_node 4 tests/mp_workers/megatron_equivalence.py --workdir /tmp/x

For each tiny model: build it at TP1×PP1 (data parallel 4), randomise every weight, measure logits, a loss
and a few gradients, and save it with megatron's dist_checkpointing. Then for each layout: rebuild the
model, load that checkpoint (dist_checkpointing reshards it), measure the same and compare. Rank 0 writes
every rank's errors to <workdir>/results.json, which the test asserts on.
"""

from __future__ import annotations

import argparse
import json
import os
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from hyperclone_dist.config import ModelConfig
from hyperclone_dist.errors import HypercloneError
from hyperclone_dist.layout import Layout, padded_vocab_size
from hyperclone_dist.megatron.cpu_shims import apply_cpu_shims
from hyperclone_dist.megatron.model import build_gpt_model, causal_attention_mask, forward_logits
from hyperclone_dist.megatron.parallel import destroy_parallel, init_model_parallel

VOCAB, SEQ, BATCH = 100, 16, 4
PADDED_VOCAB = padded_vocab_size(VOCAB, tp=4)  # one padded size that every layout below can split
LAYOUTS = {  # name -> (tp, pp, vpp)
    "tp2pp2": (2, 2, None),
    "tp4pp1": (4, 1, None),
    "tp1pp4": (1, 4, None),
    "tp1pp2vpp2": (1, 2, 2),
}
MODELS = {
    # Llama/Mistral style: RMSNorm, RoPE, SwiGLU, GQA with 2 kv heads (fewer than tp=4: megatron's
    # replicated-kv path), sliding window shorter than the sequence, untied head, no biases.
    "llama": ModelConfig(family="mistral", vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4,
                         num_kv_heads=2, head_dim=16, ffn_hidden_size=96, max_position_embeddings=32,
                         norm="rmsnorm", activation="silu", gated_mlp=True, position_embedding="rope",
                         rotary_base=10000.0, hf_extra={"sliding_window": 8}),
    # GPT-2 style: LayerNorm with bias, learned positions, tied embeddings, every bias, gelu_new.
    "gpt2": ModelConfig(family="gpt2", vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4,
                        num_kv_heads=4, head_dim=8, ffn_hidden_size=128, max_position_embeddings=32,
                        norm="layernorm", norm_bias=True, activation="gelu_new", gated_mlp=False,
                        position_embedding="learned", tie_word_embeddings=True, qkv_bias=True,
                        attn_out_bias=True, mlp_bias=True),
}
# OPT style: relu, learned positions with 2 rows before position 0.
OPT = ModelConfig(family="opt", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                  head_dim=8, ffn_hidden_size=64, max_position_embeddings=SEQ, norm="layernorm",
                  norm_bias=True, activation="relu", gated_mlp=False, position_embedding="learned",
                  position_offset=2, tie_word_embeddings=True, qkv_bias=True, attn_out_bias=True,
                  mlp_bias=True)
# Replicated parameters whose gradients every layout computes in full, by global layer number: the first
# layer's input norm (its gradient crosses every pipeline stage), a later layer's MLP norm, the final norm.
GRAD_PROBES = ("decoder.layers.0.input_layernorm.weight", "decoder.layers.2.pre_mlp_layernorm.weight",
               "decoder.final_layernorm.weight")


def randomise(model: torch.nn.Module) -> None:
    """Every parameter from a generator seeded by its name (norm gains near 1, biases nonzero), so a
    misplaced slice anywhere changes the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noise = torch.randn(param.shape, generator=generator)
            if "layernorm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif param.dim() == 1:
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.3 * noise)


def global_name(chunk: torch.nn.Module, name: str) -> str:
    """Parameter names number layers within a pipeline stage; this renumbers them model-wide."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def loss_and_grads(chunks: list, tokens: torch.Tensor) -> tuple[float | None, dict[str, torch.Tensor]]:
    """One forward/backward through megatron's schedule (mean squared logit as the loss)."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    mask = causal_attention_mask(SEQ)
    positions = torch.arange(SEQ).unsqueeze(0)

    def loss_func(output):
        loss = tensor_parallel.gather_from_tensor_model_parallel_region(output).float().pow(2).mean()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        return model(next(data_iterator), positions, mask), loss_func

    stats = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter(tokens.split(1)) for _ in chunks], model=chunks,
        num_microbatches=BATCH, seq_length=SEQ, micro_batch_size=1, forward_only=False)
    loss = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        loss = float(torch.stack([s["loss"] for s in stats]).mean())
    grads = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            name = global_name(chunk, name)
            if name in GRAD_PROBES:
                assert param.grad is not None and torch.isfinite(param.grad).all(), name
                grads[name] = param.grad.clone()
    return loss, grads


def measure(chunks: list, tokens: torch.Tensor) -> dict:
    logits = forward_logits(chunks, tokens)
    loss, grads = loss_and_grads(chunks, tokens)
    return {"logits": logits, "loss": loss, "grads": grads}


def load_layout(cfg: ModelConfig, layout: tuple[int, int, int | None], checkpoint: Path) -> list:
    """This rank's chunks at a layout, with weights resharded from the checkpoint."""
    from megatron.core import dist_checkpointing

    tp, pp, vpp = layout
    init_model_parallel(Layout(tp=tp, pp=pp, vpp=vpp), seed=7)
    chunks = build_gpt_model(cfg, padded_vocab=PADDED_VOCAB, perform_initialization=False)
    sharded = {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    loaded = dist_checkpointing.load(sharded, str(checkpoint))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"chunk{i}"])
    return chunks


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def compare(got: dict, want: dict) -> dict:
    """Errors of one layout's measurements against the reference, as far as this rank holds them."""
    out = {"rank": dist.get_rank(), "logits_rel_err": None, "loss_rel_err": None, "grad_rel_err": {}}
    if got["logits"] is not None:
        assert got["logits"].shape == want["logits"].shape, (got["logits"].shape, want["logits"].shape)
        out["logits_rel_err"] = relative_error(got["logits"], want["logits"])
        out["loss_rel_err"] = abs(got["loss"] - want["loss"]) / abs(want["loss"])
    for name, grad in got["grads"].items():
        out["grad_rel_err"][name] = relative_error(grad, want["grads"][name])
    return out


def run_model(name: str, cfg: ModelConfig, workdir: Path) -> dict:
    """The TP1×PP1 reference (kept in memory, saved to a checkpoint), then every layout loaded from it."""
    from megatron.core import dist_checkpointing

    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(11))
    checkpoint = workdir / f"{name}_tp1pp1"
    init_model_parallel(seed=7)
    reference_chunks = build_gpt_model(cfg, padded_vocab=PADDED_VOCAB)
    randomise(reference_chunks[0])
    want = measure(reference_chunks, tokens)
    if dist.get_rank() == 0:
        checkpoint.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"chunk0": reference_chunks[0].sharded_state_dict()}, str(checkpoint))
    results = {"reference": {"logits_std": float(want["logits"].std()), "loss": want["loss"]}}
    for layout_name, layout in {"tp1pp1": (1, 1, None), **LAYOUTS}.items():
        results[layout_name] = compare(measure(load_layout(cfg, layout, checkpoint), tokens), want)
    return results


def check_learned_positions() -> dict:
    """With forward_logits' position ids, position p must read row p of megatron's learned table (for OPT
    that row holds HF row p + 2, see hf_position_rows): bumping the last row changes only the last
    position's logits, bumping row 0 changes position 0's."""
    init_model_parallel(seed=7)
    (model,) = build_gpt_model(OPT, padded_vocab=PADDED_VOCAB)
    randomise(model)
    table = model.embedding.position_embeddings.weight
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    base = forward_logits([model], tokens)
    original = table.detach().clone()

    def positions_changed_by_bumping(row: int) -> list[bool]:
        with torch.no_grad():
            table.copy_(original)
            table[row] += 1.0
        return ((forward_logits([model], tokens) - base).abs().amax(dim=(0, 2)) > 0).tolist()

    last, first = positions_changed_by_bumping(-1), positions_changed_by_bumping(0)
    return {"rows": table.shape[0], "last_row_only_last_position": last == [False] * (SEQ - 1) + [True],
            "first_row_reaches_position_0": first[0]}


def check_shims_idempotent() -> dict:
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    wrapped = schedules.forward_backward_pipelining_with_interleaving
    again = apply_cpu_shims()
    return {"applied": again, "unchanged": schedules.forward_backward_pipelining_with_interleaving is wrapped,
            "tracker": type(get_cuda_rng_tracker()).__name__}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    mine: dict = {"bad_layout_error": None, "models": {}}
    try:
        init_model_parallel(Layout(tp=3))
    except HypercloneError as exc:
        mine["bad_layout_error"] = str(exc)
    for name in args.models:
        mine["models"][name] = run_model(name, MODELS[name], args.workdir)
    mine["learned_positions"] = check_learned_positions()
    mine["shims"] = check_shims_idempotent()
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() == 0:
        (args.workdir / "results.json").write_text(json.dumps(gathered))
    destroy_parallel()


if __name__ == "__main__":  # dist_checkpointing.save starts a spawn-context Manager: keep this guard
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
