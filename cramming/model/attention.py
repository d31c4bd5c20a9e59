"""Attention backends: free functions with one signature, selected by name.

Every backend takes `q, k, v` of shape [B, H, L, D], an optional boolean key mask broadcastable to
[B, H, L, L] (True = attend; finetuning pads, packed pretraining rows need none), the dropout
probability and whether the module is training, and returns [B, H, L, D]. `eager` is the
numerical reference; the others must agree with it within floating-point tolerance.

Unpadded batches (packed real tokens, `unpadding.py`) go through `varlen_attention`, which runs
flash-attn's variable-length kernel where it can and otherwise hands a backend the padded grid.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from cramming.errors import ConfigError
from cramming.model.unpadding import Rows, Unpadded

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float, bool], torch.Tensor]


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float, training: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, written out; the reference the fused kernels are tested against.

    Also the CPU path of `sdpa`: torch's fused CPU kernel tiles for long sequences, and at BERT
    lengths these two plain batched products are 1.1-1.6x faster forward + backward on a 2-core
    x86 CPU (L 128-512, head size 16-64; docs/benchmarks.md).
    """
    # Scaling q (L x D) rather than the scores (L x L) is the cheaper place.
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, Lq, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    # Softmax in fp32 even under autocast: the reference must not lose precision to half types
    # (both casts are no-ops in fp32).
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    probs = F.dropout(probs, p=dropout_p, training=training)  # returns probs itself when p = 0
    return probs @ v  # [B, H, Lq, D]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float, training: bool
) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention (flash / memory-efficient kernels) on GPU.

    Without a mask, torch picks flash attention on GPU; a boolean mask routes to the
    memory-efficient or math kernel. On CPU, the plain matmuls of `eager_attention`, which are faster there.
    """
    if q.device.type == "cpu":
        return eager_attention(q, k, v, mask, dropout_p, training)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0)


def _flash_attn_func() -> Callable:
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError(
            "arch.attention_backend=flash needs the flash-attn package (pip install flash-attn) and a CUDA GPU; "
            "it is not installed. Use arch.attention_backend=sdpa, which already uses flash kernels on GPU."
        ) from None
    return flash_attn_func


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float, training: bool
) -> torch.Tensor:
    """The flash-attn package's kernel (fp16/bf16 on CUDA only).

    flash-attn has no dense padding mask (only a variable-length API over unpadded tokens); padded
    finetuning batches go through sdpa instead, which gives the same result.
    """
    fn = _flash_attn_func()
    if mask is not None or q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return sdpa_attention(q, k, v, mask, dropout_p, training)
    # flash-attn wants [B, L, H, D].
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p if training else 0.0)
    return out.transpose(1, 2)


# Looked up once, without importing it (which starts CUDA): a failed import inside a compiled
# forward would be a graph break in every layer.
_FLASH_INSTALLED = importlib.util.find_spec("flash_attn") is not None


def _flash_varlen(q: torch.Tensor, backend: AttentionFn) -> Callable | None:
    """flash-attn's variable-length kernel where it is installed and runs on q (CUDA, fp16/bf16), unless
    the reference `eager` was asked for; else None."""
    if not _FLASH_INSTALLED or backend is eager_attention or q.device.type != "cuda":
        return None
    if q.dtype not in (torch.float16, torch.bfloat16):
        return None
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]

    return flash_attn_varlen_func


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Unpadded, queries: Rows | None,
    dropout_p: float, training: bool, backend: AttentionFn,
) -> torch.Tensor:
    """Attention within each sequence of packed tokens: q [N, nh, D] for `queries` (None: every token),
    k, v [T, nh, D] for the batch's tokens -> [N, nh, D].

    flash-attn's variable-length kernel where it runs (`_flash_varlen`). Otherwise the rows go back to
    their places in the padded grid for `backend`, with the key mask: the padded path's own attention,
    dropout draws included. On a 2-core CPU that was also the fastest of the options measured
    (forward + backward, batch 16, 12 heads of 64; lengths like CoLA's / MRPC's): this grid 3.4 / 15 ms,
    a loop over sequences 7.6 / 22 ms, a block-diagonal mask over the packed tokens 7.5 / 94 ms, torch's
    jagged nested tensors with SDPA 17 / 47 ms.
    """
    queries = queries or batch.tokens
    flash = _flash_varlen(q, backend)
    if flash is not None:
        keys = batch.tokens
        return flash(q, k, v, queries.cu_seqlens, keys.cu_seqlens, queries.max_len, keys.max_len,
                     dropout_p=dropout_p if training else 0.0)
    grid = [batch.pad(t, rows).transpose(1, 2) for t, rows in ((q, queries), (k, None), (v, None))]  # [B, nh, L, D]
    out = backend(*grid, batch.mask, dropout_p, training)  # [B, nh, L, D]
    return out.transpose(1, 2).flatten(0, 1).index_select(0, queries.index)  # [N, nh, D]


BACKENDS: dict[str, AttentionFn] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash": flash_attention,
}
# The type of `arch.attention_backend`, made from the table so that a new backend is one entry in it.
AttentionBackend = Literal[tuple(BACKENDS)]  # type: ignore[valid-type]


def get_backend(name: str) -> AttentionFn:
    """Look a backend up by name; unknown names list the valid ones, flash checks its package."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name == "flash":
        _flash_attn_func()  # fail at model construction, not at the first step
    return BACKENDS[name]
