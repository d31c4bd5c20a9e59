"""`cram glue`: finetune a checkpoint on GLUE (and custom tasks) and report the median of N trials.

The typed config of the `glue` group lives here so that it can be imported without torch;
`tasks` reads the data, `metrics` scores predictions, `finetune` runs the trials.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cramming.errors import ConfigError
from cramming.glue.tasks import EXCLUDED_TASKS, GLUE_TASKS, METRIC_NAMES, validate_task_names

Schedule = Literal["cosine", "linear", "constant"]


@dataclass
class CustomTaskConfig:
    """A user's own task in a local TSV, CSV or JSONL file, finetuned like a GLUE task."""

    name: str
    """Name of the task in results and tables (letters, digits, '-' and '_'; not a GLUE task name)."""
    train_file: str
    """Training file (.tsv, .csv or .jsonl). TSV is read with quoting disabled, CSV with standard quoting."""
    dev_file: str
    """Evaluation file, same layout as `train_file`."""
    text_columns: list[str]
    """One column (single sentence) or two (a pair, encoded as [CLS] a [SEP] b [SEP]); header names or JSON keys."""
    label_column: str
    """Column holding the label (classification) or the score (regression)."""
    kind: Literal["classification", "regression"] = "classification"
    """classification: cross-entropy over `labels`; regression: one output, MSE loss."""
    metric: str = "accuracy"
    """Headline metric: accuracy, f1, mcc (classification; f1 needs 2 labels) or pearson, spearman (regression)."""
    labels: list[str] | None = None
    """The label values in class-index order; null = the sorted distinct values of the training file."""
    format: Literal["tsv", "csv", "jsonl"] | None = None
    """File format; null = inferred from the file extension."""

    def __post_init__(self) -> None:
        import re

        where = f"glue.custom_tasks[{self.name}]"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(self.name)):
            raise ConfigError(f"{where}: name must use letters, digits, '-' and '_' only")
        if self.name.lower() in GLUE_TASKS or self.name.lower() in EXCLUDED_TASKS:
            raise ConfigError(f"{where}: '{self.name}' is a GLUE task name; pick another name")
        if not 1 <= len(self.text_columns) <= 2:
            raise ConfigError(f"{where}: text_columns must name 1 or 2 columns, got {list(self.text_columns)}")
        if self.kind not in ("classification", "regression"):
            raise ConfigError(f"{where}: kind must be classification or regression, got {self.kind!r}")
        allowed = METRIC_NAMES[self.kind]
        if self.metric not in allowed:
            raise ConfigError(f"{where}: metric {self.metric!r} does not fit kind={self.kind}; choose one of {', '.join(allowed)}")
        if self.kind == "regression" and self.labels is not None:
            raise ConfigError(f"{where}: labels must be null for a regression task")
        if self.labels is not None:
            self.labels = [str(v) for v in self.labels]
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise ConfigError(f"{where}: labels must list at least 2 distinct values, got {self.labels}")
        if self.metric == "f1" and self.labels is not None and len(self.labels) != 2:
            raise ConfigError(f"{where}: metric f1 needs exactly 2 labels (the second is the positive class)")
        if self.format not in (None, "tsv", "csv", "jsonl"):
            raise ConfigError(f"{where}: format must be tsv, csv, jsonl or null, got {self.format!r}")


