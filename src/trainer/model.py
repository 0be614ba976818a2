"""Model: the GPT and the small config that fixes its function.

Block weights live in four 3-D "banks" so Muon can orthogonalise a whole bank in one
batched call and shard it across ranks by its first axis:
  qo_bank   [2L, d, d]      q of layer i at i, attention out-projection at L + i
  kv_bank   [2L, kv, d]     k of layer i at i, v at L + i
  mlp_up_bank [L, h, d], mlp_down_bank [L, d, h]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.settings import Hyperparameters

FLASH_ATTENTION_3: Callable | None = None  # FlashAttention-3's function, once enabled


def enable_flash_attention_3(device: torch.device) -> bool:
    """Use FlashAttention-3 when its Python interface is installed and the GPU is a Hopper."""
    global FLASH_ATTENTION_3
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        try:
            from flash_attn_interface import flash_attn_func
        except ImportError:
            return False
        FLASH_ATTENTION_3 = flash_attn_func
    return FLASH_ATTENTION_3 is not None


@dataclass(frozen=True)
class ModelConfig:
    """What fixes the model's function: derived once from the settings, stored in the
    artifact and compared on load (the two init fields excepted)."""
    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    num_kv_heads: int
    mlp_hidden: int
    rope_dims: int
    rope_base: float
    xsa_last_n: int
    bigram_vocab_size: int
    bigram_dim: int
    ve_dim: int
    ve_layers: tuple[int, ...]
    smear_gate: bool
    num_loops: int
    loop_start: int
    loop_end: int
    parallel_residual_start: int
    rope_train_seq_len: int
    logit_softcap: float
    negative_slope: float
    qk_gain_init: float
    tied_embed_init_std: float

    INIT_ONLY = ("qk_gain_init", "tied_embed_init_std")

    @classmethod
    def from_settings(cls, hp: Hyperparameters) -> ModelConfig:
        same_name = {spec.name: getattr(hp, spec.name) for spec in fields(cls) if hasattr(hp, spec.name)}
        return cls(**{**same_name, "mlp_hidden": int(hp.mlp_mult * hp.model_dim), "rope_dims": hp.rope_dims or hp.model_dim // hp.num_heads,
                      "ve_layers": tuple(hp.value_embedding_layers)})

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_order(self, looping: bool) -> tuple[list[int], list[int]]:
        """(encoder, decoder) physical layers in the order the forward visits them. Looping
        repeats layers LOOP_START..LOOP_END NUM_LOOPS more times, and the visits are split in
        half again (the PR #1493 record's 11 layers: [0,1,2,3,4,5,3,4] and [5,3,4,5,...,10])."""
        layers = list(range(self.num_layers))
        if looping and self.num_loops > 0:
            segment = layers[self.loop_start : self.loop_end + 1]
            layers = layers[: self.loop_start] + segment * (self.num_loops + 1) + layers[self.loop_end + 1 :]
        half = self.num_layers // 2 if not looping or self.num_loops == 0 else len(layers) // 2
        return layers[:half], layers[half:]

    @property
    def num_skips(self) -> int:
        """U-Net skip weights: as many as the longer (looped) order pairs up."""
        encoder, decoder = self.layer_order(looping=True)
        return min(len(encoder), len(decoder))

    def function_fields(self) -> dict[str, Any]:
        """The fields a stored model must match (lists where JSON turns tuples into lists)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items() if key not in self.INIT_ONLY}

def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal GQA attention on [B, T, heads, D] tensors; returns [B, T, H, D]."""
    if FLASH_ATTENTION_3 is not None and q.is_cuda and q.dtype == torch.bfloat16:
        out = FLASH_ATTENTION_3(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)

def rotary_tables(seq_len: int, rope_dims: int, base: float, train_seq_len: int,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin for partial RoPE, shaped [1, T, 1, rope_dims/2].

    Sequences longer than ROPE_TRAIN_SEQ_LEN grow the base by (L/train)^(rd/(rd-2))
    (NTK-style scaling). The PR #1217 record believed it trained at 1024 and so scales at
    its 2048; the PR #1493 record uses its real 2048 and never scales.
    """
    if seq_len > train_seq_len:
        base = base * (seq_len / train_seq_len) ** (rope_dims / (rope_dims - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first rope_dims dims of each head (pairs i and i + rope_dims/2)."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)

def remove_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: drop from each head's output its component along its own unit value vector."""
    batch, seq, heads, dim = y.shape
    kv_heads = v.size(2)
    grouped = y.reshape(batch, seq, kv_heads, heads // kv_heads, dim)
    unit_v = F.normalize(v, dim=-1).unsqueeze(3)
    grouped = grouped - (grouped * unit_v).sum(-1, keepdim=True) * unit_v
    return grouped.reshape(batch, seq, heads, dim)

def soft_round_to_grid(weight: Tensor, sharpness: Tensor, clip_range: int) -> Tensor:
    """Late-QAT fake quantisation: the per-row [-clip_range, clip_range] grid GPTQ uses, with
    a differentiable rounding.

    floor(w/s) + sigmoid(sharpness * (frac - 0.5)); sharpness 1 is nearly linear and 16
    nearly a hard round.
    """
    w32 = weight.float()
    scale = (w32.abs().amax(dim=1) / clip_range).clamp_min(1.0 / clip_range)[:, None]
    scaled = w32 / scale
    floor = scaled.floor()
    rounded = floor + torch.sigmoid(sharpness * (scaled - floor - 0.5))
    return rounded.clamp(-clip_range, clip_range) * scale

class QATLinear(nn.Module):
    """A bias-free linear layer that late QAT can switch to fake-quantised weights.

    Initialised orthogonal: the reference declares these projections zero, but its
    init pass then makes every linear layer with both sides >= 64 orthogonal (at its
    sizes, these two), and a zero projection behind a zero table never gets a gradient.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(out_features, in_features)))
        self.qat_sharpness: Tensor | None = None  # set by LateQAT, with the grid's clip range
        self.qat_clip_range = 0

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.training and self.qat_sharpness is not None:  # this order: eval mode guards on nothing more
            weight = soft_round_to_grid(weight, self.qat_sharpness, self.qat_clip_range)
        return F.linear(x, weight.to(x.dtype))

class BigramHash(nn.Module):
    """A hashed embedding of (previous token, token) pairs, projected to the width."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.table = nn.Embedding(buckets, dim)
        nn.init.zeros_(self.table.weight)
        self.proj = QATLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket_ids(self, tokens: Tensor) -> Tensor:
        """(36313*x_t XOR 27191*x_{t-1}) mod (buckets-1); position 0 gets the last bucket."""
        t = tokens.to(torch.int64)
        mixed = torch.bitwise_xor(36313 * t[..., 1:], 27191 * t[..., :-1]) % (self.buckets - 1)
        first = torch.full_like(t[..., :1], self.buckets - 1)
        return torch.cat((first, mixed), dim=-1)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.table(self.bucket_ids(tokens))) * self.scale

class ValueEmbedding(nn.Module):
    """One token table added to the attention values of a few layers, each with its own scalar."""

    def __init__(self, vocab_size: int, dim: int, kv_dim: int, num_layers: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.table.weight, std=0.01)
        self.proj = QATLinear(dim, kv_dim)
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.layer_scales = nn.ParameterList([nn.Parameter(torch.ones(1)) for _ in range(num_layers)])

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.table(tokens)) * self.scale

class SmearGate(nn.Module):
    """x_t <- (1-g) x_t + g x_{t-1}, with g = sigmoid(per-channel gate)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate).to(x.dtype)
        previous = F.pad(x[:, :-1], (0, 0, 1, 0))
        return torch.lerp(x, previous, g)

class Attention(nn.Module):
    def __init__(self, config: ModelConfig, use_xsa: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_gain = nn.Parameter(torch.full((config.num_heads,), config.qk_gain_init))
        self.use_xsa = use_xsa
        self.captured: dict[str, list[Tensor]] | None = None  # GPTQ calibration inputs when set (a looped layer: several)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], q_w: Tensor, k_w: Tensor, v_w: Tensor,
                out_w: Tensor, value_embed: Tensor | None) -> Tensor:
        batch, seq, width = x.shape
        if self.captured is not None:
            self.captured.setdefault("qkv", []).append(x.detach())
        q = F.linear(x, q_w.to(x.dtype)).reshape(batch, seq, self.num_heads, self.head_dim)
        k = F.linear(x, k_w.to(x.dtype)).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v = F.linear(x, v_w.to(x.dtype))
        if value_embed is not None:
            v = v + value_embed.to(v.dtype)
        v = v.reshape(batch, seq, self.num_kv_heads, self.head_dim)
        q = apply_rotary(F.rms_norm(q, (self.head_dim,)), *rotary)
        k = apply_rotary(F.rms_norm(k, (self.head_dim,)), *rotary)
        q = q * self.q_gain.to(q.dtype)[:, None]
        y = causal_attention(q.to(v.dtype), k.to(v.dtype), v)
        if self.use_xsa:
            y = remove_self_value(y, v)
        y = y.reshape(batch, seq, width)
        if self.captured is not None:
            self.captured.setdefault("out", []).append(y.detach())
        return F.linear(y, out_w.to(y.dtype))

class MLP(nn.Module):
    def __init__(self, negative_slope: float):
        super().__init__()
        self.negative_slope = negative_slope
        self.captured: dict[str, list[Tensor]] | None = None

    def forward(self, x: Tensor, up_w: Tensor, down_w: Tensor) -> Tensor:
        if self.captured is not None:
            self.captured.setdefault("up", []).append(x.detach())
        hidden = F.leaky_relu(F.linear(x, up_w.to(x.dtype)), self.negative_slope).square()
        if self.captured is not None:
            self.captured.setdefault("down", []).append(hidden.detach())
        return F.linear(hidden, down_w.to(hidden.dtype))

class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        dim = config.model_dim
        self.attn = Attention(config, use_xsa=layer >= config.num_layers - config.xsa_last_n)
        self.mlp = MLP(config.negative_slope)
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.norm_scale = 1.0 / math.sqrt(layer + 1)  # deeper layers see smaller normed inputs
        self.parallel = 0 <= config.parallel_residual_start <= layer  # GPT-J style: attention and MLP read one input

    def forward(self, x: Tensor, x0: Tensor, rotary: tuple[Tensor, Tensor], weights: tuple[Tensor, ...],
                value_embed: Tensor | None) -> Tensor:
        q_w, k_w, v_w, out_w, up_w, down_w = weights
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        normed = F.rms_norm(x, (x.size(-1),)) * self.norm_scale
        attended = x + self.attn_scale.to(x.dtype) * self.attn(normed, rotary, q_w, k_w, v_w, out_w, value_embed)
        if not self.parallel:
            normed = F.rms_norm(attended, (x.size(-1),)) * self.norm_scale
        return attended + self.mlp_scale.to(x.dtype) * self.mlp(normed, up_w, down_w)

class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dim, layers = config.model_dim, config.num_layers
        self.tok_emb = nn.Embedding(config.vocab_size, dim)
        nn.init.normal_(self.tok_emb.weight, std=config.tied_embed_init_std)
        self.bigram = BigramHash(config.bigram_vocab_size, config.bigram_dim, dim) if config.bigram_vocab_size else None
        self.smear = SmearGate(dim) if config.smear_gate else None
        self.ve_layers = list(config.ve_layers)
        self.value_embed = ValueEmbedding(config.vocab_size, config.ve_dim, config.kv_dim, len(self.ve_layers)) if self.ve_layers else None
        self.skip_weights = nn.Parameter(torch.ones(config.num_skips, dim))
        self.skip_gates = nn.Parameter(torch.zeros(config.num_skips, dim))
        self.looping = False  # switched on during training (ENABLE_LOOPING_AT) and for every evaluation after it
        self.qo_bank = nn.Parameter(torch.zeros(2 * layers, dim, dim))
        self.kv_bank = nn.Parameter(torch.zeros(2 * layers, config.kv_dim, dim))
        self.mlp_up_bank = nn.Parameter(torch.zeros(layers, config.mlp_hidden, dim))
        self.mlp_down_bank = nn.Parameter(torch.zeros(layers, dim, config.mlp_hidden))
        for i in range(layers):  # out-projections and MLP-down stay zero
            for matrix in (self.qo_bank[i], self.kv_bank[i], self.kv_bank[layers + i], self.mlp_up_bank[i]):
                nn.init.orthogonal_(matrix.data)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(layers))

    def layer_weights(self, i: int) -> tuple[Tensor, ...]:
        n = self.config.num_layers
        return (self.qo_bank[i], self.kv_bank[i], self.kv_bank[n + i], self.qo_bank[n + i],
                self.mlp_up_bank[i], self.mlp_down_bank[i])

    def forward_hidden(self, input_ids: Tensor) -> Tensor:
        """Final normalised hidden states [B, T, d]."""
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids)
        x = F.rms_norm(x, (x.size(-1),))
        x = x0 = self.smear(x) if self.smear is not None else x
        config = self.config
        rotary = rotary_tables(input_ids.size(1), config.rope_dims, config.rope_base, config.rope_train_seq_len, input_ids.device)
        value_base = self.value_embed(input_ids) if self.value_embed is not None else None
        encoder, decoder = config.layer_order(self.looping)
        skips: list[Tensor] = []
        for position, i in enumerate(encoder + decoder):
            decoder_index = position - len(encoder)
            if 0 <= decoder_index < config.num_skips and skips:
                # U-Net skip: the most recent encoder output, gated in by lerp.
                gate = torch.sigmoid(self.skip_gates[decoder_index]).to(x.dtype)
                x = torch.lerp(self.skip_weights[decoder_index].to(x.dtype) * skips.pop(), x, gate)
            value_embed = None
            if i in self.ve_layers:
                value_embed = value_base * self.value_embed.layer_scales[self.ve_layers.index(i)]
            x = self.blocks[i](x, x0, rotary, self.layer_weights(i), value_embed)
            if decoder_index < 0:
                skips.append(x)
        return F.rms_norm(x, (x.size(-1),))

    def logits(self, hidden: Tensor) -> Tensor:
        """Tied output head with the tanh soft cap."""
        raw = F.linear(hidden, self.tok_emb.weight.to(hidden.dtype))
        return self.config.logit_softcap * torch.tanh(raw / self.config.logit_softcap)

    def token_nll(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Cross-entropy of every position in nats, [B, T], in float32."""
        logits = self.logits(self.forward_hidden(input_ids)).float()
        return F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction="none").view_as(target_ids)

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean cross-entropy in nats: the training loss."""
        return self.token_nll(input_ids, target_ids).mean()

    def qat_layers(self) -> list[QATLinear]:
        return [module for module in self.modules() if isinstance(module, QATLinear)]

    def capture_inputs(self, enabled: bool) -> list[tuple[dict[str, list[Tensor]], dict[str, list[Tensor]]]]:
        """Make every block record its linear-layer inputs (for GPTQ); returns the records."""
        records = []
        for block in self.blocks:
            block.attn.captured = {} if enabled else None
            block.mlp.captured = {} if enabled else None
            records.append((block.attn.captured, block.mlp.captured))
        return records

