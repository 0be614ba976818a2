"""Draft of train_gpt.py's EVALUATION section, written to be pasted there.

Until then it imports what it needs from train_gpt; the paste needs only
`from contextlib import contextmanager` and `Iterator` added to train_gpt's imports.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import sentencepiece
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train_gpt import GPT, Hyperparameters, Runtime, compile_if_enabled

# -----------------------------------------------------------------------------
# EVALUATION
# -----------------------------------------------------------------------------
# The score is bits per byte: the NLL of every scored token in nats, / ln 2, / the
# UTF-8 bytes of the text those tokens stand for, summed in float64 over all ranks.
# "Ordinal" o is the prediction of val_tokens[o+1] from val_tokens[..o]. Whatever
# adapts during evaluation (a SLOT delta, TTT weights) may only have learned from
# targets of ordinals that were already scored.

@dataclass
class TokenBytes:
    """Per-piece byte counts read from the SentencePiece model, indexed by token id."""
    base_bytes: Tensor  # int16: UTF-8 bytes of the piece without its leading "▁"; byte pieces 1
    has_leading_space: Tensor  # bool: the piece starts with "▁": one more byte, unless it follows a boundary
    is_boundary: Tensor  # bool: control, unknown and unused pieces: no bytes, and no space after them

def build_token_bytes(tokenizer: sentencepiece.SentencePieceProcessor, vocab_size: int,
                      device: torch.device) -> TokenBytes:
    # ids past the tokenizer's vocabulary never occur in real text: boundaries of 0 bytes
    size = max(vocab_size, tokenizer.vocab_size())
    base_bytes, has_leading_space, is_boundary = [0] * size, [False] * size, [True] * size
    for token_id in range(tokenizer.vocab_size()):
        if tokenizer.is_control(token_id) or tokenizer.is_unknown(token_id) or tokenizer.is_unused(token_id):
            continue
        is_boundary[token_id] = False
        if tokenizer.is_byte(token_id):  # "<0xNN>" stands for one raw byte of a character
            base_bytes[token_id] = 1
            continue
        piece = tokenizer.id_to_piece(token_id)
        has_leading_space[token_id] = piece.startswith("\u2581")
        base_bytes[token_id] = len(piece.removeprefix("\u2581").encode("utf-8"))
    return TokenBytes(torch.tensor(base_bytes, dtype=torch.int16, device=device),
                      torch.tensor(has_leading_space, dtype=torch.bool, device=device),
                      torch.tensor(is_boundary, dtype=torch.bool, device=device))

def count_bytes(token_bytes: TokenBytes, previous_ids: Tensor, target_ids: Tensor) -> Tensor:
    """UTF-8 bytes each target adds to the text, as float64 (the shape of target_ids)."""
    space = token_bytes.has_leading_space[target_ids] & ~token_bytes.is_boundary[previous_ids]
    return token_bytes.base_bytes[target_ids].double() + space.double()

@dataclass
class EvalResult:
    loss: float  # mean NLL, nats per token
    bpb: float
    tokens: float
    bytes: float
    seconds: float

class ScoreTotals:
    """This rank's float64 sums of NLL, tokens and bytes, kept on the device so no batch
    waits for the host, and the evaluation's clock, started on creation."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.sums = torch.zeros(3, dtype=torch.float64, device=runtime.device)
        runtime.synchronize()
        self.started = time.perf_counter()

    def add(self, nll: Tensor, previous_ids: Tensor, target_ids: Tensor, token_bytes: TokenBytes) -> None:
        self.sums[0] += nll.double().sum()
        self.sums[1] += nll.numel()
        self.sums[2] += count_bytes(token_bytes, previous_ids, target_ids).sum()

    def global_sums(self) -> tuple[float, float, float]:
        nll, tokens, byte_count = self.runtime.all_reduce_sum(self.sums.clone()).tolist()
        return nll, tokens, byte_count

    def result(self) -> EvalResult:
        nll, tokens, byte_count = self.global_sums()
        self.runtime.synchronize()
        return EvalResult(loss=nll / tokens, bpb=bits_per_byte(nll, byte_count), tokens=tokens,
                          bytes=byte_count, seconds=time.perf_counter() - self.started)

