"""`cram glue`: finetune a checkpoint on GLUE tasks, N trials each, and report medians.

One trial = one task, one seed: encode with the model's own tokenizer and pair format (`sources`,
`encoding`; at most `max_seq_len` tokens), finetune with AdamW and a warmup + decay schedule under
the GPU profile's precision (CUDA; the CPU runs fp32 eager), evaluate on dev after each epoch
(`epochs`) and keep the FINAL epoch's scores (never the best epoch: picking on dev would overstate
them). The median over trials is the task's score; the GLUE average follows the paper's convention
(see `metrics`). On CUDA a task's trials train side by side as one stacked model by default
(`parallel`, glue.parallel_trials), each trial still the recipe's, through the same epoch loop.

The results file (`runs.RESULTS_FILE`, the records of `cramming.runs`) is rewritten atomically after
every trial (after every group of side-by-side trials), so a killed run resumes: re-running with the
same output folder (`run_name=...`) and the same config skips the trials already in it. It records
what was finetuned (folder or hub id, revision, weights checksums, parameters, tokenizer and pair
format) beside the recipe.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers
from omegaconf import DictConfig
from torch import nn

from cramming import runs
from cramming.config import config_hash, resolve_paths, to_container, to_dataclass
from cramming.errors import ConfigError
from cramming.glue import GlueConfig, parallel
from cramming.glue import metrics as M
from cramming.glue.encoding import Encoded
from cramming.glue.epochs import DevSets, Trials, run_epochs
from cramming.glue.sources import CRAMMED, Source, resolve_source
from cramming.glue.tasks import TaskData, TaskSpec, load_custom_task, load_task
from cramming.glue.training import (
    TrialLog,
    TrialTrainer,
    compiled_step,
    compiles,
    seed_everything,
    train_collate,
    unpads,
)
from cramming.gpu import GpuProfile, require_runnable, resolve_gpu
from cramming.optim.precision import effective_precision
from cramming.runs import GlueResults, GlueRunInfo, GlueTask, GlueTrial
from cramming.trackers import Trackers, open_trackers, require_installed

log = logging.getLogger(__name__)

# Config fields that change what a trial computes; the rest (which tasks, how many trials, loader
# workers, export, eval batch size, logging every epoch, padding widths, trials side by side or not,
# padded or unpadded, and how the checkpoint is fetched, which its weights' checksum covers) can change
# between a run and its resume. Each trial's record says how it ran ("mode", "unpadded").
_RESUME_IGNORED = ("tasks", "custom_tasks", "trials", "seeds", "num_workers", "export_finetuned",
                   "eval_batch_size", "eval_every_epoch", "pad_buckets", "parallel_trials", "unpadded", "revision",
                   "trust_remote_code", "report_to")

Encoding = tuple[Encoded, dict[str, Encoded]]
"""A task's training split and dev splits, encoded."""


# ---------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------


def encode_task(source: Source, task: TaskData, gcfg: GlueConfig) -> Encoding:
    """Tokenize a task's training and dev splits (once per task, only when some trial needs it)."""
    return (source.encode(task.train, gcfg.max_seq_len),
            {k: source.encode(v, gcfg.max_seq_len) for k, v in task.dev.items()})


def finetune_trial(source: Source, spec: TaskSpec, train: Encoded, dev: dict[str, Encoded], gcfg: GlueConfig,
                   seed: int, profile: GpuProfile, label: str = "") -> tuple[GlueTrial, nn.Module]:
    """Finetune one fresh copy of the model on one task with one seed; returns the trial record
    (final-epoch scores, per-epoch log) and the finetuned model."""
    device = torch.device(profile.device)
    regression = spec.kind == "regression"
    seed_everything(seed)
    model = source.make_model(spec.num_labels, gcfg.dropout).to(device)
    unpadded = unpads(gcfg, profile, model)
    collate = train_collate(source.pad_id, regression, gcfg, compiled_step(profile, unpadded))
    loader = train.loader(gcfg.batch_size, collate, True, seed, gcfg.num_workers)
    total_steps = gcfg.epochs * len(loader)
    trainer = TrialTrainer.build(model, gcfg, profile, total_steps, regression, unpadded)
    trial = TrialLog(seed, label, gcfg.epochs)
    start = time.perf_counter()
    run_epochs(Trials(trainer, lambda: iter(loader), len(loader), [model], [trial]),
               DevSets.of(spec, dev, source.pad_id, gcfg, profile), gcfg, label)
    return trial.result(time.perf_counter() - start, total_steps, "sequential", unpadded=unpadded), model


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def resume_key(gcfg: GlueConfig, source: Source, profile: GpuProfile, base_seed: int) -> str:
    """Hash of everything that changes a trial's outcome (beyond the task and the seed)."""
    settings = {k: v for k, v in dataclasses.asdict(gcfg).items() if k not in _RESUME_IGNORED}
    key = {"glue": settings, "source": source.sha256, "precision": profile.precision, "device": profile.device,
           "base_seed": base_seed if gcfg.seeds is None else None}
    if source.record.format == "transformers":  # its tokenizer files could be replaced beside the same weights
        key["tokenizer"] = source.tokenizer_record.sha256
    return config_hash(key)


