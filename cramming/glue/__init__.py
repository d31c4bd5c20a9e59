"""`cram glue`: finetune a checkpoint on GLUE (and custom tasks) and report the median of N trials.

The typed config of the `glue` group lives here so that it can be imported without torch;
`tasks` reads the data, `metrics` scores predictions, `sources` loads the model to finetune,
`finetune` runs the trials.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cramming.checks import validate
from cramming.glue.tasks import (
    EXCLUDED_TASKS,
    GLUE_TASKS,
    METRIC_NAMES,
    FileFormat,
    TaskKind,
    validate_task_names,
)
from cramming.trackers import TrackerName

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
    kind: TaskKind = "classification"
    """classification: cross-entropy over `labels`; regression: one output, MSE loss."""
    metric: str = "accuracy"
    """Headline metric: accuracy, f1, mcc (classification; f1 needs 2 labels) or pearson, spearman (regression)."""
    labels: list[str] | None = None
    """The label values in class-index order; null = the sorted distinct values of the training file."""
    format: FileFormat | None = None
    """File format; null = inferred from the file extension."""

    def __post_init__(self) -> None:
        import re

        if self.labels is not None:
            self.labels = [str(v) for v in self.labels]
        allowed = METRIC_NAMES.get(self.kind, ())
        validate(self, f"glue.custom_tasks[{self.name}]", [
            (re.fullmatch(r"[A-Za-z0-9_-]+", str(self.name)) is not None, "name must use letters, digits, '-' and '_' only"),
            (str(self.name).lower() not in (*GLUE_TASKS, *EXCLUDED_TASKS),
             f"name={self.name!r} is a GLUE task name; pick another name"),
            (1 <= len(self.text_columns) <= 2, f"text_columns must name 1 or 2 columns, got {list(self.text_columns)}"),
            (self.metric in allowed,
             f"metric={self.metric!r} does not fit kind={self.kind}; choose one of: {', '.join(allowed)}"),
            (self.kind != "regression" or self.labels is None, "labels must be null for a regression task"),
            (self.labels is None or 2 <= len(self.labels) == len(set(self.labels)),
             f"labels must list at least 2 distinct values, got {self.labels}"),
            (self.metric != "f1" or self.labels is None or len(self.labels) == 2,
             "metric=f1 needs exactly 2 labels (the second is the positive class)"),
        ])


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
    """Dropout during finetuning of crammed models (pretraining runs without it); a transformers
    checkpoint keeps the dropout of its own config."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices only (not to biases and LayerNorm weights)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW beta1, beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float | None = 1.0
    """Clip the gradient norm to this value; null = no clipping."""
    max_seq_len: int = 128
    """Tokens per example including the special tokens ([CLS]/[SEP], <s>/</s>); longer inputs are
    truncated (longest text first). At most the model's own limit."""
    max_train_examples: int | None = None
    """Use a fixed random subset of this many training examples per task (quick runs); null = all."""
    max_eval_examples: int | None = None
    """Use a fixed random subset of this many examples of each dev split; null = all."""
    eval_every_epoch: bool = True
    """Evaluate on dev after every epoch (logged); the FINAL epoch's scores are reported either way."""
    export_finetuned: bool = False
    """Export the first trial's finetuned classifier of each task to <out>/finetuned/<task>/."""
    report_to: list[TrackerName] = field(default_factory=list)
    """Experiment trackers that also receive the config, every trial's and task's scores and the GLUE
    summary (tensorboard, wandb, mlflow; cramming.trackers); none beyond the run folder's files by default."""
    num_workers: int = 0
    """DataLoader worker processes (tokenization is done up front, so 0 is usually fastest)."""
    parallel_trials: bool | None = None
    """Train a task's trials side by side on one device (one stacked step; same seeds, batches, AdamW and
    schedule per trial as one after another): true, false (one after another), or null = side by side on
    CUDA, one after another on CPU (not faster there; docs/benchmarks.md). fp16 always runs them one after
    another, and a group that does not fit in memory falls back to that (logged)."""
    unpadded: bool | None = None
    """Run a crammed model's token-wise work (embeddings, projections, feed-forward, norms) on the real
    tokens only, attention per sequence, in training and evaluation: the same steps and scores as padded
    batches (relative 1e-5, tested), fewer FLOPs on short-sentence tasks (docs/benchmarks.md). true,
    false, or null = wherever it applies: trials one after another whose step is eager (the CPU, or CUDA
    without gpu.compile). true also runs compiled profiles' trials eager and one after another (the token
    count is a data-dependent shape, which neither a static compiled graph nor side-by-side trials take);
    transformers checkpoints cannot use it."""
    pad_buckets: int = 4
    """Padding widths of a compiled step (CUDA with gpu.compile): a batch is padded to the smallest of this
    many widths up to max_seq_len that holds it (1 = always max_seq_len), so the compiled step sees a few
    static shapes. Eager steps pad to the batch's longest example. Scores do not depend on it."""
    tokenizer: str | None = None
    """For ckpt=random-init only: a tokenizer.json file or a folder holding one (a prepared data folder or
    an exported checkpoint); the model is built from the `arch` group with that tokenizer's vocabulary."""
    revision: str | None = None
    """For a hub id in ckpt (e.g. ckpt=bert-base-uncased): the branch, tag or commit to fetch; null = main.
    The results file records the commit it resolved to."""
    trust_remote_code: bool = False
    """Run a transformers checkpoint's own modelling code (config.json's auto_map); off unless asked."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A data row with missing fields, empty text or a label outside the task's set: stop with an error
    naming the file and line, or skip it (counted in the log and results)."""

    def __post_init__(self) -> None:
        # `glue.tasks=rte` (a bare name) means one task, not the letters r, t, e.
        self.tasks = validate_task_names([self.tasks] if isinstance(self.tasks, str) else list(self.tasks))
        if self.seeds is not None:
            self.seeds = [int(s) for s in self.seeds]
        positive = {"trials": self.trials, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
                    "epochs": self.epochs}
        limits = {k: getattr(self, k) for k in ("max_train_examples", "max_eval_examples")}
        names = [c.name for c in self.custom_tasks]
        validate(self, "glue", [
            (len(set(names)) == len(names), f"custom_tasks: task names must be unique, got {names}"),
            (bool(self.tasks or self.custom_tasks), "tasks is empty and there are no glue.custom_tasks: nothing to run"),
            *((int(v) >= 1, f"{k} must be >= 1, got {v}") for k, v in positive.items()),
            (self.seeds is None or len(self.seeds) == self.trials,
             f"seeds has {len(self.seeds or ())} entries but glue.trials={self.trials}; give one per trial"),
            (self.seeds is None or len(set(self.seeds)) == len(self.seeds), f"seeds must be distinct, got {self.seeds}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0.0 <= self.warmup_fraction < 1.0, f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (len(self.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in self.adam_betas),
             f"adam_betas must be two values in [0, 1), got {self.adam_betas}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or null, got {self.grad_clip}"),
            (self.max_seq_len >= 4, f"max_seq_len must be >= 4 ([CLS] a [SEP] b [SEP]), got {self.max_seq_len}"),
            *((v is None or int(v) >= 1, f"{k} must be >= 1 or null, got {v}") for k, v in limits.items()),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (not (self.unpadded and self.parallel_trials),
             "unpadded=true and parallel_trials=true cannot both hold: side-by-side trials need padded batches "
             "(vmap takes no data-dependent token layout); drop one of them"),
            (1 <= self.pad_buckets <= self.max_seq_len,
             f"pad_buckets must be between 1 and glue.max_seq_len={self.max_seq_len}, got {self.pad_buckets}"),
        ])
        if self.epochs > 5:
            # The paper's rules cap downstream finetuning at 5 epochs; allow more but make it visible.
            import warnings

            warnings.warn(f"glue.epochs={self.epochs} exceeds the Cramming rules' limit of 5", stacklevel=2)

    def trial_seeds(self, base_seed: int = 0) -> list[int]:
        """The seed of each trial."""
        if self.seeds is not None:
            return list(self.seeds)
        return [int(base_seed) + i for i in range(self.trials)]


__all__ = ["CustomTaskConfig", "GlueConfig", "GLUE_TASKS"]
