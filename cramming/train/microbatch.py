"""`gpu.micro_batch_size=auto`: the largest micro-batch that runs a full training step on this device.

The probe takes real steps (forward, backward, optimizer) of the run's own model and optimizer on
synthetic batches shaped like the loader's, doubling the size from 8 until it runs out of memory (or
reaches the target batch per rank: a larger micro-batch would only be rounded away), then bisecting
between the largest size that ran and the smallest that did not, in multiples of 8 above 8 (the shapes
tensor cores like). It runs eagerly, before compiling: compile would rebuild its graph at every size.
Afterwards the weights, the optimizer's state and the random generators are as they were, so the run
is the same as one given the number by hand; the trainer then rounds the target batch down to whole
micro-batches (BatchPlan.build) and saves the number in the run's config, so a resume keeps it.

The answer is cached per device (name and memory) and model (its config, the sequence length,
precision, DDP or not, torch release) in `$CRAMMING_CACHE_DIR` (default `~/.cache/cramming`), so the
next run on this device starts at once. The probe runs inside setup, after the budget's clock started:
like compile, its time counts against the budget (the paper's rule, and the log says how long it
took); a cached answer costs nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cramming.config import config_hash
from cramming.errors import ConfigError
from cramming.fileio import write_atomic
from cramming.gpu import GpuProfile
from cramming.optim.precision import autocast, grad_scaler
from cramming.train import distributed as dist_utils
from cramming.train.inputs import TrainData, model_kwargs, probe_batch

log = logging.getLogger(__name__)

GRAIN = 8
"""Sizes above this are multiples of it."""
CACHE_FILE = "micro_batch.json"


@dataclass(frozen=True)
class Search:
    """What a probe found."""

    largest: int
    """The largest micro-batch that ran."""
    failed_at: int | None
    """The smallest that ran out of memory; None when every size up to the limit ran."""
    tried: tuple[int, ...] = ()


def largest_fitting(fits: Callable[[int], bool], limit: int, start: int = GRAIN) -> Search:
    """The largest size up to `limit` for which `fits` holds, assuming that it holds below some size:
    doubling from `start`, then bisecting (multiples of GRAIN above GRAIN)."""
    largest, failed, tried = 0, None, []
    size = min(start, limit)
    while failed is None:
        tried.append(size)
        if not fits(size):
            failed = size
        elif size >= limit:
            largest = size
            break
        else:
            largest, size = size, min(2 * size, limit)
    while failed is not None:
        middle = (largest + failed) // 2
        middle = middle // GRAIN * GRAIN if middle >= GRAIN else middle
        if middle <= largest:
            break
        tried.append(middle)
        if fits(middle):
            largest = middle
        else:
            failed = middle
    if largest == 0:
        raise ConfigError("gpu.micro_batch_size=auto: not even one sequence fits a training step on this device; "
                          "choose a smaller arch, or a device with more memory")
    return Search(largest, failed, tuple(tried))


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------


def cache_path() -> Path:
    """Where probed micro-batches are kept: $CRAMMING_CACHE_DIR, else $XDG_CACHE_HOME/cramming (~/.cache)."""
    root = os.environ.get("CRAMMING_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cramming")
    return Path(root) / CACHE_FILE


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    memory_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
    return f"{torch.cuda.get_device_name(device)} ({memory_gb:.0f} GiB)"


def cache_entry(device: torch.device, arch: Any, seq_len: int, precision: str, ddp: bool) -> dict[str, Any]:
    """What a probe's answer depends on (its hash is the cache key)."""
    return {"device": device_name(device), "arch": dataclasses.asdict(arch), "seq_len": seq_len,
            "precision": precision, "ddp": ddp, "torch": ".".join(torch.__version__.split(".")[:2])}


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:  # a broken cache is only a cache: probe again, rewrite it
        log.warning("ignoring the micro-batch cache %s (%s)", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def cached(path: Path, entry: dict[str, Any], limit: int) -> int | None:
    """The cached micro-batch for `entry` under `limit`; None when there is none, or when the probe
    stopped at a lower limit without running out of memory (a larger one may fit now)."""
    found = _read(path).get(config_hash(entry))
    if not isinstance(found, dict) or not isinstance(found.get("largest"), int):
        return None
    if found.get("failed_at") is None and found["largest"] < limit:
        return None
    return min(found["largest"], limit)


def remember(path: Path, entry: dict[str, Any], search: Search) -> None:
    """Add a probe's answer to the cache (atomically: concurrent runs each leave a whole file)."""
    data = _read(path)
    data[config_hash(entry)] = {"device": entry["device"], "arch": entry["arch"].get("name"), "seq_len": entry["seq_len"],
                                "precision": entry["precision"], "ddp": entry["ddp"], "torch": entry["torch"],
                                "largest": search.largest, "failed_at": search.failed_at,
                                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError as err:
        log.warning("could not write the micro-batch cache %s (%s); the next run probes again", path, err)


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batch: dict[str, torch.Tensor], device: torch.device, precision: str) -> None:
    """One full training step on `batch` (forward, backward, optimizer), as the loop takes one."""
    with autocast(device, precision):
        loss = model(**model_kwargs(model, batch, device))["loss"]
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # an allocation that fails in a queued kernel shows here, not later


@contextlib.contextmanager
def _untouched(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> Iterator[None]:
    """Run the block, then restore the weights, empty the optimizer's state and rewind the random
    generators: the probe leaves no trace in the run."""
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            optimizer.zero_grad(set_to_none=True)
            optimizer.state.clear()  # AdamW starts its moments afresh at the first real step
            model.load_state_dict(weights)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def probe(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: TrainData, device: torch.device,
          precision: str, limit: int) -> Search:
    """The largest micro-batch (up to `limit`) with which a training step of `model` does not run out of memory."""
    scaler = grad_scaler(device, precision)

    def fits(size: int) -> bool:
        try:
            train_step(model, optimizer, scaler, probe_batch(data.manifest, data.masker, size, data.seq_len), device,
                       precision)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    with _untouched(model, optimizer, device):
        return largest_fitting(fits, limit)


def resolve_micro_batch(gpu: GpuProfile, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: TrainData,
                        arch: Any, info: dist_utils.DistInfo, wanted_target: int) -> GpuProfile:
    """`gpu` with its micro-batch `auto` replaced by a number: cached for this device and model, or
    probed (and cached). Every rank takes the smallest of the ranks' answers."""
    limit = max(1, gpu.capped_target(wanted_target) // info.world_size)
    entry = cache_entry(info.device, arch, data.seq_len, gpu.precision, info.enabled)
    path = cache_path()
    size = cached(path, entry, limit)
    if size is not None:
        log.info("gpu.micro_batch_size=auto: %d sequences, cached for %s and this model in %s (no probe)", size,
                 entry["device"], path)
    else:
        started = time.monotonic()
        search = probe(model, optimizer, data, info.device, gpu.precision, limit)
        remember(path, entry, search)
        size = search.largest
        ran_out = f"{search.failed_at} ran out of memory" if search.failed_at else f"the limit, {limit} per rank, ran"
        log.info("gpu.micro_batch_size=auto: %d sequences, the largest that runs a training step on %s (tried %s; %s). "
                 "The probe took %.1fs, counted in the budget as the rest of setup is; cached in %s", size,
                 entry["device"], ", ".join(map(str, search.tried)), ran_out, time.monotonic() - started, path)
    size = int(-dist_utils.agree(info, [-float(size)])[0])  # agree takes the maximum: of the negatives
    return dataclasses.replace(gpu, micro_batch_size=size)


def with_micro_batch(config_text: str, micro_batch_size: int) -> str:
    """The run's saved config with the micro-batch it resolved, so that a resume keeps it."""
    from omegaconf import OmegaConf

    config = OmegaConf.create(config_text)
    OmegaConf.update(config, "gpu.micro_batch_size", micro_batch_size, force_add=True)
    return OmegaConf.to_yaml(config)
