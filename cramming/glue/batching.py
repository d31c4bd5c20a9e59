"""Finetuning batches: which examples form a batch (the recipe's shuffled loader) and how wide it is padded.

Batch membership comes from one DataLoader per trial, shuffled by a generator seeded with the trial's
seed, so a trial sees the same batches in the same order whether it runs alone or side by side with
other trials. Padding never changes a batch's members, only its width:

- `longest` (buckets empty): pad to the batch's longest example, the least padding; each width is a
  new shape, which eager execution does not mind.
- buckets: pad to the smallest bucket width that holds the longest example, so a compiled step
  sees a few static shapes instead of up to `max_seq_len` of them.

Side-by-side trials stack one batch per trial into one tensor, padded to one width for all.
Padded positions are masked out of attention and never reach the [CLS] pooler, so the padding
width does not change what the model computes (up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

Example = tuple[list[int], float] | tuple[list[int], float, list[int]]
"""(token ids, class index or score), and the segment ids for models that read them."""


def bucket_widths(max_len: int, count: int) -> tuple[int, ...]:
    """`count` (>= 1) padding widths up to `max_len`, evenly spaced and rounded up to multiples of 8
    (tensor-core friendly); the last one is `max_len` itself."""
    if count < 1:
        raise ValueError(f"bucket count must be >= 1, got {count}")
    widths = {min(max_len, 8 * math.ceil(max_len * k / count / 8)) for k in range(1, count + 1)}
    return tuple(sorted(widths | {max_len}))


def padded_width(longest: int, buckets: Sequence[int]) -> int:
    """The width a batch whose longest example has `longest` tokens is padded to."""
    if not buckets:
        return longest
    for width in buckets:
        if width >= longest:
            return width
    raise ValueError(f"an example of {longest} tokens is longer than the largest bucket {buckets[-1]}")


class Collate:
    """Examples -> input_ids, attention_mask (token_type_ids) [B, W] and labels [B] (or [N, B, ...] stacked).

    Every key but `labels` is a model input (`training.model_inputs`).
    """

    def __init__(self, pad_id: int, regression: bool, buckets: Sequence[int] = ()) -> None:
        self.pad_id = pad_id
        self.regression = regression
        self.buckets = tuple(buckets)

    def pad(self, batch: Sequence[Example], width: int) -> dict[str, torch.Tensor]:
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, example in enumerate(batch):
            ids = example[0]
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        out = {"input_ids": input_ids, "attention_mask": mask}
        if len(batch[0]) == 3:  # padded positions are masked, so their segment id does not matter
            types = torch.zeros((len(batch), width), dtype=torch.long)
            for i, example in enumerate(batch):
                types[i, : len(example[2])] = torch.tensor(example[2], dtype=torch.long)
            out["token_type_ids"] = types
        dtype = torch.float32 if self.regression else torch.long
        out["labels"] = torch.tensor([example[1] for example in batch], dtype=dtype)
        return out

    def __call__(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        return self.pad(batch, padded_width(max(len(example[0]) for example in batch), self.buckets))

    def stack(self, batches: Sequence[Sequence[Example]], width: int | None = None) -> dict[str, torch.Tensor]:
        """One batch per trial, padded to one width (the widest trial's, or `width`) and stacked: [N, B, W], [N, B]."""
        if width is None:
            width = padded_width(max(len(example[0]) for batch in batches for example in batch), self.buckets)
        parts = [self.pad(batch, width) for batch in batches]
        return {key: torch.stack([p[key] for p in parts]) for key in parts[0]}


def make_loader(input_ids: Sequence[list[int]], labels: Sequence[int | float], batch_size: int, collate_fn: object,
                shuffle: bool, seed: int, workers: int, token_type_ids: Sequence[list[int]] | None = None) -> DataLoader:
    """The recipe's loader: batches of `batch_size` (the last one smaller), reshuffled every epoch by a
    generator seeded with `seed`; which examples form a batch depends only on the seed and the data."""
    columns = (input_ids, labels) if token_type_ids is None else (input_ids, labels, token_type_ids)
    data = list(zip(*columns, strict=True))
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn, generator=gen,
                      num_workers=workers)


@dataclass
class PaddingStats:
    """Tokens computed over one pass of batches: real tokens and the padded total."""

    real: int = 0
    padded: int = 0

    def add(self, lengths: Sequence[int], width: int) -> None:
        self.real += sum(lengths)
        self.padded += width * len(lengths)

    @property
    def waste(self) -> float:
        """Fraction of computed positions that are padding."""
        return 1.0 - self.real / self.padded if self.padded else 0.0


def padding_waste(lengths: Sequence[int], batch_size: int, seeds: Sequence[int], buckets: Sequence[int],
                  epochs: int = 1) -> dict[str, PaddingStats]:
    """Padding of the recipe's batches of examples with these token `lengths`, per way of padding.

    Sequential trials pad each batch on its own: to `max_seq_len` (the largest bucket: static shapes
    without buckets), to the batch's `longest`, or to its bucket. Side-by-side trials pad each step's
    batches of all trials (one per seed) to one width: the group's longest or its bucket.
    """
    names = ("max_seq_len", "longest", "buckets", "side-by-side longest", "side-by-side buckets")
    stats = {name: PaddingStats() for name in names}
    loaders = [make_loader([[0] * n for n in lengths], [0] * len(lengths), batch_size, list, True, s, 0) for s in seeds]
    top = buckets[-1] if buckets else max(lengths)
    for _ in range(epochs):
        for group in zip(*loaders, strict=True):
            group_lengths = [[len(ids) for ids, _ in batch] for batch in group]
            longest = max(max(lens) for lens in group_lengths)
            for lens in group_lengths:
                stats["max_seq_len"].add(lens, top)
                stats["longest"].add(lens, max(lens))
                stats["buckets"].add(lens, padded_width(max(lens), buckets))
                stats["side-by-side longest"].add(lens, longest)
                stats["side-by-side buckets"].add(lens, padded_width(longest, buckets))
    return stats
