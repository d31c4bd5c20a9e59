"""`cram bench glue`: finetuning throughput per GLUE task in each way `cram glue` can run trials (one
after another padded or unpadded, side by side), and the projected time of one checkpoint's full GLUE
evaluation.

    cram bench glue                                    # CPU, the demo arch, the shipped task subsets
    cram bench glue --device cuda --precision bf16 --compile --arch crammed-bert
    cram bench glue --ckpt outputs/pretrain/<run>/final --data-dir <GLUE folder>

Every mode runs the finetuning code's own steps (`TrialTrainer.step`, `GroupTrainer.step`: forward,
backward, clipping, AdamW, schedule) on the task's real batches in the recipe's order (batch 16,
dropout 0.1, bucketed padding where compiled). One trial stands for trials one after another (each
has the same steps): `sequential` pads each batch (to its longest example eager, to the bucket widths
compiled), `unpadded` runs the model's token-wise work on the real tokens only (glue.unpadded, always
eager); side by side, the N trials' steps run as one stacked step. Timed blocks of the modes take
turns in a rotating order (A B C, B C A, ...) after an untimed warm-up that also compiles every
bucket width; rates are medians over blocks, each mode's speed-up the median of its per-block ratios
to `sequential`.

Optimizer steps/s counts trial steps (a stacked step of N trials is N); sequences/s is 16 x that.
The projection multiplies each task's measured time per trial step by the recipe's step count on
the real GLUE training sets (5 epochs x 5 trials x ceil(rows / 16)); tasks without data in
--data-dir take the median rate of the measured sentence-pair tasks (labelled in the output).
Evaluation (a forward pass over the dev sets after each epoch, a few percent of the training
FLOPs) and loading are not timed.

Without --ckpt the model is the --arch preset with random weights and a WordPiece tokenizer trained
on the tasks' own training text (so token counts are a little lower than a general tokenizer's).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cramming.benchtools import add_arch_options, add_out_option, arch_config, cpu_name, write_json_report
from cramming.glue import GlueConfig
from cramming.glue.batching import bucket_widths, make_loader, padding_waste
from cramming.glue.encoding import encode_with_cls_sep
from cramming.glue.parallel import DoesNotFit, GroupTrainer, build_stack, cpu_memory_check
from cramming.glue.tasks import GLUE_TASKS, TASK_SPECS, TaskData, load_task
from cramming.glue.training import TrialTrainer, compiled_step, seed_everything, train_collate
from cramming.gpu import Fixes, GpuProfile, require_runnable
from cramming.runs import GLUE_TRAIN_ROWS

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "glue_demo"
MODES = ("sequential", "unpadded", "side-by-side")
BASELINE = "sequential"
# What `cram bench glue` users type instead when this machine cannot run what they asked for.
BENCH_FIXES = Fixes(cpu="--device cpu (the default without CUDA)", no_bf16="--precision fp32")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cram bench glue", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast on CUDA; CPU is always fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the steps (CUDA only, as cram glue)")
    p.add_argument("--ckpt", type=Path, help="an exported model folder (its weights and tokenizer); default: --arch, random")
    add_arch_options(p, "demo", "arch preset without --ckpt (configs/arch/*.yaml)", seq_len_help="glue.max_seq_len")
    p.add_argument("--data-dir", type=Path, default=ASSETS, help="GLUE folder (official layout); default: the shipped subsets")
    p.add_argument("--tasks", nargs="*", help="default: every GLUE task with data in --data-dir")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="the ways to run trials to time (default: all; sequential is the baseline of the speed-ups)")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per timed block (per trial)")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per mode (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (after one per bucket width)")
    p.add_argument("--pad-buckets", type=int, default=4, help="glue.pad_buckets")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    add_out_option(p)
    return p


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, data
# ---------------------------------------------------------------------------------------------


def _train_tokenizer(tasks: list[TaskData], vocab_size: int, folder: Path) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from cramming.model.export import SPECIAL_TOKENS, load_tokenizer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = [t for task in tasks for t in (*task.train.texts_a, *(task.train.texts_b or []))]
    specials = list(SPECIAL_TOKENS.values())  # [PAD] first: id 0
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder / "tokenizer.json")


def model_factory(args: argparse.Namespace, tasks: list[TaskData], dropout: float,
                  workdir: Path) -> tuple[Any, Callable[[int], nn.Module], dict[str, Any]]:
    """The tokenizer, num_labels -> a fresh classifier, and a description of the model."""
    from cramming.model import export

    if args.ckpt is not None:
        tokenizer = export.load_tokenizer(args.ckpt)

        def from_ckpt(num_labels: int) -> nn.Module:
            return export.load_model(args.ckpt, head="classification", num_labels=num_labels, dropout=dropout)

        return tokenizer, from_ckpt, {"source": str(args.ckpt)}
    from cramming.model.bert import ModelConfig

    arch = arch_config(ModelConfig, args)  # the same --arch/--hidden/... as `cram bench model`
    tokenizer = _train_tokenizer(tasks, arch.vocab_size, workdir)
    arch = dataclasses.replace(arch, dropout=dropout, vocab_size=max(arch.vocab_size, len(tokenizer)),
                               pad_token_id=int(tokenizer.convert_tokens_to_ids("[PAD]")))

    def random_init(num_labels: int) -> nn.Module:
        return export.build_model(arch, "classification", num_labels)

    return tokenizer, random_init, {"source": f"random-init {arch.name}", "arch": dataclasses.asdict(arch),
                                    "tokenizer_vocab": len(tokenizer)}


def _groups(loaders: list, forever: bool = True) -> Iterator[tuple]:
    """Step-aligned batches of every loader, epoch after epoch."""
    while True:
        yield from zip(*loaders, strict=True)
        if not forever:
            return


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModeRun:
    """One mode's trainer on one task, with the step-aligned batches it is fed."""

    name: str
    trials: int
    step: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    batches: Iterator[dict[str, torch.Tensor]]
    warmup_s: float = 0.0
    rates: list[float] = dataclasses.field(default_factory=list)
    """Trial steps per second of each timed block."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_mode(name: str, task: TaskData, encoded: Any, make_model: Callable[[int], nn.Module], pad_id: int,
                 gcfg: GlueConfig, profile: GpuProfile, trials: int, warmup: int) -> ModeRun:
    """Build a mode's trainer (1 trial, or `trials` stacked) and warm it up: one step per bucket width
    (so a compiled step has all its graphs before timing), then `warmup` steps."""
    device = torch.device(profile.device)
    spec, regression = task.spec, task.spec.kind == "regression"
    seeds = list(range(trials if name == "side-by-side" else 1))
    unpadded = name == "unpadded"
    collate = train_collate(pad_id, regression, gcfg, compiled_step(profile, unpadded))
    loaders = [make_loader(encoded.input_ids, encoded.labels, gcfg.batch_size, list, True, s, 0) for s in seeds]
    total = gcfg.epochs * len(loaders[0])
    if name == "side-by-side":
        fits = cpu_memory_check(trials, gcfg) if device.type == "cpu" else None  # as cram glue decides
        stack = build_stack(lambda: make_model(spec.num_labels), seeds, device, fits)
        stack.base.train()
        trainer: Any = GroupTrainer.build(stack, gcfg, profile, total, regression)

        def batch_of(group: tuple, width: int | None = None) -> dict[str, torch.Tensor]:
            return collate.stack(group, width)
    else:
        seed_everything(0)
        model = make_model(spec.num_labels).to(device).train()
        trainer = TrialTrainer.build(model, gcfg, profile, total, regression, unpadded)

        def batch_of(group: tuple, width: int | None = None) -> dict[str, torch.Tensor]:
            return collate(group[0]) if width is None else collate.pad(group[0], width)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for group in _groups(loaders):
            yield {k: v.to(device, non_blocking=True) for k, v in batch_of(group).items()}

    run = ModeRun(name, len(seeds), trainer.step, batches())
    start = time.perf_counter()
    first = next(_groups(loaders, forever=False))  # a group of full batches (the train set holds >= 16)
    for width in collate.buckets:
        trainer.step({k: v.to(device) for k, v in batch_of(first, width).items()})
    for _ in range(warmup):
        run.step(next(run.batches))
    _sync(device)
    run.warmup_s = time.perf_counter() - start
    return run


def time_block(run: ModeRun, steps: int, device: torch.device) -> float:
    """Trial steps per second over `steps` steps of every trial of the run."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run.step(next(run.batches))
    _sync(device)
    rate = run.trials * steps / (time.perf_counter() - start)
    run.rates.append(rate)
    return rate


