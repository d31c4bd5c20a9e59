"""random-LTD: layerwise random token dropping (Yao et al., 2022).

In a middle layer, keep a random subset of k tokens per sequence ("gather"), run the layer on
those only, and write the results back in place among the untouched tokens ("combine"), so the
next layer sees the full sequence again. Each layer draws its own subset. No importance score and
no special treatment of [CLS]/[SEP]/[MASK]: the paper found none helped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def sample_indices(
    batch: int, length: int, keep: int, device: torch.device | str, real: torch.Tensor | None = None
) -> torch.Tensor:
    """k distinct positions per row, sorted so kept tokens stay in sequence order: [B, k].

    With `real` [B, L] (True = a token, False = padding), real tokens are drawn first and padding
    only fills what they cannot: a subset of padding alone would leave attention no key to attend
    to (an undefined softmax; NaN in some GPU kernels).
    """
    # argsort of uniform noise gives a random permutation per row without a Python loop; +1 on
    # padding sorts every pad after every real token while keeping the draw uniform among each.
    noise = torch.rand(batch, length, device=device)
    if real is not None:
        noise = noise + (~real).to(noise.dtype)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [B, L, ...] at `idx` [B, k] -> [B, k, ...]."""
    index = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def combine(full: torch.Tensor, part: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Put `part` [B, k, H] back into a copy of `full` [B, L, H] at `idx` [B, k]."""
    index = idx.unsqueeze(-1).expand(-1, -1, full.shape[-1])
    return full.scatter(1, index, part)


def gather_mask(mask: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    """Restrict a [B, 1, 1, L] key mask to the kept keys -> [B, 1, 1, k]."""
    if mask is None:
        return None
    return mask.gather(3, idx[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))


def gather_rope(rope: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary (cos, sin) tables, [1 or B, 1, L, D] each, at positions `idx` [B, k] -> [B, 1, k, D] each."""
    cos, sin = (r.expand(batch, -1, -1, -1)[:, 0] for r in rope)  # [B, L, D]
    return gather(cos, idx).unsqueeze(1), gather(sin, idx).unsqueeze(1)


def apply_layer(
    layer: Callable[..., torch.Tensor],
    x: torch.Tensor,
    keep: int,
    mask: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run `layer(x, mask, rope)` on `keep` random tokens per row of x [B, L, H]; the rest pass through.

    `rope` is the rotary (cos, sin) pair, [1, 1, L, D] or [B, 1, L, D]; it is gathered with the
    tokens so each kept token keeps its own position. `idx` may be given to fix the subset (tests).
    """
    batch, length, _ = x.shape
    if idx is None:
        real = None if mask is None else mask[:, 0, 0, :]  # the [B, 1, 1, L] key mask's rows
        idx = sample_indices(batch, length, keep, x.device, real)
    kept_rope = None if rope is None else gather_rope(rope, idx, batch)
    out = layer(gather(x, idx), gather_mask(mask, idx), kept_rope)  # [B, k, H]
    return combine(x, out, idx)
