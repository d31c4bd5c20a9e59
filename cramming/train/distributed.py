"""torchrun / DDP setup and teardown.

`cram pretrain` under `torchrun --nproc_per_node=N` finds RANK, WORLD_SIZE and LOCAL_RANK in the
environment and joins a process group: nccl on CUDA, gloo on CPU. Without them it runs as a single
process and every helper here is a no-op. Ranks must agree on progress (it sets the accumulation
count and the LR) and on when to stop, so the trainer syncs a few host-side numbers once per
optimizer step through a separate gloo group: CPU tensors, so no GPU synchronisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control_group: Any = None

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size <= 1:
        return DistInfo(device=device)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=device if device_type == "cuda" else None)
    control = dist.new_group(backend="gloo") if device_type == "cuda" else dist.group.WORLD
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, control_group=control)


def agree(info: DistInfo, values: list[float]) -> list[float]:
    """Element-wise maximum of `values` over all ranks (elapsed time, stop/signal flags)."""
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=info.control_group)
    return tensor.tolist()


def barrier(info: DistInfo) -> None:
    """Wait for all ranks (e.g. while rank 0 evaluates or saves)."""
    if info.enabled:
        dist.barrier(group=info.control_group)


def teardown(info: DistInfo) -> None:
    """Leave the process group."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
