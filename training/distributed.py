"""Multi-process training through torchrun (DDP). One process on CPU by default.

    torchrun --nproc_per_node=4 -m linejudge_cli train --config training/configs/full.yaml --out runs/full

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; each process then trains on its own shard of
every dataset, gradients are averaged by DistributedDataParallel (NCCL on GPUs, gloo on
CPU), and only rank 0 writes checkpoints, models and reports (each other rank writes just
its own random state next to the checkpoint, for resuming). Shards are padded like
torch's DistributedSampler (drop_last=False), so every rank runs the same number of steps:
DDP's collectives need every rank at every step.
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


def shard(indices: np.ndarray, rank_: int | None = None, world: int | None = None) -> np.ndarray:
    """This process's share of a dataset's indices (all of them when not distributed).

    As torch's DistributedSampler(drop_last=False) does, the indices are first padded to a
    multiple of the world size by wrapping around to the start, so every rank gets the same
    ceil(n / world) items and so the same number of batches; a few items are then seen twice
    an epoch. Rank r takes items r, r + world, ... of the padded list."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if world == 1 or len(indices) == 0:
        return indices
    per_rank = -(-len(indices) // world)
    return np.resize(indices, per_rank * world)[rank_::world]   # np.resize repeats cyclically


def sync_buffers(model: torch.nn.Module | None) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, as DDP does at the start
    of each forward: after an epoch's last step each rank holds statistics of its own last batch,
    and validation, the epoch kept and the next stage must see the same model on every rank."""
    if world_size() == 1 or model is None:
        return
    import torch.distributed as dist
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, find_unused_parameters=True)
