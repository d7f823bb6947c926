"""One optimizer step over a global batch, the DeepSpeed engine doing the optimizer side.

Two ways through, both plain uses of the two libraries:
- PP=1: DeepSpeed's own loop. Each micro-batch goes through ``engine(...)`` (the model chunk plus the loss,
  ``ChunkStack.forward``), ``engine.backward(loss)`` and ``engine.step()``; DeepSpeed counts the gradient
  accumulation steps and, on the last, reduces over data parallel (ZeRO-1 or ZeRO-2), clips and updates.
- PP>1: the backward of a stage is driven by gradients arriving from the next stage, which is megatron's
  pipeline schedule's job, so megatron-core runs forward/backward over all micro-batches and the engine is
  configured with ``managed_gradient_accumulation: false``: ``engine.step()`` is then the boundary where
  ZeRO-1 reduces the accumulated gradients, takes the norm over data x tensor x pipeline ranks, clips and
  updates. This is how DeepSpeed's own pipeline engine works, and, like it, it refuses ZeRO-2 (whose
  reduction runs in backward hooks that only ``engine.backward`` arms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from hyperclone_dist.megatron.model import causal_attention_mask
from hyperclone_dist.train import symmetry_breaking

# megatron.core is imported inside the functions that use it (seconds to import; bad input is refused first).


@dataclass
class StepResult:
    loss: float | None  # mean LM loss over the global batch (on the last pipeline stage; None elsewhere)
    grad_norm: float | None
    lr: float


def masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the unmasked tokens of one micro-batch."""
    mask = loss_mask.float()
    return (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)


def real_vocab_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                             logit_scale: float = 1.0) -> torch.Tensor:
    """Per-token loss [batch, seq] from this TP rank's vocab slice of the logits, with megatron's padded
    vocab rows (ids >= vocab_size) left out of the softmax: a grown model's loss then equals the small
    model's exactly, and the padded rows get no gradient (Megatron-LM lets them take probability mass)."""
    from megatron.core import parallel_state, tensor_parallel

    if logit_scale != 1.0:  # muP output multiplier
        logits = logits * logit_scale
    local = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * local
    if first + local > vocab_size:
        padded = torch.arange(first, first + local, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, float("-inf"))
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)


def make_forward_step(attention_mask: torch.Tensor, vocab_size: int, logit_scale: float = 1.0):
    """The ``forward_step_func`` megatron's schedules call for each micro-batch."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], attention_mask)  # logits on the last stage

        def loss_func(logits):
            per_token = real_vocab_cross_entropy(logits, batch["labels"], vocab_size, logit_scale)
            loss = masked_mean(per_token, batch["loss_mask"])
            # megatron divides the returned loss in place by the number of micro-batches: report a copy
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    return forward_step


def allreduce_tied_embedding_grads(chunks: list) -> None:
    """With tied embeddings and PP>1 the first and last stages each hold a copy of the word embedding;
    their gradients are summed so both copies take the same step (megatron's finalize_model_grads)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    group = parallel_state.get_embedding_group(check_initialized=False)
    if group is None or dist.get_rank() not in dist.get_process_group_ranks(group):
        return
    if parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        chunk = chunks[0]
    else:
        chunk = chunks[-1]
    if not getattr(chunk, "share_embeddings_and_output_weights", False):
        return
    weight = chunk.shared_embedding_or_output_weight()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=group)


def mark_pipeline_replicas(chunks: list) -> None:
    """The last stage's copy of a tied embedding must not count twice in the global gradient norm:
    DeepSpeed skips parameters marked ``ds_pipe_replicated``."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        return
    last = chunks[-1]
    if getattr(last, "share_embeddings_and_output_weights", False) and last.post_process:
        last.shared_embedding_or_output_weight().ds_pipe_replicated = True


def forward_backward(chunks: list, micro_batches: list[dict], seq_length: int, micro_batch_size: int,
                     vocab_size: int, forward_only: bool = False, logit_scale: float = 1.0) -> float | None:
    """Run the schedule over this data-parallel rank's micro-batches; the mean micro-batch loss on the
    last pipeline stage, None elsewhere. Gradients accumulate into ``param.grad``."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = model_device(chunks)
    mask = causal_attention_mask(seq_length, device)
    data = [iter(on_device(micro_batches, device)) for _ in chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=make_forward_step(mask, vocab_size, logit_scale),
        data_iterator=data if len(chunks) > 1 else data[0],
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.stack([o["lm loss"] for o in outputs]).mean().item()


def data_parallel_mean(value: float | None) -> float | None:
    """Average a last-stage scalar over the data-parallel replicas (every one has the same count)."""
    from megatron.core import parallel_state

    if value is None:
        return None
    group = parallel_state.get_data_parallel_group()
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, group=group)
    return (tensor / dist.get_world_size(group)).item()


