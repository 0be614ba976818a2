"""MODEL section: size, shapes, XSA, BigramHash, RoPE, late QAT."""

from __future__ import annotations

import torch

import train_gpt
from conftest import noisy_model, tiny_hp


def test_default_model_has_the_reference_parameter_count():
    model = train_gpt.build_model(train_gpt.Hyperparameters.from_env({}))
    assert sum(p.numel() for p in model.parameters()) == 27_041_372


def test_output_shapes():
    hp = tiny_hp()
    model = train_gpt.build_model(hp)
    tokens = torch.randint(0, hp.vocab_size, (3, 40))
    assert model.forward_hidden(tokens).shape == (3, 40, hp.model_dim)
    logits = model.forward_logits(tokens)
    assert logits.shape == (3, 40, hp.vocab_size)
    assert logits.abs().max() <= hp.logit_softcap
    loss = model(tokens, tokens)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_model_is_causal():
    hp = tiny_hp()
    model = noisy_model(hp)
    tokens = torch.randint(0, hp.vocab_size, (1, 32))
    changed = tokens.clone()
    changed[0, 20] = (changed[0, 20] + 1) % hp.vocab_size
    before, after = model.forward_logits(tokens), model.forward_logits(changed)
    assert torch.equal(before[0, :20], after[0, :20])
    assert not torch.allclose(before[0, 20:], after[0, 20:])


def test_xsa_leaves_no_component_along_v():
    torch.manual_seed(0)
    y = torch.randn(2, 5, 8, 16, dtype=torch.float64)
    v = torch.randn(2, 5, 2, 16, dtype=torch.float64)
    out = train_gpt.remove_self_value(y, v)
    unit_v = v / v.norm(dim=-1, keepdim=True)
    for head in range(8):  # heads 0-3 share KV head 0, heads 4-7 KV head 1
        along = (out[:, :, head] * unit_v[:, :, head // 4]).sum(-1)
        assert along.abs().max() < 1e-12
    # what was removed is exactly y's projection on v: the orthogonal part is untouched
    residual = y - out
    projected = (y[:, :, 0] * unit_v[:, :, 0]).sum(-1, keepdim=True) * unit_v[:, :, 0]
    assert torch.allclose(residual[:, :, 0], projected)


def test_bigram_buckets_by_hand():
    bigram = train_gpt.BigramHash(2816, 8, 16)
    tokens = torch.tensor([[5, 7, 1023, 0], [1, 1, 1, 1]])
    expected = [[2815, (36313 * 7 ^ 27191 * 5) % 2815, (36313 * 1023 ^ 27191 * 7) % 2815, (0 ^ 27191 * 1023) % 2815],
                [2815] + [(36313 ^ 27191) % 2815] * 3]
    assert bigram.bucket_ids(tokens).tolist() == expected


def test_rotary_matches_a_complex_rotation_and_leaves_the_rest():
    x = torch.randn(1, 6, 2, 12, dtype=torch.float64)
    cos, sin = train_gpt.rotary_tables(6, 8, 10000.0, torch.device("cpu"))
    out = train_gpt.apply_rotary(x, cos.double(), sin.double())
    pairs = torch.complex(x[..., :4], x[..., 4:8])
    angles = torch.arange(6, dtype=torch.float64)[:, None] / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    rotated = pairs * torch.exp(-1j * angles)[None, :, None, :]
    assert torch.allclose(out[..., :4], rotated.real, atol=1e-6) and torch.allclose(out[..., 4:8], rotated.imag, atol=1e-6)
    assert torch.equal(out[..., 8:], x[..., 8:])


def test_rotary_base_grows_past_1024():
    short_cos, _ = train_gpt.rotary_tables(2048, 16, 10000.0, torch.device("cpu"))
    scaled_base = 10000.0 * 2 ** (16 / 14)
    expected = torch.cos(torch.tensor(5.0) / scaled_base ** (2 / 16))
    assert torch.isclose(short_cos[0, 5, 0, 1], expected, atol=1e-5)


def test_soft_round_becomes_hard_rounding():
    # rows whose max is exactly 31 steps, values at least 0.2 steps from a rounding boundary
    steps = torch.randint(-30, 31, (4, 32)).double()
    steps[:, 0] = 31
    offsets = (torch.rand(4, 32, dtype=torch.float64) - 0.5) * 0.6
    offsets[:, 0] = 0
    scale = torch.rand(4, 1, dtype=torch.float64) + 0.01
    weight = (steps + offsets) * scale
    soft = train_gpt.soft_round_int6(weight, torch.tensor(100.0, dtype=torch.float64))
    assert torch.allclose(soft.double(), steps * scale, atol=1e-5)
    gentle = train_gpt.soft_round_int6(weight, torch.tensor(1.0, dtype=torch.float64))
    assert not torch.allclose(gentle.double(), steps * scale, atol=0.05 * float(scale.min()))


def test_late_qat_changes_only_the_small_projections_in_training():
    hp = tiny_hp()
    model = noisy_model(hp)
    tokens = torch.randint(0, hp.vocab_size, (2, 16))
    plain = model(tokens, tokens)
    model.set_late_qat(torch.tensor(16.0))
    assert not torch.equal(model(tokens, tokens), plain)
    model.eval()  # fake quantisation is a training-time device only
    assert torch.equal(model(tokens, tokens), plain)
