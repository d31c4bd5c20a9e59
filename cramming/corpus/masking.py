"""MLM masking.

Dynamic masking (RoBERTa): `MLMMasker` masks a batch when it is drawn, so every visit of a row
gets fresh masks. Of the chosen targets, `replace_mask` become [MASK], `replace_random` a random
non-special token, the rest stay unchanged (the 80/10/10 rule). Special tokens (pad, cls, sep,
...) are never targets.

With `fixed_count`, every row gets exactly K = round(mask_rate * L) targets, returned as sorted
`masked_positions [B, K]` (and `masked_labels [B, K]`), so sparse prediction has static shapes
for torch.compile. A row with fewer than K maskable tokens gets its remaining positions on special
tokens, left unchanged with label -100, so the shape stays static and the loss ignores them.

Static masking (RoBERTa's baseline) reuses this class at preprocessing time; see
`DataConfig.static_masking_copies` and `shards.PackedDataset`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

IGNORE_INDEX = -100


class MLMMasker:
    """Callable turning a `[B, L]` batch of token ids into masked inputs and labels."""

    def __init__(
        self,
        vocab_size: int,
        mask_token_id: int,
        special_token_ids: Iterable[int],
        *,
        mask_rate: float = 0.15,
        replace_mask: float = 0.8,
        replace_random: float = 0.1,
        fixed_count: bool = False,
    ) -> None:
        if not 0.0 < mask_rate < 1.0:
            raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}")
        if replace_mask < 0 or replace_random < 0 or replace_mask + replace_random > 1.0 + 1e-9:
            raise ValueError(f"replace_mask ({replace_mask}) + replace_random ({replace_random}) must be within [0, 1]")
        self.vocab_size = int(vocab_size)
        self.mask_token_id = int(mask_token_id)
        self.special_token_ids = sorted({int(i) for i in special_token_ids} | {self.mask_token_id})
        self.mask_rate = float(mask_rate)
        self.replace_mask = float(replace_mask)
        self.replace_random = float(replace_random)
        self.fixed_count = bool(fixed_count)
        is_special = torch.zeros(self.vocab_size, dtype=torch.bool)
        is_special[torch.tensor(self.special_token_ids, dtype=torch.long)] = True
        self._is_special = is_special
        # Random replacements come from ordinary tokens only: a random [PAD]/[SEP] would teach
        # the model nonsense positions.
        self._random_pool = torch.nonzero(~is_special).squeeze(1)
        if len(self._random_pool) == 0:
            raise ValueError("vocabulary has no non-special tokens to draw random replacements from")

    def num_targets(self, seq_len: int) -> int:
        """K, the number of targets per row with `fixed_count` (at least 1)."""
        return max(1, round(self.mask_rate * seq_len))

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.long()
        bsz, seq_len = input_ids.shape
        special = self._is_special[input_ids]  # [B, L]
        out: dict[str, torch.Tensor] = {}
        if self.fixed_count:
            k = self.num_targets(seq_len)
            if k > seq_len:
                raise ValueError(f"cannot choose {k} targets in rows of length {seq_len}")
            # Uniform scores, specials pushed to the end: the K smallest are a uniform random subset
            # of the maskable positions (falling back to specials only when a row is too short).
            scores = torch.rand(bsz, seq_len, generator=generator)
            scores = scores + special.float() * 2.0
            positions = scores.topk(k, dim=1, largest=False).indices.sort(dim=1).values  # [B, K]
            targets = torch.zeros_like(special)
            targets.scatter_(1, positions, True)
            targets &= ~special
            out["masked_positions"] = positions
        else:
            probs = torch.rand(bsz, seq_len, generator=generator)
            targets = (probs < self.mask_rate) & ~special
        labels = torch.where(targets, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        # One uniform draw per position decides mask / random / keep.
        action = torch.rand(bsz, seq_len, generator=generator)
        to_mask = targets & (action < self.replace_mask)
        to_random = targets & (action >= self.replace_mask) & (action < self.replace_mask + self.replace_random)
        masked = input_ids.clone()
        masked[to_mask] = self.mask_token_id
        n_random = int(to_random.sum())
        if n_random:
            pick = torch.randint(len(self._random_pool), (n_random,), generator=generator)
            masked[to_random] = self._random_pool[pick]
        out["input_ids"] = masked
        out["labels"] = labels
        if self.fixed_count:
            out["masked_labels"] = labels.gather(1, out["masked_positions"])
        return out
