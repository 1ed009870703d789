"""Multi-process training through torchrun (DDP). One process on CPU by default.

    torchrun --nproc_per_node=4 -m linejudge_cli train --config training/configs/full.yaml --out runs/full

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; each process then trains on its own shard of
every dataset, gradients are averaged by DistributedDataParallel (NCCL on GPUs, gloo on
CPU), and only rank 0 writes checkpoints, models and reports.
"""
from __future__ import annotations

import os

import numpy as np
import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> torch.device:
    """Start the process group when launched by torchrun; return this process's device."""
    if world_size() == 1:
        return torch.device("cpu")
    import torch.distributed as dist
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def shard(indices: np.ndarray) -> np.ndarray:
    """This process's share of a dataset's indices (all of them when not distributed)."""
    return indices[rank()::world_size()]


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, find_unused_parameters=True)
