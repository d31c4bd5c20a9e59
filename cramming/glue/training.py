"""The finetuning recipe's step pieces, shared by sequential and side-by-side trials: loss, AdamW
and the learning-rate schedule from the glue config, padding, when to compile, the trial record.

Both ways of running trials build these the same way, so a trial's optimizer and schedule are the
recipe's whichever way it runs (see `cramming.glue.parallel` for the stacked form). Optimizer
groups, precision and schedule shapes are the training stack both stages share (`cramming.optim`):
on CPU finetuning runs fp32 without autocast, as pretraining does.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cramming.glue import GlueConfig
from cramming.glue.batching import Collate, bucket_widths
from cramming.gpu import GpuProfile
from cramming.optim import schedules
from cramming.optim.groups import build_optimizer
from cramming.optim.precision import autocast, grad_scaler
from cramming.runs import GlueEpoch, GlueTrial

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA): a trial's model is built right after this."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compiles(profile: GpuProfile) -> bool:
    """torch.compile the training step on CUDA when the profile compiles; CPU stays eager (compiling a
    step on CPU takes minutes and each GLUE task needs its own graphs)."""
    return profile.device == "cuda" and profile.compile


def compiled_step(profile: GpuProfile, unpadded: bool) -> bool:
    """Whether a trial's step is compiled: where the profile compiles, unless it runs unpadded (the
    token count is a data-dependent shape, so that step stays eager)."""
    return compiles(profile) and not unpadded


def unpads(gcfg: GlueConfig, profile: GpuProfile, model: nn.Module) -> bool:
    """Whether a trial run one after another takes the model's unpadded path (glue.unpadded): null = where
    the step is eager. Only crammed models have that path (`run_glue` refuses unpadded=true for others)."""
    if not hasattr(model, "use_unpadding"):
        return False
    return gcfg.unpadded if gcfg.unpadded is not None else not compiles(profile)


def train_collate(pad_id: int, regression: bool, gcfg: GlueConfig, compiled: bool) -> Collate:
    """Training batches padded to the bucket widths for a compiled step (its static shapes), to the
    longest example for an eager one."""
    return Collate(pad_id, regression, bucket_widths(gcfg.max_seq_len, gcfg.pad_buckets) if compiled else ())


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a batch hands the model: every key but the labels (input_ids, attention_mask, and
    token_type_ids for models that read them). Every forward pass of finetuning, one trial's, a stack's
    and evaluation's, takes its inputs from here."""
    return {k: v for k, v in batch.items() if k != "labels"}


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The classifier's fp32 logits [B, num_labels] (a plain module's dict or a transformers output)."""
    out = model(**model_inputs(batch))
    logits = out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)
    return logits.float()


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Mean loss of a batch: cross-entropy for classes, MSE for a score (num_labels == 1).

    Computed here in fp32 rather than taken from the model, so the objective is the same under any
    precision.
    """
    logits = logits.float()
    if regression:
        return nn.functional.mse_loss(logits.view(-1), labels.float())
    return nn.functional.cross_entropy(logits, labels)


def make_optimizer(params: Iterable[torch.Tensor], gcfg: GlueConfig, device: torch.device,
                   stacked: int = 0) -> torch.optim.AdamW:
    """The recipe's AdamW: weight decay on the matrices (embedding tables included), not on biases,
    norm weights or scalars. `stacked`: leading trial dimensions of side-by-side tensors [N, ...]."""
    return build_optimizer(params, lr=gcfg.lr, weight_decay=gcfg.weight_decay, betas=tuple(gcfg.adam_betas),
                           eps=gcfg.adam_eps, device=device, stacked=stacked)


def make_scheduler(optimizer: torch.optim.Optimizer, gcfg: GlueConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over round(warmup_fraction x total_steps) steps, then the recipe's decay (cosine or
    linear to 0, or constant): transformers' `get_*_schedule_with_warmup` shapes, stepped per batch."""
    warmup = int(round(gcfg.warmup_fraction * total_steps)) / total_steps
    return schedules.lambda_lr(optimizer, functools.partial(schedules.lr_factor, schedule=gcfg.schedule,
                                                            warmup_fraction=warmup), total_steps)


@dataclass
class TrialTrainer:
    """One trial's model, its compiled form, AdamW, schedule and loss scaler: `step` is one recipe step."""

    model: nn.Module
    fast: nn.Module
    """The compiled model (or `model` itself): it takes full batches, whose bucketed widths are its
    static shapes; an epoch's smaller last batch runs through the eager `model`."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    gcfg: GlueConfig
    profile: GpuProfile
    regression: bool

    @classmethod
    def build(cls, model: nn.Module, gcfg: GlueConfig, profile: GpuProfile, total_steps: int,
              regression: bool, unpadded: bool = False) -> TrialTrainer:
        """`unpadded`: switch the model to its unpadded path (training and evaluation), whose step stays
        eager: the token count is a data-dependent shape."""
        device = torch.device(profile.device)
        optimizer = make_optimizer(model.parameters(), gcfg, device)
        scaler = grad_scaler(device, profile.precision)  # enabled for fp16 on CUDA only
        if unpadded:
            model.use_unpadding(True)
        fast = torch.compile(model, dynamic=False) if compiled_step(profile, unpadded) else model
        return cls(model, fast, optimizer, make_scheduler(optimizer, gcfg, total_steps), scaler, gcfg, profile, regression)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step on one batch (on the model's device); returns the loss, unsynced."""
        with autocast(batch["input_ids"].device, self.profile.precision):
            logits = logits_of(self.fast if len(batch["labels"]) == self.gcfg.batch_size else self.model, batch)
        loss = task_loss(logits, batch["labels"], self.regression)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.gcfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.gcfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss


@dataclass
class TrialLog:
    """One trial's record while it trains: its epochs, the FINAL epoch's scores (never the best
    epoch's) and notes; `result` is its entry in the results file."""

    seed: int
    label: str
    """How the log lines name the trial, e.g. 'rte trial 1/5 (seed 0)'."""
    epochs_total: int
    epochs: list[GlueEpoch] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    eval_notes: list[str] = field(default_factory=list)
    """Notes of the latest evaluation (e.g. a constant prediction)."""
    loss_notes: list[str] = field(default_factory=list)

    def end_epoch(self, epoch: int, train_loss: float, lr: float, seconds: float,
                  scores: tuple[dict[str, float], list[str]] | None) -> None:
        """Record an epoch: its mean training loss, last LR, training time and (when evaluated) dev scores."""
        record = GlueEpoch(epoch, train_loss, lr, round(seconds, 3))
        if scores is not None:
            record.dev, self.eval_notes = scores
            self.final = record.dev
        self.epochs.append(record)
        shown = " ".join(f"{k} {v:.2f}" for k, v in (record.dev or {}).items())
        log.info("%s epoch %d/%d: train_loss %.4f%s (%.1fs)", self.label, epoch, self.epochs_total, train_loss,
                 f" dev {shown}" if shown else "", seconds)
        if not math.isfinite(train_loss):
            self.loss_notes.append(f"non-finite training loss in epoch {epoch}")

    def result(self, seconds: float, steps: int, mode: str, together: int | None = None,
               unpadded: bool = False) -> GlueTrial:
        """The trial's entry in the results file; `together`: the size of its side-by-side group."""
        return GlueTrial(self.seed, self.final, self.epochs, [*self.eval_notes, *self.loss_notes], round(seconds, 3),
                         steps, mode, together, unpadded)
