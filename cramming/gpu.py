"""GPU profiles (configs/gpu/*.yaml) and device detection, for every stage and the benchmarks.

A profile says what the trainer needs to know about a device: torch device type, the micro-batch
that fits, precision, compile, workers, and the reference card's memory and peak TFLOP/s.
`gpu=auto` picks the profile whose `match` strings name the visible CUDA device, the closest by
memory for an unlisted one (with `micro_batch_size: auto`: the trainer finds the largest that fits,
cramming.train.microbatch), or `cpu`. `require_runnable` stops a stage before any work when this
machine cannot run the chosen profile.
"""

from __future__ import annotations

import dataclasses
import os
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
    # int | str rather than int | Literal["auto"]: `validate` would admit only a Literal's choices.
    micro_batch_size: int | str = 32
    """Sequences per forward/backward pass (the largest that fits at 128 tokens for crammed-bert), or
    auto: pretraining finds the largest that runs a training step on this device (and caches it)."""
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
    max_target_batch_size: int | None = None
    """The largest target batch this device trains with (null = the recipe's train.target_batch_size):
    the cpu profile caps it at 256 so that a minutes-long run takes tens of optimizer steps."""

    def __post_init__(self) -> None:
        # device and precision are checked against their Literal types; the target batch is the
        # recipe's (train.target_batch_size), rounded to whole micro-batches by the trainer.
        validate(self, "gpu", [
            (self.micro_batch_size == "auto" or (isinstance(self.micro_batch_size, int) and self.micro_batch_size >= 1),
             f"micro_batch_size must be >= 1, got {self.micro_batch_size!r} (or auto: the largest that fits)"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.max_target_batch_size is None or self.max_target_batch_size >= 1,
             f"max_target_batch_size must be >= 1 or null, got {self.max_target_batch_size}"),
        ])

    def capped_target(self, wanted: int) -> int:
        """The target batch this device trains with for a recipe's `wanted` one (max_target_batch_size)."""
        return min(wanted, self.max_target_batch_size) if self.max_target_batch_size else wanted


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
    """Pick the shipped profile matching the visible CUDA device, or `cpu` without one."""
    return detect_profile()[0]


def detect_profile() -> tuple[str, bool]:
    """The shipped profile for the visible CUDA device (`cpu` without one), and whether it is listed
    (a profile's `match` names the device, or there is no GPU).

    An unlisted GPU gets the closest profile by memory size, with bf16 only where supported, so
    a new card works out of the box; `resolve_gpu` lets pretraining find its micro-batch.
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu", True
    named = match_profile(torch.cuda.get_device_name(0))
    if named is not None:
        return named.name, True
    profiles = [load_profile(n) for n in available_profiles()]
    memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # Turing emulates bf16 slowly
    candidates = [
        p for p in profiles
        if p.device == "cuda" and (p.memory_gb or 0) <= memory_gb * 1.05 and (bf16 or p.precision != "bf16")
    ]
    if not candidates:
        return ("rtx2080ti" if not bf16 else "rtxa4000"), False
    return max(candidates, key=lambda p: p.memory_gb or 0).name, False


def resolve_gpu(node: Any) -> GpuProfile:
    """Turn the composed `gpu` group into a profile, resolving `auto` by device detection.

    With `gpu=auto`, fields the user overrode (non-null in the node) win over the detected
    profile's, so `gpu.micro_batch_size=64` works together with auto-detection. An unlisted GPU's
    micro-batch is `auto`: the borrowed profile's was sized for another card's memory.
    """
    values = to_container(node) or {}
    name = values.get("name", "auto")
    if name != "auto":
        return to_dataclass(GpuProfile, values, "gpu")
    profile, listed = detect_profile()
    detected = dataclasses.asdict(load_profile(profile))
    if not listed:
        detected["micro_batch_size"] = "auto"
    overrides = {k: v for k, v in values.items() if k != "name" and v is not None}
    return to_dataclass(GpuProfile, {**detected, **overrides}, "gpu")


# One example of a CUDA build; pytorch.org/get-started gives the index URL for the user's driver.
CUDA_TORCH_INSTALL = "pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu126"


@dataclass(frozen=True)
class Fixes:
    """What the checking command's user types instead, in its own words (overrides or flags)."""

    cpu: str
    """How to run on the CPU (or let the command pick the device)."""
    no_bf16: str
    """How to run without bf16 on this GPU."""


# The Hydra stages (cram pretrain, cram glue) choose the device with the gpu group.
STAGE_FIXES = Fixes(
    cpu="gpu=cpu, or gpu=auto to pick the profile of the device this machine has (cpu here)",
    no_bf16="gpu.precision=fp16 (autocast with loss scaling, as gpu=rtx2080ti does), or gpu=auto to pick a profile "
            "this GPU runs",
)


def require_runnable(profile: GpuProfile, asked: str | None = None, fixes: Fixes = STAGE_FIXES) -> None:
    """Raise ConfigError, before a stage does any work, when this machine cannot run `profile`.

    A CUDA profile needs a CUDA build of torch, a visible GPU and, in bf16, a GPU with native bf16.
    The message names what is missing and what to type instead; `asked` is how the user chose the
    profile (default `gpu=<name>`). Compile is not checked: CUDA builds of torch bring triton on
    Linux, and pretraining falls back to eager mode where compiling fails (train.compile_fallback).
    """
    import torch

    if profile.device != "cuda":
        return
    asked = asked or f"gpu={profile.name}"
    if not torch.backends.cuda.is_built():
        raise ConfigError(
            f"{asked} needs a CUDA GPU, but the installed torch ({torch.__version__}) is a CPU build. To run here, "
            f"type {fixes.cpu}; to use a GPU, install a CUDA build of torch, e.g. `{CUDA_TORCH_INSTALL}` "
            "(pytorch.org/get-started gives the index URL for your CUDA driver)"
        )
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hidden = "" if visible is None else f" with CUDA_VISIBLE_DEVICES={visible!r}"
        raise ConfigError(
            f"{asked} needs a CUDA GPU, but torch {torch.__version__}, a CUDA build, sees none{hidden}: check that "
            "CUDA_VISIBLE_DEVICES names a GPU and that the NVIDIA driver works (nvidia-smi lists the GPU). To run "
            f"on the CPU instead, type {fixes.cpu}"
        )
    # Since torch 2.3 the default also counts bf16 emulated in software, which Turing cards pass.
    if profile.precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(
            f"{asked} runs in bf16, which this GPU ({torch.cuda.get_device_name(0)}) lacks (bf16 needs an Ampere "
            f"or later GPU). To run on it, type {fixes.no_bf16}"
        )
