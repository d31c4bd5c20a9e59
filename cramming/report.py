"""`cram report RUN_DIR [RUN_DIR ...]`: tables and plots for pretraining and GLUE runs.

A run folder is a pretraining run (metrics log, summary, Hydra's saved config, `final/`), a GLUE
run (results and their markdown table), or a folder holding such runs one level down (e.g. a demo
folder with `pretrain/` and `glue/`); `cramming.runs` reads them (formats: docs/design.md). A GLUE run found
beside a pretraining run is attached to it when its checkpoint is that run's `final/` (or when the
folder holds exactly one of each).

One run: resolved config, hardware, budget used, tokens seen, throughput, final and held-out MLM
loss, loss-vs-time and LR/batch-vs-time plots, and the GLUE table beside the paper's published rows.
Several runs: a comparison table (with the config keys that differ between them), overlaid loss
and schedule curves, the GLUE rows side by side, then one section per run.

`--include FILE` adds a markdown file of one's own (e.g. the demo's fill-mask table) after the
comparison. Writes `report.md` and PNGs into `--out` (default: the run folder for one run, else
`outputs/report/<name or timestamp>`) and prints a short summary. Reading is tolerant: optional
fields that are missing are shown as "n/a", a run still in progress (no summary yet) is
reported from its metrics. Folders that are not runs raise `ReportError`.

The report renders every table of a run, `results.md` of a GLUE run included (`write_glue_tables`),
and with `--card` a GLUE run's table into the model card of the export it finetuned (`write_card_glue`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cramming import runs as run_files
from cramming.errors import CrammingError
from cramming.fileio import write_atomic
from cramming.runs import (
    GLUE_COLUMNS,
    GLUE_TRAIN_ROWS,
    FinetunedModel,
    RunFormatError,
    TokenizerRecord,
    finite_float,
    glue_columns,
)
from cramming.runs import time_axis as _time_axis

# Key values shown per config group (others are in the full config at the end of the report).
KEY_FIELDS = {
    "arch": ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "max_seq_len",
             "ffn", "norm_position", "attention_backend"),
    "train": ("lr", "lr_schedule", "warmup_fraction", "target_batch_size", "ramp_fraction", "mask_rate",
              "grad_clip", "weight_decay"),
    "data": ("source", "tokenizer", "vocab_size", "seq_len", "compression_filter", "sorting", "lowercase"),
    "gpu": ("device", "micro_batch_size", "precision", "compile"),
}
NA = "n/a"

# Published GLUE dev scores, copied from the project spec's summary of the Cramming paper
# (RECIPE.md, section 1, "GLUE"). Only the numbers stated there are filled in; the rest stay blank
# rather than being recalled from memory. Columns as in runs.GLUE_COLUMNS plus "Avg".
PUBLISHED_ROWS: tuple[tuple[str, dict[str, float]], ...] = (
    ("published: BERT-base, original checkpoint (Cramming paper, GLUE dev)", {"Avg": 80.9}),
    ("published: crammed BERT, 1 day on one A6000 (Cramming paper v1, median of 5)", {"Avg": 78.6}),
    (
        "published: crammed BERT, reference repo's later checkpoint (best of 5)",
        {
            "MNLI-m": 84.1, "MNLI-mm": 84.6, "QQP": 87.5, "QNLI": 90.2, "SST-2": 92.0,
            "CoLA": 53.3, "STS-B": 87.4, "MRPC": 88.9, "RTE": 58.5, "Avg": 80.7,
        },
    ),
)


class ReportError(CrammingError):
    """A folder given to `cram report` is missing, not a run, or unreadable."""


# --------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------


@dataclass
class PretrainRun:
    """What a pretraining run folder holds."""

    path: Path
    config: dict[str, Any]
    """The run's saved config as plain containers ({} when absent)."""
    records: list[dict[str, Any]]
    """Training log records of the metrics log (no eval records)."""
    evals: list[dict[str, Any]]
    """Eval records (`"event": "eval"`, with `val_loss`)."""
    summary: dict[str, Any]
    """The run's summary ({} while the run is unfinished)."""
    bad_lines: int = 0
    """Metrics log lines that were not JSON (e.g. a line cut by a crash)."""

    @property
    def exported(self) -> bool:
        return (self.path / "final" / "model.safetensors").is_file()


@dataclass
class GlueRun:
    """What a GLUE run folder holds."""

    path: Path
    results: dict[str, Any]


