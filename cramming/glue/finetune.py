"""`cram glue`: finetune a checkpoint on GLUE tasks, N trials each, and report medians.

One trial = one task, one seed: tokenize with the checkpoint's own tokenizer (pairs as
[CLS] a [SEP] b [SEP], at most `max_seq_len` tokens), finetune with AdamW and a warmup + decay
schedule under the GPU profile's precision (CUDA; the CPU runs fp32 eager), evaluate on dev after
each epoch and keep the FINAL epoch's scores (never the best epoch: picking on dev would overstate
them). The median over trials is the task's score; the GLUE average follows the paper's convention
(see `metrics`). On CUDA a task's trials train side by side as one stacked model by default
(`parallel`, glue.parallel_trials), each trial still the recipe's.

The results file (`runs.RESULTS_FILE`) is rewritten atomically after every trial (after every group
of side-by-side trials), so a killed run resumes: re-running with the same output folder (`run_name=...`) and the
same config skips the trials already in it.

Baseline `ckpt=random-init`: the `arch` group's model with random weights (the paper's lower bound);
it needs `glue.tokenizer=<tokenizer.json or a folder holding one>` for its vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from cramming import runs
from cramming.config import config_hash, resolve_paths, to_dataclass
from cramming.errors import CheckpointError, ConfigError
from cramming.faults import fault_point
from cramming.fileio import sha256_file
from cramming.glue import GlueConfig, parallel
from cramming.glue import metrics as M
from cramming.glue.batching import Collate, make_loader
from cramming.glue.tasks import Split, TaskData, TaskSpec, load_custom_task, load_task
from cramming.glue.training import TrialLog, TrialTrainer, compiles, logits_of, seed_everything, train_collate
from cramming.gpu import GpuProfile, resolve_gpu
from cramming.optim.precision import autocast, effective_precision

log = logging.getLogger(__name__)

RESULTS_VERSION = 1
RANDOM_INIT = "random-init"

# Config fields that change what a trial computes; the rest (which tasks, how many trials, loader
# workers, export, eval batch size, logging every epoch, padding widths, trials side by side or not)
# can change between a run and its resume. Each trial's record says how it ran ("mode").
_RESUME_IGNORED = ("tasks", "custom_tasks", "trials", "seeds", "num_workers", "export_finetuned",
                   "eval_batch_size", "eval_every_epoch", "pad_buckets", "parallel_trials")


# ---------------------------------------------------------------------------------------------
# The model to finetune
# ---------------------------------------------------------------------------------------------


@dataclass
class Source:
    """The checkpoint (or random-init baseline) to finetune, with its tokenizer."""

    kind: str
    """'checkpoint' or 'random-init'."""
    path: str
    sha256: str
    """sha256 of the weights file (checkpoint), or of the arch config + tokenizer (random-init)."""
    tokenizer: Any
    """transformers.PreTrainedTokenizerFast."""
    tokenizer_file: Path
    make_model: Callable[[int, float], nn.Module]
    """(num_labels, dropout) -> a fresh classifier."""


def _check_tokenizer(tokenizer: Any, where: str) -> None:
    vocab = tokenizer.get_vocab()
    missing = [t for t in ("[PAD]", "[CLS]", "[SEP]") if t not in vocab]
    if missing:
        raise CheckpointError(f"{where}: the tokenizer lacks the special token(s) {missing} needed to encode GLUE inputs")


def _check_vocab(tokenizer: Any, vocab_size: int, where: str) -> None:
    """The tokenizer must be the model's own: same vocabulary size (as export.load_model demands)."""
    size = len(tokenizer)
    if size != vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has {size} tokens but the model's vocabulary has {vocab_size}; "
            "the tokenizer does not belong to this checkpoint (re-export it with its own tokenizer.json)"
        )


def _check_length(model_max_len: int, gcfg: GlueConfig, where: str) -> None:
    if gcfg.max_seq_len > model_max_len:
        raise ConfigError(
            f"glue.max_seq_len={gcfg.max_seq_len} exceeds the model's max_seq_len={model_max_len} ({where}); "
            f"pass glue.max_seq_len={model_max_len}"
        )


def _locate_tokenizer_file(path: str) -> Path:
    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"glue.tokenizer={path}: no tokenizer.json there (give the file or a folder holding it)")
    return file