@dataclass
class GlueConfig:
    """Finetuning and evaluation settings of `cram glue` (one global set for all tasks, as in the paper)."""

    name: str = "cramming"
    """Preset name (a file in configs/glue/)."""
    tasks: list[str] = field(default_factory=lambda: list(GLUE_TASKS))
    """GLUE tasks to run: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte (WNLI is excluded, as in the paper)."""
    data_dir: str | None = None
    """Folder in the official GLUE download layout (<dir>/CoLA/train.tsv, <dir>/MNLI/dev_matched.tsv, ...);
    null = the Hugging Face hub dataset nyu-mll/glue (needs network or a warm cache)."""
    custom_tasks: list[CustomTaskConfig] = field(default_factory=list)
    """Extra tasks from local files, run after the GLUE tasks and kept out of the GLUE average."""
    trials: int = 5
    """Finetuning runs per task, each with its own seed; the median is reported."""
    seeds: list[int] | None = None
    """One seed per trial; null = seed, seed+1, ... (the top-level `seed`)."""
    batch_size: int = 16
    """Training examples per optimizer step."""
    eval_batch_size: int = 128
    """Examples per forward pass during evaluation (no effect on scores)."""
    lr: float = 4e-5
    """Peak AdamW learning rate."""
    schedule: Schedule = "cosine"
    """Learning-rate decay after warmup: cosine (to 0), linear (to 0) or constant."""
    warmup_fraction: float = 0.1
    """Fraction of the optimizer steps spent warming the learning rate up linearly from 0."""
    epochs: int = 5
    """Passes over the training set (the rules allow at most 5)."""
    dropout: float = 0.1
    """Dropout during finetuning (pretraining runs without it)."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices only (not to biases and LayerNorm weights)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW beta1, beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float | None = 1.0
    """Clip the gradient norm to this value; null = no clipping."""
    max_seq_len: int = 128
    """Tokens per example including [CLS]/[SEP]; longer inputs are truncated (longest text first)."""
    max_train_examples: int | None = None
    """Use a fixed random subset of this many training examples per task (quick runs); null = all."""
    max_eval_examples: int | None = None
    """Use a fixed random subset of this many examples of each dev split; null = all."""
    eval_every_epoch: bool = True
    """Evaluate on dev after every epoch (logged); the FINAL epoch's scores are reported either way."""
    export_finetuned: bool = False
    """Export the first trial's finetuned classifier of each task to <out>/finetuned/<task>/."""
    num_workers: int = 0
    """DataLoader worker processes (tokenization is done up front, so 0 is usually fastest)."""
    parallel_trials: bool | None = None
    """Train a task's trials side by side on one device (one stacked step; same seeds, batches, AdamW and
    schedule per trial as one after another): true, false (one after another), or null = side by side on
    CUDA, one after another on CPU (not faster there; docs/benchmarks.md). fp16 always runs them one after
    another, and a group that does not fit in memory falls back to that (logged)."""
    pad_buckets: int = 4
    """Padding widths of a compiled step (CUDA with gpu.compile): a batch is padded to the smallest of this
    many widths up to max_seq_len that holds it (1 = always max_seq_len), so the compiled step sees a few
    static shapes. Eager steps pad to the batch's longest example. Scores do not depend on it."""
    tokenizer: str | None = None
    """For ckpt=random-init only: a tokenizer.json file or a folder holding one (a prepared data folder or
    an exported checkpoint); the model is built from the `arch` group with that tokenizer's vocabulary."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A data row with missing fields, empty text or a label outside the task's set: stop with an error
    naming the file and line, or skip it (counted in the log and results)."""

    def __post_init__(self) -> None:
        # `glue.tasks=rte` (a bare name) means one task, not the letters r, t, e.
        self.tasks = validate_task_names([self.tasks] if isinstance(self.tasks, str) else list(self.tasks))
        names = [c.name for c in self.custom_tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"glue.custom_tasks: task names must be unique, got {names}")
        if not self.tasks and not self.custom_tasks:
            raise ConfigError("glue.tasks is empty and there are no glue.custom_tasks: nothing to run")
        positive = {
            "trials": self.trials, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
            "epochs": self.epochs,
        }
        for key, value in positive.items():
            if int(value) < 1:
                raise ConfigError(f"glue.{key} must be >= 1, got {value}")
        if self.epochs > 5:
            # The paper's rules cap downstream finetuning at 5 epochs; allow more but make it visible.
            import warnings

            warnings.warn(f"glue.epochs={self.epochs} exceeds the Cramming rules' limit of 5", stacklevel=2)
        if self.seeds is not None:
            self.seeds = [int(s) for s in self.seeds]
            if len(self.seeds) != self.trials:
                raise ConfigError(f"glue.seeds has {len(self.seeds)} entries but glue.trials={self.trials}; give one per trial")
            if len(set(self.seeds)) != len(self.seeds):
                raise ConfigError(f"glue.seeds must be distinct, got {self.seeds}")
        if not self.lr > 0:
            raise ConfigError(f"glue.lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"glue.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"glue.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"glue.dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0:
            raise ConfigError(f"glue.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"glue.adam_betas must be two values in [0, 1), got {self.adam_betas}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"glue.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.max_seq_len < 4:
            raise ConfigError(f"glue.max_seq_len must be >= 4 ([CLS] a [SEP] b [SEP]), got {self.max_seq_len}")
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            if value is not None and int(value) < 1:
                raise ConfigError(f"glue.{key} must be >= 1 or null, got {value}")
        if self.num_workers < 0:
            raise ConfigError(f"glue.num_workers must be >= 0, got {self.num_workers}")
        if self.pad_buckets < 1 or self.pad_buckets > self.max_seq_len:
            raise ConfigError(f"glue.pad_buckets must be between 1 and glue.max_seq_len={self.max_seq_len}, got {self.pad_buckets}")
        if self.on_bad_row not in ("error", "skip"):
            raise ConfigError(f"glue.on_bad_row must be error or skip, got {self.on_bad_row!r}")

    def trial_seeds(self, base_seed: int = 0) -> list[int]:
        """The seed of each trial."""
        if self.seeds is not None:
            return list(self.seeds)
        return [int(base_seed) + i for i in range(self.trials)]


__all__ = ["CustomTaskConfig", "GlueConfig", "GLUE_TASKS"]
