"""torchrun / DDP setup and teardown.

`cram pretrain` under `torchrun --nproc_per_node=N` finds RANK, WORLD_SIZE and LOCAL_RANK in the
environment and joins a process group: nccl on CUDA, gloo on CPU. Without them it runs as a single
process and every helper here is a no-op. Ranks must agree on progress (it sets the accumulation
count and the LR) and on when to stop, so the trainer syncs a few host-side numbers once per
optimizer step through a separate gloo group: CPU tensors, so no GPU synchronisation.

A rank that dies (a crash, the OOM killer, a lost node) must not leave the others waiting for ever
with the final export unwritten. Measured with gloo (torch 2.13, CPU): when a peer process is
SIGKILLed its sockets close, and the next collective of a rank connected to it raises at once
("Connection closed by peer"); a peer that lives but never joins (a hung host, or ranks in
different collectives) makes it raise when the group's timeout expires ("Timed out waiting");
both are RuntimeErrors naming gloo, and the process group can still be destroyed afterwards.
NCCL raises a `DistBackendError`, or its watchdog ends the process after the timeout. So every
group gets the timeout given to `setup`, and the collectives here (and DDP's gradient all-reduce,
under `guard`) turn such a failure into `RankLost`, whose message says how to continue.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cramming.errors import CrammingError

log = logging.getLogger(__name__)

_GLOO_RELEASE_S = 0.1
"""How long `teardown` leaves the GIL to gloo's worker threads (see there)."""


class RankLost(CrammingError):
    """Another rank of the job died or stopped answering: this one cannot go on alone."""


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control_group: Any = None
    timeout_s: float = 600.0
    """How long a collective waits for a silent peer before it fails."""
    run_dir: Path | None = None
    """The run folder, named in `RankLost`'s advice to resume."""

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_type: str, timeout_s: float = 600.0, run_dir: Path | None = None) -> DistInfo:
    """Join the process group when launched by torchrun; pick this rank's device.

    `timeout_s` bounds every collective's wait for a peer, so it must exceed the longest phase in
    which rank 0 works alone while the others wait at a barrier (evaluation, checkpoint, export).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size <= 1:
        return DistInfo(device=device, timeout_s=timeout_s, run_dir=run_dir)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout,
                                device_id=device if device_type == "cuda" else None)
    control = dist.new_group(backend="gloo", timeout=timeout) if device_type == "cuda" else dist.group.WORLD
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, control_group=control,
                    timeout_s=timeout_s, run_dir=run_dir)


def _lost_peer(err: RuntimeError) -> bool:
    """Whether `err` is a collective failing on a dead or silent peer (see the module docstring), not
    some other error of the guarded block, e.g. a shape error in the backward pass that runs DDP's all-reduce."""
    return isinstance(err, dist.DistError) or "gloo" in str(err)


def _first_sentence(err: BaseException) -> str:
    """The gist of a backend's error: gloo's start with its source location and end in advice."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip())
    return text.split(". ")[0].splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def guard(info: DistInfo, what: str) -> Iterator[None]:
    """Raise `RankLost` when a collective inside the block (`what`, for the message) fails on a lost peer.

    The message is also logged at once: torchrun sends SIGTERM to the surviving ranks a tenth of a
    second after one dies, which ends this process as soon as the loop's signal handlers are gone,
    possibly before the exception reaches whoever prints it.
    """
    try:
        yield
    except RuntimeError as err:
        if not (info.enabled and _lost_peer(err)):
            raise
        others = [r for r in range(info.world_size) if r != info.rank]
        lost = f"rank {others[0]}" if len(others) == 1 else "another rank"
        message = (f"rank {info.rank} of {info.world_size} lost {lost} during {what}: it crashed, was killed or "
                   f"did not answer within {info.timeout_s:g} s ({_first_sentence(err)}). The launcher's log names "
                   f"the rank that failed first. Training since the last checkpoint is lost; continue from that "
                   f"checkpoint with `cram pretrain resume={info.run_dir or '<run_dir>'}`")
        log.error("%s", message)
        raise RankLost(message) from err


def agree(info: DistInfo, values: list[float]) -> list[float]:
    """Element-wise maximum of `values` over all ranks (elapsed time, stop/signal flags)."""
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    with guard(info, "the ranks' agreement on progress"):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=info.control_group)
    return tensor.tolist()


def gather_objects(info: DistInfo, obj: Any) -> list[Any] | None:
    """Every rank's (picklable) `obj` in rank order on rank 0, None on the others; `[obj]` in a single process."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
    with guard(info, "gathering the ranks' state"):
        dist.gather_object(obj, gathered, dst=0, group=info.control_group)
    return gathered


def barrier(info: DistInfo) -> None:
    """Wait for all ranks (e.g. while rank 0 evaluates or saves)."""
    if info.enabled:
        with guard(info, "a barrier"):
            dist.barrier(group=info.control_group)


def teardown(info: DistInfo) -> None:
    """Leave the process group (also after `RankLost`: destroying a group with a dead peer does not block).

    Gloo's worker threads free each finished collective, and with it the tensors it was given, which
    takes the GIL for tensors made in Python (`agree`'s, `gather_objects`'). The group itself is freed
    later by DDP's reducer, with the GIL held, joining those threads: if one of them still waits for
    the GIL to free the last collective, that is a deadlock at the very end of the run (seen in about
    1 run in 10 of the two-rank tests, torch 2.13). Sleeping here, after the last collective, hands
    them the GIL first.
    """
    if info.enabled and dist.is_initialized():
        time.sleep(_GLOO_RELEASE_S)
        dist.destroy_process_group()