def bits_per_byte(nll: float, byte_count: float) -> float:
    return nll / math.log(2) / byte_count

def rank_share(items: Sequence, runtime: Runtime) -> Sequence:
    """This rank's contiguous 1/world_size of the items (shares differ by at most one)."""
    count = len(items)
    return items[count * runtime.rank // runtime.world_size : count * (runtime.rank + 1) // runtime.world_size]

def gather_ordinal_nll(ordinal_nll: Tensor, runtime: Runtime) -> Tensor:
    """Every ordinal's NLL on the CPU: each ordinal is scored on exactly one rank (the others
    hold 0 there), so a sum over ranks gathers them."""
    return runtime.all_reduce_sum(ordinal_nll).cpu()

@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() for the block, then every module's own train/eval flag back."""
    modes = [module.training for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in zip(model.modules(), modes):
            module.training = training

@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad for the block (SLOT's backward then reaches only its
    delta, not the output head), then every flag back as it was."""
    flags = [param.requires_grad for param in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)

@torch.inference_mode()
def evaluate_standard(model: nn.Module, val_tokens: Tensor, seq_len: int, batch_tokens: int,
                      token_bytes: TokenBytes, runtime: Runtime) -> EvalResult:
    """Non-overlapping seq_len sequences, each token scored with only its own sequence before it.

    `model(ids)` must return logits (GPT.forward does without targets), so a compiled
    model works as well.
    """
    num_sequences = (val_tokens.numel() - 1) // seq_len
    starts = rank_share(range(0, num_sequences * seq_len, seq_len), runtime)
    batch_seqs = max(1, batch_tokens // (seq_len * runtime.world_size))
    totals = ScoreTotals(runtime)
    with eval_mode(model):
        for first in range(0, len(starts), batch_seqs):
            batch_starts = starts[first : first + batch_seqs]
            # consecutive sequences: one slice, viewed as rows, is both inputs and targets
            span = val_tokens[batch_starts[0] : batch_starts[-1] + seq_len + 1].to(runtime.device)
            inputs, targets = span[:-1].view(-1, seq_len), span[1:].view(-1, seq_len)
            with runtime.autocast():
                logits = model(inputs)
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            totals.add(nll, inputs.flatten(), targets.flatten(), token_bytes)
    return totals.result()

Window = tuple[int, int, int]  # (start, end, first_scored): inputs val_tokens[start:end]; scores ordinals [first_scored, end)

def sliding_windows(num_ordinals: int, seq_len: int, stride: int) -> list[Window]:
    """Windows that score every ordinal exactly once, each with all the context the data allows.

    Window k ends at min(seq_len + k*stride, N) and is seq_len long (all N when N < seq_len).
    It scores the ordinals after the previous window's end: all of the first window, then
    up to `stride` per window, each seeing at least seq_len - stride ordinals before it.
    """
    windows: list[Window] = []
    scored_to = 0
    while scored_to < num_ordinals:
        end = min(seq_len + len(windows) * stride, num_ordinals)
        windows.append((max(end - seq_len, 0), end, scored_to))
        scored_to = end
    return windows

@dataclass
class WindowBatch:
    """Equal-length windows as [B, T] tensors on the device."""
    inputs: Tensor
    targets: Tensor
    ordinals: Tensor  # the ordinal each position predicts
    first_scored: Tensor  # [B, 1]

    @property
    def scored(self) -> Tensor:
        """[B, T] bool: the positions each window scores."""
        return self.ordinals >= self.first_scored

def window_batch(tokens: Tensor, windows: Sequence[Window]) -> WindowBatch:
    """Gathers the windows from `tokens` (already on the evaluation device)."""
    device = tokens.device
    starts = torch.tensor([start for start, _, _ in windows], device=device)
    length = windows[0][1] - windows[0][0]
    positions = starts[:, None] + torch.arange(length + 1, device=device)
    first_scored = torch.tensor([first for _, _, first in windows], device=device)[:, None]
    return WindowBatch(tokens[positions[:, :-1]], tokens[positions[:, 1:]], positions[:, :-1], first_scored)

def slot_context_weights(batch: WindowBatch, mode: str) -> Tensor:
    """[B, T] loss weights of the positions a SLOT delta learns from; zero elsewhere.

    window: each window's own context (ordinals before its first scored one), a mean per
        window, so the summed loss gives each window's delta only its own gradient.
    batch_causal: in every window, only ordinals scored before this batch; one mean.
    shared: every window's own context, one mean. NOT causal: a later window's context
        holds ordinals that earlier windows of the same batch score with the same delta.
    """
    limit = batch.first_scored.min() if mode == "batch_causal" else batch.first_scored
    weights = (batch.ordinals < limit).float()
    if mode == "window":
        return weights / weights.sum(dim=1, keepdim=True).clamp_min(1)
    return weights / weights.sum().clamp_min(1)

def slot_context_loss(model: GPT, hidden: Tensor, delta: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """One SLOT step's objective: weighted cross-entropy of logits(hidden + delta).

    Weights, not a boolean selection, keep every shape static for torch.compile; a
    position of weight 0 adds exactly 0 to the loss and to delta's gradient.
    """
    logits = model.logits(hidden + delta)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (nll * weights.flatten()).sum()

class WindowScorer:
    """Scores batches of sliding windows, optionally with context-only SLOT.

    The hidden states, the logits and the SLOT objective are compiled (dynamic=False)
    where COMPILE allows it (CUDA by default); the last, smaller batch compiles once more.
    """

    def __init__(self, model: GPT, hp: Hyperparameters, runtime: Runtime):
        self.model, self.hp, self.runtime = model, hp, runtime
        self.hidden = compile_if_enabled(hp, model.forward_hidden, runtime)
        self.logits = compile_if_enabled(hp, model.logits, runtime)
        self.slot_loss = compile_if_enabled(hp, slot_context_loss, runtime)

    def nll(self, batch: WindowBatch, slot: bool) -> Tensor:
        """NLL of the scored positions, flat in (window, position) order. Call under no_grad."""
        with self.runtime.autocast():
            hidden = self.hidden(batch.inputs).float()
        if slot:
            hidden = hidden + self.fit_slot_delta(hidden, batch)
        with self.runtime.autocast():
            logits = self.logits(hidden)
        scored = batch.scored
        return F.cross_entropy(logits.float()[scored], batch.targets[scored], reduction="none")

    @torch.enable_grad()
    def fit_slot_delta(self, hidden: Tensor, batch: WindowBatch) -> Tensor:
        """An additive vector on the frozen hidden states, fitted by AdamW to the context.

        [B, 1, d] (one per window) in `window` mode, [1, 1, d] otherwise. A window without
        context (the very first) gets exactly zero gradient, so its delta stays exactly 0.
        """
        hp = self.hp
        rows = hidden.size(0) if hp.slot_mode == "window" else 1
        delta = torch.zeros(rows, 1, hidden.size(-1), device=hidden.device, requires_grad=True)
        optimizer = torch.optim.AdamW([delta], lr=hp.slot_lr, weight_decay=1e-8, eps=1e-5)
        weights = slot_context_weights(batch, hp.slot_mode)
        for _ in range(hp.slot_steps):
            optimizer.zero_grad(set_to_none=True)
            with self.runtime.autocast():
                loss = self.slot_loss(self.model, hidden, delta, batch.targets, weights)
            loss.backward()
            optimizer.step()
        return delta.detach()

def score_windows(scorer: WindowScorer, tokens: Tensor, windows: Sequence[Window], batch_seqs: int, slot: bool,
                  totals: ScoreTotals, token_bytes: TokenBytes, ordinal_nll: Tensor | None) -> None:
    """Adds the windows' scores to the totals and, when given, each ordinal's NLL to ordinal_nll."""
    for first in range(0, len(windows), batch_seqs):
        batch = window_batch(tokens, windows[first : first + batch_seqs])
        nll = scorer.nll(batch, slot)
        scored = batch.scored
        totals.add(nll, batch.inputs[scored], batch.targets[scored], token_bytes)
        if ordinal_nll is not None:
            ordinal_nll[batch.ordinals[scored]] = nll.double()

def evaluate_sliding(model: GPT, val_tokens: Tensor, hp: Hyperparameters, token_bytes: TokenBytes,
                     runtime: Runtime, slot: bool, return_nll: bool = False) -> EvalResult | tuple[EvalResult, Tensor]:
    """Sliding windows of EVAL_SEQ_LEN every EVAL_STRIDE, optionally with context-only SLOT.

    With return_nll, also the float64 NLL of every ordinal (on the CPU, gathered from all ranks).
    Runs under no_grad rather than inference_mode: SLOT differentiates through the frozen
    hidden states.
    """
    if slot and hp.slot_mode == "shared":
        runtime.log("slot:mode shared is NOT causal: one delta per batch is fitted on every window's context, "
                    "which holds earlier windows' scored tokens; not a legal score")
    num_ordinals = val_tokens.numel() - 1
    windows = rank_share(sliding_windows(num_ordinals, hp.eval_seq_len, hp.eval_stride), runtime)
    totals = ScoreTotals(runtime)
    ordinal_nll = torch.zeros(num_ordinals, dtype=torch.float64, device=runtime.device) if return_nll else None
    with eval_mode(model), frozen(model), torch.no_grad():
        scorer = WindowScorer(model, hp, runtime)
        score_windows(scorer, val_tokens.to(runtime.device), windows, hp.eval_batch_seqs, slot, totals, token_bytes,
                      ordinal_nll)
    result = totals.result()
    return (result, gather_ordinal_nll(ordinal_nll, runtime)) if return_nll else result

def ttt_parameters(model: GPT, freeze_blocks: int) -> list[nn.Parameter]:
    """Freezes the first freeze_blocks blocks and returns every other parameter. The weight
    banks belong to the GPT, not to blocks.N, so they stay trainable (as in the reference)."""
    frozen_prefixes = tuple(f"blocks.{i}." for i in range(freeze_blocks))
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(frozen_prefixes))
        if param.requires_grad:
            trainable.append(param)
    return trainable

def windows_by_chunk(windows: list[Window], num_ordinals: int, chunk_tokens: int) -> list[list[Window]]:
    """Each window goes to the chunk holding its first scored ordinal."""
    chunks: list[list[Window]] = [[] for _ in range(math.ceil(num_ordinals / chunk_tokens))]
    for window in windows:
        chunks[window[2] // chunk_tokens].append(window)
    return chunks

def sum_gradients_across_ranks(params: list[nn.Parameter], runtime: Runtime) -> None:
    """One all-reduce over all gradients at once (one per parameter costs a launch each)."""
    if not runtime.distributed:
        return
    flat = runtime.all_reduce_sum(torch.cat([param.grad.flatten() for param in params]))
    for param, grad in zip(params, flat.split([param.numel() for param in params])):
        param.grad.copy_(grad.view_as(param))

def train_on_chunk(training_model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                   tokens: Tensor, chunk_start: int, chunk_end: int, hp: Hyperparameters, runtime: Runtime) -> None:
    """TTT_EPOCHS of SGD on the chunk's whole sequences, whose targets are all scored already.

    A step takes the next TTT_BATCH_SEQS sequences and splits them across the ranks, so
    every rank runs the same steps and the result does not depend on the world size. Each
    rank's mean loss is weighted by its part of the step, so the summed gradient is the
    mean over the step's sequences (sum / world_size when the parts are equal).
    """
    length = hp.eval_seq_len
    starts = range(chunk_start, chunk_end - length + 1, length)
    for _ in range(hp.ttt_epochs):
        for first in range(0, len(starts), hp.ttt_batch_seqs):
            step = starts[first : first + hp.ttt_batch_seqs]
            mine = rank_share(step, runtime)
            optimizer.zero_grad(set_to_none=False)  # a rank without sequences still reduces zeros
            if len(mine):
                rows = torch.stack([tokens[start : start + length + 1] for start in mine])
                with runtime.autocast():
                    loss = training_model(rows[:, :-1], rows[:, 1:])
                (loss * len(mine) / len(step)).backward()
            sum_gradients_across_ranks(params, runtime)
            torch.nn.utils.clip_grad_norm_(params, hp.ttt_grad_clip)
            optimizer.step()

def evaluate_ttt(model: GPT, val_tokens: Tensor, hp: Hyperparameters, token_bytes: TokenBytes,
                 runtime: Runtime, return_nll: bool = False) -> EvalResult | tuple[EvalResult, Tensor]:
    """Score-first test-time training, on a copy (the caller's model is left as it was).

    The ordinals are cut into chunks of TTT_CHUNK_TOKENS; for each chunk, its windows are
    scored (plain sliding, no SLOT), then (all but the last chunk) the copy trains on the
    chunk's tokens. A score therefore never depends on a target at or after its ordinal.
    With return_nll, also the float64 NLL of every ordinal, as evaluate_sliding.
    """
    num_ordinals = val_tokens.numel() - 1
    totals = ScoreTotals(runtime)
    ordinal_nll = torch.zeros(num_ordinals, dtype=torch.float64, device=runtime.device) if return_nll else None
    adapted = copy.deepcopy(model)
    params = ttt_parameters(adapted, hp.ttt_freeze_blocks)
    optimizer = torch.optim.SGD(params, lr=hp.ttt_lr, momentum=hp.ttt_momentum)
    for param in params:  # zeroed in place each step, so every rank always has a gradient to reduce
        param.grad = torch.zeros_like(param)
    scorer = WindowScorer(adapted, hp, runtime)
    training_model = compile_if_enabled(hp, adapted, runtime)
    tokens = val_tokens.to(runtime.device)
    windows = sliding_windows(num_ordinals, hp.eval_seq_len, hp.eval_stride)
    chunks = windows_by_chunk(windows, num_ordinals, hp.ttt_chunk_tokens)
    runtime.log(f"ttt_sliding:start chunks={len(chunks)} chunk_tokens={hp.ttt_chunk_tokens} total_windows={len(windows)} "
                f"stride={hp.eval_stride} ttt_lr={hp.ttt_lr} ttt_epochs={hp.ttt_epochs} freeze_blocks={hp.ttt_freeze_blocks}")
    unfrozen = sum(param.numel() for param in params)
    runtime.log(f"ttt_sliding:params unfrozen={unfrozen} frozen={sum(param.numel() for param in adapted.parameters()) - unfrozen}")
    for index, chunk_windows in enumerate(chunks):
        adapted.eval()
        with torch.no_grad():
            score_windows(scorer, tokens, rank_share(chunk_windows, runtime), hp.eval_batch_seqs, False, totals, token_bytes,
                          ordinal_nll)
        if index < len(chunks) - 1:
            for group in optimizer.param_groups:  # cosine from TTT_LR down to 0 at the last chunk
                group["lr"] = hp.ttt_lr * 0.5 * (1 + math.cos(math.pi * index / (len(chunks) - 1)))
            adapted.train()
            chunk_start = index * hp.ttt_chunk_tokens
            train_on_chunk(training_model, params, optimizer, tokens, chunk_start,
                           min(chunk_start + hp.ttt_chunk_tokens, num_ordinals), hp, runtime)
        if index % 10 == 0 or index == len(chunks) - 1:
            nll, _, byte_count = totals.global_sums()
            runtime.log(f"  ttt_chunk [{index + 1}/{len(chunks)}] bpb={bits_per_byte(nll, byte_count):.6f} "
                        f"time={time.perf_counter() - totals.started:.1f}s")
    result = totals.result()
    return (result, gather_ordinal_nll(ordinal_nll, runtime)) if return_nll else result

def log_result(runtime: Runtime, name: str, result: EvalResult, stride: int | None = None) -> None:
    """The reference's two lines: rounded with the time, then `<name>_exact` to 8 decimals."""
    stride_field = f" stride:{stride}" if stride is not None else ""
    runtime.log(f"{name} val_loss:{result.loss:.4f} val_bpb:{result.bpb:.4f}{stride_field} "
                f"eval_time:{1000 * result.seconds:.0f}ms")
    runtime.log(f"{name}_exact val_loss:{result.loss:.8f} val_bpb:{result.bpb:.8f}")
