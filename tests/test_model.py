"""trainer.model: size, causality, XSA, BigramHash, RoPE, late QAT, depth recurrence, parallel
residuals, and that every parameter learns."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from trainer.data import make_sampler
from trainer.model import (BigramHash, GPT, ModelConfig, QATLinear, apply_rotary, enable_flash_attention_3, remove_self_value,
                           rotary_tables, soft_round_to_grid)
from trainer.optimizer import build_optimizers
from trainer.runtime import Runtime
from trainer.settings import Hyperparameters
from conftest import TOKENIZER_8192, distinct_hp, noisy_model, tiny_hp, tiny_model


@pytest.mark.parametrize("profile, count", [("pr1217", 27_041_372), ("pr1493", 35_944_536)])
def test_each_profile_has_its_record_parameter_count(profile, count):
    with torch.device("meta"):  # shapes only: no weights are made
        model = GPT(ModelConfig.from_settings(Hyperparameters.from_env({"PROFILE": profile})))
    assert sum(p.numel() for p in model.parameters()) == count


def test_loss_is_the_mean_of_the_token_losses():
    hp = tiny_hp()
    model = noisy_model(hp)
    tokens = torch.randint(0, hp.vocab_size, (3, 40))
    nll = model.token_nll(tokens[:, :-1], tokens[:, 1:])
    logits = model.logits(model.forward_hidden(tokens[:, :-1])).double()
    by_hand = torch.logsumexp(logits, -1) - logits.gather(-1, tokens[:, 1:, None])[..., 0]
    assert nll.shape == (3, 39) and torch.allclose(nll.double(), by_hand, atol=1e-4)
    assert model(tokens[:, :-1], tokens[:, 1:]).item() == pytest.approx(nll.mean().item(), rel=1e-6)


def test_model_is_causal():
    hp = tiny_hp()
    model = noisy_model(hp)
    tokens = torch.randint(0, hp.vocab_size, (1, 32))
    changed = tokens.clone()
    changed[0, 20] = (changed[0, 20] + 1) % hp.vocab_size
    before, after = model.forward_hidden(tokens), model.forward_hidden(changed)
    assert torch.equal(before[0, :20], after[0, :20])
    assert not torch.allclose(before[0, 20:], after[0, 20:])


def test_xsa_leaves_no_component_along_v():
    torch.manual_seed(0)
    y = torch.randn(2, 5, 8, 16, dtype=torch.float64)
    v = torch.randn(2, 5, 2, 16, dtype=torch.float64)
    out = remove_self_value(y, v)
    unit_v = v / v.norm(dim=-1, keepdim=True)
    for head in range(8):  # heads 0-3 share KV head 0, heads 4-7 KV head 1
        along = (out[:, :, head] * unit_v[:, :, head // 4]).sum(-1)
        assert along.abs().max() < 1e-12
    # what was removed is exactly y's projection on v: the orthogonal part is untouched
    projected = (y[:, :, 0] * unit_v[:, :, 0]).sum(-1, keepdim=True) * unit_v[:, :, 0]
    assert torch.allclose((y - out)[:, :, 0], projected)


def test_bigram_buckets_by_hand():
    bigram = BigramHash(2816, 8, 16)
    tokens = torch.tensor([[5, 7, 1023, 0], [1, 1, 1, 1]])
    expected = [[2815, (36313 * 7 ^ 27191 * 5) % 2815, (36313 * 1023 ^ 27191 * 7) % 2815, (0 ^ 27191 * 1023) % 2815],
                [2815] + [(36313 ^ 27191) % 2815] * 3]
    assert bigram.bucket_ids(tokens).tolist() == expected


def test_rotary_matches_a_complex_rotation_and_leaves_the_rest():
    x = torch.randn(1, 6, 2, 12, dtype=torch.float64)
    cos, sin = rotary_tables(6, 8, 10000.0, 1024, torch.device("cpu"))
    out = apply_rotary(x, cos.double(), sin.double())
    pairs = torch.complex(x[..., :4], x[..., 4:8])
    angles = torch.arange(6, dtype=torch.float64)[:, None] / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    rotated = pairs * torch.exp(-1j * angles)[None, :, None, :]
    assert torch.allclose(out[..., :4], rotated.real, atol=1e-6) and torch.allclose(out[..., 4:8], rotated.imag, atol=1e-6)
    assert torch.equal(out[..., 8:], x[..., 8:])


@pytest.mark.parametrize("train_seq_len, base", [(1024, 10000.0 * 2 ** (16 / 14)), (2048, 10000.0), (512, 10000.0 * 4 ** (16 / 14))])
def test_rotary_base_grows_past_the_training_length(train_seq_len, base):
    cos, _ = rotary_tables(2048, 16, 10000.0, train_seq_len, torch.device("cpu"))
    assert torch.isclose(cos[0, 5, 0, 1], torch.cos(torch.tensor(5.0) / base ** (2 / 16)), atol=1e-5)


@pytest.mark.parametrize("clip_range", [31, 15])
def test_soft_round_becomes_hard_rounding(clip_range):
    # rows whose max is exactly clip_range steps, values at least 0.2 steps from a rounding boundary
    steps = torch.randint(-clip_range + 1, clip_range, (4, 32)).double()
    steps[:, 0] = clip_range
    offsets = (torch.rand(4, 32, dtype=torch.float64) - 0.5) * 0.6
    offsets[:, 0] = 0
    scale = torch.rand(4, 1, dtype=torch.float64) + 0.04
    weight = (steps + offsets) * scale
    soft = soft_round_to_grid(weight, torch.tensor(100.0, dtype=torch.float64), clip_range)
    assert torch.allclose(soft.double(), steps * scale, atol=1e-5)
    gentle = soft_round_to_grid(weight, torch.tensor(1.0, dtype=torch.float64), clip_range)
    assert not torch.allclose(gentle.double(), steps * scale, atol=0.05 * float(scale.min()))


def test_late_qat_changes_only_the_small_projections_in_training():
    hp = tiny_hp()
    model = noisy_model(hp)
    tokens = torch.randint(0, hp.vocab_size, (2, 16))
    plain = model(tokens, tokens)
    assert {id(layer) for layer in model.qat_layers()} == {id(model.bigram.proj), id(model.value_embed.proj)}
    for layer in model.qat_layers():
        layer.qat_sharpness, layer.qat_clip_range = torch.tensor(16.0), 31
    assert not torch.equal(model(tokens, tokens), plain)
    model.eval()  # fake quantisation is a training-time device only
    assert torch.equal(model(tokens, tokens), plain)


@pytest.mark.parametrize("dims", [(112, 512), (16, 64)], ids=["reference_size", "tiny"])
def test_small_projections_start_orthogonal(dims):
    layer = QATLinear(*dims)
    weight = layer.weight.detach().double()
    assert torch.allclose(weight.T @ weight, torch.eye(dims[0], dtype=torch.float64), atol=1e-5)


def test_every_parameter_gets_a_gradient_and_moves(smoke_corpus):
    """Within a few steps on real tokens, no parameter is dead (a zero table behind a zero
    projection, say, would never receive a gradient)."""
    hp = tiny_hp(DATA_PATH=str(smoke_corpus), TRAIN_BATCH_TOKENS="1024")
    model, runtime = tiny_model(hp), Runtime()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizers = build_optimizers(hp, model, runtime)
    sampler = make_sampler(hp, runtime)
    reached: set[str] = set()
    for _ in range(3):
        optimizers.zero_grad()
        for inputs, targets in sampler.next_step(runtime):
            model(inputs, targets).backward()
        reached |= {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizers.step(hp.grad_clip_norm)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), initial[name])}
    names = {name for name, _ in model.named_parameters()}
    assert names - reached == set() and names - moved == set()


def test_the_record_1493_layer_order_loops_layers_3_to_5():
    config = ModelConfig.from_settings(Hyperparameters.from_env({"PROFILE": "pr1493"}))
    assert config.layer_order(looping=False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert config.layer_order(looping=True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert config.num_skips == 8


def plain_forward(model, tokens):
    """The loops, skips and parallel residuals written out plainly from the weights, in float64."""
    config = model.config
    encoder, decoder = config.layer_order(model.looping)
    x = torch.nn.functional.rms_norm(model.tok_emb(tokens).double(), (config.model_dim,))
    x0, skips = x, []
    rotary = tuple(t.double() for t in rotary_tables(tokens.size(1), config.rope_dims, config.rope_base,
                                                      config.rope_train_seq_len, tokens.device))
    for position, layer in enumerate(encoder + decoder):
        if position >= len(encoder) and position - len(encoder) < config.num_skips and skips:
            k = position - len(encoder)
            gate = torch.sigmoid(model.skip_gates[k].double())
            x = gate * x + (1 - gate) * model.skip_weights[k].double() * skips.pop()
        block = model.blocks[layer]
        weights = [w.double() for w in model.layer_weights(layer)]
        mix = block.resid_mix.double()
        x = mix[0] * x + mix[1] * x0
        scale = block.norm_scale
        attention = block.attn.double()(torch.nn.functional.rms_norm(x, (config.model_dim,)) * scale, rotary, *weights[:4], None)
        after = x + block.attn_scale.double() * attention
        mlp_input = x if layer >= config.parallel_residual_start >= 0 else after
        hidden = torch.nn.functional.leaky_relu(torch.nn.functional.rms_norm(mlp_input, (config.model_dim,)) * scale @ weights[4].T,
                                                config.negative_slope).square()
        x = after + block.mlp_scale.double() * (hidden @ weights[5].T)
        if position < len(encoder):
            skips.append(x)
    return torch.nn.functional.rms_norm(x, (config.model_dim,))


@pytest.mark.parametrize("looping", [False, True])
def test_loops_and_parallel_residuals_match_a_plain_version(looping):
    """6 layers looping 2..3 twice more, parallel from layer 4 (inside the decoder both ways)."""
    hp = tiny_hp(PROFILE="pr1493", NUM_LAYERS="6", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", XSA_LAST_N="6",
                 LOOP_START="2", LOOP_END="3", PARALLEL_RESIDUAL_START="4", BIGRAM_VOCAB_SIZE="0",
                 TOKENIZER_PATH=str(TOKENIZER_8192))
    model = noisy_model(hp).double()
    model.looping = looping
    tokens = torch.randint(0, hp.vocab_size, (2, 24))
    expected = plain_forward(model, tokens)
    assert torch.allclose(model.forward_hidden(tokens), expected, atol=1e-10)
    model.looping = not looping
    assert not torch.allclose(model.forward_hidden(tokens), expected, atol=1e-3)  # the loops do change the function


# An independent float64 version of the whole model, written from the module docstring's
# bank layout and each formula, on DISTINCT's shapes where no two settings coincide.
def rms(x):
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + torch.finfo(torch.float64).eps)


def rope_by_hand(x, rope_dims, base, train_len):
    """Pairs (j, j + rope_dims/2) of the first rope_dims dims turn by -t * base^(-2j/rope_dims)."""
    length = x.size(1)
    if length > train_len:
        base = base * (length / train_len) ** (rope_dims / (rope_dims - 2))
    half = rope_dims // 2
    angle = torch.arange(length, dtype=torch.float64)[:, None] * base ** (-2 * torch.arange(half, dtype=torch.float64) / rope_dims)
    turned = torch.complex(x[..., :half], x[..., half:rope_dims]) * torch.exp(-1j * angle)[None, :, None, :]
    return torch.cat((turned.real, turned.imag, x[..., rope_dims:]), -1)


def attention_by_hand(q, k, v):
    """Causal softmax attention, query head h reading KV head h // (H / KV)."""
    group = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / q.size(-1) ** 0.5
    length = q.size(1)
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def reference_forward(model, tokens, visits, encoder_length, record=None):
    """(final hidden states, logits, NLL) of tokens[:, 1:] from tokens[:, :-1]; `visits`: the
    layers in the order the forward runs them, the first `encoder_length` of them the encoder.
    `record`: a list to append, per visit, the inputs of its four linear maps to."""
    c, p = model.config, {name: value.detach().double() for name, value in model.named_parameters()}
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch, length = inputs.shape
    layers, heads, kv_heads, head_dim = c.num_layers, c.num_heads, c.num_kv_heads, c.model_dim // c.num_heads
    x = p["tok_emb.weight"][inputs]
    if c.bigram_vocab_size:
        ids = torch.full_like(inputs, c.bigram_vocab_size - 1)
        for t in range(1, length):
            ids[:, t] = ((36313 * inputs[:, t]) ^ (27191 * inputs[:, t - 1])) % (c.bigram_vocab_size - 1)
        x = x + p["bigram.table.weight"][ids] @ p["bigram.proj.weight"].T * p["bigram.scale"]
    x = rms(x)
    if c.smear_gate:
        g = torch.sigmoid(p["smear.gate"])
        x = torch.cat((x[:, :1] * (1 - g), (1 - g) * x[:, 1:] + g * x[:, :-1]), 1)
    x0, skips = x, []
    for position, layer in enumerate(visits):
        k = position - encoder_length
        if 0 <= k < len(p["skip_weights"]) and skips:
            g = torch.sigmoid(p["skip_gates"][k])
            x = g * x + (1 - g) * p["skip_weights"][k] * skips.pop()
        prefix = f"blocks.{layer}."
        x = p[prefix + "resid_mix"][0] * x + p[prefix + "resid_mix"][1] * x0
        normed = rms(x) / (layer + 1) ** 0.5
        q = (normed @ p["qo_bank"][layer].T).view(batch, length, heads, head_dim)
        key = (normed @ p["kv_bank"][layer].T).view(batch, length, kv_heads, head_dim)
        value = normed @ p["kv_bank"][layers + layer].T
        if layer in c.ve_layers:
            table = p["value_embed.table.weight"][inputs] @ p["value_embed.proj.weight"].T * p["value_embed.scale"]
            value = value + table * p[f"value_embed.layer_scales.{list(c.ve_layers).index(layer)}"]
        value = value.view(batch, length, kv_heads, head_dim)
        q = rope_by_hand(rms(q), c.rope_dims, c.rope_base, c.rope_train_seq_len) * p[prefix + "attn.q_gain"][:, None]
        key = rope_by_hand(rms(key), c.rope_dims, c.rope_base, c.rope_train_seq_len)
        y = attention_by_hand(q, key, value)
        if layer >= layers - c.xsa_last_n:
            unit = (value / value.norm(dim=-1, keepdim=True)).repeat_interleave(heads // kv_heads, 2)
            y = y - (y * unit).sum(-1, keepdim=True) * unit
        attended = x + p[prefix + "attn_scale"] * (y.reshape(batch, length, -1) @ p["qo_bank"][layers + layer].T)
        mlp_input = normed if 0 <= c.parallel_residual_start <= layer else rms(attended) / (layer + 1) ** 0.5
        hidden = F.leaky_relu(mlp_input @ p["mlp_up_bank"][layer].T, c.negative_slope).square()
        if record is not None:
            record.append((layer, {"qkv": normed, "out": y.reshape(batch, length, -1), "up": mlp_input, "down": hidden}))
        x = attended + p[prefix + "mlp_scale"] * (hidden @ p["mlp_down_bank"][layer].T)
        if position < encoder_length:
            skips.append(x)
    hidden = rms(x)
    logits = c.logit_softcap * torch.tanh(hidden @ p["tok_emb.weight"].T / c.logit_softcap)
    return hidden, logits, torch.logsumexp(logits, -1) - logits.gather(-1, targets[..., None])[..., 0]


LOOPED = dict(PROFILE="pr1493", NUM_LOOPS="1", LOOP_START="1", LOOP_END="2", PARALLEL_RESIDUAL_START="3",
              TOKENIZER_PATH=str(TOKENIZER_8192))


@pytest.mark.parametrize("settings, looping, visits, encoder_length", [
    ({}, False, [0, 1, 2, 3, 4], 2),
    (LOOPED, False, [0, 1, 2, 3, 4], 2),
    (LOOPED, True, [0, 1, 2, 1, 2, 3, 4], 3),
], ids=["pr1217", "pr1493_before_looping", "pr1493_looping"])
def test_the_model_matches_an_independent_version_where_no_settings_coincide(settings, looping, visits, encoder_length):
    model = noisy_model(distinct_hp(**settings)).double()
    with torch.no_grad():  # logits several times the soft cap, so the cap's formula matters
        model.tok_emb.weight.mul_(40)
    model.looping = looping
    tokens = torch.randint(0, model.config.vocab_size, (2, 25), generator=torch.Generator().manual_seed(3))
    hidden, logits, nll = reference_forward(model, tokens, visits, encoder_length)
    assert (hidden @ model.tok_emb.weight.T).abs().max() > 3 * model.config.logit_softcap
    # (the model's RoPE tables are float32: ~1e-8 from the float64 ones)
    assert torch.allclose(model.forward_hidden(tokens[:, :-1]), hidden, rtol=0, atol=1e-6)
    assert torch.allclose(model.logits(hidden), logits, rtol=0, atol=1e-12)
    # the loss is taken in float32
    assert torch.allclose(model.token_nll(tokens[:, :-1], tokens[:, 1:]).double(), nll, rtol=0, atol=2e-5)
    assert model(tokens[:, :-1], tokens[:, 1:]).item() == pytest.approx(nll.mean().item(), rel=1e-6)


def test_every_control_tensor_starts_at_its_stated_value():
    hp = distinct_hp()
    model = tiny_model(hp)
    for layer, block in enumerate(model.blocks):
        assert torch.equal(block.attn.q_gain, torch.full((6,), 3.5))
        assert torch.equal(block.resid_mix, torch.stack((torch.ones(48), torch.zeros(48))))
        assert torch.equal(block.attn_scale, torch.ones(48)) and torch.equal(block.mlp_scale, torch.ones(48))
        assert block.norm_scale == 1 / (layer + 1) ** 0.5 and block.attn.use_xsa == (layer >= 3)
        assert not block.parallel
    assert torch.equal(model.skip_weights, torch.ones(2, 48)) and torch.equal(model.skip_gates, torch.zeros(2, 48))
    assert model.bigram.scale.item() == pytest.approx(0.05) and not model.bigram.table.weight.any()
    assert model.value_embed.scale.item() == pytest.approx(0.1) and model.smear.gate.abs().sum() == 0
    assert [p.item() for p in model.value_embed.layer_scales] == [1.0, 1.0] and model.looping is False
    assert all(block.parallel for block in tiny_model(distinct_hp(PARALLEL_RESIDUAL_START="0")).blocks)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert model.value_embed.table.weight.std().item() == pytest.approx(0.01, rel=0.05)
    for bank in (model.qo_bank, model.kv_bank, model.mlp_up_bank, model.mlp_down_bank):
        assert bank.shape[0] == 2 * 5 or bank.shape[0] == 5
    assert not model.qo_bank[5:].any() and not model.mlp_down_bank.any()  # out-projections and MLP-down start at zero
    for matrix in (*model.qo_bank[:5], *model.kv_bank, *model.mlp_up_bank):
        rows, cols = matrix.shape
        product = matrix @ matrix.T if rows <= cols else matrix.T @ matrix
        assert torch.allclose(product, torch.eye(min(rows, cols)), atol=1e-5)


@pytest.mark.parametrize("settings, looping, visits, encoder_length", [
    ({}, False, [0, 1, 2, 3, 4], 2),
    (LOOPED, True, [0, 1, 2, 1, 2, 3, 4], 3),
], ids=["pr1217", "pr1493_looping"])
def test_gptq_capture_records_each_linear_maps_input_at_every_visit(settings, looping, visits, encoder_length):
    model = noisy_model(distinct_hp(**settings)).double()
    model.looping = looping
    tokens = torch.randint(0, model.config.vocab_size, (2, 25), generator=torch.Generator().manual_seed(4))
    expected = []
    reference_forward(model, tokens, visits, encoder_length, expected)
    records = model.capture_inputs(True)
    with torch.no_grad():
        model.forward_hidden(tokens[:, :-1])
    for layer, (attention, mlp) in enumerate(records):
        visited = [inputs for visit, inputs in expected if visit == layer]
        assert len(attention["qkv"]) == len(attention["out"]) == len(mlp["up"]) == len(mlp["down"]) == len(visited)
        for k, inputs in enumerate(visited):
            for key, captured in (("qkv", attention), ("out", attention), ("up", mlp), ("down", mlp)):
                assert torch.allclose(captured[key][k], inputs[key], rtol=0, atol=1e-6), (layer, key, k)
    assert model.capture_inputs(False) == [(None, None)] * 5
    assert all(block.attn.captured is None and block.mlp.captured is None for block in model.blocks)


def test_the_stored_config_is_the_function_without_the_init_fields():
    config = ModelConfig.from_settings(distinct_hp())
    fields = config.function_fields()
    assert "qk_gain_init" not in fields and "tied_embed_init_std" not in fields
    assert fields["ve_layers"] == [1, 3] and fields["mlp_hidden"] == 120 and fields["rope_dims"] == 4
    assert len(fields) == len(dataclasses.fields(ModelConfig)) - 2
    assert ModelConfig.from_settings(distinct_hp(ROPE_DIMS="0")).rope_dims == 8  # 0: the whole head
    assert type(ModelConfig.from_settings(distinct_hp(ROPE_DIMS="0")).rope_dims) is int
    assert ModelConfig.from_settings(distinct_hp(VE_ENABLED="0")).ve_layers == ()


def test_flash_attention_3_is_only_for_hopper_gpus():
    assert not enable_flash_attention_3(torch.device("cpu"))


@pytest.mark.parametrize("sharpness", [1.0, 4.0])
def test_soft_rounding_is_its_formula_and_stays_on_the_grid(sharpness):
    """floor(w/s) + sigmoid(k (frac - 1/2)), per-row s = max|w| / N floored at 1/N, then
    clamped to [-N, N] (the row's largest value would land above N otherwise)."""
    weight = torch.randn(6, 40) * torch.tensor([0.001, 0.02, 0.5, 1, 3, 8])[:, None]  # float32, as the function works
    weight[3] = weight[3].clamp(-1.9, 1.9)
    weight[3, 7] = 31 / 16  # a scale of exactly 1/16: this value lands on 31 + sigmoid(-k/2) before the clamp
    scale = (weight.abs().amax(1) / 31).clamp_min(1 / 31)[:, None]
    scaled = weight / scale
    expected = (scaled.floor() + torch.sigmoid(sharpness * (scaled - scaled.floor() - 0.5))).clamp(-31, 31) * scale
    soft = soft_round_to_grid(weight, torch.tensor(sharpness), 31)
    assert torch.allclose(soft, expected, rtol=1e-6, atol=0)
    assert soft[3, 7] == 31 / 16
