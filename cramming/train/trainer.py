"""`cram pretrain`: from the composed config to a run of the pretraining stage.

`load_job(cfg)` turns the composed config into typed ones (with `resume=<run_dir>`, the config
saved in the run's newest checkpoint), all validated before anything is read or prepared; `run(job,
data_dir)` trains on a prepared data folder by calling `cramming.train.loop.pretrain`, which Python
callers and tests use directly. Finding or preparing the data folder is the CLI's job
(cramming.pipeline): this stage reads data, it does not build it.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cramming.config import BudgetSpec, config_hash, parse_budget, resolve_paths, to_dataclass
from cramming.errors import CrammingError
from cramming.gpu import GpuProfile, resolve_gpu
from cramming.model.bert import ModelConfig
from cramming.trackers import require_installed
from cramming.train.checkpoint import latest_checkpoint, verify_checkpoint
from cramming.train.config import TrainConfig
from cramming.train.loop import Interrupted, pretrain

log = logging.getLogger(__name__)


@dataclass
class PretrainJob:
    """What one `cram pretrain` runs with, typed and validated."""

    cfg: DictConfig
    """The composed config with its paths resolved; with resume, the run's own saved config."""
    run_dir: Path
    resume: bool
    train: TrainConfig
    arch: ModelConfig
    gpu: GpuProfile
    budget: BudgetSpec
    """The parsed top-level `budget`."""
    seed: int
    """The run's one seed (init, data order, masks)."""
    config_text: str
    """The resolved config as YAML, saved in every checkpoint (resume reads it back)."""


def load_job(cfg: DictConfig) -> PretrainJob:
    """The job of `cfg`: the run folder is Hydra's output dir, or `resume=<run_dir>` to continue one."""
    cfg = resolve_paths(cfg)
    if cfg.get("resume"):
        run_dir = Path(str(cfg.resume))
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CrammingError(f"resume={run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
        # Continue with the run's own resolved config, so its schedules and budget are unchanged.
        # Verify the checksums first: a damaged config.yaml must not be parsed (or half-parsed).
        verify_checkpoint(ckpt)
        saved = upgrade_saved_config(OmegaConf.create((ckpt / "config.yaml").read_text()))
        saved.resume = str(run_dir)
        cfg = resolve_paths(saved)  # a run saved before paths were resolved may hold a `~`
        resume = True
    else:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        resume = False
    train = to_dataclass(TrainConfig, cfg.train, "train")
    require_installed(train.report_to)  # a missing tracker stops the run now, not after data preparation
    return PretrainJob(cfg=cfg, run_dir=run_dir, resume=resume, train=train,
                       arch=to_dataclass(ModelConfig, cfg.arch, "arch"), gpu=resolve_gpu(cfg.gpu),
                       budget=parse_budget(cfg.budget), seed=int(cfg.seed), config_text=OmegaConf.to_yaml(cfg, resolve=True))


def upgrade_saved_config(saved: DictConfig) -> DictConfig:
    """A run's saved config in today's keys (cramming.config.MOVED_KEYS), so a run checkpointed
    before the budget and the target batch had one home each resumes as it started: its
    train.budget_kind with train.budget_steps/budget_tokens becomes the top-level `budget` (e.g.
    budget=300steps; a time budget was the top-level one already), and gpu.target_batch_size fills
    a train.target_batch_size left null (which meant the profile's). A null in both (gpu=auto) takes
    the recipe's default, 4096, which every GPU profile's target rounds to (the cpu profile's was
    256). The one flag train.decay_norms_biases_embeddings becomes train.decay_embeddings and
    train.decay_norms_biases with its value (runs saved before those keys exempted the embeddings),
    and a train.seed that was set becomes the top-level `seed`; train.tensorboard=true becomes
    train.report_to=[tensorboard]. Changes `saved` in place and returns it."""
    train, gpu = saved.get("train"), saved.get("gpu")
    if train is None:
        return saved
    if "budget_kind" in train:
        kind = train.pop("budget_kind")
        amounts = {"tokens": train.pop("budget_tokens", None), "steps": train.pop("budget_steps", None)}
        if kind in amounts:
            saved.budget = f"{amounts[kind]}{kind}"
    if gpu is not None and "target_batch_size" in gpu:
        profile_target = gpu.pop("target_batch_size")
        if train.get("target_batch_size") is None:
            train.target_batch_size = profile_target
    if "target_batch_size" in train and train.target_batch_size is None:
        del train["target_batch_size"]
    if "decay_embeddings" not in train:  # one flag exempted both; every saved run exempted embeddings
        exempt_all = bool(train.pop("decay_norms_biases_embeddings", False))
        train.decay_embeddings = train.decay_norms_biases = exempt_all
    if "seed" in train:
        train_seed = train.pop("seed")
        if train_seed is not None:
            saved.seed = train_seed
    if "tensorboard" in train:
        tensorboard = bool(train.pop("tensorboard"))
        train.report_to = ["tensorboard"] if tensorboard else []
    return saved


def run(job: PretrainJob, data_dir: Path) -> None:
    """Pretrain `job` on the prepared data in `data_dir`; an interruption exits with its code."""
    cfg = job.cfg
    log.info("pretraining %s/%s (config %s) into %s", cfg.arch.get("name"), job.train.name, config_hash(cfg),
             job.run_dir)
    try:
        final = pretrain(job.train, job.arch, job.gpu, data_dir, job.run_dir, budget=job.budget, seed=job.seed,
                         resume=job.resume, config_text=job.config_text)
    except Interrupted as stop:
        print(f"cram pretrain: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    print(f"cram pretrain: finished; model exported to {final}")
