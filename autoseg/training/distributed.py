"""Multi-process training (PyTorch DistributedDataParallel): who this process is and how ranks agree.

A run launched with ``torchrun --nproc_per_node N -m autoseg train ...`` has one process per GPU (or per CPU
group with the gloo backend). The CLI joins the process group; the training loop asks :func:`world` who it is.
Each rank trains on its share of the batch; rank 0 alone writes logs, checkpoints and validation results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_by_torchrun() -> bool:
    return dist.is_available() and dist.is_torchelastic_launched()


def init(device_type: str) -> None:
    """Join the process group torchrun set up (NCCL on CUDA, gloo otherwise)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_batch_size(batch_size: int, w: World) -> int:
    """This rank's share of the global batch (the first ``batch_size % size`` ranks take one more)."""
    if batch_size < w.size:
        raise ValueError(f"batch size {batch_size} is smaller than the number of processes {w.size}")
    return batch_size // w.size + (1 if w.rank < batch_size % w.size else 0)


def sum_over_ranks(values: np.ndarray, w: World) -> np.ndarray:
    """Element-wise sum of a float array over all ranks (the array itself without DDP)."""
    if not w.distributed:
        return values
    t = torch.as_tensor(np.asarray(values, dtype=np.float64))
    dist.all_reduce(t)
    return t.numpy()


def mean_over_ranks(value: float, w: World) -> float:
    """The mean of each rank's ``value`` (the value itself without DDP)."""
    return float(sum_over_ranks(np.array([value]), w)[0] / w.size)


def from_main(value: int, w: World) -> int:
    """Rank 0's ``value`` on every rank."""
    if not w.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return int(t.item())
