"""`cram pretrain`: masked-language-model pretraining within a budget.

`run(cfg)` is the Hydra entry point; `pretrain(...)` is the same thing for Python callers and
tests, taking typed configs and a run folder. The loop lives in one function, in the order it
happens: budget check, schedules, accumulation of micro-batches under autocast, clipping, a
guarded optimizer step, logging, evaluation and checkpoints, then the final phase (held-out loss,
checkpoint, export, summary, plot) inside the reserve the budget keeps for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cramming.config import (
    GpuProfile,
    config_hash,
    fault_point,
    format_duration,
    parse_budget,
    resolve_gpu,
    to_dataclass,
)
from cramming.errors import ConfigError, CrammingError, DataError
from cramming.fileio import write_atomic
from cramming.train import distributed as dist_utils
from cramming.train import schedules
from cramming.train.budget import BUDGET_KINDS, Budget
from cramming.train.checkpoint import (
    RunLock,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

log = logging.getLogger(__name__)

# Fault injection for tests (tests/test_train_*.py, tests/reliability/): a comma-separated list of
# optimizer steps whose loss is replaced by NaN. Read once per run; unset in normal use.
NAN_STEPS_ENV = "CRAMMING_INJECT_NAN_STEPS"


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
        if self.start_keep < 1:
            raise ConfigError(f"train.random_ltd.start_keep must be >= 1, got {self.start_keep}")
        if not 0.0 < self.full_at_fraction <= 1.0:
            raise ConfigError(f"train.random_ltd.full_at_fraction must be in (0, 1], got {self.full_at_fraction}")
        if self.granularity < 1:
            raise ConfigError(f"train.random_ltd.granularity must be >= 1, got {self.granularity}")


@dataclass
class TrainConfig:
    """The pretraining recipe: optimizer, schedules, masking, budget kind, logging and checkpoints."""

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
    decay_norms_biases_embeddings: bool = False
    """Also decay norm weights, biases (any 1-D parameter) and embedding tables (off in the recipe)."""
    fused: bool | None = None
    """Fused AdamW kernel: null = on CUDA and CPU (where torch has one), true/false to force."""
    grad_clip: float = 0.5
    """Clip the global gradient norm to this value (0 = no clipping)."""
    # --- schedules -----------------------------------------------------------------------------
    lr_schedule: str = "one-cycle"
    """one-cycle (triangle) | linear (warmup + linear decay) | cosine | constant; all of progress."""
    warmup_fraction: float = 0.5
    """Fraction of the budget at which the LR peaks (one-cycle: 0.5, the symmetric triangle)."""
    target_batch_size: int | None = None
    """Sequences per optimizer step after the ramp; null = the GPU profile's target_batch_size."""
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
    # --- budget --------------------------------------------------------------------------------
    budget_kind: str = "time"
    """time (the top-level `budget`) | tokens (`budget_tokens`) | steps (`budget_steps`)."""
    budget_tokens: int | None = None
    """Token budget (sequences x seq_len over all ranks) when budget_kind=tokens."""
    budget_steps: int | None = None
    """Optimizer-step budget when budget_kind=steps."""
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
    eval_interval_minutes: float = 0.0
    """Minutes between held-out MLM evaluations during training (0 = at the start and end only)."""
    eval_batches: int = 16
    """Micro-batches of the val split per evaluation (fixed masks, the same each time)."""
    eval_mask_rate: float | None = None
    """Masking rate of the held-out evaluation; null = mask_rate. Set it equal to compare recipes
    that train with different rates (the loss depends on how much context is masked)."""
    seed: int | None = None
    """Seed for init, data order and masks; null = the top-level `seed`."""
    shuffle: bool = False
    """Shuffle the training rows each epoch; off keeps the prepared order (the prevalence sort)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to <run_dir>/tb (needs the tensorboard package)."""
    compile_fallback: bool = True
    """If torch.compile fails on the first batch, continue in eager mode instead of stopping."""
    prepare_data: bool = False
    """Prepare the data (`cram data`) first when the prepared folder is missing."""

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        checks = [
            (self.lr > 0, f"train.lr must be > 0, got {self.lr}"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"train.betas must be two values in [0, 1), got {self.betas}"),
            (self.eps > 0, f"train.eps must be > 0, got {self.eps}"),
            (self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}"),
            (self.lr_schedule in schedules.LR_SCHEDULES,
             f"train.lr_schedule must be one of {', '.join(schedules.LR_SCHEDULES)}, got {self.lr_schedule!r}"),
            (0 <= self.warmup_fraction <= 1, f"train.warmup_fraction must be in [0, 1], got {self.warmup_fraction}"),
            (self.target_batch_size is None or self.target_batch_size >= 1, "train.target_batch_size must be >= 1"),
            (0 <= self.ramp_fraction <= 1, f"train.ramp_fraction must be in [0, 1], got {self.ramp_fraction}"),
            (0 <= self.final_batch_fraction <= 1, f"train.final_batch_fraction must be in [0, 1], got {self.final_batch_fraction}"),
            (0 < self.mask_rate < 1, f"train.mask_rate must be in (0, 1), got {self.mask_rate}"),
            (self.replace_mask >= 0 and self.replace_random >= 0 and self.replace_mask + self.replace_random <= 1,
             "train.replace_mask + train.replace_random must be within [0, 1]"),
            (self.budget_kind in BUDGET_KINDS, f"train.budget_kind must be one of {', '.join(BUDGET_KINDS)}, got {self.budget_kind!r}"),
            (self.budget_kind != "tokens" or (self.budget_tokens or 0) > 0, "train.budget_kind=tokens needs train.budget_tokens > 0"),
            (self.budget_kind != "steps" or (self.budget_steps or 0) > 0, "train.budget_kind=steps needs train.budget_steps > 0"),
            (self.reserve_margin_s >= 0, "train.reserve_margin_s must be >= 0"),
            (self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1"),
            (self.checkpoint_interval_minutes >= 0, "train.checkpoint_interval_minutes must be >= 0"),
            (self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
            (self.log_interval >= 1, "train.log_interval must be >= 1"),
            (self.log_interval_s >= 0, "train.log_interval_s must be >= 0"),
            (self.eval_interval_minutes >= 0, "train.eval_interval_minutes must be >= 0"),
            (self.eval_batches >= 1, "train.eval_batches must be >= 1"),
            (self.eval_mask_rate is None or 0 < self.eval_mask_rate < 1, "train.eval_mask_rate must be in (0, 1) or null"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


class Interrupted(Exception):
    """Training stopped early on a signal or on repeated non-finite steps (a checkpoint was written)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Signals:
    """SIGTERM/SIGINT set a flag checked at each optimizer step; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> _Signals:
        if threading_is_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases or embeddings unless configured)."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for param in model.parameters():  # tied parameters appear once
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or id(param) in embedding_params
        (no_decay if exempt and not cfg.decay_norms_biases_embeddings else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # torch has fused AdamW kernels for CUDA and CPU; on CPU it steps 1.2x faster than foreach at
    # vocab 32768 (docs/benchmarks.md), elsewhere the default implementation is used.
    fused = cfg.fused if cfg.fused is not None else device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_kwargs(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The batch entries the model's forward accepts, moved to the device."""
    accepted = inspect.signature(model.forward).parameters
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in accepted}


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_dataset: Any, masker: Any, micro_batch_size: int, num_batches: int,
             seed: int, device: torch.device, precision: str) -> float:
    """Held-out MLM loss: the mean over the first `num_batches` val micro-batches, with fixed masks."""
    from cramming.data.shards import build_loader

    available = max(1, len(val_dataset) // micro_batch_size)
    micro = min(micro_batch_size, len(val_dataset))
    loader = build_loader(val_dataset, micro, masker, shuffle=False, seed=seed, num_workers=0)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    count = min(num_batches, available)
    for _ in range(count):
        with _autocast(device, precision):
            total += model(**_model_kwargs(model, next(loader), device))["loss"].float()
    model.train(was_training)
    return float(total.item() / count)


def _probe(model: torch.nn.Module, raw: torch.nn.Module, sample: dict[str, torch.Tensor], device: torch.device,
           precision: str, want_compile: bool, allow_fallback: bool, micro_batch_size: int,
           no_sync: Any) -> tuple[torch.nn.Module, str]:
    """Run one forward/backward on a synthetic micro-batch: compiles (counted in the budget) and
    turns a failed compile into eager mode and an out-of-memory into an actionable message."""
    candidates = [("compiled", torch.compile(model)), ("eager", model)] if want_compile else [("eager", model)]
    for path, candidate in candidates:
        try:
            with no_sync(), _autocast(device, precision):
                loss = candidate(**_model_kwargs(raw, sample, device))["loss"]
            loss.backward()
            raw.zero_grad(set_to_none=True)
            return candidate, path
        except torch.OutOfMemoryError:
            raise ConfigError(
                f"CUDA out of memory on the first micro-batch of {micro_batch_size} sequences: set a smaller "
                f"gpu.micro_batch_size (e.g. gpu.micro_batch_size={max(1, micro_batch_size // 2)}); the target "
                "batch is reached by accumulating more micro-batches"
            ) from None
        except Exception as err:
            raw.zero_grad(set_to_none=True)
            if path != "compiled" or not allow_fallback:
                raise
            log.warning("torch.compile failed (%s: %s); continuing in eager mode", type(err).__name__, str(err)[:300])
            torch._dynamo.reset()
    raise AssertionError("unreachable")


def _plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r and r.get("event") != "eval" and r["loss"] is not None]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["elapsed_s"] / 60 for r in train], [r["loss"] for r in train], label="train MLM loss")
    if evals:
        ax.plot([r["elapsed_s"] / 60 for r in evals], [r["val_loss"] for r in evals], "o-", label="held-out MLM loss")
    ax.set_xlabel("wall-clock minutes (budget)")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


class _RunLog:
    """metrics.jsonl (and TensorBoard) records and the progress bar of the main process.

    Step losses stay on the device until a log step: `log_step` is the only place training
    losses reach the host. On ranks other than the main one every method is a no-op.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, budget: Budget, device: torch.device,
                 resumed_at: int | None, mfu_per_token: float | None) -> None:
        self.enabled, self.budget, self.mfu_per_token = enabled, budget, mfu_per_token
        self.path = run_dir / "metrics.jsonl"
        if resumed_at is not None and enabled and self.path.is_file():
            # Records written after the checkpoint describe steps that will be redone: drop them so
            # the resumed log reads as one run.
            kept = [r for r in _read_records(self.path) if r.get("step", 0) <= resumed_at]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self.file = open(self.path, "a") if enabled else None  # noqa: SIM115 - closed in close()
        self.tb = _tensorboard(run_dir) if (tensorboard and enabled) else None
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

    def record(self, entry: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        if self.tb is not None:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, entry["step"])

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

    def log_step(self, st: dict[str, Any], elapsed: float, progress: float, lr: float, sequences: int,
                 keep: int | None, random_ltd: bool) -> None:
        """Write one metrics record for the steps since the last one and refresh the bar."""
        if not self.enabled or st["step"] == self.last_step:
            return
        now = time.monotonic()
        tokens_per_s = self.tokens / max(now - self.clock, 1e-9)
        entry = {"step": st["step"], "elapsed_s": round(elapsed, 3), "progress": round(progress, 6),
                 "loss": float(self.loss.item() / self.steps) if self.steps else None, "lr": lr,
                 "batch_size": sequences, "tokens_seen": st["tokens"], "tokens_per_s": round(tokens_per_s, 1),
                 "mfu": tokens_per_s * self.mfu_per_token if self.mfu_per_token else None,
                 "skipped_steps": st["skipped"]}
        if random_ltd:
            entry.update(keep_tokens=keep, layer_tokens_saved=st["layer_tokens_saved"])
        self.record(entry)
        self.bar.n = round(100 * progress, 1)
        self.postfix = {"loss": f"{entry['loss']:.3f}" if entry["loss"] is not None else "nan",
                        "tok_s": f"{tokens_per_s:.0f}", "bs": sequences, "lr": f"{lr:.2e}"}
        self.show_left(elapsed)
        self.bar.refresh()
        self.loss.zero_()
        self.steps = self.tokens = 0
        self.clock, self.last_step = now, st["step"]

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _maskers(manifest: dict[str, Any], train: TrainConfig) -> tuple[Any, Any]:
    """The training masker and the held-out one (a different rate with train.eval_mask_rate)."""
    from cramming.data.masking import MLMMasker

    special = manifest["special_tokens"]

    def masker(rate: float) -> MLMMasker:
        return MLMMasker(int(manifest["vocab_size"]), int(special["mask"]), special.values(), mask_rate=rate,
                         replace_mask=train.replace_mask, replace_random=train.replace_random,
                         fixed_count=train.fixed_count)

    training = masker(train.mask_rate)
    return training, (training if train.eval_mask_rate is None else masker(train.eval_mask_rate))


def _resume(run_dir: Path, raw: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
            st: dict[str, Any], budget: Budget) -> Path:
    """Load the newest checkpoint of `run_dir` into model, optimizer, scaler, counters, RNGs and budget."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CrammingError(f"resume: {run_dir} has no complete checkpoint under {run_dir / 'checkpoints'}")
    saved, _ = load_checkpoint(ckpt, raw)
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    st.update(saved["counters"])
    _set_rng_state(saved["rng"])
    budget.elapsed_offset = st["elapsed_s"]
    budget.note_final_cost(st["final_cost_s"])
    log.warning("resuming %s from %s: step %d, %s of budget used", run_dir, ckpt.name, st["step"],
                format_duration(st["elapsed_s"]))
    return ckpt


def _export_final(raw: torch.nn.Module, run_dir: Path, data_dir: Path, manifest: dict[str, Any],
                  summary: dict[str, Any], train: TrainConfig) -> None:
    """Write `run_dir/final` (atomically replacing any earlier one) and the loss plot."""
    from cramming.model import export

    final = run_dir / "final"
    tmp = run_dir / f".final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    export.save_pretrained(raw, tmp, data_dir / manifest["tokenizer"],
                           extra_config={"cramming_training": {**summary, "train": dataclasses.asdict(train)}})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _plot_loss(_read_records(run_dir / "metrics.jsonl"), run_dir / "loss.png")


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def pretrain(
    train: TrainConfig,
    arch: Any,
    gpu: GpuProfile,
    data_dir: str | Path,
    run_dir: str | Path,
    *,
    budget_s: float = 3600.0,
    seed: int = 0,
    resume: bool = False,
    config_text: str | None = None,
) -> Path:
    """Pretrain `arch` (a bert.ModelConfig) on the prepared data in `data_dir`; returns `run_dir/final`.

    With `resume`, continues from the newest checkpoint in `run_dir`. Raises `Interrupted` (with
    the exit code to use) when stopped by SIGTERM/SIGINT or by repeated non-finite steps, after
    writing a checkpoint.
    """
    from cramming.data.shards import PackedDataset, build_loader
    from cramming.model import bert

    run_dir, data_dir = Path(run_dir), Path(data_dir)
    seed = train.seed if train.seed is not None else seed
    info = dist_utils.setup(gpu.device)
    lock = RunLock(run_dir) if info.is_main else None
    budget = Budget(train.budget_kind, {"time": budget_s, "tokens": train.budget_tokens, "steps": train.budget_steps}[
        train.budget_kind], margin_s=train.reserve_margin_s)  # the clock starts here: setup counts
    runlog: _RunLog | None = None
    try:
        if lock:
            lock.acquire()
        dataset = PackedDataset(data_dir, "train")
        val_dataset = PackedDataset(data_dir, "val")
        manifest = dataset.manifest
        seq_len = int(manifest["seq_len"])
        arch = dataclasses.replace(arch, vocab_size=int(manifest["vocab_size"]))
        if getattr(arch, "max_seq_len", seq_len) < seq_len:
            raise ConfigError(f"arch.max_seq_len={arch.max_seq_len} is shorter than the data's seq_len={seq_len}")
        if config_text is None:
            config_text = OmegaConf.to_yaml({"train": dataclasses.asdict(train), "arch": dataclasses.asdict(arch),
                                             "gpu": dataclasses.asdict(gpu), "budget_s": budget_s, "seed": seed,
                                             "data_dir": str(data_dir)})
        torch.manual_seed(seed + info.rank)
        random.seed(seed + info.rank)
        if gpu.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        device = info.device
        raw = bert.CrammedBertForMLM(arch).to(device)
        raw.train()
        optimizer = build_optimizer(raw, train, device)
        scaler = torch.amp.GradScaler("cuda", enabled=gpu.precision == "fp16" and device.type == "cuda")
        masker, eval_masker = _maskers(manifest, train)
        target = train.target_batch_size or gpu.target_batch_size
        micro = gpu.micro_batch_size
        num_masked = masker.num_targets(seq_len) if train.fixed_count else round(train.mask_rate * seq_len)
        flops_per_seq = bert.training_flops_per_sequence(arch, seq_len, num_masked, fixed_positions=train.fixed_count)
        # MFU = tokens/s x this: counted FLOPs per token over the peak of every GPU in the run.
        mfu_per_token = (flops_per_seq / seq_len / (gpu.peak_tflops * 1e12 * info.world_size)
                         if device.type == "cuda" and gpu.peak_tflops else None)
        ltd = train.random_ltd
        num_layers = int(arch.num_layers)

        # Counters that a checkpoint carries; everything else is derived from them.
        st: dict[str, Any] = {"step": 0, "micro_index": 0, "tokens": 0, "elapsed_s": 0.0, "skipped": 0,
                              "nonfinite_run": 0, "layer_tokens_saved": 0, "final_cost_s": 0.0,
                              "last_ckpt_s": 0.0, "last_eval_s": 0.0}
        ckpt = _resume(run_dir, raw, optimizer, scaler, st, budget) if resume else None

        model: torch.nn.Module = raw
        # Row gradients for the tied embedding pay off in eager single-process training (CPU);
        # DDP rejects them and compiled graphs gain nothing (CrammedBertForMLM.use_sparse_embedding_grad).
        raw.use_sparse_embedding_grad(not gpu.compile and not info.enabled)
        if info.enabled:
            model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device] if device.type == "cuda" else None)
        no_sync = model.no_sync if info.enabled else contextlib.nullcontext
        sample = masker(torch.randint(len(manifest["special_tokens"]), int(manifest["vocab_size"]), (micro, seq_len)))
        if manifest.get("packing") == "doc-bounded":
            # The loader's batches carry an attention_mask then: probe (and compile) with one too.
            sample["attention_mask"] = torch.ones(micro, seq_len, dtype=torch.long)
        fwd, compile_path = _probe(model, raw, sample, device, gpu.precision, gpu.compile, train.compile_fallback,
                                   micro, no_sync)
        log.info("model: %.1fM parameters, %s path, precision %s, device %s",
                 sum(p.numel() for p in raw.parameters()) / 1e6, compile_path, gpu.precision, device)

        signals = _Signals().__enter__()
        # The loader's workers are forked with SIGTERM/SIGINT blocked (torch installs its own fatal
        # SIGTERM handler in them): a signal sent to the whole process group (Ctrl-C in a terminal,
        # Slurm) then reaches only this process, which stops at a step boundary with a checkpoint,
        # instead of killing a worker mid-batch. Workers still exit with the loader or its parent.
        mask = {signal.SIGTERM, signal.SIGINT}
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, mask) if threading_is_main() else None
        try:
            loader = build_loader(dataset, micro, masker, shuffle=train.shuffle, seed=seed,
                                  num_workers=gpu.num_workers, rank=info.rank, world_size=info.world_size,
                                  start_batch=st["micro_index"], pin_memory=device.type == "cuda")
        finally:
            if previous_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        runlog = _RunLog(run_dir, info.is_main, train.tensorboard, budget, device,
                         st["step"] if ckpt is not None else None, mfu_per_token)

        def run_eval(elapsed: float) -> float | None:
            val = None
            if info.is_main:
                val = evaluate(raw, val_dataset, eval_masker, micro, train.eval_batches, seed, device, gpu.precision)
                runlog.record({"event": "eval", "step": st["step"], "elapsed_s": round(elapsed, 3),
                               "progress": budget.progress(st["step"], st["tokens"], elapsed), "val_loss": val})
            dist_utils.barrier(info)
            return val

        def checkpoint(elapsed: float) -> float:
            start = time.monotonic()
            if info.is_main:
                st["elapsed_s"] = elapsed
                state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "counters": dict(st),
                         "rng": _rng_state(), "world_size": info.world_size}
                save_checkpoint(run_dir, raw, state, config_text, st["step"], keep=train.keep_checkpoints)
            dist_utils.barrier(info)
            return time.monotonic() - start

        nan_steps = {int(s) for s in os.environ.get(NAN_STEPS_ENV, "").split(",") if s.strip()}
        val_loss: float | None = None
        if ckpt is None:
            # Start-of-run eval and checkpoint: a baseline, a resume point, and a measurement of the
            # final phase's cost that sizes the budget's reserve.
            t0 = time.monotonic()
            val_loss = run_eval(budget.elapsed())
            eval_cost = time.monotonic() - t0
            save_cost = checkpoint(budget.elapsed())
            st["final_cost_s"] = eval_cost + 2 * save_cost  # checkpoint + export
            budget.note_final_cost(st["final_cost_s"])
            st["last_ckpt_s"] = st["last_eval_s"] = budget.elapsed()
        if budget.done(st["step"], st["tokens"]):
            log.warning(
                "the budget is spent before the first step: setup took %s and the final phase (held-out "
                "loss, checkpoint, export) is expected to take %s; the run will end without training and "
                "overrun. Give a larger budget, or make the fixed costs smaller (train.eval_batches, a "
                "smaller arch on this device)", format_duration(budget.elapsed()), format_duration(st["final_cost_s"]))
        start_step = st["step"]

        step_time_per_micro = 0.0
        stop_reason = "budget"
        progress, lr, sequences, keep, sig = 0.0, 0.0, 0, None, 0.0
        while True:
            # --- where are we: ranks agree on time and on signals received by any of them ----
            accum_guess = schedules.accumulation_steps(budget.progress(st["step"], st["tokens"]), micro, target,
                                                       train.ramp_fraction, info.world_size,
                                                       train.final_batch_size, train.final_batch_fraction)
            elapsed, sig = dist_utils.agree(info, [budget.elapsed(), float(signals.received or 0)])
            if sig:
                stop_reason = "signal"
                break
            # Stop when the next step would not finish before the deadline's reserve.
            if budget.done(st["step"], st["tokens"], elapsed + step_time_per_micro * accum_guess):
                break
            progress = budget.progress(st["step"], st["tokens"], elapsed)
            accum = accum_guess
            keep = None
            if ltd.enabled:
                keep = schedules.keep_tokens(progress, seq_len, ltd.start_keep, ltd.full_at_fraction, ltd.granularity)
            lr_progress = progress
            if ltd.enabled and ltd.layer_token_lr:
                lr_progress = schedules.layer_token_progress(progress, seq_len, num_layers, ltd.start_keep,
                                                             ltd.full_at_fraction, ltd.granularity)
            lr = train.lr * schedules.lr_factor(lr_progress, train.lr_schedule, train.warmup_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # --- accumulate micro-batches; DDP syncs gradients only on the last one ------------
            step_start = time.monotonic()
            step_loss = torch.zeros((), device=device)
            for i in range(accum):
                batch = next(loader)
                st["micro_index"] += 1
                kwargs = _model_kwargs(raw, batch, device)
                if keep is not None and keep < seq_len:
                    kwargs["keep_tokens"] = keep
                sync = contextlib.nullcontext() if i == accum - 1 else no_sync()
                with sync, _autocast(device, gpu.precision):
                    loss = fwd(**kwargs)["loss"]
                    if st["step"] in nan_steps:
                        loss = loss * float("nan")
                step_loss += loss.detach().float() / accum
                scaler.scale(loss / accum).backward()
                fault_point("train.step")  # mid-step: gradients accumulated, optimizer not stepped
            sequences = accum * micro * info.world_size
            st["tokens"] += sequences * seq_len
            if keep is not None and keep < seq_len:
                st["layer_tokens_saved"] += sequences * max(0, num_layers - 2) * (seq_len - keep)

            # --- guarded optimizer step: skip (and count) non-finite loss or gradients ---------
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), train.grad_clip or float("inf"))
            # One host sync per optimizer step (not per micro-batch), the same one GradScaler makes.
            finite = bool(torch.isfinite(grad_norm) & torch.isfinite(step_loss))
            if finite:
                scaler.step(optimizer)
                st["nonfinite_run"] = 0
            else:
                st["skipped"] += 1
                st["nonfinite_run"] += 1
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            st["step"] += 1
            runlog.add_step(step_loss if finite else None, sequences * seq_len)
            # A smoothed per-micro-batch time sizes the next step for the deadline check; the
            # first step (loader start-up) is left out and one slow step (a busy host) cannot
            # end the run early.
            per_micro = (time.monotonic() - step_start) / accum
            if st["step"] > 1 or ckpt is not None:
                step_time_per_micro = per_micro if not step_time_per_micro else 0.8 * step_time_per_micro + 0.2 * per_micro
            if st["nonfinite_run"] >= train.max_nonfinite_steps:
                stop_reason = "nonfinite"
                break

            # --- log, evaluate, checkpoint ----------------------------------------------------
            elapsed = budget.elapsed()
            since_log = time.monotonic() - runlog.clock
            if st["step"] % train.log_interval == 0 or (train.log_interval_s and since_log >= train.log_interval_s):
                runlog.log_step(st, elapsed, progress, lr, sequences, keep, ltd.enabled)
            else:
                runlog.tick(budget.progress(st["step"], st["tokens"], elapsed), elapsed)
            if train.eval_interval_minutes and elapsed - st["last_eval_s"] >= 60 * train.eval_interval_minutes:
                run_eval(elapsed)
                st["last_eval_s"] = elapsed
            if (train.checkpoint_interval_minutes
                    and elapsed - st["last_ckpt_s"] >= 60 * train.checkpoint_interval_minutes):
                st["last_ckpt_s"] = elapsed
                budget.note_final_cost(checkpoint(elapsed) * 2)

        # --- final phase: checkpoint (always), then held-out loss and export unless interrupted --
        if st["step"] > 0:  # the steps since the last record
            runlog.log_step(st, budget.elapsed(), progress, lr, sequences, keep, ltd.enabled)
        runlog.bar.close()
        elapsed = budget.elapsed()
        checkpoint(elapsed)
        if stop_reason == "signal":
            name = signal.Signals(int(sig)).name
            raise Interrupted(f"received {name}: checkpoint written at step {st['step']}; continue with "
                              f"`cram pretrain resume={run_dir}`", 130 if int(sig) == signal.SIGINT else 0)
        if stop_reason == "nonfinite":
            raise Interrupted(
                f"stopped after {st['nonfinite_run']} non-finite steps in a row at step {st['step']} (lr {lr:.2e}); "
                f"a checkpoint was written. Lower train.lr, raise train.warmup_fraction, or use gpu.precision=bf16/fp32",
                3)
        if st["step"] > start_step or val_loss is None:  # else the start-of-run loss is still the model's
            val_loss = run_eval(budget.elapsed())
        final = run_dir / "final"
        if info.is_main:
            final_loss = next((r["loss"] for r in reversed(_read_records(runlog.path))
                               if r.get("event") != "eval" and r.get("loss") is not None), None)
            tokens_per_s = st["tokens"] / max(budget.elapsed(), 1e-9)
            summary = {
                "budget_kind": train.budget_kind, "budget_s": budget_s if train.budget_kind == "time" else None,
                "budget_amount": budget.total, "elapsed_s": None, "steps": st["step"], "tokens_seen": st["tokens"],
                "final_loss": final_loss, "val_loss": val_loss, "tokens_per_s": round(tokens_per_s, 1),
                "mfu": tokens_per_s * mfu_per_token if mfu_per_token else None,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "gpu_profile": gpu.name, "precision": gpu.precision, "compile": compile_path,
                "skipped_steps": st["skipped"], "layer_tokens_saved": st["layer_tokens_saved"],
                "world_size": info.world_size, "train_recipe": train.name, "arch": getattr(arch, "name", None),
                "data_config_hash": manifest.get("config_hash"),
            }
            _export_final(raw, run_dir, data_dir, manifest, summary, train)
            summary["elapsed_s"] = round(budget.elapsed(), 3)
            summary["overrun_s"] = (round(summary["elapsed_s"] - budget_s, 3) if train.budget_kind == "time" else None)
            write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
            log.info("done: %d steps, %d tokens, val loss %s, %s elapsed; export in %s", st["step"], st["tokens"],
                     val_loss, format_duration(summary["elapsed_s"]), final)
        dist_utils.barrier(info)
        return final
    finally:
        if "loader" in locals():
            del loader  # shut the workers down now, not at interpreter exit
        if "signals" in locals():
            signals.__exit__()
        if runlog is not None:
            runlog.close()
        if lock:
            lock.release()
        dist_utils.teardown(info)


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("train.tensorboard=true but the tensorboard package is not installed; skipping it")
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _progress_bar(enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=100, unit="%", desc="pretrain", disable=not enabled, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total}% [{elapsed}{postfix}]", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Hydra entry point
# ---------------------------------------------------------------------------------------------