def resolve_source(cfg: DictConfig, gcfg: GlueConfig) -> Source:
    """Check the checkpoint (or build the random-init recipe) before any data is read or trained on."""
    ckpt = cfg.get("ckpt")
    if ckpt in (None, ""):
        raise ConfigError(
            "ckpt is required: cram glue ckpt=outputs/pretrain/<run>/final, or ckpt=random-init "
            "glue.tokenizer=<tokenizer.json> for the untrained baseline"
        )
    ckpt = str(ckpt)
    if ckpt == RANDOM_INIT:
        return _random_init_source(cfg, gcfg)
    if gcfg.tokenizer is not None:
        raise ConfigError("glue.tokenizer is only for ckpt=random-init; a checkpoint is always finetuned with its own tokenizer")
    folder = Path(ckpt).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"ckpt={ckpt} is not a folder; give an exported model folder (e.g. outputs/pretrain/<run>/final)")
    needed = ("model.safetensors", "config.json", "tokenizer.json")
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(
            f"ckpt={ckpt} lacks {', '.join(missing)}; an exported model folder holds {', '.join(needed)} "
            "(written by cram pretrain into <run>/final)"
        )
    from cramming.model import export

    tokenizer = export.load_tokenizer(folder)
    _check_tokenizer(tokenizer, f"ckpt={ckpt}")
    try:
        model_config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"ckpt={ckpt}: config.json is unreadable ({err})") from None
    if "vocab_size" in model_config:
        _check_vocab(tokenizer, int(model_config["vocab_size"]), f"ckpt={ckpt}")
    if "max_seq_len" in model_config:
        _check_length(int(model_config["max_seq_len"]), gcfg, f"ckpt={ckpt}")

    def make_model(num_labels: int, dropout: float) -> nn.Module:
        return export.load_model(folder, head="classification", num_labels=num_labels, dropout=dropout)

    return Source("checkpoint", str(folder), sha256_file(folder / "model.safetensors"), tokenizer,
                  folder / "tokenizer.json", make_model)


def _random_init_source(cfg: DictConfig, gcfg: GlueConfig) -> Source:
    if gcfg.tokenizer is None:
        raise ConfigError(
            "ckpt=random-init needs glue.tokenizer=<tokenizer.json, or a folder holding one such as a prepared "
            "data folder or an exported checkpoint>: the untrained model still needs a vocabulary"
        )
    from cramming.model import bert, export

    file = _locate_tokenizer_file(gcfg.tokenizer)
    tokenizer = export.load_tokenizer(file)
    _check_tokenizer(tokenizer, f"glue.tokenizer={gcfg.tokenizer}")
    arch = to_dataclass(bert.ModelConfig, cfg.arch, "arch")
    # The baseline's embedding table is sized to the tokenizer it will read.
    arch = dataclasses.replace(arch, vocab_size=len(tokenizer), pad_token_id=int(tokenizer.convert_tokens_to_ids("[PAD]")))
    _check_length(arch.max_seq_len, gcfg, "arch")
    identity = {"arch": dataclasses.asdict(arch), "tokenizer": sha256_file(file)}

    def make_model(num_labels: int, dropout: float) -> nn.Module:
        return export.build_model(dataclasses.replace(arch, dropout=dropout), head="classification", num_labels=num_labels)

    return Source(RANDOM_INIT, RANDOM_INIT, hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest(),
                  tokenizer, file, make_model)


# ---------------------------------------------------------------------------------------------
# Tokenization and batching
# ---------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids of each example ([CLS] a [SEP] (b [SEP])) and their labels."""

    input_ids: list[list[int]]
    labels: list[int] | list[float]


def encode_split(tokenizer: Any, split: Split, max_len: int) -> Encoded:
    """Encode with the checkpoint's tokenizer; [CLS]/[SEP] are placed here rather than by the
    tokenizer's post-processor, which pretraining does not need and may not define."""
    cls_id, sep_id = tokenizer.convert_tokens_to_ids("[CLS]"), tokenizer.convert_tokens_to_ids("[SEP]")
    a_ids = tokenizer(split.texts_a, add_special_tokens=False, verbose=False)["input_ids"]
    out: list[list[int]] = []
    if split.texts_b is None:
        for a in a_ids:
            out.append([cls_id, *a[: max_len - 2], sep_id])
    else:
        b_ids = tokenizer(split.texts_b, add_special_tokens=False, verbose=False)["input_ids"]
        budget = max_len - 3
        for a, b in zip(a_ids, b_ids, strict=True):
            # Longest-first truncation: trim the longer text until the pair fits.
            la, lb = len(a), len(b)
            while la + lb > budget:
                if la >= lb:
                    la -= 1
                else:
                    lb -= 1
            out.append([cls_id, *a[:la], sep_id, *b[:lb], sep_id])
    return Encoded(out, split.labels)


