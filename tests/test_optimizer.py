"""OPTIMISER: Newton-Schulz and MuonEq-R against float64 re-implementations, the LR split,
global-norm clipping."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.optimizer import MuonEqR, build_optimizers, matrix_lr_scales, newton_schulz, normalize_rows
from trainer.runtime import Runtime
from trainer.settings import Hyperparameters
from conftest import tiny_hp, tiny_model


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
    exact = newton_schulz(update.double(), dtype=torch.float64)
    assert exact.shape == update.shape and torch.allclose(exact, reference, atol=1e-9)
    in_bf16 = newton_schulz(update).double()  # what training runs: bf16 arithmetic
    assert (in_bf16 - reference).norm() / reference.norm() < 0.08


def test_newton_schulz_keeps_the_reference_epsilon_on_tiny_gradients():
    """eps (1e-7) is added to the norm: on a gradient this small it sets the update's scale."""
    torch.manual_seed(0)
    update = 1e-9 * torch.randn(3, 48, 32, dtype=torch.float64)  # Frobenius norm ~4e-8 per matrix
    reference = newton_schulz_float64(update)
    assert torch.allclose(newton_schulz(update, dtype=torch.float64), reference, rtol=1e-6, atol=0)


def test_row_normalisation_floors_tiny_rows_at_1e_7():
    rows = torch.tensor([[3.0, 4.0], [3e-4, 4e-4], [9e-8, 1.2e-7], [3e-9, 4e-9], [0.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.6, 0.8], [0.03, 0.04], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(normalize_rows(rows), expected, rtol=1e-9, atol=0)


def muon_step_float64(bank, grad, momentum_buffer, lr, momentum, weight_decay, row_normalize):
    momentum_buffer = momentum * momentum_buffer + grad
    update = grad + momentum * momentum_buffer
    if row_normalize:
        update = update / update.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    update = newton_schulz_float64(update) * math.sqrt(max(1.0, bank.size(-2) / bank.size(-1)))
    return bank * (1 - lr[:, None, None] * weight_decay) - lr[:, None, None] * update, momentum_buffer


def float64_muon(bank, lr_scale, row_normalize=True):
    return MuonEqR([bank], [lr_scale], lr=0.03, momentum=0.9, backend_steps=5, weight_decay=0.04,
                           row_normalize=row_normalize, runtime=Runtime(), ns_dtype=torch.float64)


@pytest.mark.parametrize("row_normalize", [True, False])
def test_muon_eq_r_matches_float64_over_steps(row_normalize):
    torch.manual_seed(1)
    bank = torch.nn.Parameter(torch.randn(4, 48, 32, dtype=torch.float64))
    lr_scale = torch.tensor([0.5, 1.0, 1.0, 2.0], dtype=torch.float64)
    optimizer = float64_muon(bank, lr_scale, row_normalize)
    reference, buffer = bank.detach().clone(), torch.zeros(4, 48, 32, dtype=torch.float64)
    for _ in range(3):
        grad = torch.randn(4, 48, 32, dtype=torch.float64)
        grad[0, 0] *= 1000  # one row 1000x larger: MuonEq-R must equalise it, plain Muon must not
        optimizer.step([grad.clone()])
        reference, buffer = muon_step_float64(reference, grad, buffer, 0.03 * lr_scale, 0.9, 0.04, row_normalize)
        assert torch.allclose(bank.detach(), reference, atol=1e-10)
    other_mode = muon_step_float64(reference, grad, buffer, 0.03 * lr_scale, 0.9, 0.04, not row_normalize)[0]
    assert not torch.allclose(other_mode, reference, atol=1e-4)  # the switch matters on this gradient


@pytest.mark.parametrize("row_normalize", [True, False])
def test_scaling_a_matrix_gradient_changes_nothing(row_normalize):
    """Why the reference's 0.025/0.03 split of layers 0-4 is a no-op: it scales those
    matrices' gradients, and row normalisation (or Newton-Schulz's own normalisation)
    cancels any per-matrix factor. So the default trains every layer alike."""
    torch.manual_seed(2)
    start = torch.randn(6, 32, 24, dtype=torch.float64)
    banks = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    optimizers = [float64_muon(bank, torch.ones(6, dtype=torch.float64), row_normalize) for bank in banks]
    split = torch.tensor([0.025 / 0.03] * 3 + [1.0] * 3, dtype=torch.float64)[:, None, None]
    for _ in range(3):
        grad = torch.randn(6, 32, 24, dtype=torch.float64)
        optimizers[0].step([grad.clone()])
        optimizers[1].step([grad * split])
    assert torch.allclose(banks[0], banks[1], atol=1e-12)


def test_early_layers_lr_scale_really_scales_their_updates():
    hp = tiny_hp(NUM_LAYERS="4", EARLY_LAYERS="2", EARLY_LAYERS_LR_SCALE="0.5")
    scales = matrix_lr_scales(hp, 8, torch.device("cpu"))  # q of layers 0-3, then out-proj of layers 0-3
    assert scales.tolist() == [0.5, 0.5, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0]
    assert matrix_lr_scales(Hyperparameters.from_env({}), 22, torch.device("cpu")).eq(1.0).all()
    bank = torch.nn.Parameter(torch.zeros(8, 16, 16, dtype=torch.float64))
    float64_muon(bank, scales.double()).step([torch.randn(16, 16, dtype=torch.float64).expand(8, 16, 16).clone()])
    norms = bank.detach().flatten(1).norm(dim=1)
    assert torch.allclose(norms / norms[2], scales.double(), rtol=1e-9)


class DeferredGather:
    """A fake 2-rank runtime whose all-gather fills the output only when waited on, as an
    asynchronous collective may: the update must be read after wait(), never before."""

    world_size, distributed, device = 2, True, torch.device("cpu")

    def all_gather(self, output, shard):
        class Work:
            def wait(self):
                output.copy_(torch.cat([shard, torch.full_like(shard, float("nan"))]))
        return Work()


def test_sharded_muon_applies_each_gathered_update_only_after_it_arrives():
    torch.manual_seed(3)
    start = [torch.randn(4, 24, 16, dtype=torch.float64), torch.randn(3, 16, 40, dtype=torch.float64)]
    results = []
    for runtime in (Runtime(), DeferredGather()):
        banks = [torch.nn.Parameter(bank.clone()) for bank in start]
        muon = MuonEqR(banks, [torch.ones(len(b), dtype=torch.float64) for b in banks], lr=0.03, momentum=0.9,
                               backend_steps=5, weight_decay=0.04, row_normalize=True, runtime=runtime,
                               ns_dtype=torch.float64)
        muon.comm_dtype = torch.float64
        for step in range(2):
            muon.step([torch.randn(b.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
                       for b in banks])
        results.append(banks)
    for single, gathered in zip(*results):
        assert torch.equal(single, gathered)


def test_a_parameter_the_forward_missed_gets_a_zero_gradient():
    hp = tiny_hp()
    model = tiny_model(hp)
    optimizers = build_optimizers(hp, model, Runtime())
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    missed = optimizers.replicated[-1]
    missed.grad = None
    optimizers.adam.step = lambda: None
    optimizers.muon.step = lambda shards: None
    optimizers.step(0.3)
    assert missed.grad is not None and torch.equal(missed.grad, torch.zeros_like(missed))


def test_every_parameter_has_exactly_one_optimiser():
    hp = tiny_hp()
    model = tiny_model(hp)
    optimizers = build_optimizers(hp, model, Runtime())
    owned = [p for opt in optimizers.all() for group in opt.param_groups for p in group["params"]]
    assert len(owned) == len({id(p) for p in owned}) == len(list(model.parameters()))


def test_global_norm_clipping_covers_banks_and_the_rest():
    hp = tiny_hp()
    model = tiny_model(hp)
    optimizers = build_optimizers(hp, model, Runtime())
    for param in model.parameters():
        param.grad = torch.full_like(param, 2.0)
    total = 2.0 * math.sqrt(sum(p.numel() for p in model.parameters()))
    seen: list[torch.Tensor] = []
    optimizers.adam.step = lambda: None  # look at the clipped gradients only
    optimizers.muon.step = lambda shards: seen.extend(shards)
    optimizers.step(0.3)
    clipped = math.sqrt(sum(float(s.square().sum()) for s in seen) + sum(float(p.grad.square().sum()) for p in optimizers.replicated))
    assert clipped == pytest.approx(0.3, rel=1e-4) and total > 0.3 and len(seen) == 4
    for value, clip_norm in ((1e-6, 0.3), (1e-12, 0.3), (2.0, 0.0)):  # under the limit, near zero, or no clip: left alone
        for param in model.parameters():
            param.grad = torch.full_like(param, value)
        seen.clear()
        optimizers.step(clip_norm)
        assert all(torch.equal(g, torch.full_like(g, value)) for g in seen + [p.grad for p in optimizers.replicated])


def test_schedule_sets_every_group():
    hp = tiny_hp()
    optimizers = build_optimizers(hp, tiny_model(hp), Runtime())
    optimizers.set_schedule(0.5, 0.95)
    assert [g["lr"] for g in optimizers.adam.param_groups] == [hp.tied_embed_lr * 0.5, hp.scalar_lr * 0.5]
    assert {g["lr"] for g in optimizers.muon.param_groups} == {hp.matrix_lr * 0.5}
    assert {g["momentum"] for g in optimizers.muon.param_groups} == {0.95}


def test_token_tables_and_controls_decay_by_their_own_settings():
    """EMBED_WD for the token tables, ADAM_WD for the rest (PR #1493: 0.085 and 0.02)."""
    hp = tiny_hp(EMBED_WD="0.5", ADAM_WD="0.25", TIED_EMBED_LR="0.1", SCALAR_LR="0.2")
    model = tiny_model(hp)
    optimizers = build_optimizers(hp, model, Runtime())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for param in model.parameters():
        param.grad = torch.zeros_like(param)  # nothing to learn: only the decay moves a weight
    optimizers.step(0.0)
    after = dict(model.named_parameters())
    assert torch.allclose(after["tok_emb.weight"], before["tok_emb.weight"] * (1 - 0.1 * 0.5))
    assert torch.allclose(after["skip_weights"], before["skip_weights"] * (1 - 0.2 * 0.25))


def test_the_optimiser_settings_reach_the_optimisers():
    """Each setting arrives where it acts (mutation testing found these unchecked)."""
    hp = tiny_hp(MUON_EQ_R="0", MUON_BACKEND_STEPS="3", BETA1="0.8", BETA2="0.9", ADAM_EPS="1e-7")
    optimizers = build_optimizers(hp, tiny_model(hp), Runtime())
    muon = optimizers.muon.param_groups[0]
    assert (muon["row_normalize"], muon["backend_steps"]) == (False, 3)
    assert all(group["betas"] == (0.8, 0.9) and group["eps"] == 1e-7 for group in optimizers.adam.param_groups)
    assert optimizers.muon.ns_dtype == torch.bfloat16  # Newton-Schulz in bfloat16, as both records run it
    assert build_optimizers(tiny_hp(), tiny_model(tiny_hp()), Runtime()).muon.param_groups[0]["row_normalize"] is True
