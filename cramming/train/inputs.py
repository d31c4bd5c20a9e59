"""What the loop feeds the model: the prepared splits, the MLM maskers, the micro-batch streams,
and how many passes over the training split a budget makes.

The train stage reads the prepared data through this module only (cramming.corpus's `PackedDataset`,
`build_loader` and `MLMMasker`); a missing folder is prepared before this stage runs (cramming.pipeline).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cramming.corpus.masking import MLMMasker
from cramming.corpus.shards import PackedDataset, build_loader
from cramming.train import signals
from cramming.train.budget import Budget
from cramming.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    """A prepared folder's splits and MLM maskers, as the loop uses them."""

    train: PackedDataset
    val: PackedDataset
    masker: MLMMasker
    eval_masker: MLMMasker
    """The held-out masker: `masker` itself unless train.eval_mask_rate sets another rate."""

    @property
    def manifest(self) -> dict[str, Any]:
        return self.train.manifest

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])


def _masker(manifest: dict[str, Any], train: TrainConfig, rate: float) -> MLMMasker:
    special = manifest["special_tokens"]
    return MLMMasker(int(manifest["vocab_size"]), int(special["mask"]), special.values(), mask_rate=rate,
                     replace_mask=train.replace_mask, replace_random=train.replace_random,
                     fixed_count=train.fixed_count)


def open_data(data_dir: Path, train: TrainConfig) -> TrainData:
    """The train and val splits of a prepared folder (each shard's sha256 verified) and the maskers."""
    train_split, val_split = PackedDataset(data_dir, "train"), PackedDataset(data_dir, "val")
    manifest = train_split.manifest
    masker = _masker(manifest, train, train.mask_rate)
    eval_masker = masker if train.eval_mask_rate is None else _masker(manifest, train, train.eval_mask_rate)
    return TrainData(train_split, val_split, masker, eval_masker)


def probe_batch(manifest: dict[str, Any], masker: MLMMasker, micro: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A synthetic micro-batch shaped like the loader's (random non-special tokens, masked)."""
    ids = torch.randint(len(manifest["special_tokens"]), int(manifest["vocab_size"]), (micro, seq_len))
    batch = masker(ids)
    if manifest.get("packing") == "doc-bounded":
        # The loader's batches carry an attention_mask then: probe (and compile) with one too.
        batch["attention_mask"] = torch.ones(micro, seq_len, dtype=torch.long)
    return batch


def model_kwargs(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The batch entries the model's forward accepts, moved to the device."""
    accepted = inspect.signature(model.forward).parameters
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in accepted}


class TrainBatches:
    """This rank's endless stream of training micro-batches, from micro-batch `start` on, as a `with`
    block: leaving it shuts the loader's worker processes down at once, not at interpreter exit."""

    def __init__(self, dataset: PackedDataset, micro: int, masker: MLMMasker, *, shuffle: bool, seed: int,
                 num_workers: int, rank: int, world_size: int, start: int, pin_memory: bool) -> None:
        # Workers forked with SIGTERM/SIGINT blocked: a signal to the process group stops the
        # trainer at a step boundary instead of killing a worker mid-batch (train.signals).
        with signals.blocked():
            self._batches: Iterator[dict[str, torch.Tensor]] | None = build_loader(
                dataset, micro, masker, shuffle=shuffle, seed=seed, num_workers=num_workers, rank=rank,
                world_size=world_size, start_batch=start, pin_memory=pin_memory)

    def __enter__(self) -> TrainBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self._batches = None  # the DataLoader iterator's only reference: its workers exit now

    def __next__(self) -> dict[str, torch.Tensor]:
        assert self._batches is not None, "TrainBatches used after its `with` block"
        return next(self._batches)


def heldout_batches(val_dataset: PackedDataset, micro: int, masker: MLMMasker, num_batches: int,
                    seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """The first `num_batches` val micro-batches (fewer if the split is smaller), with fixed masks:
    the same batches at every evaluation of a run."""
    available = max(1, len(val_dataset) // micro)
    loader = build_loader(val_dataset, min(micro, len(val_dataset)), masker, shuffle=False, seed=seed, num_workers=0)
    for _ in range(min(num_batches, available)):
        yield next(loader)


class DataPasses:
    """Epochs over the training split (rows drawn / rows one pass holds), and one warning early in
    the run when the budget will draw more rows than that: the loader then wraps around and
    revisits rows, which long budgets on a small dataset do silently otherwise.

    Token and step budgets know what they will draw before the first step (`check`); a time budget
    is projected from the throughput measured from this process's first step to its first metrics
    record (`observe`).
    """

    def __init__(self, rows: int, seq_len: int, enabled: bool) -> None:
        self.rows = rows
        """Rows one pass delivers (BatchPlan.rows_per_pass)."""
        self.seq_len, self.enabled = seq_len, enabled
        self.checked = False
        self._baseline: tuple[float, int] | None = None  # (elapsed, tokens) after the first step

    def epochs(self, tokens: int) -> float:
        return tokens / (self.rows * self.seq_len)

    def check(self, planned_tokens: float, basis: str) -> None:
        """Decide (once) whether `planned_tokens` revisit data, and warn if so; `basis` says where
        the plan comes from and ends in a verb ("this steps budget draws")."""
        self.checked = True
        if not self.enabled or planned_tokens <= self.rows * self.seq_len:
            return
        planned_rows = planned_tokens / self.seq_len
        log.warning(
            "this run will revisit its data: %s about %s tokens (%s rows of %d), which a single pass would "
            "need, but the training split holds %s tokens (%s rows): about %.1f epochs. Prepare more data "
            "(data.max_documents, data.max_chars, a larger source) or expect repeated rows",
            basis, f"{planned_tokens:,.0f}", f"{planned_rows:,.0f}", self.seq_len, f"{self.rows * self.seq_len:,}",
            f"{self.rows:,}", planned_rows / self.rows)

    def observe(self, budget: Budget, tokens: int, elapsed: float, logged: bool) -> None:
        """Time budgets, after each step until decided: the first call is the baseline (the first
        step includes the loader's start-up); the first later metrics record projects the tokens
        the rest of the budget will draw at the throughput measured since."""
        if self._baseline is None:
            self._baseline = (elapsed, tokens)
            return
        start, start_tokens = self._baseline
        if not logged or elapsed <= start:
            return
        rate = (tokens - start_tokens) / (elapsed - start)
        left = max(0.0, budget.training_end_s() - elapsed)
        self.check(tokens + rate * left, f"at the measured {rate:,.0f} tokens/s the time budget draws")