class ChunkStack(torch.nn.Module):
    """The module DeepSpeed wraps: this rank's model chunks. With PP=1 its forward is one micro-batch's
    loss, so the engine's own forward/backward/step loop drives training."""

    def __init__(self, chunks: list, vocab_size: int, seq_length: int, logit_scale: float = 1.0):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)
        self.vocab_size, self.logit_scale = vocab_size, logit_scale
        self.register_buffer("attention_mask", causal_attention_mask(seq_length), persistent=False)
        self.placeholders = torch.nn.ParameterList()  # see engine._same_groups_everywhere

    def placeholder(self) -> torch.nn.Parameter:
        param = torch.nn.Parameter(torch.zeros(1))
        self.placeholders.append(param)
        return param

    def forward(self, tokens, position_ids, labels, loss_mask):
        logits = self.chunks[0](tokens, position_ids, self.attention_mask)
        return masked_mean(real_vocab_cross_entropy(logits, labels, self.vocab_size, self.logit_scale), loss_mask)


def model_device(chunks: list) -> torch.device:
    return next(chunks[0].parameters()).device


def on_device(micro_batches: list[dict], device: torch.device) -> list[dict]:
    """The data feed's CPU batches on the model's device (a no-op on CPU)."""
    return [{key: value.to(device, non_blocking=True) for key, value in batch.items()} for batch in micro_batches]


def _engine_loop_step(engine, micro_batches: list[dict]) -> float:
    losses = []
    for batch in on_device(micro_batches, model_device(list(engine.module.chunks))):
        loss = engine(batch["tokens"], batch["position_ids"], batch["labels"], batch["loss_mask"])
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean().item()


def _symmetry_noise(engine, chunks: list, noise) -> None:
    """Gradient noise in the first K optimizer steps (symmetry_breaking.py): hooks attached at the first
    step, removed once step K is reached."""
    if not hasattr(engine, "symmetry_noise_hooks"):
        engine.symmetry_noise_hooks = symmetry_breaking.attach(engine, chunks, noise) if noise else None
    hooks = engine.symmetry_noise_hooks
    if hooks is not None and hooks.retire_if_done():
        engine.symmetry_noise_hooks = None


def train_step(engine, chunks: list, micro_batches: list[dict], seq_length: int, micro_batch_size: int,
               vocab_size: int, noise=None) -> StepResult:
    """``noise``: a ``symmetry_breaking.GradientNoise`` or None (off)."""
    from megatron.core import parallel_state

    _symmetry_noise(engine, chunks, noise)
    for chunk in chunks:
        chunk.train()
    lr = engine.get_lr()[0]  # the LR of this update (the scheduler advances inside engine.step)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        loss = _engine_loop_step(engine, micro_batches)
    else:
        loss = forward_backward(chunks, micro_batches, seq_length, micro_batch_size, vocab_size,
                                logit_scale=engine.module.logit_scale)
        allreduce_tied_embedding_grads(chunks)
        engine.step()
    norm = engine.get_global_grad_norm()
    norm = None if norm is None else float(norm)
    return StepResult(data_parallel_mean(loss), norm, lr)


@torch.no_grad()
def eval_step(chunks: list, micro_batches: list[dict], seq_length: int, micro_batch_size: int,
              vocab_size: int, logit_scale: float = 1.0) -> float | None:
    was = [c.training for c in chunks]
    for chunk in chunks:
        chunk.eval()
    loss = forward_backward(chunks, micro_batches, seq_length, micro_batch_size, vocab_size, forward_only=True,
                            logit_scale=logit_scale)
    for chunk, training in zip(chunks, was):
        chunk.train(training)
    return data_parallel_mean(loss)
