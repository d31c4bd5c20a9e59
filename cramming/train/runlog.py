"""What pretraining writes about itself into the run folder: the metrics log, the progress bar, the
summary and the loss plot, each record and the summary also going to the run's experiment trackers
(train.report_to, cramming.trackers). The files' formats are cramming.runs'."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cramming import runs
from cramming.config import format_duration
from cramming.trackers import Trackers
from cramming.train.budget import Budget
from cramming.train.state import TrainState

log = logging.getLogger(__name__)

LOSS_PLOT = "loss.png"


def _progress_bar(enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=100, unit="%", desc="pretrain", disable=not enabled, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total}% [{elapsed}{postfix}]", file=sys.stderr)


class RunLog:
    """Metrics log records (also sent to the trackers) and the progress bar of the main process, as a
    `with` block.

    Step losses stay on the device until a log step: `log_step` is the only place training
    losses reach the host. On ranks other than the main one every method is a no-op. The trackers are
    opened (and closed) by the caller; this logs the resolved config to them once, here.
    """

    def __init__(self, run_dir: Path, enabled: bool, trackers: Trackers, budget: Budget, device: torch.device,
                 resumed_at: int | None, mfu_per_token: float | None, config_text: str | None = None) -> None:
        self.enabled, self.budget, self.mfu_per_token = enabled, budget, mfu_per_token
        self.run_dir = run_dir
        # A resumed run's records after its checkpoint describe steps that will be redone: the
        # writer drops them so that the resumed log reads as one run.
        self.metrics = runs.MetricsWriter(run_dir, resumed_at) if enabled else None
        self.trackers = trackers
        if enabled and trackers and config_text is not None:
            import yaml

            trackers.log_config(yaml.safe_load(config_text))
        self.bar = _progress_bar(enabled)
        self.loss = torch.zeros((), device=device)  # sum of finite step losses since the last record
        self.steps = self.tokens = 0
        self.clock = time.monotonic()
        self.last_step: int | None = None
        self.postfix: dict[str, Any] = {}
        if enabled:
            # Import the plotting stack now: a first import inside the final reserve can take seconds.
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, entry: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(entry)
        if self.trackers:
            self.trackers.log(entry, entry["step"])

    def add_step(self, loss: torch.Tensor | None, tokens: int) -> None:
        """Count one optimizer step's tokens, and its loss when it was finite (None: skipped)."""
        if loss is not None:
            self.loss += loss
            self.steps += 1
        self.tokens += tokens

    def show_left(self, elapsed: float) -> None:
        """The bar's last logged figures with the time left now (host-side numbers only)."""
        remaining = self.budget.remaining_s(elapsed)
        self.bar.set_postfix(**self.postfix, refresh=False,
                             left=format_duration(remaining) if remaining is not None else "-")

    def tick(self, progress: float, elapsed: float) -> None:
        """Between log steps: advance the bar; it redraws at tqdm's own rate, with no host sync."""
        if self.enabled:
            self.bar.n = round(100 * progress, 1)
            self.show_left(elapsed)
            self.bar.update(0)

    def log_step(self, state: TrainState, elapsed: float, progress: float, lr: float, sequences: int,
                 keep: int | None, random_ltd: bool, epochs: float) -> None:
        """Write one metrics record for the steps since the last one and refresh the bar.

        `progress` is the value this step's schedules were computed from, recorded unrounded so
        that the record's `lr` is exactly the LR schedule at the record's `progress`."""
        if not self.enabled or state.step == self.last_step:
            return
        now = time.monotonic()
        tokens_per_s = self.tokens / max(now - self.clock, 1e-9)
        entry = {"step": state.step, "elapsed_s": round(elapsed, 3), "progress": progress,
                 "loss": float(self.loss.item() / self.steps) if self.steps else None, "lr": lr,
                 "batch_size": sequences, "tokens_seen": state.tokens, "tokens_per_s": round(tokens_per_s, 1),
                 "mfu": tokens_per_s * self.mfu_per_token if self.mfu_per_token else None,
                 "skipped_steps": state.skipped, "epochs": epochs}
        if random_ltd:
            entry.update(keep_tokens=keep, layer_tokens_saved=state.layer_tokens_saved)
        self.record(entry)
        self.bar.n = round(100 * progress, 1)
        self.postfix = {"loss": f"{entry['loss']:.3f}" if entry["loss"] is not None else "nan",
                        "tok_s": f"{tokens_per_s:.0f}", "bs": sequences, "lr": f"{lr:.2e}"}
        self.show_left(elapsed)
        self.bar.refresh()
        self.loss.zero_()
        self.steps = self.tokens = 0
        self.clock, self.last_step = now, state.step

    def final_loss(self) -> float | None:
        """The training loss of the run's last record that has one (across resumes)."""
        records = runs.read_metrics(self.run_dir).records
        return next((r["loss"] for r in reversed(records) if r.get("loss") is not None), None)

    def write_summary(self, summary: dict[str, Any]) -> None:
        runs.write_summary(self.run_dir, summary)
        self.trackers.log_summary(summary)

    def plot(self) -> None:
        """loss.png: the training and held-out loss over the budget's wall-clock time, with the start of
        each new data pass marked (the same plot as `cram report`'s)."""
        runs.plot_loss([(self.run_dir.name, runs.read_metrics(self.run_dir))], self.run_dir / LOSS_PLOT)

    def close_bar(self) -> None:
        """End the progress bar (before the final phase, which has no progress to show)."""
        self.bar.close()

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

