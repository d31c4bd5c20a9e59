"""The finetuning epochs of a trial, or of several trials side by side, and the dev evaluation after each.

One loop serves both ways of running trials, so they cannot drift apart: `finetune.finetune_trial`
hands it one model, `parallel` N trials stacked into one. `Trials` says what differs: how a step's
batch is made and stepped, and each trial as a module for switching dropout and for evaluation.
Every forward pass (training steps of both kinds, evaluation) takes its inputs from the batch
through `training.model_inputs`, so an option of the model's forward reaches all of them from there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cramming.faults import fault_point
from cramming.glue import GlueConfig
from cramming.glue import metrics as M
from cramming.glue.batching import Collate
from cramming.glue.encoding import Encoded
from cramming.glue.tasks import TaskSpec
from cramming.glue.training import TrialLog, logits_of
from cramming.gpu import GpuProfile
from cramming.optim.precision import autocast

Scores = tuple[dict[str, float], list[str]]
"""Dev scores in percent by metric key, and notes on undefined metrics."""


class Stepper(Protocol):
    """An optimizer step of every trial it trains (`training.TrialTrainer`, `parallel.GroupTrainer`)."""

    scheduler: torch.optim.lr_scheduler.LRScheduler

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One step on one batch on the device; the loss [] of one trial or the losses [N] of N, unsynced."""
        ...


@dataclass
class Trials:
    """What the epoch loop drives: one trial, or N trained side by side as one stacked model."""

    trainer: Stepper
    batches: Callable[[], Iterator[dict[str, torch.Tensor]]]
    """A new pass over the training batches on the host (one trial's, or N stacked into [N, B, W]),
    opened once per epoch: each opening draws the epoch's shuffle from the trials' own generators."""
    steps_per_epoch: int
    models: list[nn.Module]
    """Each trial as a module: `.train()` and `.eval()` switch its dropout, evaluation runs it."""
    logs: list[TrialLog]


@dataclass
class DevSets:
    """A task's dev splits and how they are scored."""

    spec: TaskSpec
    splits: dict[str, Encoded]
    collate: Collate
    batch_size: int
    profile: GpuProfile

    @classmethod
    def of(cls, spec: TaskSpec, splits: dict[str, Encoded], pad_id: int, gcfg: GlueConfig, profile: GpuProfile) -> DevSets:
        """The recipe's evaluation: batches of glue.eval_batch_size padded to their longest example."""
        return cls(spec, splits, Collate(pad_id, spec.kind == "regression"), gcfg.eval_batch_size, profile)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Scores:
        """Scores (percent) on every dev split, flattened to the task's metric keys."""
        model.eval()
        device = torch.device(self.profile.device)
        values: dict[str, float] = {}
        notes: list[str] = []
        regression = self.spec.kind == "regression"
        for split, enc in self.splits.items():
            preds: list[torch.Tensor] = []
            for batch in enc.loader(self.batch_size, self.collate, False, 0, 0):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast(device, self.profile.precision):
                    logits = logits_of(model, batch)
                preds.append(logits.view(-1) if regression else logits.argmax(-1))
            pred = torch.cat(preds).cpu().numpy()
            scores, split_notes = M.score(self.spec, pred, np.asarray(enc.labels))
            for name, v in scores.items():
                values[self.spec.metric_key(split, name)] = v
            notes += [f"{split}: {n}" if len(self.splits) > 1 else n for n in split_notes]
        return values, notes


def run_epochs(trials: Trials, dev: DevSets, gcfg: GlueConfig, desc: str) -> None:
    """Train every trial for glue.epochs epochs, evaluating on dev after each (or only after the last:
    glue.eval_every_epoch=false); each epoch ends in the trials' logs."""
    device = torch.device(dev.profile.device)
    steps = trials.steps_per_epoch
    for epoch in range(1, gcfg.epochs + 1):
        for model in trials.models:
            model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros(len(trials.logs), device=device)
        # The bar gets the epoch's one iterator: given a loader, tqdm.auto opens a throwaway iterator of
        # its own, whose draw from the shuffling generator would make the order depend on the bar.
        bar = tqdm(trials.batches(), total=steps, desc=f"{desc} epoch {epoch}/{gcfg.epochs}", leave=False,
                   mininterval=1.0, dynamic_ncols=True)
        for batch in bar:
            losses = trials.trainer.step({k: v.to(device, non_blocking=True) for k, v in batch.items()})
            fault_point("glue.trial")
            loss_sum += losses.detach()
        train_losses = [total / max(1, steps) for total in loss_sum.tolist()]  # one host sync per epoch
        seconds = time.perf_counter() - t0
        evaluated = gcfg.eval_every_epoch or epoch == gcfg.epochs
        lr = trials.trainer.scheduler.get_last_lr()[0]
        for log, model, loss in zip(trials.logs, trials.models, train_losses, strict=True):
            log.end_epoch(epoch, loss, lr, seconds, dev.evaluate(model) if evaluated else None)
