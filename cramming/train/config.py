"""The pretraining recipe as typed dataclasses: `train.*` of the composed config.

`cramming.config.to_dataclass` builds these from Hydra's config (rejecting unknown keys and
wrongly typed values); `__post_init__` checks the values, so a recipe built in Python is checked
the same way. Choices come from the `Literal` types of the modules that implement them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import get_args

from cramming.checks import validate
from cramming.optim.schedules import LrSchedule
from cramming.trackers import TrackerName


@dataclass
class RandomLTDConfig:
    """random-LTD (Yao et al., 2022): layerwise random token dropping with MSLG."""

    enabled: bool = False
    """Drop tokens in the middle layers (all but the first and last) during pretraining."""
    start_keep: int = 64
    """Tokens kept per sequence at the start (of seq_len)."""
    full_at_fraction: float = 0.7
    """Fraction of the budget at which the kept length reaches the full sequence (MSLG end)."""
    granularity: int = 16
    """The kept length grows in steps of this many tokens."""
    layer_token_lr: bool = True
    """Drive the LR schedule by layer-tokens consumed instead of by progress (LayerToken LR)."""

    def __post_init__(self) -> None:
        validate(self, "train.random_ltd", [
            (self.start_keep >= 1, f"start_keep must be >= 1, got {self.start_keep}"),
            (0.0 < self.full_at_fraction <= 1.0, f"full_at_fraction must be in (0, 1], got {self.full_at_fraction}"),
            (self.granularity >= 1, f"granularity must be >= 1, got {self.granularity}"),
        ])


@dataclass
class TrainConfig:
    """The pretraining recipe: optimizer, schedules, masking, logging and checkpoints.

    The budget (time, tokens or steps) is the top-level `budget` (cramming.config.parse_budget).
    """

    name: str = "cramming"
    """Recipe name (a file in configs/train/)."""
    # --- optimizer -----------------------------------------------------------------------------
    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas (0.98 for stability at large batch, RoBERTa/Cramming)."""
    eps: float = 1e-12
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    decay_embeddings: bool = True
    """Decay the embedding tables (the word embeddings are also the tied output projection) like the
    other matrices, as the paper's implementation, original BERT and transformers' run_mlm do;
    false exempts them (an ablation; runs saved before this key existed resumed with false)."""
    decay_norms_biases: bool = False
    """Also decay norm weights and biases (every 1-D parameter); exempt in every recipe."""
    fused: bool | None = None
    """Fused AdamW kernel: null = on CUDA and CPU (where torch has one), true/false to force."""
    grad_clip: float = 0.5
    """Clip the global gradient norm to this value (0 = no clipping)."""
    # --- schedules -----------------------------------------------------------------------------
    lr_schedule: LrSchedule = "one-cycle"
    """one-cycle (triangle) | linear (warmup + linear decay) | cosine | constant; all of progress."""
    warmup_fraction: float = 0.5
    """Fraction of the budget at which the LR peaks (one-cycle: 0.5, the symmetric triangle)."""
    target_batch_size: int = 4096
    """Sequences per optimizer step after the ramp, rounded down to whole micro-batches x ranks
    (at least one micro-batch per rank): 4096 is 4032 = 42 x 96 on the rtx2080ti profile."""
    ramp_fraction: float = 0.6
    """The batch grows linearly from one micro-batch to the target over this fraction (0 = no ramp)."""
    final_batch_size: int | None = None
    """A larger batch for the last `final_batch_fraction` of the budget (null = none)."""
    final_batch_fraction: float = 0.0
    """Share of the budget, at the end, that uses `final_batch_size`."""
    # --- masking -------------------------------------------------------------------------------
    mask_rate: float = 0.25
    """Share of tokens that are MLM targets."""
    replace_mask: float = 0.8
    """Of the targets, share replaced by [MASK]."""
    replace_random: float = 0.1
    """Of the targets, share replaced by a random token (the rest stay unchanged)."""
    fixed_count: bool = True
    """Exactly round(mask_rate * seq_len) targets per row: static shapes for sparse prediction/compile."""
    # --- budget (its kind and amount are the top-level `budget`) -------------------------------
    reserve_margin_s: float = 2.0
    """Seconds kept free before a time deadline on top of the measured cost of the final save."""
    # --- random-LTD ----------------------------------------------------------------------------
    random_ltd: RandomLTDConfig = field(default_factory=RandomLTDConfig)
    """Layerwise token dropping (off in the cramming recipe)."""
    # --- robustness, logging, evaluation ---------------------------------------------------------
    max_nonfinite_steps: int = 25
    """Stop (with a checkpoint) after this many non-finite steps in a row."""
    checkpoint_interval_minutes: float = 30.0
    """Minutes of budget between resume checkpoints (0 = only at the start and the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk (older ones are deleted)."""
    log_interval: int = 20
    """Optimizer steps between metric records (the only host syncs besides the step guard)."""
    log_interval_s: float = 30.0
    """Also write a metric record when this many seconds passed since the last one, so slow steps
    (a CPU, a large accumulated batch) still give a loss curve; 0 disables."""
    eval_fraction: float = 0.05
    """Held-out MLM evaluation every this fraction of the run's progress (0.05: about 20 points
    whatever the budget's length; 0 = at the start and end only). Its cost counts against the budget."""
    eval_interval_minutes: float | None = None
    """Minutes between held-out evaluations instead of `eval_fraction` (null = use the fraction)."""
    eval_batches: int = 16
    """Micro-batches of the val split per evaluation (fixed masks, the same each time)."""
    eval_mask_rate: float | None = None
    """Masking rate of the held-out evaluation; null = mask_rate. Set it equal to compare recipes
    that train with different rates (the loss depends on how much context is masked)."""
    shuffle: bool = False
    """Shuffle the training rows each epoch; off keeps the prepared order (the prevalence sort)."""
    report_to: list[TrackerName] = field(default_factory=list)
    """Experiment trackers that also receive the config, every metrics record and the summary:
    tensorboard (<run_dir>/tb), wandb, mlflow (cramming.trackers); [] = the run folder's files only."""
    compile_fallback: bool = True
    """If torch.compile fails on the first batch, continue in eager mode instead of stopping."""
    prepare_data: bool = True
    """Prepare (and cache) the data as `cram data` would when its prepared folder is missing, before
    the budget clock starts; false stops with the `cram data ...` command to run instead."""

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        validate(self, "train", [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two values in [0, 1), got {self.betas}"),
            (self.eps > 0, f"eps must be > 0, got {self.eps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (0 <= self.warmup_fraction <= 1, f"warmup_fraction must be in [0, 1], got {self.warmup_fraction}"),
            (self.target_batch_size >= 1, f"target_batch_size must be >= 1, got {self.target_batch_size}"),
            (0 <= self.ramp_fraction <= 1, f"ramp_fraction must be in [0, 1], got {self.ramp_fraction}"),
            (0 <= self.final_batch_fraction <= 1, f"final_batch_fraction must be in [0, 1], got {self.final_batch_fraction}"),
            (0 < self.mask_rate < 1, f"mask_rate must be in (0, 1), got {self.mask_rate}"),
            (self.replace_mask >= 0 and self.replace_random >= 0 and self.replace_mask + self.replace_random <= 1,
             "replace_mask + train.replace_random must be within [0, 1]"),
            (self.reserve_margin_s >= 0, "reserve_margin_s must be >= 0"),
            (self.max_nonfinite_steps >= 1, "max_nonfinite_steps must be >= 1"),
            (self.checkpoint_interval_minutes >= 0, "checkpoint_interval_minutes must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.log_interval >= 1, "log_interval must be >= 1"),
            (self.log_interval_s >= 0, "log_interval_s must be >= 0"),
            (0 <= self.eval_fraction <= 1, f"eval_fraction must be in [0, 1], got {self.eval_fraction}"),
            (self.eval_interval_minutes is None or self.eval_interval_minutes >= 0,
             "eval_interval_minutes must be >= 0 or null"),
            (self.eval_batches >= 1, "eval_batches must be >= 1"),
            (self.eval_mask_rate is None or 0 < self.eval_mask_rate < 1, "eval_mask_rate must be in (0, 1) or null"),
            (set(self.report_to) <= set(get_args(TrackerName)),
             f"report_to={self.report_to} may name only: {', '.join(get_args(TrackerName))}"),
        ])