def bench_task(task: TaskData, encoded: Any, make_model: Callable[[int], nn.Module], pad_id: int, gcfg: GlueConfig,
               profile: GpuProfile, args: argparse.Namespace) -> dict[str, Any]:
    """The modes on one task, timed blocks interleaved; rates, speed-ups and padding waste."""
    device = torch.device(profile.device)
    lengths = [len(ids) for ids in encoded.input_ids]
    buckets = bucket_widths(gcfg.max_seq_len, gcfg.pad_buckets)
    waste = padding_waste(lengths, gcfg.batch_size, list(range(args.trials)), buckets)
    out: dict[str, Any] = {"train_rows": len(lengths), "mean_tokens": sum(lengths) / len(lengths),
                           "padding_waste": {k: v.waste for k, v in waste.items()}, "modes": {}}
    runs: list[ModeRun] = []
    for name in args.modes:
        try:
            runs.append(prepare_mode(name, task, encoded, make_model, pad_id, gcfg, profile, args.trials, args.warmup))
        except (torch.OutOfMemoryError, DoesNotFit) as err:
            out["modes"][name] = {"error": f"does not fit: {str(err).splitlines()[0]}"}
    for r in range(args.repeats if runs else 0):
        for run in runs[r % len(runs):] + runs[:r % len(runs)]:  # each mode first in turn
            time_block(run, args.steps, device)
    base = next((run for run in runs if run.name == BASELINE), None)
    for run in runs:
        ratios = [rate / b for rate, b in zip(run.rates, base.rates, strict=True)] if base and run is not base else []
        rate = statistics.median(run.rates)
        out["modes"][run.name] = {"trials_per_step": run.trials, "optimizer_steps_per_s": rate,
                                  "sequences_per_s": rate * gcfg.batch_size, "warmup_s": run.warmup_s,
                                  "blocks": run.rates, "speedups": ratios,
                                  "speedup": statistics.median(ratios) if ratios else None}
    return out


