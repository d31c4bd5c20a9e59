"""GPU profiles (configs/gpu/*.yaml) and device detection, for every stage and the benchmarks.

A profile says what the trainer needs to know about a device: torch device type, the micro-batch
that fits, precision, compile, workers, and the reference card's memory and peak TFLOP/s.
`gpu=auto` picks the profile whose `match` strings name the visible CUDA device, the closest by
memory for an unlisted one, or `cpu`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import OmegaConf

from cramming.checks import validate
from cramming.config import CONFIG_DIR, to_container, to_dataclass
from cramming.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
PROFILE_DIR = CONFIG_DIR / "gpu"


@dataclass
class GpuProfile:
    """What the trainer needs to know about the device it runs on."""

    name: str = "cpu"
    """Profile name (a file in configs/gpu/)."""
    match: list[str] = field(default_factory=list)
    """Substrings of `torch.cuda.get_device_name()` that select this profile under gpu=auto."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Torch device type."""
    micro_batch_size: int = 32
    """Sequences per forward/backward pass (the largest that fits at 128 tokens for crammed-bert)."""
    precision: Precision = "fp32"
    """fp16 (autocast + loss scaling, for Turing which lacks bf16), bf16 (Ampere and later), or fp32."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    memory_gb: float | None = None
    """Device memory of the reference card; used to emulate it on a larger GPU in benchmarks."""
    peak_tflops: float | None = None
    """Dense peak tensor TFLOP/s at `precision`, the denominator of model FLOPs utilisation."""
    num_workers: int = 2
    """DataLoader worker processes."""

    def __post_init__(self) -> None:
        # device and precision are checked against their Literal types; the target batch is the
        # recipe's (train.target_batch_size), rounded to whole micro-batches by the trainer.
        validate(self, "gpu", [
            (self.micro_batch_size >= 1, f"micro_batch_size must be >= 1, got {self.micro_batch_size}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
        ])


def available_profiles() -> list[str]:
    """Names of the shipped GPU profiles, `auto` excluded."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml") if p.stem != "auto")


def load_profile(name: str) -> GpuProfile:
    """Load a shipped profile by name; unknown names list the valid ones."""
    path = PROFILE_DIR / f"{name}.yaml"
    if name == "auto" or not path.is_file():
        raise ConfigError(f"unknown GPU profile {name!r}; choose one of: auto, {', '.join(available_profiles())}")
    return to_dataclass(GpuProfile, OmegaConf.load(path), "gpu")


def match_profile(device_name: str) -> GpuProfile | None:
    """The shipped profile one of whose `match` strings is in `device_name` (case-insensitive)."""
    name = device_name.lower()
    for profile in (load_profile(n) for n in available_profiles()):
        if any(m.lower() in name for m in profile.match):
            return profile
    return None


def detect_profile_name() -> str:
    """Pick the shipped profile matching the visible CUDA device, or `cpu` without one.

    An unlisted GPU gets the closest profile by memory size, with bf16 only where supported, so
    a new card works out of the box (the user may still tune micro_batch_size).
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    named = match_profile(torch.cuda.get_device_name(0))
    if named is not None:
        return named.name
    profiles = [load_profile(n) for n in available_profiles()]
    memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    bf16 = torch.cuda.is_bf16_supported()
    candidates = [
        p for p in profiles
        if p.device == "cuda" and (p.memory_gb or 0) <= memory_gb * 1.05 and (bf16 or p.precision != "bf16")
    ]
    if not candidates:
        return "rtx2080ti" if not bf16 else "rtxa4000"
    return max(candidates, key=lambda p: p.memory_gb or 0).name


def resolve_gpu(node: Any) -> GpuProfile:
    """Turn the composed `gpu` group into a profile, resolving `auto` by device detection.

    With `gpu=auto`, fields the user overrode (non-null in the node) win over the detected
    profile's, so `gpu.micro_batch_size=64` works together with auto-detection.
    """
    values = to_container(node) or {}
    name = values.get("name", "auto")
    if name != "auto":
        return to_dataclass(GpuProfile, values, "gpu")
    detected = dataclasses.asdict(load_profile(detect_profile_name()))
    overrides = {k: v for k, v in values.items() if k != "name" and v is not None}
    return to_dataclass(GpuProfile, {**detected, **overrides}, "gpu")
