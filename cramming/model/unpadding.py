"""Unpadding: a padded batch's real tokens packed into [T, H], so that per-token work skips the padding.

A finetuning batch is padded to its longest example, so on short-sentence tasks half or more of its
positions are padding. Projections, feed-forward, norms and residuals act on each token alone; on the
packed tokens they give the padded path's values at the real positions and do none of the rest.
Attention is the one place where tokens meet: it places them by sequence again (see
`attention.varlen_attention`).

Random numbers are drawn as the padded path draws them (a dropout mask of the padded shape, of which
the real tokens' entries are kept), so a training run takes the same steps with or without unpadding
(tested on the CPU in fp32). Building the layout reads the mask on the host: the token count and the
longest sequence are shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Rows:
    """Rows of a padded batch [B, L], grouped by sequence in order: where attention puts them back."""

    index: torch.Tensor
    """[N] flat position of each row in the padded batch's B * L positions."""
    cu_seqlens: torch.Tensor
    """[B + 1] int32: sequence b owns rows cu_seqlens[b]:cu_seqlens[b + 1] (flash-attn's varlen layout)."""
    max_len: int
    """Most rows of one sequence."""
    packed: torch.Tensor | None = None
    """[N] their rows in the packed [T, H] tensor; None when they are all T tokens, in order."""


@dataclass(frozen=True)
class Unpadded:
    """The layout of one padded batch's real tokens (attention_mask == 1), packed row-major."""

    shape: tuple[int, int]
    """(B, L) of the padded batch."""
    mask: torch.Tensor
    """[B, 1, 1, L] boolean key mask, for attention in the padded grid."""
    tokens: Rows
    """The real tokens."""
    positions: torch.Tensor
    """[T] each token's column in the padded batch: its position id there."""

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> the real tokens' rows [T, ...]."""
        return x.flatten(0, 1).index_select(0, self.tokens.index)

    def pad(self, x: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        """Packed rows [N, ...] (the tokens, or `rows`) -> [B, L, ...], zeros elsewhere."""
        index = (rows or self.tokens).index
        # Zeros, not empty memory: attention multiplies masked values by a probability of 0, and 0 * NaN is NaN.
        out = x.new_zeros(self.shape[0] * self.shape[1], *x.shape[1:]).index_copy(0, index, x)
        return out.view(*self.shape, *x.shape[1:])

    def rows(self, positions: torch.Tensor) -> Rows:
        """The tokens at columns `positions` [B, K] of each sequence, K per sequence, in that order."""
        batch, length = self.shape
        count = positions.shape[1]
        index = (torch.arange(batch, device=positions.device)[:, None] * length + positions).flatten()  # [B * K]
        slot = torch.full((batch * length,), -1, dtype=torch.long, device=positions.device)
        slot[self.tokens.index] = torch.arange(len(self.tokens.index), device=positions.device)
        packed = slot.index_select(0, index)
        if bool((packed < 0).any()):
            raise ValueError("an output position is padding (attention_mask 0 there); unpadded, it has no row")
        cu_seqlens = torch.arange(0, batch * count + 1, count, dtype=torch.int32, device=positions.device)
        return Rows(index, cu_seqlens, count, packed)

    def dropout(self, x: torch.Tensor, p: float, training: bool, rows: Rows | None = None) -> torch.Tensor:
        """Dropout on packed rows x [N, H] (the tokens, or `rows`) with the padded path's mask.

        The mask is drawn at the padded batch's shape and dtype, as dropout of the padded tensor draws
        it, and its rows' entries are applied: the same entries dropped, and every later draw matches
        too. The price is drawing B * L * H numbers rather than N * H.
        """
        if not training or p == 0.0:
            return x
        index = (rows or self.tokens).index
        shape = (self.shape[0] * self.shape[1], *x.shape[1:])
        if x.device.type == "cpu":
            # torch's CPU dropout is `input * empty_like(input).bernoulli_(1 - p).div_(1 - p)`: the same
            # draw, scaled on the kept rows only (bitwise the same factors; measured 1.6-2x faster
            # than dropout of a tensor of ones, which multiplies and divides all B * L * H entries).
            keep = x.new_empty(shape).bernoulli_(1.0 - p)
            return x * keep.index_select(0, index).div_(1.0 - p)
        # Elsewhere dropout may be a fused kernel with its own draws (CUDA's): dropout of ones gives its factors.
        return x * F.dropout(x.new_ones(shape), p, training=True).index_select(0, index)


def unpad(attention_mask: torch.Tensor) -> Unpadded:
    """The layout of the real tokens of a padded batch, from its attention_mask [B, L] (1 = token)."""
    batch, length = attention_mask.shape
    real = attention_mask.bool()
    index = real.flatten().nonzero().squeeze(1)  # [T], row-major: each sequence's tokens together, in order
    lengths = real.sum(dim=1, dtype=torch.int32)  # [B]
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    tokens = Rows(index, cu_seqlens, int(lengths.max()))
    return Unpadded((batch, length), real[:, None, None, :], tokens, index % length)