def _task_key(task: TaskData, custom: dict | None) -> str:
    return config_hash({"spec": dataclasses.asdict(task.spec), "custom": custom,
                        "train": len(task.train), "dev": {k: len(v) for k, v in task.dev.items()}})


def summarize(results: GlueResults) -> None:
    """Fill in medians, task scores and the `glue` block (columns, average) from the trials (in place)."""
    medians: dict[str, dict[str, float]] = {}
    for name, task in results.tasks.items():
        if not task.trials:
            task.median, task.score = {}, None
            continue
        task.median = {k: M.median([t.final[k] for t in task.trials]) for k in task.trials[0].final}
        task.score = float(np.mean([task.median[k] for k in task.headline]))
        medians[name] = task.median
    results.glue = runs.glue_block(medians)


def _load_previous(out_dir: Path, key: str) -> GlueResults | None:
    """The results of an earlier run into this folder, to resume from; None if there are none or
    they are unreadable (the run starts afresh)."""
    if not runs.is_glue_run(out_dir):
        return None
    try:
        previous = runs.read_glue_results(out_dir)
    except runs.RunFormatError as err:
        log.warning("ignoring unreadable results (%s); starting afresh", err)
        return None
    if previous.format_version != runs.GLUE_RESULTS_VERSION or previous.resume_key != key:
        raise ConfigError(
            f"{out_dir / runs.RESULTS_FILE} holds results of a different checkpoint or glue config; resuming "
            "would mix them. Use a new run_name (a new output folder) or move that file away"
        )
    return previous


def _new_results(gcfg: GlueConfig, source: Source, profile: GpuProfile, base_seed: int, key: str) -> GlueResults:
    precision = effective_precision(torch.device(profile.device), profile.precision)
    if precision != profile.precision:
        log.info("gpu.precision=%s applies on CUDA only; finetuning on the CPU runs fp32, as pretraining does", profile.precision)
    run = GlueRunInfo(base_seed, gcfg.trial_seeds(base_seed), profile.device, profile.name, precision, torch.__version__,
                      transformers.__version__)
    return GlueResults(key, source.record, dataclasses.asdict(gcfg), run, source.tokenizer_record)


def _task_entry(task: TaskData, custom: dict | None) -> GlueTask:
    spec = task.spec
    return GlueTask(spec.kind, custom is not None, _task_key(task, custom), list(spec.labels), list(spec.metrics),
                    spec.headline_keys(), {"train": task.train.source, **{k: v.source for k, v in task.dev.items()}},
                    {"train": len(task.train), **{k: len(v) for k, v in task.dev.items()}},
                    task.train.skipped + sum(v.skipped for v in task.dev.values()))


# ---------------------------------------------------------------------------------------------
# All tasks, all trials
# ---------------------------------------------------------------------------------------------


def load_all_tasks(gcfg: GlueConfig) -> list[tuple[TaskData, dict | None]]:
    """Read and check every task's data up front, so bad data stops the run before training."""
    out: list[tuple[TaskData, dict | None]] = []
    for name in gcfg.tasks:
        task = load_task(name, gcfg.data_dir, gcfg.on_bad_row)
        out.append((task.subsample(gcfg.max_train_examples, gcfg.max_eval_examples), None))
    for custom in gcfg.custom_tasks:
        task = load_custom_task(custom, gcfg.on_bad_row)
        out.append((task.subsample(gcfg.max_train_examples, gcfg.max_eval_examples), dataclasses.asdict(custom)))
    return out


def run_glue(gcfg: GlueConfig, source: Source, out_dir: Path, profile: GpuProfile, base_seed: int = 0,
             tracked: Trackers | None = None) -> GlueResults:
    """Finetune every task for every seed (skipping trials already in out_dir's results file) and
    rewrite the results file after each trial; `tracked` receives each task's trials and medians and
    the final GLUE summary. Returns the results; `cramming.report` renders them."""
    tracked = tracked or Trackers({})
    require_runnable(profile)
    if gcfg.unpadded and source.record.model_type != CRAMMED:
        raise ConfigError(f"glue.unpadded=true: only crammed models have an unpadded path, and {source.path} is a "
                          f"{source.record.model_type} checkpoint; leave glue.unpadded at null (padded batches)")
    tasks = load_all_tasks(gcfg)
    key = resume_key(gcfg, source, profile, base_seed)
    previous = _load_previous(out_dir, key)
    results = _new_results(gcfg, source, profile, base_seed, key)

    def save() -> None:
        summarize(results)
        runs.write_results(out_dir, results)

    for task, custom in tasks:
        entry = results.tasks[task.spec.name] = _task_entry(task, custom)
        done: dict[int, GlueTrial] = {}
        kept = previous.tasks.get(task.spec.name) if previous else None
        if kept is not None and kept.task_key == entry.task_key:
            done = {t.seed: t for t in kept.trials}
        _run_task(source, task, entry, done, gcfg, results.run.seeds, profile, out_dir, save)
        for trial in entry.trials:
            tracked.log_glue_trial(task.spec.name, trial)
        tracked.log_glue_task(task.spec.name, entry)
        log.info("%s: median %s", task.spec.name, " ".join(f"{k} {v:.2f}" for k, v in entry.median.items()))
    results.status = "complete"
    save()
    tracked.log_glue_summary(results)
    avg = results.glue["average"]
    log.info("GLUE average: %s; results in %s", "n/a (not all tasks ran)" if avg is None else f"{avg:.2f}", out_dir / runs.RESULTS_FILE)
    return results