@dataclass
class Run:
    """One row of the report: a pretraining run, its GLUE results, or both."""

    label: str
    path: Path
    pretrain: PretrainRun | None = None
    glue: GlueRun | None = None
    notes: list[str] = field(default_factory=list)


def read_pretrain(path: Path) -> PretrainRun:
    """Read a pretraining run folder (metrics log, summary, saved config)."""
    metrics = run_files.read_metrics(path)
    return PretrainRun(path, run_files.read_run_config(path), metrics.records, metrics.evals,
                       run_files.read_summary(path), metrics.bad_lines)


def read_glue(path: Path) -> GlueRun:
    """Read a GLUE run folder (its results)."""
    return GlueRun(path, run_files.read_results(path))


def _same_path(a: str | Path, b: Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == b.resolve()
    except OSError:
        return False


def discover(path: str | Path) -> list[Run]:
    """The runs in `path`: the folder itself, or the runs one level below it."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ReportError(f"{root}: no such folder. Pass a pretraining run (outputs/pretrain/<run>), "
                          "a GLUE run (outputs/glue/<run>) or a folder holding them")
    if not root.is_dir():
        raise ReportError(f"{root} is a file; pass a run folder (it holds {run_files.METRICS_FILE}/"
                          f"{run_files.SUMMARY_FILE} or {run_files.RESULTS_FILE})")
    is_pretrain, is_glue = run_files.is_pretrain_run, run_files.is_glue_run
    if is_pretrain(root) or is_glue(root):
        return [Run(root.name, root, read_pretrain(root) if is_pretrain(root) else None,
                    read_glue(root) if is_glue(root) else None)]
    children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    pretrains = [read_pretrain(p) for p in children if is_pretrain(p)]
    glues = [read_glue(p) for p in children if is_glue(p)]
    if not pretrains and not glues:
        raise ReportError(
            f"{root} is not a run folder: expected {run_files.METRICS_FILE} or {run_files.SUMMARY_FILE} (a "
            f"pretraining run) or {run_files.RESULTS_FILE} (a GLUE run) in it or in one of its subfolders"
        )
    if len(pretrains) <= 1 and len(glues) <= 1:
        # A demo/reproduce folder (pretrain/ + glue/, or one of them): one run, named after the folder.
        return [Run(root.name, root, pretrains[0] if pretrains else None, glues[0] if glues else None)]
    return [Run(p.path.name, p.path, p) for p in pretrains] + [Run(g.path.name, g.path, glue=g) for g in glues]


def attach_glue(runs: list[Run]) -> list[Run]:
    """Merge each GLUE-only run into the pretraining run whose `final/` it finetuned.

    So `cram report outputs/pretrain/<run> outputs/glue/<run>` reads as one run with its GLUE
    table, however the folders were given.
    """
    merged: list[Run] = []
    for run in runs:
        if run.glue is not None and run.pretrain is None:
            ckpt = str(run.glue.results.get("checkpoint", {}).get("path", ""))
            owner = next((r for r in merged if ckpt and r.pretrain and r.glue is None
                          and _same_path(ckpt, r.path / "final")), None)
            if owner is not None:
                owner.glue = run.glue
                continue
        merged.append(run)
    return merged


def _unique_labels(runs: list[Run]) -> None:
    """Give runs with the same folder name longer labels (parent/name), so tables stay readable."""
    for depth in range(1, 6):
        labels = ["/".join(r.path.resolve().parts[-depth:]) for r in runs]
        if len(set(labels)) == len(labels):
            for r, label in zip(runs, labels, strict=True):
                r.label = label
            return
    for i, r in enumerate(runs, 1):
        r.label = f"{r.label} #{i}"


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------


def fmt_int(x: Any) -> str:
    v = finite_float(x)
    return NA if v is None else f"{round(v):,}"


def fmt_float(x: Any, digits: int = 4) -> str:
    v = finite_float(x)
    return NA if v is None else f"{v:.{digits}f}"


def fmt_tokens(x: Any) -> str:
    """12,345,678 (12.3M): exact and readable."""
    v = finite_float(x)
    if v is None:
        return NA
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{round(v):,} ({v / scale:.1f}{unit})"
    return f"{round(v):,}"


def fmt_duration(seconds: Any) -> str:
    v = finite_float(seconds)
    if v is None:
        return NA
    s = round(v)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h {m:02d}m {sec:02d}s"
    return f"{m}m {sec:02d}s" if m else f"{v:.1f}s"


def fmt_mfu(x: Any, device: Any = None) -> str:
    v = finite_float(x)
    if v is None:
        return "n/a (CPU)" if device == "cpu" else NA
    return f"{100 * v:.1f}%"


def fmt_score(x: Any) -> str:
    v = finite_float(x)
    return "" if v is None else f"{v:.1f}"


def _cell(x: Any) -> str:
    text = NA if x is None else (json.dumps(x) if isinstance(x, (list, dict)) else str(x))
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]], align_right: set[int] | None = None) -> list[str]:
    align_right = align_right or set()
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(" ---: " if i in align_right else " --- " for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


# --------------------------------------------------------------------------------------------------
# Derived values
# --------------------------------------------------------------------------------------------------


def _last(records: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)


def pretrain_stats(run: PretrainRun) -> dict[str, Any]:
    """The numbers of the training table, from the run's summary, else from its metrics log."""
    s, recs = run.summary, run.records
    cfg = run.config
    elapsed = s.get("elapsed_s", _last(recs, "elapsed_s"))
    budget_s = s.get("budget_s")
    if budget_s is None:
        budget_s = _budget_seconds(cfg.get("budget"))
    used = (finite_float(elapsed) / finite_float(budget_s)) if finite_float(elapsed) is not None and finite_float(budget_s) else None
    return {
        "budget": cfg.get("budget"),
        "budget_s": budget_s,
        "elapsed_s": elapsed,
        "budget_used": used,
        "steps": s.get("steps", _last(recs, "step")),
        "tokens_seen": s.get("tokens_seen", _last(recs, "tokens_seen")),
        "epochs": s.get("epochs", _last(recs, "epochs")),
        "tokens_per_s": s.get("tokens_per_s", _last(recs, "tokens_per_s")),
        "mfu": s.get("mfu", _last(recs, "mfu")),
        "final_loss": s.get("final_loss", _last(recs, "loss")),
        "val_loss": s.get("val_loss", _last(run.evals, "val_loss")),
        "device": s.get("device"),
        "gpu_profile": s.get("gpu_profile", (cfg.get("gpu") or {}).get("name")),
        "precision": s.get("precision", (cfg.get("gpu") or {}).get("precision")),
        "compile": s.get("compile", (cfg.get("gpu") or {}).get("compile")),
        "skipped_steps": s.get("skipped_steps", _last(recs, "skipped_steps")),
        "complete": bool(s),
    }


def _budget_seconds(budget: Any) -> float | None:
    """A time budget in seconds from the config string, with the project's parser when it accepts it;
    None for a token or step budget."""
    if budget is None:
        return None
    from cramming.config import parse_budget

    try:
        spec = parse_budget(budget)
    except CrammingError:  # an unparsable budget only costs the "budget used" cell
        return None
    return spec.amount if spec.kind == "time" else None


def is_subset(results: dict[str, Any]) -> bool:
    """Whether any task ran on fewer training rows than the official GLUE set (or was subsampled)."""
    cfg = results.get("config") or {}
    if cfg.get("max_train_examples") or cfg.get("max_eval_examples"):
        return True
    for name, task in results.get("tasks", {}).items():
        train = finite_float((task.get("examples") or {}).get("train"))
        if train is not None and name in GLUE_TRAIN_ROWS and train < GLUE_TRAIN_ROWS[name]:
            return True
    return False


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(cfg, dict):
        return {prefix: cfg}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(runs: list[Run]) -> dict[str, list[Any]]:
    """Config keys (arch/train/data/gpu/budget/seed) whose values differ between the runs."""
    flats = [_flatten({k: v for k, v in (r.pretrain.config if r.pretrain else {}).items()
                       if k in ("arch", "train", "data", "gpu", "budget", "seed")}) for r in runs]
    keys = sorted({k for f in flats for k in f})
    return {k: [f.get(k) for f in flats] for k in keys
            if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1}


# --------------------------------------------------------------------------------------------------
# Plots (Agg canvas only: no display, no global pyplot state). The loss plot is cramming.runs'
# plot_loss, the one the trainer draws into loss.png.
# --------------------------------------------------------------------------------------------------


def plot_schedule(runs: list[tuple[str, PretrainRun]], path: Path) -> Path | None:
    """Learning rate (top) and batch size in sequences (bottom) against wall-clock time."""
    series = [(label, run) for label, run in runs if run.records]
    if not series:
        return None
    scale, unit = _time_axis([run for _, run in series])
    fig, (ax_lr, ax_bs) = run_files.new_figure(rows=2, height=3.0)
    for label, run in series:
        for ax, key in ((ax_lr, "lr"), (ax_bs, "batch_size")):
            pts = run_files.time_series(run.records, key, scale)
            if pts:
                ax.plot(*zip(*pts, strict=True), label=label)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("schedule vs. time")
    ax_bs.set_ylabel("batch size (sequences)")
    ax_bs.set_xlabel(f"wall-clock {unit}")
    for ax in (ax_lr, ax_bs):
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _config_section(run: PretrainRun) -> list[str]:
    cfg = run.config
    if not cfg:
        return [f"No `{run_files.RUN_CONFIG}` in this run folder; the config is unknown.", ""]
    rows = []
    for group, keys in KEY_FIELDS.items():
        values = cfg.get(group) or {}
        if not isinstance(values, dict):
            continue
        shown = ", ".join(f"{k}={_cell(values[k])}" for k in keys if k in values and values[k] is not None)
        rows.append([group, values.get("name", NA), shown or "(profile defaults)"])
    rows.append(["budget", cfg.get("budget", NA), f"seed={cfg.get('seed', NA)}"])
    return _table(["group", "name", "key values"], rows) + [""]


def _pretrain_section(run: PretrainRun) -> list[str]:
    st = pretrain_stats(run)
    lines = ["### Hardware and budget", ""]
    used = NA if st["budget_used"] is None else f"{100 * st['budget_used']:.1f}%"
    lines += _table(["device", "gpu profile", "precision", "compile", "budget", "elapsed", "budget used"],
                    [[st["device"] or NA, st["gpu_profile"] or NA, st["precision"] or NA, st["compile"],
                      f"{st['budget'] or NA} ({fmt_duration(st['budget_s'])})", fmt_duration(st["elapsed_s"]), used]])
    lines += ["", "### Training", ""]
    lines += _table(["steps", "tokens seen", "epochs", "tokens/s", "MFU", "final MLM loss", "held-out MLM loss",
                     "skipped steps"],
                    [[fmt_int(st["steps"]), fmt_tokens(st["tokens_seen"]), fmt_float(st["epochs"], 2),
                      fmt_int(st["tokens_per_s"]), fmt_mfu(st["mfu"], st["device"]), fmt_float(st["final_loss"]),
                      fmt_float(st["val_loss"]), fmt_int(st["skipped_steps"])]], align_right=set(range(8)))
    lines += ["", *_data_passes(run.records)]
    first = next((r["loss"] for r in run.records if finite_float(r.get("loss")) is not None), None)
    if first is not None and st["final_loss"] is not None:
        lines.append(f"Training loss went from {fmt_float(first)} (first log step) to {fmt_float(st['final_loss'])}.")
    if not st["complete"]:
        lines.append(f"**No {run_files.SUMMARY_FILE}: the run is unfinished or was interrupted; values come from "
                     "its last log record.**")
    if run.bad_lines:
        lines.append(f"{run.bad_lines} line(s) of {run_files.METRICS_FILE} were not JSON and were skipped.")
    lines.append(f"Exported model: `{run.path / 'final'}`" if run.exported else "No exported model in `final/`.")
    return lines + [""]


# A log of hundreds of passes (a long budget on a small split) would bury the report in rows.
MAX_PASS_ROWS = 10


def _data_passes(records: list[dict[str, Any]]) -> list[str]:
    """Where each new pass over the training split started, or that there was one: in the recipe's
    prevalence-sorted order (train.shuffle false) a revisit starts over at the easiest rows, which
    shows in the loss curve."""
    epochs = _last(records, "epochs")
    if finite_float(epochs) is None:
        return ["Data passes: not recorded (this metrics log predates the `epochs` field).", ""]
    starts = run_files.pass_starts(records)
    if not starts:
        return [f"Data passes: one pass, not revisited ({epochs:.2f} of the training split read by the last "
                "log record).", ""]
    lines = [f"Data passes: {len(starts)} new pass(es) over the training split ({epochs:.2f} passes by the last "
             "log record), so rows were revisited. Each new pass starts at a dotted line in the loss plot; its "
             "step and time are interpolated between log records.", ""]
    rows = [[f"pass {s.number}", fmt_int(s.step), fmt_tokens(s.tokens_seen), fmt_duration(s.elapsed_s)]
            for s in starts[:MAX_PASS_ROWS]]
    if len(starts) > MAX_PASS_ROWS:
        rows.append([f"({len(starts) - MAX_PASS_ROWS} more)", "", "", ""])
    table = _table(["data pass", "starts at step", "tokens seen", "elapsed"], rows, align_right={1, 2, 3})
    return lines + table + [""]


def _glue_table(entries: list[tuple[str, dict[str, Any]]]) -> list[str]:
    cols = [c for c, _, _ in GLUE_COLUMNS]
    rows, notes = [], []
    for label, results in entries:
        columns, avg, mean_run = glue_columns(results)
        rows.append([f"measured: {label}", *(fmt_score(columns.get(c)) for c in cols), fmt_score(avg)])
        if avg is None and mean_run is not None:
            notes.append(f"{label}: not all nine GLUE columns ran, so there is no GLUE average; "
                         f"mean of the columns that ran: {mean_run:.1f}.")
        if is_subset(results):
            notes.append(f"{label}: trained/evaluated on subsets of the GLUE tasks; its scores are not "
                         "comparable with the published full-GLUE rows.")
    for label, row in PUBLISHED_ROWS:
        rows.append([label, *(fmt_score(row.get(c)) for c in cols), fmt_score(row.get("Avg"))])
    lines = _table(["model", *cols, "Avg"], rows, align_right=set(range(1, len(cols) + 2)))
    lines += ["", "GLUE dev scores in percent (median over trials of the final epoch). Avg: plain mean of the nine "
              "columns (MNLI-m and MNLI-mm both counted). Rows marked *published* are copied from the Cramming "
              "paper as summarised in the project's RECIPE.md, not re-measured; blank = not run or not published."]
    return lines + [f"- {n}" for n in notes] + [""]


def _finetuned(results: dict[str, Any]) -> tuple[FinetunedModel | None, TokenizerRecord | None]:
    """The model and tokenizer records of a GLUE run; None for what its file lacks (hand-made or older files)."""
    records: list[Any] = []
    for key, record in (("checkpoint", FinetunedModel), ("tokenizer", TokenizerRecord)):
        try:
            records.append(record.from_json(results[key]) if results.get(key) else None)
        except RunFormatError:
            records.append(None)
    return records[0], records[1]


def _protocol(cfg: dict[str, Any]) -> str:
    return (f"glue={cfg.get('name', NA)}: batch {cfg.get('batch_size', NA)}, lr {_fmt_g(cfg.get('lr'))}, "
            f"{cfg.get('schedule', NA)}, {cfg.get('epochs', NA)} epochs")


def _glue_models(entries: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """What each row of a GLUE comparison finetuned, and under which protocol: a row's scores say
    something about a recipe only beside these."""
    rows = []
    for label, results in entries:
        model, tokenizer = _finetuned(results)
        cfg = results.get("config") or {}
        where = NA if model is None else f"`{model.path}`" + (f" @ {model.revision[:12]}" if model.revision else "")
        rows.append([f"measured: {label}", where, (model and model.format) or NA, (model and model.model_type) or NA,
                     fmt_int(model and model.parameters), (tokenizer and f"`{tokenizer.pair_format}`") or NA,
                     _protocol(cfg), cfg.get("trials", NA), cfg.get("max_seq_len", NA)])
    return ["What each row finetuned, and how:", "",
            *_table(["row", "model", "loaded as", "type", "parameters", "pair format", "protocol", "trials", "max tokens"],
                    rows, align_right={4, 7, 8}), ""]


def _glue_tasks(results: dict[str, Any]) -> list[str]:
    rows = []
    for name, task in results.get("tasks", {}).items():
        median = task.get("median") or {}
        examples = task.get("examples") or {}
        dev = sum(v for k, v in examples.items() if k != "train" and finite_float(v) is not None) if examples else None
        rows.append([name, fmt_int(examples.get("train")), fmt_int(dev), len(task.get("trials") or []),
                     ", ".join(f"{k} {v:.2f}" for k, v in median.items() if finite_float(v) is not None) or NA,
                     fmt_score(task.get("score"))])
    if not rows:
        return ["No task results yet.", ""]
    return _table(["task", "train rows", "dev rows", "trials", "median metrics (%)", "score"], rows,
                  align_right={1, 2, 3, 5}) + [""]


def _glue_header(glue: GlueRun) -> list[str]:
    r = glue.results
    ckpt, run, cfg = r.get("checkpoint") or {}, r.get("run") or {}, r.get("config") or {}
    out = [f"Results: `{glue.path / run_files.RESULTS_FILE}`"
           + (f" (status: {r['status']})" if r.get("status") and r.get("status") != "complete" else "")]
    if ckpt:
        out.append(f"Checkpoint: `{ckpt.get('path', NA)}` ({ckpt.get('kind', NA)})")
    if cfg:
        out.append(f"Recipe: glue={cfg.get('name', NA)}, batch {cfg.get('batch_size', NA)}, lr {cfg.get('lr', NA)}, "
                   f"{cfg.get('schedule', NA)} schedule, {cfg.get('epochs', NA)} epochs, {cfg.get('trials', NA)} trials; "
                   f"device {run.get('device', NA)}, precision {run.get('precision', NA)}")
    return [f"{line}  " for line in out] + [""]


def _fmt_g(x: Any) -> str:
    v = finite_float(x)
    return NA if v is None else f"{v:g}"


def _glue_recipe(results: dict[str, Any]) -> list[str]:
    """The bullets at the top of results.md: checkpoint, recipe, trials, and whether tasks were subsampled."""
    src, cfg, run = results.get("checkpoint") or {}, results.get("config") or {}, results.get("run") or {}
    model, tokenizer = _finetuned(results)
    lines = [
        f"- checkpoint: `{src.get('path', NA)}` ({src.get('kind', NA)}, sha256 `{str(src.get('sha256', NA))[:16]}`)",
        *([f"- model: {model.format} {model.model_type} ({model.architecture}), {fmt_int(model.parameters)} parameters "
           f"with a two-class head, at most {model.max_length or NA} tokens; "
           f"{'hub commit ' + model.revision if model.revision else model.origin or NA}"] if model and model.format else []),
        *([f"- tokenizer: {tokenizer.tokenizer_class}, {fmt_int(tokenizer.vocab_size)} tokens; a pair reads "
           f"`{tokenizer.pair_format}`{' with segment ids' if tokenizer.token_type_ids else ''}"] if tokenizer else []),
        f"- recipe: glue={cfg.get('name', NA)}, batch {cfg.get('batch_size', NA)}, lr {_fmt_g(cfg.get('lr'))}, "
        f"{cfg.get('schedule', NA)} schedule (warmup {_fmt_g(cfg.get('warmup_fraction'))}), epochs "
        f"{cfg.get('epochs', NA)}, dropout {_fmt_g(cfg.get('dropout'))}, max length {cfg.get('max_seq_len', NA)}; "
        f"precision {run.get('precision', NA)}",
        f"- trials per task: {cfg.get('trials', NA)}; each score is the median over trials of the FINAL epoch's "
        "dev score",
    ]
    if cfg.get("max_train_examples") or cfg.get("max_eval_examples"):
        lines.append(f"- SUBSAMPLED: at most {cfg.get('max_train_examples') or 'all'} train / "
                     f"{cfg.get('max_eval_examples') or 'all'} dev examples per task; not comparable to full GLUE")
    return lines + [""]


def _glue_trials(results: dict[str, Any]) -> list[str]:
    """Per task: every trial's final-epoch dev metrics, their median, and the metric's notes."""
    lines = ["## Per task and trial (percent, final epoch)", ""]
    for name, task in (results.get("tasks") or {}).items():
        median = task.get("median") or {}
        if not median:
            continue
        custom = " (custom)" if task.get("custom") else ""
        lines += [f"### {name}{custom}: headline {', '.join(task.get('headline') or [])}", ""]
        trials = task.get("trials") or []
        rows = [[i, t.get("seed"), *(fmt_float((t.get("final") or {}).get(k), 2) for k in median)]
                for i, t in enumerate(trials, 1)]
        rows.append(["median", "", *(fmt_float(v, 2) for v in median.values())])
        lines += _table(["trial", "seed", *median], rows, align_right=set(range(2, len(median) + 2)))
        notes = sorted({n for t in trials for n in t.get("notes") or []})
        lines += ["", "Notes: " + "; ".join(notes), ""] if notes else [""]
    return lines


def glue_markdown(results: dict[str, Any]) -> str:
    """results.md of a GLUE run: its recipe, the measured row beside the published rows, the tasks,
    and every trial."""
    path = str((results.get("checkpoint") or {}).get("path", NA))
    label = "/".join(Path(path).parts[-2:]) or path
    lines = ["# GLUE dev results", "", *_glue_recipe(results), *_glue_table([(label, results)]),
             *_glue_tasks(results), *_glue_trials(results)]
    return "\n".join(lines).rstrip() + "\n"


def write_glue_tables(glue_dir: str | Path) -> Path:
    """Render a GLUE run's results.md from its results, atomically; return its path."""
    glue_dir = Path(glue_dir)
    path = glue_dir / run_files.RESULTS_MD
    write_atomic(path, glue_markdown(run_files.read_results(glue_dir)))
    return path


def write_card_glue(glue_dir: str | Path) -> Path:
    """Put a GLUE run's table (and its recipe and tasks) into the model card (README.md) of the local
    `cram pretrain` export it finetuned, replacing an earlier GLUE section; returns the card's path."""
    from cramming import card

    results = run_files.read_results(glue_dir)
    lines = ["## GLUE (dev)", "", f"From `cram glue` in `{Path(glue_dir)}`:", "", *_glue_recipe(results),
             *_glue_table([("this model", results)]), *_glue_tasks(results)]
    return card.set_glue_section(card.finetuned_export(results), "\n".join(lines))


def _full_config(run: PretrainRun) -> list[str]:
    if not run.config:
        return []
    import yaml

    text = yaml.safe_dump(run.config, sort_keys=False, default_flow_style=False, width=110)
    return [f"<details><summary>Full config ({run_files.RUN_CONFIG})</summary>", "", "```yaml", text.rstrip(), "```",
            "", "</details>", ""]


def _run_sections(run: Run, plots: dict[str, Path], level: str, out: Path) -> list[str]:
    lines = [f"{level} {run.label}", "", f"Folder: `{run.path}`", ""]
    if run.pretrain:
        lines += [f"{level}# Configuration", ""] + _config_section(run.pretrain)
        lines += [line.replace("### ", f"{level}# ", 1) for line in _pretrain_section(run.pretrain)]
        for title, key in (("MLM loss vs. time", "loss"), ("Learning rate and batch size vs. time", "schedule")):
            if key in plots:
                lines += [f"![{title}]({plots[key].relative_to(out).as_posix()})", ""]
    if run.glue:
        lines += [f"{level}# GLUE (dev)", ""] + _glue_header(run.glue)
        lines += _glue_table([(run.label, run.glue.results)]) + _glue_tasks(run.glue.results)
    if run.pretrain:
        lines += _full_config(run.pretrain)
    return lines


def _comparison(runs: list[Run]) -> list[str]:
    rows = []
    for r in runs:
        st = pretrain_stats(r.pretrain) if r.pretrain else {}
        cfg = r.pretrain.config if r.pretrain else {}
        avg = mean_run = None
        if r.glue:
            _, avg, mean_run = glue_columns(r.glue.results)
        glue_cell = fmt_score(avg) if avg is not None else (f"{mean_run:.1f} (partial)" if mean_run is not None else NA)
        rows.append([r.label, (cfg.get("arch") or {}).get("name", NA), (cfg.get("train") or {}).get("name", NA),
                     (cfg.get("data") or {}).get("name", NA), st.get("gpu_profile") or NA, st.get("budget") or NA,
                     fmt_duration(st.get("elapsed_s")), fmt_int(st.get("steps")), fmt_tokens(st.get("tokens_seen")),
                     fmt_float(st.get("epochs"), 2), fmt_int(st.get("tokens_per_s")), fmt_mfu(st.get("mfu"), st.get("device")),
                     fmt_float(st.get("final_loss")), fmt_float(st.get("val_loss")), glue_cell])
    lines = _table(["run", "arch", "train", "data", "gpu", "budget", "elapsed", "steps", "tokens seen", "epochs",
                    "tokens/s", "MFU", "final loss", "held-out loss", "GLUE avg"], rows, align_right=set(range(6, 15)))
    diffs = config_differences(runs)
    if diffs:
        lines += ["", "Config keys that differ between the runs:", ""]
        lines += _table(["key", *(r.label for r in runs)], [[k, *v] for k, v in diffs.items()])
    return lines + [""]


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _read_include(path: str | Path) -> list[str]:
    """The lines of a markdown file given with --include."""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").rstrip().splitlines() + [""]
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"--include {path}: cannot read it ({err}); pass a markdown file") from None


def build_report(paths: list[str | Path], out: str | Path | None = None, name: str | None = None,
                 include: list[str | Path] | None = None) -> Path:
    """Write report.md (+ PNGs) for the runs in `paths`; return the report's path.

    `include`: markdown files placed after the comparison (several runs) or after the run (one run),
    e.g. the demo's fill-mask predictions.
    """
    extra = [line for p in include or () for line in _read_include(p)]
    runs: list[Run] = []
    for p in paths:
        runs.extend(discover(p))
    runs = attach_glue(runs)
    if not runs:
        raise ReportError("no runs given")
    _unique_labels(runs)
    if out is None:
        out = runs[0].path if len(paths) == 1 and len(runs) == 1 else \
            Path("outputs") / "report" / (name or datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; pass a folder")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()

    title = name or (runs[0].label if len(runs) == 1 else f"comparison of {len(runs)} runs")
    lines = [f"# Cramming report: {title}", "",
             f"Generated {datetime.now().strftime('%Y-%m-%d %H:%M:%S')} by `cram report` from: "
             + ", ".join(f"`{Path(p)}`" for p in paths), ""]
    pre = [(r.label, r.pretrain) for r in runs if r.pretrain]
    if len(runs) == 1:
        plots = {}
        if pre:
            for key, fn, file in (("loss", run_files.plot_loss, "loss_vs_time.png"),
                                  ("schedule", plot_schedule, "lr_batch_vs_time.png")):
                made = fn(pre, out / file)
                if made:
                    plots[key] = made
        lines += _run_sections(runs[0], plots, "##", out) + extra
    else:
        lines += ["## Comparison", ""] + _comparison(runs)
        for title_, fn, file in (("MLM loss vs. time, all runs", run_files.plot_loss, "loss_comparison.png"),
                                 ("Learning rate and batch size vs. time, all runs", plot_schedule, "lr_batch_comparison.png")):
            if pre and fn(pre, out / file):
                lines += [f"![{title_}]({file})", ""]
        lines += extra
        with_glue = [(r.label, r.glue.results) for r in runs if r.glue]
        if with_glue:
            lines += ["## GLUE (dev)", ""] + _glue_table(with_glue) + _glue_models(with_glue)
        lines += ["## Runs", ""]
        for r in runs:
            lines += _run_sections(r, {}, "###", out)
    report = out / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    _print_summary(runs, report)
    return report


def _print_summary(runs: list[Run], report: Path) -> None:
    for r in runs:
        parts = [r.label]
        if r.pretrain:
            st = pretrain_stats(r.pretrain)
            parts += [f"steps {fmt_int(st['steps'])}", f"tokens {fmt_tokens(st['tokens_seen'])}",
                      f"epochs {fmt_float(st['epochs'], 2)}",
                      f"loss {fmt_float(st['final_loss'], 3)}", f"held-out {fmt_float(st['val_loss'], 3)}",
                      f"{fmt_int(st['tokens_per_s'])} tok/s"]
        if r.glue:
            _, avg, mean_run = glue_columns(r.glue.results)
            parts.append(f"GLUE avg {avg:.1f}" if avg is not None else
                         f"GLUE mean of tasks run {mean_run:.1f}" if mean_run is not None else "GLUE n/a")
        print("  " + " | ".join(parts))
    print(f"report: {report}")


def main(argv: list[str]) -> int:
    """`cram report RUN_DIR [RUN_DIR ...] [--out DIR] [--name NAME] [--include FILE ...]`."""
    parser = argparse.ArgumentParser(
        prog="cram report",
        description="Tables and plots for pretraining and GLUE runs. A RUN_DIR is a pretraining run "
        "(outputs/pretrain/<run>), a GLUE run (outputs/glue/<run>) or a folder holding such runs one level "
        "down (e.g. a demo folder with pretrain/ and glue/). Several RUN_DIRs give a comparison.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s) to report on")
    parser.add_argument("--out", default=None,
                        help="folder for report.md and the PNGs (default: the run folder for one run, "
                        "outputs/report/<name or timestamp> for several)")
    parser.add_argument("--name", default=None, help="report title, and its folder name under outputs/report/")
    parser.add_argument("--include", action="append", default=[], metavar="FILE",
                        help="a markdown file to place after the comparison (or after the run, for one run); "
                        "repeatable")
    parser.add_argument("--card", action="store_true",
                        help="also write each GLUE run's table into the model card (README.md) of the cram pretrain "
                        "export it finetuned, replacing an earlier GLUE section there")
    args = parser.parse_args(argv)
    build_report(args.runs, args.out, args.name, args.include)
    if args.card:
        glue_runs = [r.glue.path for p in args.runs for r in discover(p) if r.glue]
        if not glue_runs:
            raise ReportError("--card needs a GLUE run (outputs/glue/<run>) among the RUN_DIRs")
        for path in glue_runs:
            print(f"model card: {write_card_glue(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