def _data_dir(cfg: DictConfig, train: TrainConfig) -> Path:
    from cramming.data import prepare

    data_cfg = to_dataclass(prepare.DataConfig, cfg.data, "data")
    folder = prepare.prepared_dir(data_cfg, cfg.paths.data_root)
    if (folder / "manifest.json").is_file():
        return folder
    if train.prepare_data:
        log.warning("prepared data not found at %s; preparing it now (train.prepare_data=true)", folder)
        return prepare.prepare(data_cfg, cfg.paths.data_root)
    name = cfg.data.get("name", "<name>")
    overrides = [a for a in sys.argv[1:] if a.startswith(("data.", "paths.data_root"))]
    raise DataError(
        f"the data for data={name} is not prepared (no {folder / 'manifest.json'}). Run "
        f"`cram data data={name} {' '.join(overrides)}`".rstrip() + " first with the same data overrides, "
        "or add train.prepare_data=true"
    )


def run(cfg: DictConfig) -> None:
    """`cram pretrain`: the run folder is Hydra's output dir, or `resume=<run_dir>` to continue one."""
    if cfg.get("resume"):
        run_dir = Path(str(cfg.resume))
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CrammingError(f"resume={run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
        # Continue with the run's own resolved config, so its schedules and budget are unchanged.
        # Verify the checksums first: a damaged config.yaml must not be parsed (or half-parsed).
        verify_checkpoint(ckpt)
        saved = OmegaConf.create((ckpt / "config.yaml").read_text())
        saved.resume = str(run_dir)
        cfg = saved
        resume = True
    else:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        resume = False
    train = to_dataclass(TrainConfig, cfg.train, "train")
    from cramming.model import bert

    arch = to_dataclass(bert.ModelConfig, cfg.arch, "arch")
    gpu = resolve_gpu(cfg.gpu)
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    data_dir = _data_dir(cfg, train)
    log.info("pretraining %s/%s (config %s) into %s", cfg.arch.get("name"), train.name, config_hash(cfg), run_dir)
    try:
        final = pretrain(train, arch, gpu, data_dir, run_dir, budget_s=parse_budget(cfg.budget), seed=int(cfg.seed),
                         resume=resume, config_text=config_text)
    except Interrupted as stop:
        print(f"cram pretrain: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    print(f"cram pretrain: finished; model exported to {final}")


__all__ = ["TrainConfig", "RandomLTDConfig", "Interrupted", "pretrain", "run", "evaluate", "build_optimizer"]