# ---------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, spec: TaskSpec, dev: dict[str, Encoded], batch_size: int, collate: Collate,
             profile: GpuProfile, device: torch.device) -> tuple[dict[str, float], list[str]]:
    """Scores (percent) on every dev split, flattened to the task's metric keys."""
    model.eval()
    values: dict[str, float] = {}
    notes: list[str] = []
    regression = spec.kind == "regression"
    for split, enc in dev.items():
        preds: list = []
        for batch in make_loader(enc.input_ids, enc.labels, batch_size, collate, False, 0, 0):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device, profile.precision):
                logits = logits_of(model, batch)
            preds.append(logits.view(-1) if regression else logits.argmax(-1))
        pred = torch.cat(preds).cpu().numpy()
        scores, split_notes = M.score(spec, pred, np.asarray(enc.labels))
        for name, v in scores.items():
            values[spec.metric_key(split, name)] = v
        notes += [f"{split}: {n}" if len(dev) > 1 else n for n in split_notes]
    return values, notes


def finetune_trial(source: Source, spec: TaskSpec, train: Encoded, dev: dict[str, Encoded], gcfg: GlueConfig,
                   seed: int, profile: GpuProfile, label: str = "") -> tuple[dict[str, Any], nn.Module]:
    """Finetune one fresh copy of the model on one task with one seed; returns the trial record
    (final-epoch scores, per-epoch log) and the finetuned model."""
    device = torch.device(profile.device)
    regression = spec.kind == "regression"
    seed_everything(seed)
    model = source.make_model(spec.num_labels, gcfg.dropout).to(device)
    pad_id = _pad_id(source)
    loader = make_loader(train.input_ids, train.labels, gcfg.batch_size, train_collate(pad_id, regression, gcfg, profile),
                         True, seed, gcfg.num_workers)
    total_steps = gcfg.epochs * len(loader)
    trainer = TrialTrainer.build(model, gcfg, profile, total_steps, regression)

    trial = TrialLog(seed, label, gcfg.epochs)
    start = time.perf_counter()
    for epoch in range(1, gcfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        # The bar gets the epoch's one iterator: given the loader, tqdm.auto opens a throwaway iterator
        # of its own, whose draw from the shuffling generator would make the order depend on the bar.
        bar = tqdm(iter(loader), total=len(loader), desc=f"{label} epoch {epoch}/{gcfg.epochs}", leave=False,
                   mininterval=1.0, dynamic_ncols=True)
        for batch in bar:
            loss = trainer.step({k: v.to(device, non_blocking=True) for k, v in batch.items()})
            fault_point("glue.trial")
            loss_sum += loss.detach()
        train_loss = float(loss_sum.item()) / max(1, len(loader))
        seconds = time.perf_counter() - t0
        scores = None
        if gcfg.eval_every_epoch or epoch == gcfg.epochs:
            scores = evaluate(model, spec, dev, gcfg.eval_batch_size, Collate(pad_id, regression), profile, device)
        trial.end_epoch(epoch, train_loss, trainer.scheduler.get_last_lr()[0], seconds, scores)
    return trial.result(time.perf_counter() - start, total_steps, mode="sequential"), model


def _pad_id(source: Source) -> int:
    return int(source.tokenizer.convert_tokens_to_ids("[PAD]"))


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def resume_key(gcfg: GlueConfig, source: Source, profile: GpuProfile, base_seed: int) -> str:
    """Hash of everything that changes a trial's outcome (beyond the task and the seed)."""
    settings = {k: v for k, v in dataclasses.asdict(gcfg).items() if k not in _RESUME_IGNORED}
    return config_hash({"glue": settings, "source": source.sha256, "precision": profile.precision,
                        "device": profile.device, "base_seed": base_seed if gcfg.seeds is None else None})


def _task_key(task: TaskData, custom: dict[str, Any] | None) -> str:
    return config_hash({"spec": dataclasses.asdict(task.spec), "custom": custom,
                        "train": len(task.train), "dev": {k: len(v) for k, v in task.dev.items()}})


def summarize(results: dict[str, Any]) -> None:
    """Fill in medians, task scores and the `glue` block (columns, average) from the trials (in place)."""
    medians: dict[str, dict[str, float]] = {}
    for name, task in results["tasks"].items():
        trials = task["trials"]
        if not trials:
            task["median"], task["score"] = {}, None
            continue
        keys = trials[0]["final"].keys()
        task["median"] = {k: M.median([t["final"][k] for t in trials]) for k in keys}
        heads = [task["median"][k] for k in task["headline"]]
        task["score"] = float(np.mean(heads))
        medians[name] = task["median"]
    results["glue"] = runs.glue_block(medians)


def _load_previous(out_dir: Path, key: str) -> dict[str, Any] | None:
    """The results of an earlier run into this folder, to resume from; None if there are none or
    they are unreadable (the run starts afresh)."""
    if not runs.is_glue_run(out_dir):
        return None
    try:
        previous = runs.read_results(out_dir)
    except runs.RunFormatError as err:
        log.warning("ignoring unreadable results (%s); starting afresh", err)
        return None
    if previous.get("format_version") != RESULTS_VERSION or previous.get("resume_key") != key:
        raise ConfigError(
            f"{out_dir / runs.RESULTS_FILE} holds results of a different checkpoint or glue config; resuming "
            "would mix them. Use a new run_name (a new output folder) or move that file away"
        )
    return previous


# ---------------------------------------------------------------------------------------------
# All tasks, all trials
# ---------------------------------------------------------------------------------------------


def load_all_tasks(gcfg: GlueConfig) -> list[tuple[TaskData, dict[str, Any] | None]]:
    """Read and check every task's data up front, so bad data stops the run before training."""
    out: list[tuple[TaskData, dict[str, Any] | None]] = []
    for name in gcfg.tasks:
        task = load_task(name, gcfg.data_dir, gcfg.on_bad_row)
        out.append((task.subsample(gcfg.max_train_examples, gcfg.max_eval_examples), None))
    for custom in gcfg.custom_tasks:
        task = load_custom_task(custom, gcfg.on_bad_row)
        out.append((task.subsample(gcfg.max_train_examples, gcfg.max_eval_examples), dataclasses.asdict(custom)))
    return out


def run_glue(gcfg: GlueConfig, source: Source, out_dir: Path, profile: GpuProfile, base_seed: int = 0) -> dict[str, Any]:
    """Finetune every task for every seed (skipping trials already in out_dir's results file) and
    rewrite the results file after each trial. Returns the results; `cramming.report` renders them."""
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"gpu profile {profile.name} wants CUDA but none is available; pass gpu=cpu")
    tasks = load_all_tasks(gcfg)
    seeds = gcfg.trial_seeds(base_seed)
    precision = effective_precision(torch.device(profile.device), profile.precision)
    if precision != profile.precision:
        log.info("gpu.precision=%s applies on CUDA only; finetuning on the CPU runs fp32, as pretraining does", profile.precision)
    key = resume_key(gcfg, source, profile, base_seed)
    previous = _load_previous(out_dir, key)
    results: dict[str, Any] = {
        "format_version": RESULTS_VERSION,
        "resume_key": key,
        "status": "running",
        "checkpoint": {"path": source.path, "kind": source.kind, "sha256": source.sha256},
        "config": dataclasses.asdict(gcfg),
        "run": {"base_seed": base_seed, "seeds": seeds, "device": profile.device, "gpu_profile": profile.name,
                "precision": precision, "torch": torch.__version__},
        "tasks": {},
    }

    def save() -> None:
        summarize(results)
        runs.write_results(out_dir, results)

    for task, custom in tasks:
        spec = task.spec
        tkey = _task_key(task, custom)
        done = {}
        if previous and previous.get("tasks", {}).get(spec.name, {}).get("task_key") == tkey:
            done = {t["seed"]: t for t in previous["tasks"][spec.name]["trials"]}
        entry = results["tasks"][spec.name] = {
            "kind": spec.kind, "custom": custom is not None, "task_key": tkey,
            "labels": list(spec.labels), "metrics": list(spec.metrics), "headline": spec.headline_keys(),
            "sources": {"train": task.train.source, **{k: v.source for k, v in task.dev.items()}},
            "examples": {"train": len(task.train), **{k: len(v) for k, v in task.dev.items()}},
            "skipped_rows": task.train.skipped + sum(v.skipped for v in task.dev.values()),
            "trials": [],
        }
        todo = [s for s in seeds if s not in done]
        if len(todo) < len(seeds):
            log.info("%s: %d of %d trial(s) already in %s; skipping them", spec.name, len(seeds) - len(todo), len(seeds), out_dir)
        labels = {seed: f"{spec.name} trial {i + 1}/{len(seeds)} (seed {seed})" for i, seed in enumerate(seeds)}
        encoded = None
        if parallel.wanted(gcfg, profile, len(todo)):
            encoded = _encode(source, task, gcfg)
            # Trials that did not fit side by side stay out of `done` and run one by one below.
            done.update(_side_by_side(source, spec, encoded, gcfg, seeds, todo, profile, labels, out_dir))
        for i, seed in enumerate(seeds):
            if seed in done:
                entry["trials"].append(done[seed])
                continue
            if encoded is None:  # tokenize once per task, only when some trial needs it
                encoded = _encode(source, task, gcfg)
            label = labels[seed]
            trial, model = finetune_trial(source, spec, encoded[0], encoded[1], gcfg, seed, profile, label)
            entry["trials"].append(trial)
            if gcfg.export_finetuned and i == 0:
                _export(model, source, spec, out_dir / "finetuned" / spec.name, seed)
            del model
            save()
            head = " ".join(f"{k} {trial['final'][k]:.2f}" for k in spec.headline_keys())
            log.info("%s: final %s", label, head)
        if compiles(profile):
            torch._dynamo.reset()  # this task's graphs (its head's shapes) are not the next task's
        # Keep trials in seed order so a resumed run reads the same as an uninterrupted one.
        entry["trials"].sort(key=lambda t: seeds.index(t["seed"]))
        save()
        log.info("%s: median %s", spec.name, " ".join(f"{k} {v:.2f}" for k, v in entry["median"].items()))
    results["status"] = "complete"
    save()
    avg = results["glue"]["average"]
    log.info("GLUE average: %s; results in %s", "n/a (not all tasks ran)" if avg is None else f"{avg:.2f}", out_dir / runs.RESULTS_FILE)
    return results


