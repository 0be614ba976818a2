"""Sharded optimiser on 2 gloo processes: the same math as one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt

STEPS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gradients(step: int, rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(shape, generator=generator)


def make_banks() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5, 24, 16)), torch.nn.Parameter(torch.randn(3, 16, 40))]


def run_muon(banks, world_size: int, rank: int, use_reduce_scatter: bool) -> None:
    optimizer = train_gpt.MuonEqR(banks, [torch.linspace(0.01, 0.03, len(b)) for b in banks], momentum=0.9,
                                  backend_steps=5, weight_decay=0.04, row_normalize=True)
    optimizer.use_reduce_scatter = use_reduce_scatter
    for step in range(STEPS):
        for bank in banks:
            if world_size == 1:  # what the ranks' average would be
                bank.grad = (gradients(step, 0, bank.shape) + gradients(step, 1, bank.shape)) / 2
            else:
                bank.grad = gradients(step, rank, bank.shape)
        optimizer.step()


def worker(rank: int, port: int, use_reduce_scatter: bool, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        banks = make_banks()
        run_muon(banks, 2, rank, use_reduce_scatter)
        results[rank] = [bank.detach().clone() for bank in banks]
        dist.barrier()  # neither rank leaves while the other still talks
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("use_reduce_scatter", [True, False], ids=["reduce_scatter", "all_reduce_fallback"])
def test_two_rank_muon_equals_one_process(use_reduce_scatter):
    single = make_banks()
    run_muon(single, 1, 0, True)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(free_port(), use_reduce_scatter, results), nprocs=2, join=True)
        per_rank = [results[0], results[1]]
    for rank_banks in per_rank:
        for ours, expected in zip(rank_banks, single):
            assert torch.allclose(ours, expected, atol=2e-6), (ours - expected).abs().max()
