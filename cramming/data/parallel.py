"""Worker processes for the heavy phases of `cram data` (normalisation, encoding).

`ordered_map` runs a function over a stream of tasks in `num_proc` spawned processes and yields
the results in task order, with a bounded number of tasks in flight: the corpus streams through
and never queues up in memory (`multiprocessing.Pool.imap` would read its whole input ahead).
The first few tasks run in the calling process, and the pool starts only when more follow, so a
small corpus pays no process start-up. A worker that dies (the out-of-memory killer, a kill)
stops the map with `WorkerDied` instead of leaving it waiting for a result that never comes.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from cramming.data.workdir import BuildInterrupted

T = TypeVar("T")
R = TypeVar("R")


class WorkerDied(BuildInterrupted):
    """A worker process of `ordered_map` ended abruptly."""


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under taskset or a batch scheduler)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def resolve_num_proc(num_proc: int) -> int:
    """`data.num_proc`: 0 = the available cores."""
    return num_proc if num_proc > 0 else available_cores()


def _exit_with(parent: int) -> None:
    """End this worker once `parent` is gone: a killed build must not leave its workers behind
    (they would wait for tasks forever)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _start_worker(parent: int, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    initializer(*initargs, True)


def ordered_map(fn: Callable[[T], R], tasks: Iterable[T], num_proc: int, *, initializer: Callable[..., None],
                initargs: tuple[Any, ...] = (), inline_first: int | None = None,
                worth_workers: Callable[[], bool] | None = None) -> Iterator[R]:
    """`map(fn, tasks)` over `num_proc` worker processes, results in task order.

    `initializer(*initargs, in_worker)` prepares each process (in_worker=True) and the calling one
    (False), which runs the first `inline_first` tasks itself (default: 2 per worker). Then, if
    tasks remain and `worth_workers()` (asked then; default: yes) agrees, the pool starts; else
    the rest runs here too. At most 2 tasks per worker are in flight. With `num_proc <= 1`
    everything runs in the calling process.
    """
    tasks = iter(tasks)
    initializer(*initargs, False)
    if num_proc <= 1:
        yield from map(fn, tasks)
        return
    for task in itertools.islice(tasks, 2 * num_proc if inline_first is None else inline_first):
        yield fn(task)
    try:
        first = next(tasks)
    except StopIteration:
        return  # all done in this process: no pool to start
    if worth_workers is not None and not worth_workers():
        yield from map(fn, itertools.chain([first], tasks))
        return
    # spawn, not fork: a forked child would inherit the parent's Rust thread pools in a broken state.
    with ProcessPoolExecutor(num_proc, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                             initargs=(os.getpid(), initializer, initargs)) as pool:
        pending: deque = deque()
        try:
            for task in itertools.chain([first], tasks):
                pending.append(pool.submit(fn, task))
                if len(pending) >= 2 * num_proc:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise WorkerDied(
                "a worker process ended abruptly (killed, e.g. by the out-of-memory killer). If memory is short, "
                "lower data.num_proc or data.batch_docs"
            ) from None
        finally:
            for future in pending:
                future.cancel()