def _encode(source: Source, task: TaskData, gcfg: GlueConfig) -> tuple[Encoded, dict[str, Encoded]]:
    """Tokenize a task's training and dev splits (once per task, only when some trial needs it)."""
    return (encode_split(source.tokenizer, task.train, gcfg.max_seq_len),
            {k: encode_split(source.tokenizer, v, gcfg.max_seq_len) for k, v in task.dev.items()})


def _side_by_side(source: Source, spec: TaskSpec, encoded: tuple[Encoded, dict[str, Encoded]], gcfg: GlueConfig,
                  seeds: list[int], todo: list[int], profile: GpuProfile, labels: dict[int, str],
                  out_dir: Path) -> dict[int, dict[str, Any]]:
    """Run a task's remaining trials (`todo` of `seeds`) side by side; their records by seed, none when
    they did not fit. As in sequential runs, the first seed's classifier is the one exported."""
    group = parallel.finetune_side_by_side(lambda: source.make_model(spec.num_labels, gcfg.dropout), _pad_id(source),
                                           spec, *encoded, gcfg, todo, profile, [labels[s] for s in todo])
    if group is None:
        return {}
    for i, (seed, trial) in enumerate(zip(todo, group.trials, strict=True)):
        log.info("%s: final %s", labels[seed], " ".join(f"{k} {trial['final'][k]:.2f}" for k in spec.headline_keys()))
        if gcfg.export_finetuned and seed == seeds[0]:
            _export(group.stack.module(i), source, spec, out_dir / "finetuned" / spec.name, seed)
    return dict(zip(todo, group.trials, strict=True))