# ---------------------------------------------------------------------------------------------
# Projection and report
# ---------------------------------------------------------------------------------------------


def project(measured: dict[str, dict[str, Any]], pair_tasks: set[str], trials: int, epochs: int,
            batch_size: int, modes: list[str]) -> dict[str, Any]:
    """Hours of the recipe's training steps on the full GLUE training sets, per task and mode."""
    def rate(task: str, mode: str) -> float | None:
        return (measured.get(task, {}).get("modes", {}).get(mode) or {}).get("optimizer_steps_per_s")

    proxies = {}
    for mode in modes:
        pair = [r for t in sorted(pair_tasks) if (r := rate(t, mode)) is not None]
        proxies[mode] = statistics.median(pair) if pair else None
    rows = {}
    for task, n in GLUE_TRAIN_ROWS.items():
        steps = trials * epochs * math.ceil(n / batch_size)
        row: dict[str, Any] = {"train_rows": n, "trial_steps": steps, "proxy": task not in measured}
        for mode in modes:
            r = rate(task, mode) if task in measured else proxies[mode]
            row[f"{mode}_h"] = steps / r / 3600 if r else None
        rows[task] = row
    totals = {}
    for mode in modes:
        hours = [row[f"{mode}_h"] for row in rows.values()]
        totals[mode] = None if None in hours else sum(hours)
    return {"tasks": rows, "total_h": totals, "proxy_tasks": sorted(pair_tasks & set(measured)),
            "trial_steps": sum(r["trial_steps"] for r in rows.values())}


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown(report: dict[str, Any]) -> str:
    """The per-task table (padding, each mode's rates and speed-up) and the full-GLUE projection."""
    modes = report["modes"]
    lines = [f"device: {report['device_name']} ({report['device']}, {report['precision']}, "
             f"{'compiled' if report['compile'] else 'eager'}); model: {report['model']['source']}; "
             f"{report['trials']} trials, batch {report['batch_size']}; {report['date']}", "",
             "| task | rows | mean tokens | padding: longest / buckets / side-by-side | "
             + " | ".join(f"{m} steps/s | {m} seq/s" + ("" if m == BASELINE else f" | {m} speed-up") for m in modes)
             + " |", "|---" * (4 + sum(2 if m == BASELINE else 3 for m in modes)) + "|"]
    for name, t in report["tasks"].items():
        w = t["padding_waste"]
        side = w["side-by-side buckets"] if report["compile"] else w["side-by-side longest"]
        cells = [name, str(t["train_rows"]), f"{t['mean_tokens']:.1f}", f"{w['longest']:.0%} / {w['buckets']:.0%} / {side:.0%}"]
        for mode in modes:
            m = t["modes"].get(mode, {})
            cells += [_fmt(m.get("optimizer_steps_per_s"), ".2f"), _fmt(m.get("sequences_per_s"), ",.0f")]
            if mode != BASELINE:
                cells.append(_fmt(m.get("speedup"), ".2f") + ("x" if m.get("speedup") else ""))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"{name} {mode}: {m['error']}" for name, t in report["tasks"].items() for mode, m in t["modes"].items()
              if "error" in m]
    lines += ["", *errors] if errors else []
    proj = report["projection"]
    lines += ["", f"Full GLUE ({proj['trial_steps']:,} trial steps of batch {report['batch_size']}), training steps only:", "",
              "| task | train rows | trial steps | " + " | ".join(f"{m} h" for m in modes) + " |",
              "|---|---:|---:|" + "---:|" * len(modes)]
    for name, row in proj["tasks"].items():
        mark = " (proxy)" if row["proxy"] else ""
        lines.append(f"| {name}{mark} | {row['train_rows']:,} | {row['trial_steps']:,} | "
                     + " | ".join(_fmt(row[f"{m}_h"], ".2f") for m in modes) + " |")
    lines.append("| total | | | " + " | ".join(_fmt(proj["total_h"][m], ".1f") for m in modes) + " |")
    if any(r["proxy"] for r in proj["tasks"].values()):
        lines += ["", f"(proxy): no data for the task here; median rate of the measured pair tasks {', '.join(proj['proxy_tasks'])}."]
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    profile = GpuProfile(name="bench", device=device.type, precision=args.precision if device.type == "cuda" else "fp32",
                         compile=args.compile and device.type == "cuda")
    require_runnable(profile, f"--device {args.device} --precision {args.precision}", BENCH_FIXES)
    args.modes = [m for m in MODES if m in args.modes]  # the table's order, however they were typed
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.tasks or [t for t in GLUE_TASKS if (args.data_dir / TASK_SPECS[t].folder).is_dir()]
    if not names:
        raise SystemExit(f"no GLUE task folders in {args.data_dir}; pass --data-dir <GLUE folder> or --tasks")
    tasks = [load_task(n, args.data_dir) for n in names]
    gcfg = GlueConfig(tasks=names, max_seq_len=args.seq_len, pad_buckets=args.pad_buckets, trials=args.trials)
    with tempfile.TemporaryDirectory(prefix="cram-bench-glue-") as tmp:
        tokenizer, make_model, model = model_factory(args, tasks, gcfg.dropout, Path(tmp))
        pad_id = int(tokenizer.convert_tokens_to_ids("[PAD]"))
        results = {}
        for task in tasks:
            print(f"{task.spec.name}: timing {', '.join(args.modes)} ...", file=sys.stderr)
            encoded = encode_with_cls_sep(tokenizer, task.train, gcfg.max_seq_len)
            results[task.spec.name] = bench_task(task, encoded, make_model, pad_id, gcfg, profile, args)
            if profile.compile:
                torch._dynamo.reset()  # as cram glue does after each task
    pairs = {t for t in GLUE_TASKS if len(TASK_SPECS[t].text_columns) == 2}
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "date": datetime.date.today().isoformat(), "argv": list(sys.argv), "torch": torch.__version__,
        "device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(), "precision": profile.precision, "compile": profile.compile,
        "model": model, "modes": args.modes, "trials": args.trials, "batch_size": gcfg.batch_size,
        "pad_buckets": gcfg.pad_buckets,
        "data_dir": str(args.data_dir), "tasks": results, "peak_gpu_mb_all_modes": peak,
        "projection": project(results, pairs, args.trials, gcfg.epochs, gcfg.batch_size, args.modes),
    }


def main(argv: list[str]) -> int:
    """Run the benchmark; prints a markdown report, writes JSON with --out. Returns an exit code."""
    args = build_parser().parse_args(argv)
    report = run_bench(args)
    print(markdown(report))
    write_json_report(args.out, report)
    return 0
