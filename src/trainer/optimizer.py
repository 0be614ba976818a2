"""Optimiser: MuonEq-R on the four weight banks, AdamW on everything else.

With several ranks the bank gradients are reduce-scattered along the bank's first axis,
each rank orthogonalises its own matrices, and the updates are all-gathered; the next
bank's Newton-Schulz runs while the previous all-gather is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trainer.model import GPT
from trainer.runtime import Runtime
from trainer.settings import Hyperparameters


NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

def newton_schulz(update: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximately orthogonalise each matrix of a [..., m, n] batch (in bfloat16 by default)."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = update.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x

def normalize_rows(update: Tensor, floor: float = 1e-7) -> Tensor:
    """MuonEq-R: every row of every matrix to unit L2 norm before Newton-Schulz."""
    return update / update.norm(dim=-1, keepdim=True).clamp_min(floor)

class MuonEqR(torch.optim.Optimizer):
    """Muon with optional row equalisation over banks of matrices, sharded over ranks.

    step(grad_shards) takes each bank's averaged gradient rows for this rank (the whole
    gradient with one process). Each group holds one bank and `lr_scale`, a per-matrix
    multiplier kept on the device; group["lr"] is the scheduled LR.
    """

    def __init__(self, banks: list[nn.Parameter], lr_scales: list[Tensor], lr: float, momentum: float,
                 backend_steps: int, weight_decay: float, row_normalize: bool, runtime: Runtime,
                 ns_dtype: torch.dtype = torch.bfloat16):
        groups = [dict(params=[bank], lr_scale=scale) for bank, scale in zip(banks, lr_scales)]
        super().__init__(groups, dict(lr=lr, base_lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay, row_normalize=row_normalize))
        self.runtime, self.ns_dtype = runtime, ns_dtype
        self.comm_dtype = torch.bfloat16 if runtime.device.type == "cuda" else torch.float32  # halves the traffic on GPUs

    def step(self, grad_shards: list[Tensor]) -> None:  # type: ignore[override]
        with torch.no_grad():
            in_flight: tuple[nn.Parameter, Tensor, Any, dict] | None = None
            for group, grad in zip(self.param_groups, grad_shards):
                bank = group["params"][0]
                update = self.orthogonal_update(bank, grad, group)
                if not self.runtime.distributed:
                    self.apply_update(bank, update, group)
                    continue
                update = update.to(self.comm_dtype)
                full = update.new_empty((update.size(0) * self.runtime.world_size, *update.shape[1:]))
                work = self.runtime.all_gather(full, update)
                if in_flight is not None:  # the previous bank's gather overlapped this bank's Newton-Schulz
                    self.apply_gathered(*in_flight)
                in_flight = (bank, full, work, group)
            if in_flight is not None:
                self.apply_gathered(*in_flight)

    def orthogonal_update(self, bank: nn.Parameter, grad: Tensor, group: dict) -> Tensor:
        state = self.state[bank]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(grad)
        momentum = state["momentum"]
        momentum.mul_(group["momentum"]).add_(grad)
        update = grad.add(momentum, alpha=group["momentum"])  # Nesterov
        if group["row_normalize"]:
            update = normalize_rows(update)
        update = newton_schulz(update, group["backend_steps"], dtype=self.ns_dtype)
        return update.to(grad.dtype) * max(1.0, bank.size(-2) / bank.size(-1)) ** 0.5

    def apply_gathered(self, bank: nn.Parameter, full: Tensor, work: Any, group: dict) -> None:
        work.wait()
        self.apply_update(bank, full[: bank.size(0)], group)

    def apply_update(self, bank: nn.Parameter, update: Tensor, group: dict) -> None:
        lr = group["lr"] * group["lr_scale"][:, None, None]
        bank.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
        bank.sub_(lr * update.to(bank.dtype))

def matrix_lr_scales(hp: Hyperparameters, bank_size: int, device: torch.device) -> Tensor:
    """Per-matrix LR multiplier of a bank: matrix i belongs to layer i mod L.

    The reference scales the early layers' gradients by 0.025/0.03 before MuonEq-R,
    whose row normalisation and Newton-Schulz cancel the factor; 1.0 reproduces that.
    """
    early = torch.arange(bank_size, device=device) % hp.num_layers < hp.early_layers
    return torch.where(early, hp.early_layers_lr_scale, 1.0).float()

BANK_NAMES = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
TOKEN_TABLE_NAMES = ("tok_emb.weight", "bigram.table.weight", "value_embed.table.weight")

@dataclass
class Optimizers:
    muon: MuonEqR
    adam: torch.optim.AdamW
    banks: list[nn.Parameter]
    replicated: list[nn.Parameter]  # everything outside the banks: averaged in full
    runtime: Runtime

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.muon, self.adam]

    def zero_grad(self) -> None:
        for optimizer in self.all():
            optimizer.zero_grad(set_to_none=True)

    def set_schedule(self, lr_mul: float, muon_momentum: float) -> None:
        for optimizer in self.all():
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_mul
        for group in self.muon.param_groups:
            group["momentum"] = muon_momentum

    def step(self, clip_norm: float) -> None:
        """Average gradients over ranks, clip by the global norm of the average, step both."""
        pending = [self.runtime.reduce_scatter_mean(bank.grad, self.muon.comm_dtype) for bank in self.banks]  # starts first
        for param in self.replicated:
            if param.grad is None:  # a parameter the forward did not reach
                param.grad = torch.zeros_like(param)
        grads = [param.grad for param in self.replicated]
        self.runtime.mean_(grads)
        bank_shards = [shard.wait() for shard in pending]
        if clip_norm > 0:
            square = torch.stack([g.float().square().sum() for g in grads]).sum()
            bank_square = self.runtime.all_reduce_(torch.stack([s.square().sum() for s in bank_shards]).sum())
            coefficient = (clip_norm / ((square + bank_square).sqrt() + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads + bank_shards, coefficient)
        self.adam.step()
        self.muon.step(bank_shards)

def build_optimizers(hp: Hyperparameters, model: GPT, runtime: Runtime) -> Optimizers:
    named = dict(model.named_parameters())
    banks = [named[name] for name in BANK_NAMES]
    tables = [named[name] for name in TOKEN_TABLE_NAMES if name in named]
    controls = [p for name, p in named.items() if name not in BANK_NAMES and name not in TOKEN_TABLE_NAMES]
    adam = torch.optim.AdamW(
        [dict(params=tables, lr=hp.tied_embed_lr, base_lr=hp.tied_embed_lr, weight_decay=hp.embed_wd),
         dict(params=controls, lr=hp.scalar_lr, base_lr=hp.scalar_lr, weight_decay=hp.adam_wd)],
        betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, fused=runtime.device.type == "cuda")
    muon = MuonEqR(banks, [matrix_lr_scales(hp, bank.size(0), runtime.device) for bank in banks], lr=hp.matrix_lr,
                   momentum=hp.muon_momentum, backend_steps=hp.muon_backend_steps, weight_decay=hp.muon_wd,
                   row_normalize=hp.muon_eq_r, runtime=runtime)
    return Optimizers(muon=muon, adam=adam, banks=banks, replicated=tables + controls, runtime=runtime)

