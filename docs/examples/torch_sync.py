"""Synchronized batch norm over torch.distributed with gloo on the CPU: two processes hold
batches of 3 and 5 samples; each normalizes with the statistics of all 8.

    python docs/examples/torch_sync.py
"""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import portable_bn as pbn
from portable_bn.distributed import TorchProcessGroup

SIZES = (3, 5)  # samples per process: unequal sizes are weighted by their counts


def worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(SIZES))
    torch.manual_seed(0)  # every process makes the same global batch and keeps its part
    x = torch.randn(sum(SIZES), 4, 6, 6, dtype=torch.float64) * 3 + 1
    start = sum(SIZES[:rank])
    local = x[start : start + SIZES[rank]].clone().requires_grad_()

    bn = pbn.BatchNorm2d(4, xp=torch, dtype=torch.float64, sync=TorchProcessGroup())
    y = bn(local)
    y.square().sum().backward()  # autograd gives the synchronized backward

    # One process running PyTorch's own BatchNorm2d over the whole batch, for comparison.
    whole = x.clone().requires_grad_()
    reference = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    expected = reference(whole)
    expected.square().sum().backward()
    weight_grad = bn.weight.grad.clone()
    dist.all_reduce(weight_grad)  # each process holds its share, as for any parameter in DDP
    results[rank] = {
        "output": (y - expected[start : start + SIZES[rank]]).abs().max().item(),
        "running_var": (bn.running_var - reference.running_var).abs().max().item(),
        "input gradient": (local.grad - whole.grad[start : start + SIZES[rank]]).abs().max().item(),
        "weight gradient (summed)": (weight_grad - reference.weight.grad).abs().max().item(),
    }
    if rank == 0:
        try:  # what PyTorch offers for the same job on the CPU
            torch.nn.SyncBatchNorm(4, dtype=torch.float64)(local)
        except ValueError as refused:
            print(f"torch.nn.SyncBatchNorm on the CPU: {refused}")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> int:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(free_port(), results), nprocs=len(SIZES), join=True)
        results = dict(results)
    worst = 0.0
    for rank in sorted(results):
        for what, error in results[rank].items():
            print(f"process {rank} ({SIZES[rank]} samples): {what} differs from one process by {error:.1e}")
            worst = max(worst, error)
    return 0 if worst < 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