def _export(model: nn.Module, source: Source, spec: TaskSpec, out: Path, seed: int) -> None:
    from cramming.model import export

    extra = {
        "finetuned_task": spec.name, "problem_type": "regression" if spec.kind == "regression" else "single_label_classification",
        "num_labels": spec.num_labels, "id2label": {str(i): v for i, v in enumerate(spec.labels)},
        "label2id": {v: i for i, v in enumerate(spec.labels)}, "finetune_seed": seed, "base_checkpoint": source.path,
    }
    export.save_pretrained(model.cpu(), out, source.tokenizer_file, extra_config=extra)
    log.info("exported the finetuned %s classifier to %s", spec.name, out)


def run(cfg: DictConfig) -> Path:
    """The `cram glue` entry point (a Hydra application; see cramming/cli.py); returns the run's
    output folder, whose tables the CLI renders with `cramming.report.write_glue_tables`."""
    from hydra.core.hydra_config import HydraConfig

    cfg = resolve_paths(cfg)
    gcfg = to_dataclass(GlueConfig, cfg.glue, "glue")
    profile = resolve_gpu(cfg.gpu)
    source = resolve_source(cfg, gcfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    log.info("cram glue: %s on %s (%s, %s); output %s", source.path, ", ".join(
        [*gcfg.tasks, *(c.name for c in gcfg.custom_tasks)]), profile.name, profile.precision, out_dir)
    # Two `cram glue` runs with the same run_name would interleave their rewrites of the results file
    # (each dropping the other's trials): the second one refuses instead.
    with runs.RunLock(out_dir):
        run_glue(gcfg, source, out_dir, profile, int(cfg.get("seed", 0) or 0))
    return out_dir
