"""OPTIMISER section: Newton-Schulz and MuonEq-R against float64 re-implementations."""

from __future__ import annotations

import math

import pytest
import torch

import train_gpt
from conftest import tiny_hp


def newton_schulz_float64(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.double()
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


@pytest.mark.parametrize("shape", [(3, 64, 32), (2, 32, 96), (48, 48)])
def test_newton_schulz_matches_float64(shape):
    torch.manual_seed(0)
    update = torch.randn(*shape)
    reference = newton_schulz_float64(update)
    exact = train_gpt.newton_schulz(update.double(), dtype=torch.float64)
    assert exact.shape == update.shape and torch.allclose(exact, reference, atol=1e-9)
    in_bf16 = train_gpt.newton_schulz(update).double()  # what training runs: bf16 arithmetic
    assert (in_bf16 - reference).norm() / reference.norm() < 0.08
    singular_values = torch.linalg.svdvals(reference)
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3  # near-orthogonal


def muon_step_float64(bank, grad, momentum_buffer, lr, momentum, weight_decay, row_normalize):
    momentum_buffer = momentum * momentum_buffer + grad
    update = grad + momentum * momentum_buffer
    if row_normalize:
        update = update / update.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    update = newton_schulz_float64(update) * math.sqrt(max(1.0, bank.size(-2) / bank.size(-1)))
    return bank * (1 - lr[:, None, None] * weight_decay) - lr[:, None, None] * update, momentum_buffer


@pytest.mark.parametrize("row_normalize", [True, False])
def test_muon_eq_r_matches_float64_over_steps(row_normalize):
    torch.manual_seed(1)
    bank = torch.nn.Parameter(torch.randn(4, 48, 32, dtype=torch.float64))
    lrs = torch.tensor([0.02, 0.02, 0.03, 0.03], dtype=torch.float64)
    optimizer = train_gpt.MuonEqR([bank], [lrs], momentum=0.9, backend_steps=5, weight_decay=0.04,
                                  row_normalize=row_normalize, comm_dtype=torch.float64, ns_dtype=torch.float64)
    reference, buffer = bank.detach().double().clone(), torch.zeros(4, 48, 32, dtype=torch.float64)
    for _ in range(3):
        grad = torch.randn(4, 48, 32, dtype=torch.float64)
        # one row 1000x larger: MuonEq-R must equalise it, plain Muon must not
        grad[0, 0] *= 1000
        bank.grad = grad.clone()
        optimizer.step()
        reference, buffer = muon_step_float64(reference, grad.double(), buffer, lrs.double(), 0.9, 0.04, row_normalize)
        assert torch.allclose(bank.detach(), reference, atol=1e-10)
    other_mode = muon_step_float64(reference, grad.double(), buffer, lrs.double(), 0.9, 0.04, not row_normalize)[0]
    assert not torch.allclose(other_mode, reference, atol=1e-4)  # the switch matters on this gradient


def test_row_normalisation_is_what_distinguishes_eq_r():
    update = torch.randn(2, 8, 16)
    normalised = train_gpt.normalize_rows(update)
    assert torch.allclose(normalised.norm(dim=-1), torch.ones(2, 8))
    assert torch.equal(train_gpt.normalize_rows(torch.zeros(1, 2, 3)), torch.zeros(1, 2, 3))


def test_split_learning_rates_follow_the_layer():
    hp = train_gpt.Hyperparameters.from_env({})
    lrs = train_gpt.matrix_learning_rates(hp, 22)  # q of layers 0-10, then out-proj of layers 0-10
    assert lrs[:5].eq(0.025).all() and lrs[5:11].eq(0.03).all() and lrs[11:16].eq(0.025).all() and lrs[16:].eq(0.03).all()
    single = train_gpt.matrix_learning_rates(train_gpt.Hyperparameters.from_env({"BANK_SPLIT": "0", "MATRIX_LR": "0.01"}), 11)
    assert single.eq(0.01).all()


def test_every_parameter_has_exactly_one_optimiser():
    hp = tiny_hp()
    model = train_gpt.build_model(hp)
    optimizers = train_gpt.build_optimizers(hp, model, torch.device("cpu"))
    owned = [p for opt in optimizers.all() for group in opt.param_groups for p in group["params"]]
    assert len(owned) == len({id(p) for p in owned}) == len(list(model.parameters()))


def test_global_norm_clipping_covers_banks_and_the_rest():
    hp = tiny_hp(GRAD_CLIP_NORM="0.3")
    model = train_gpt.build_model(hp)
    optimizers = train_gpt.build_optimizers(hp, model, torch.device("cpu"))
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizers.muon.reduce_gradients()
    shards = optimizers.muon.reduced_grad_shards()
    total = math.sqrt(sum(p.numel() for p in model.parameters()))
    optimizers.adam.step = lambda: None  # look at the clipped gradients only
    optimizers.muon.step = lambda shards: seen.extend(shards)
    seen: list[torch.Tensor] = []
    optimizers.step(0.3)
    clipped = math.sqrt(sum(float(s.square().sum()) for s in seen) + sum(float(p.grad.square().sum()) for p in optimizers.replicated))
    assert clipped == pytest.approx(0.3, rel=1e-4) and total > 0.3 and len(shards) == 4


def test_wallclock_warmdown_ends_at_the_cap():
    hp = train_gpt.Hyperparameters.from_env({"WARMDOWN_ITERS": "100"})
    # 10 ms per step: warmdown lasts 1000 ms and ends at the 5000 ms cap
    assert train_gpt.lr_multiplier(hp, 100, 1000.0, 5000.0) == 1.0
    assert train_gpt.lr_multiplier(hp, 450, 4500.0, 5000.0) == pytest.approx(0.5)
    assert train_gpt.lr_multiplier(hp, 500, 5000.0, 5000.0) == 0.0
    assert train_gpt.lr_multiplier(hp, 19950, 0.0, None) == pytest.approx(0.5)


def test_momentum_warms_up_linearly():
    hp = train_gpt.Hyperparameters.from_env({})
    assert train_gpt.muon_momentum_at(hp, 0) == 0.92
    assert train_gpt.muon_momentum_at(hp, 750) == pytest.approx(0.955)
    assert train_gpt.muon_momentum_at(hp, 5000) == 0.99
