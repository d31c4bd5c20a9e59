"""AdamW with weight decay on the weight matrices only, as both training stages build it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def build_optimizer(
    params: nn.Module | Iterable[torch.Tensor],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    device: torch.device,
    fused: bool | None = None,
    decay_vectors: bool = False,
    decay_embeddings: bool = True,
    stacked: int = 0,
) -> torch.optim.AdamW:
    """AdamW over the trainable `params` (a model, or its tensors) in two groups: with and without decay.

    - `decay_vectors`: also decay 1-D parameters (norm weights, biases); off as in BERT and Cramming.
    - `decay_embeddings`: decay embedding tables like other matrices (as transformers' Trainer
      does); pretraining exempts them. Exempting them needs the model, to find its `nn.Embedding`s.
    - `stacked`: leading dimensions in front of each parameter's own shape (side-by-side GLUE trials
      keep N trials' tensors as [N, ...]); the grouping looks at the parameter's own shape.
    - `fused`: torch's fused AdamW kernel; None = on CUDA and CPU, where torch has one (on CPU it
      steps 1.2x faster than foreach at vocab 32768, docs/benchmarks.md).

    Each group keeps the parameters' order; tied parameters appear once.
    """
    if isinstance(params, nn.Module):
        embeddings = {id(p) for m in params.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        tensors = list(params.parameters())
    elif not decay_embeddings:
        raise ValueError("decay_embeddings=False needs the model (an nn.Module) to find its embedding tables")
    else:
        embeddings, tensors = set(), list(params)
    decay, no_decay = [], []
    for param in tensors:
        if not param.requires_grad:
            continue
        exempt = ((param.ndim - stacked < 2 and not decay_vectors)
                  or (id(param) in embeddings and not decay_embeddings))
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    use_fused = fused if fused is not None else device.type in ("cuda", "cpu")
    # False and None both mean torch's default (foreach where supported) implementation.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=use_fused or None)
