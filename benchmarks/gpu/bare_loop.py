"""Stage (c) of the GPU check: the model pretrain.py trains, trained by a bare PyTorch bf16 loop for the same
steps, and the reference losses of pretrain.py's first global batch.

    python3 benchmarks/gpu/bare_loop.py --steps 50 --warmup 10 --out runs/gpu-check/results/bare.json \\
        -- <the pretrain.py flags of stage (b)>

The model is the one pretrain.py builds from those flags (its own set-up: the same megatron-core GPTModel,
local layer spec, bf16, grown from the same small model, on the same batches): the ratio of tokens/s then
measures what the trainer adds (DeepSpeed's engine and ZeRO bookkeeping, the data feed, logging) and nothing
else. A transformers model of the same shape would run other attention and norm kernels, so the ratio would
mix the trainer's overhead with a choice of layer implementation. The loop keeps what DeepSpeed's bf16 mode
keeps: bf16 weights and gradients, float32 master weights, AdamW on those and gradient clipping; it is forward,
masked cross entropy, backward, a float32 copy of the gradients, ``clip_grad_norm_``, ``AdamW.step`` and a
copy back, nothing more.

References on global batch 0, as the first logged loss of pretrain.py sees it: the small model (transformers,
float32 and bf16, on the GPU) and the grown GPTModel in the run's dtype before any update.
"""

from __future__ import annotations

import statistics
import sys
import time

from gpu_common import OneLineParser, write_json


def mean_loss(forward, micro_batches: list[dict], vocab: int) -> float:
    """The mean of micro-batch mean losses, as the trainer logs it."""
    import torch

    from hyperclone_dist.train.step import masked_mean

    losses = []
    with torch.no_grad():
        for batch in micro_batches:
            logits = forward(batch)[..., :vocab].float()
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
            losses.append(masked_mean(per_token, batch["loss_mask"]).item())
    return sum(losses) / len(losses)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":  # GPU work is asynchronous: a step's time ends when its kernels have
        torch.cuda.synchronize(device)


def references(run, model, mask) -> dict:
    import torch

    from hyperclone_dist.hf_model import load_hf_model

    vocab, device = run.start.config.vocab_size, mask.device
    first = [to_device(b, device) for b in run.feed.train_batches(0)]
    out = {"grown": mean_loss(lambda b: model(b["tokens"], b["position_ids"], mask), first, vocab),
           "grown_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    small = load_hf_model(run.config.start.clone_from).to(device)
    for dtype, key in ((torch.float32, "small_float32"), (torch.bfloat16, "small_bf16")):
        small.to(dtype)
        out[key] = mean_loss(lambda b: small(input_ids=b["tokens"], position_ids=b["position_ids"]).logits,
                             first, vocab)
    small.cpu()  # its GPU memory back before the training loop measures its own peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def train(run, model, mask, steps: int) -> tuple[list[float], list[float]]:
    """(tokens/s, loss) of each step."""
    import torch

    from hyperclone_dist.train.step import masked_mean, real_vocab_cross_entropy

    optim, vocab, device = run.config.optim, run.start.config.vocab_size, mask.device
    params = [p for p in model.parameters() if p.requires_grad]
    master = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    groups = [{"params": [m for m in master if m.dim() > 1], "weight_decay": optim.weight_decay},
              {"params": [m for m in master if m.dim() <= 1], "weight_decay": 0.0}]
    # constant LR: the schedule's value changes no kernel, so it changes no step time
    adam = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps)
    tokens = run.plan.batches.tokens_per_step
    rates, losses = [], []
    for step in range(steps):
        synchronize(device)
        start = time.perf_counter()
        micro_batches = run.feed.train_batches(step)
        total = 0.0
        for batch in (to_device(b, device) for b in micro_batches):
            logits = model(batch["tokens"], batch["position_ids"], mask)
            loss = masked_mean(real_vocab_cross_entropy(logits, batch["labels"], vocab), batch["loss_mask"])
            (loss / len(micro_batches)).backward()
            total += loss.detach()
        for p, m in zip(params, master):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        if optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(master, optim.clip_grad)
        adam.step()
        adam.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(params, master)
        losses.append(float(total) / len(micro_batches))  # one host sync per step, as the trainer's loss read
        synchronize(device)
        rates.append(tokens / (time.perf_counter() - start))
    return rates, losses


def measure(flags: list[str], steps: int, warmup: int, device: str = "cuda") -> dict:
    import torch

    from hyperclone_dist.megatron.model import causal_attention_mask
    from hyperclone_dist.megatron.parallel import init_distributed
    from hyperclone_dist.train.args import parse_args
    from hyperclone_dist.train.loop import Run, prepare_environment
    from hyperclone_dist.train.monitor import device_peak_tflops, flops_per_token

    prepare_environment()
    init_distributed()
    run = Run(parse_args(flags))  # pretrain.py's own set-up: layout, data feed, model; no engine
    if steps > run.config.optim.train_iters:  # the data feed holds --train-iters global batches
        raise SystemExit(f"bare_loop.py: error: --steps {steps} is more than the flags' --train-iters "
                         f"{run.config.optim.train_iters}")
    run.setup_layout()
    run.setup_data()
    run.setup_model()
    model = run.chunks[0].to(device)
    model.train()
    mask = causal_attention_mask(run.plan.seq_length, device)
    result = {"first_batch": references(run, model, mask)}
    rates, losses = train(run, model, mask, steps)
    tokens_per_s = statistics.median(rates[warmup:])
    peak = device_peak_tflops(run.config.logging.peak_tflops)  # pretrain.py's MFU, computed the same way
    flops = flops_per_token(run.start.config, run.plan.seq_length)
    on_gpu = mask.device.type == "cuda"
    result.update(steps=steps, warmup=warmup, tokens_per_step=run.plan.batches.tokens_per_step, losses=losses,
                  tokens_per_s=tokens_per_s, mfu=tokens_per_s * flops / (peak * 1e12) if peak else None,
                  peak_memory_gib=torch.cuda.max_memory_allocated() / 1024**3 if on_gpu else None)
    return result


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="bare_loop.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (stage (b)'s --train-iters)")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the median")
    p.add_argument("--out", required=True, help="JSON file of the figures")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same code without a GPU "
                   "(tests)")
    p.add_argument("flags", nargs="+", help="after --: the pretrain.py flags of stage (b)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        build_parser().error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bare_loop.py: error: no GPU visible (--device cpu runs the same code on the CPU)", file=sys.stderr)
        return 2
    result = measure(args.flags, args.steps, args.warmup, args.device)
    write_json(args.out, result)
    ref = result["first_batch"]
    print(f"first batch: small float32 {ref['small_float32']:.5f}, small bf16 {ref['small_bf16']:.5f}, grown "
          f"{ref['grown_dtype']} {ref['grown']:.5f}; bare loop {result['tokens_per_s']:,.0f} tokens/s (median of steps "
          f"{args.warmup + 1}-{args.steps}), loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
