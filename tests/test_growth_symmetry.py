"""The known failure mode: an exact symmetric clone trained without noise or dropout never breaks
its symmetry (every copy of a neuron gets the same gradient); a noisy clone does."""

from __future__ import annotations

import pytest
import torch
from growth_helpers import grow_in_memory

from hyperclone_dist.growth.spec import GrowthSpec
from hyperclone_dist.verify import fixed_batch


def copy_gap(weight: torch.Tensor, n: int = 2) -> float:
    """Largest difference between the n output copies and between the n input copies of a grown matrix."""
    rows, cols = weight.shape[0] // n, weight.shape[1] // n
    out_copies = [weight[k * rows:(k + 1) * rows] for k in range(n)]
    in_copies = [weight[:, k * cols:(k + 1) * cols] for k in range(n)]
    gaps = [(c - out_copies[0]).abs().max().item() for c in out_copies[1:]]
    gaps += [(c - in_copies[0]).abs().max().item() for c in in_copies[1:]]
    return max(gaps)


def _train(model, optimizer_cls, steps: int = 5):
    model.train()
    optimizer = optimizer_cls(model.parameters(), lr=1e-2)
    for step in range(steps):
        ids = fixed_batch(model.config.vocab_size, 32, 4, seed=step)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


WATCHED = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
           "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"]


# SGD keeps the copies bitwise equal. Under Adam the copies drift apart only by float32 rounding
# (the backward GEMMs sum the copies' gradients in different orders, and Adam's normalisation turns
# an ulp into an update-sized step): ~1e-9 after a few steps, a million times below what noise gives.
@pytest.mark.parametrize("optimizer_cls,bound", [(torch.optim.SGD, 0.0), (torch.optim.AdamW, 1e-6)],
                         ids=["sgd", "adamw"])
def test_symmetric_clone_stays_symmetric(tiny_model_dirs, optimizer_cls, bound):
    _, model = grow_in_memory(tiny_model_dirs["llama-gqa2"], GrowthSpec(2, method="symmetric"))
    params = dict(model.named_parameters())
    before = {name: params[name].detach().clone() for name in WATCHED}
    _train(model, optimizer_cls)
    for name in WATCHED:
        assert not torch.equal(params[name], before[name])  # it did train
        assert copy_gap(params[name].detach()) <= bound, name  # ... and the copies are still the same


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
def test_noisy_clone_breaks_symmetry(tiny_model_dirs, optimizer_cls):
    _, model = grow_in_memory(tiny_model_dirs["llama-gqa2"], GrowthSpec(2, method="noisy", snr_db=10))
    _train(model, optimizer_cls)
    params = dict(model.named_parameters())
    for name in WATCHED:
        assert copy_gap(params[name].detach()) > 1e-3, name


def test_per_layer_snr_goes_from_first_to_last_layer_and_keeps_the_function(tiny_model_dirs):
    """--snr-db-last: the noise power of each layer follows the SNR line in dB, and the clone still
    computes the small model's function."""
    from growth_helpers import max_rel_logit_error

    path = tiny_model_dirs["llama-gqa2"]
    symmetric, _ = grow_in_memory(path, GrowthSpec(2, method="symmetric"))
    for first, last in ((5.0, 25.0), (25.0, 5.0)):
        noisy, model = grow_in_memory(path, GrowthSpec(2, method="noisy", snr_db=first, snr_db_last=last))
        assert max_rel_logit_error(path, model) <= 1e-5
        measured = []
        for layer in (0, noisy.large.num_layers - 1):
            name = next(n for n in noisy.names() if n.startswith(f"layers.{layer}.") and "up" in n)
            signal, noise = symmetric.full(name), noisy.full(name) - symmetric.full(name)
            measured.append(10 * torch.log10(signal.pow(2).mean() / noise.pow(2).mean()).item())
        assert measured == pytest.approx([first, last], abs=1.0), measured
