"""Mixed precision for a (device, precision) pair: autocast, and loss scaling for fp16.

Mixed precision is a CUDA matter here: on CPU both stages run fp32 without autocast, whatever the
profile says, so a CPU run's numbers are those of the fp32 stack in pretraining and GLUE alike.
"""

from __future__ import annotations

import contextlib

import torch

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def effective_precision(device: torch.device, precision: str) -> str:
    """The precision a run on `device` uses: `precision` on CUDA, fp32 elsewhere."""
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(_DTYPES)}")
    return precision if device.type == "cuda" else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast to bf16 or fp16 on CUDA; a no-op for fp32 and off CUDA."""
    dtype = _DTYPES[effective_precision(device, precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The loss scaler: enabled only for fp16 on CUDA (bf16 and fp32 do not underflow as fp16 does);
    disabled it passes losses and steps through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=effective_precision(device, precision) == "fp16")