def _run_task(source: Source, task: TaskData, entry: GlueTask, done: dict[int, GlueTrial], gcfg: GlueConfig,
              seeds: list[int], profile: GpuProfile, out_dir: Path, save: Callable[[], None]) -> None:
    """Run a task's trials not in `done` (side by side where wanted, the rest one after another) into
    `entry`, saving the results after each."""
    spec = task.spec
    todo = [s for s in seeds if s not in done]
    if len(todo) < len(seeds):
        log.info("%s: %d of %d trial(s) already in %s; skipping them", spec.name, len(seeds) - len(todo), len(seeds), out_dir)
    labels = {seed: f"{spec.name} trial {i + 1}/{len(seeds)} (seed {seed})" for i, seed in enumerate(seeds)}
    encoded = None
    if parallel.wanted(gcfg, profile, len(todo)):
        encoded = encode_task(source, task, gcfg)
        # Trials that did not fit side by side stay out of `done` and run one by one below.
        done.update(_side_by_side(source, spec, encoded, gcfg, seeds, todo, profile, labels, out_dir))
    for i, seed in enumerate(seeds):
        if seed in done:
            entry.trials.append(done[seed])
            continue
        if encoded is None:  # tokenize once per task, only when some trial needs it
            encoded = encode_task(source, task, gcfg)
        trial, model = finetune_trial(source, spec, *encoded, gcfg, seed, profile, labels[seed])
        entry.trials.append(trial)
        if gcfg.export_finetuned and i == 0:
            source.export(model, spec, out_dir / "finetuned" / spec.name, seed)
        del model
        save()
        log.info("%s: final %s", labels[seed], " ".join(f"{k} {trial.final[k]:.2f}" for k in spec.headline_keys()))
    if compiles(profile):
        torch._dynamo.reset()  # this task's graphs (its head's shapes) are not the next task's
    # Keep trials in seed order so a resumed run reads the same as an uninterrupted one.
    entry.trials.sort(key=lambda t: seeds.index(t.seed))
    save()


def _side_by_side(source: Source, spec: TaskSpec, encoded: Encoding, gcfg: GlueConfig, seeds: list[int],
                  todo: list[int], profile: GpuProfile, labels: dict[int, str], out_dir: Path) -> dict[int, GlueTrial]:
    """Run a task's remaining trials (`todo` of `seeds`) side by side; their records by seed, none when
    they did not fit. As in sequential runs, the first seed's classifier is the one exported."""
    group = parallel.finetune_side_by_side(lambda: source.make_model(spec.num_labels, gcfg.dropout), source.pad_id,
                                           spec, *encoded, gcfg, todo, profile, [labels[s] for s in todo])
    if group is None:
        return {}
    for i, (seed, trial) in enumerate(zip(todo, group.trials, strict=True)):
        log.info("%s: final %s", labels[seed], " ".join(f"{k} {trial.final[k]:.2f}" for k in spec.headline_keys()))
        if gcfg.export_finetuned and seed == seeds[0]:
            source.export(group.stack.module(i), spec, out_dir / "finetuned" / spec.name, seed)
    return dict(zip(todo, group.trials, strict=True))


def run(cfg: DictConfig) -> Path:
    """The `cram glue` entry point (a Hydra application; see cramming/cli.py); returns the run's
    output folder, whose tables the CLI renders with `cramming.report.write_glue_tables`."""
    from hydra.core.hydra_config import HydraConfig

    cfg = resolve_paths(cfg)
    gcfg = to_dataclass(GlueConfig, cfg.glue, "glue")
    profile = resolve_gpu(cfg.gpu)
    require_runnable(profile)  # before the checkpoint is read
    require_installed(gcfg.report_to, "glue.report_to")
    source = resolve_source(cfg, gcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    log.info("cram glue: %s (%s, %s parameters) on %s (%s, %s); output %s", source.path, source.record.format,
             f"{source.record.parameters:,}", ", ".join([*gcfg.tasks, *(c.name for c in gcfg.custom_tasks)]),
             profile.name, profile.precision, out_dir)
    # Two `cram glue` runs with the same run_name would interleave their rewrites of the results file
    # (each dropping the other's trials): the second one refuses instead.
    with runs.RunLock(out_dir), open_trackers(gcfg.report_to, out_dir, stage="glue", key="glue.report_to",
                                              config=to_container(cfg)) as tracked:
        run_glue(gcfg, source, out_dir, profile, int(cfg.get("seed", 0) or 0), tracked)
    return out_dir
