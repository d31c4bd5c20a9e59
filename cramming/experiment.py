"""Run a paper experiment preset end to end: pretraining sweep, GLUE for every run, one report.

    cram experiment cramming-ablation --scale tiny --gpu cpu [--budget 2m] [--dry-run]

The presets are the `experiment` config group (configs/experiment/<name>.yaml): each sets
`hydra.sweeper.params`, so `cram pretrain -m +experiment=<name>` alone runs its pretraining sweep.
This runner adds what a comparison needs around that command:

1. `cram pretrain -m +experiment=<name> +experiment/scale=<scale> ... hydra.sweep.dir=<out>`: one
   run folder per sweep point, `<out>/<num>_<point>/`;
2. `cram glue` on each run's `final/` into `<out>/glue_<num>_<point>/` (the shipped GLUE subsets at
   scale tiny, full GLUE otherwise; the settings come from the scale config's `glue:` block);
3. `cram report <out>`: the comparison table and overlaid curves (GLUE attaches to its run);
4. `<out>/experiment.md`: one row per point with the columns the papers compare (MLM losses, GLUE
   per task, time per step, random-LTD's layer-tokens saved) and `loss_vs_glue.png`.

The sweep points are computed here with Hydra's own basic-sweeper expansion, so `--dry-run` prints
the exact commands, run folders included, without running anything.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cramming import runs
from cramming.config import CONFIG_DIR
from cramming.errors import ConfigError
from cramming.runs import RunFormatError

EXPERIMENT_DIR = CONFIG_DIR / "experiment"
SCALES = ("tiny", "full")
GLUE_DEMO_DIR = Path(__file__).resolve().parent / "assets" / "glue_demo"
# Extra overrides that belong to `cram glue` rather than to `cram pretrain`.
GLUE_PREFIXES = ("glue.", "glue=", "+glue.")
# Overrides both stages take.
SHARED_PREFIXES = ("gpu=", "gpu.", "seed=", "paths.")


def available_presets() -> list[str]:
    """Names of the shipped experiment presets (the yaml files directly in configs/experiment/)."""
    return sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))


def check_preset(name: str) -> None:
    """Raise a ConfigError naming the valid presets when `name` is not one."""
    if name not in available_presets():
        raise ConfigError(f"unknown experiment preset {name!r}; choose one of: {', '.join(available_presets())}")


def base_overrides(name: str, scale: str, budget: str | None = None, gpu: str | None = None,
                   extra: list[str] | None = None) -> list[str]:
    """The command-line overrides of the pretraining sweep (without `-m` and the sweep folder)."""
    check_preset(name)
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of: {', '.join(SCALES)}")
    overrides = [f"+experiment={name}", f"+experiment/scale={scale}"]
    if budget is not None:
        overrides.append(f"budget={budget}")
    if gpu is not None:
        overrides.append(f"gpu={gpu}")
    return overrides + [o for o in (extra or []) if not o.startswith(GLUE_PREFIXES)]


def compose(overrides: list[str]) -> Any:
    """The composed config (with the `hydra` node) for `overrides`, as `cram` would compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3", job_name="pretrain"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=True)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Every job's overrides, expanded exactly as Hydra's basic sweeper does for `-m`: the preset's
    `hydra.sweeper.params` first, then the command line (a key given there replaces the preset's),
    then the Cartesian product of the swept values."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    # As in Hydra's multirun, the config that holds the sweeper params is composed without the
    # sweeps of the command line (a swept value is not a value).
    fixed = [o.input_line for o in parser.parse_overrides(list(overrides)) if not o.is_sweep_override()]
    cfg = compose([o for o in fixed if o is not None])
    params = cfg.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    parsed = parser.parse_overrides(arguments)
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [job for batch in batches for job in batch]


@dataclass
class Point:
    """One sweep point: its job number, label, overrides and folders."""

    num: int
    label: str
    overrides: list[str]
    """All overrides of this job (sweep values first, as Hydra applies them)."""
    swept: list[str]
    """The overrides that distinguish this point (the swept keys' values)."""
    run_dir: Path
    glue_dir: Path


def sweep_points(overrides: list[str], sweep_dir: Path) -> list[Point]:
    """The points of the sweep with their run folders (`<num>_<experiment.point>`, as the presets'
    `hydra.sweep.subdir` names them)."""
    jobs = sweep_jobs(overrides)
    base = set(overrides)
    points = []
    for num, job in enumerate(jobs):
        cfg = compose(job)
        label = str(cfg.experiment.point)
        sub = f"{num}_{label}"
        points.append(Point(num, label, job, [o for o in job if o not in base], sweep_dir / sub, sweep_dir / f"glue_{sub}"))
    return points


def cram_command() -> list[str]:
    """How to call `cram`: the console script beside this interpreter, else the module."""
    script = Path(sys.executable).parent / "cram"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cramming.cli"]


def build_plan(args: argparse.Namespace) -> tuple[Path, list[Point], list[list[str]]]:
    """(sweep folder, points, commands) for the parsed arguments."""
    extra = list(args.overrides)
    overrides = base_overrides(args.name, args.scale, args.budget, args.gpu, extra)
    sweep_dir = Path(args.out) if args.out else \
        Path("outputs") / "experiment" / f"{args.name}-{args.scale}" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    points = sweep_points(overrides, sweep_dir)
    commands = [["cram", "pretrain", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]]
    glue_common = [f"+experiment/scale={args.scale}"]
    glue_common += [o for o in extra if o.startswith(GLUE_PREFIXES + SHARED_PREFIXES)]
    if args.gpu is not None:
        glue_common.append(f"gpu={args.gpu}")
    if args.scale == "tiny" and not any(o.startswith("glue.data_dir=") for o in extra):
        # The scale config's relative path only works from the repository root; this works anywhere.
        glue_common.append(f"glue.data_dir={GLUE_DEMO_DIR}")
    if not args.skip_glue:
        for p in points:
            commands.append(["cram", "glue", f"ckpt={p.run_dir / 'final'}", *glue_common, f"hydra.run.dir={p.glue_dir}"])
    commands.append(["cram", "report", str(sweep_dir), "--out", str(sweep_dir / "report"),
                     "--name", f"{args.name} ({args.scale})"])
    return sweep_dir, points, commands


# ---------------------------------------------------------------------------------------------
# The experiment table
# ---------------------------------------------------------------------------------------------


def _read_or_empty(read: Callable[[Path], dict[str, Any]], folder: Path) -> dict[str, Any]:
    """What `read` finds in `folder`, or {} when the file is missing or unreadable: one broken point
    leaves its row empty instead of stopping the table of the whole sweep."""
    try:
        return read(folder)
    except RunFormatError:
        return {}


def _previous_timings(sweep_dir: Path) -> dict[str, float]:
    """The stage timings an earlier `cram experiment` stored in `sweep_dir`/experiment.json; {} if none."""
    try:
        previous = json.loads((sweep_dir / "experiment.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return (previous.get("timings_s") or {}) if isinstance(previous, dict) else {}


def _seconds_per_step(run_dir: Path) -> float | None:
    """Mean wall-clock seconds per optimizer step between the first and last training log records
    (start-up, the start-of-run eval and the final export are outside that window)."""
    records = [r for r in runs.read_metrics(run_dir).records if "step" in r]
    if len(records) < 2 or records[-1]["step"] <= records[0]["step"]:
        return None
    return (records[-1]["elapsed_s"] - records[0]["elapsed_s"]) / (records[-1]["step"] - records[0]["step"])


def point_row(point: Point) -> dict[str, Any]:
    """The measured values of one point (None where a file or field is missing)."""
    summary = _read_or_empty(runs.read_summary, point.run_dir)
    cfg = _read_or_empty(runs.read_run_config, point.run_dir)
    arch = cfg.get("arch") or {}
    results = _read_or_empty(runs.read_results, point.glue_dir)
    columns, average, mean_run = runs.glue_columns(results) if results else ({}, None, None)
    tokens, saved, layers = summary.get("tokens_seen"), summary.get("layer_tokens_saved"), arch.get("num_layers")
    saved_share = saved / (tokens * layers) if tokens and layers and saved is not None else None
    return {
        "point": point.label, "swept": " ".join(point.swept),
        "shape": f"{layers}x{arch.get('hidden_size')}" if arch else None,
        "arch": arch.get("name"), "train": (cfg.get("train") or {}).get("name"),
        "steps": summary.get("steps"), "s_per_step": _seconds_per_step(point.run_dir),
        "tokens_seen": tokens, "tokens_per_s": summary.get("tokens_per_s"),
        "final_loss": summary.get("final_loss"), "val_loss": summary.get("val_loss"),
        "eval_mask_rate": (cfg.get("train") or {}).get("eval_mask_rate"),
        "layer_tokens_saved": saved, "layer_tokens_saved_share": saved_share,
        "glue": {k: v for k, v in columns.items() if v is not None}, "glue_average": average, "glue_mean_run": mean_run,
        "device": summary.get("device"), "budget_s": summary.get("budget_s"), "elapsed_s": summary.get("elapsed_s"),
    }


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def experiment_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table: one row per point."""
    tasks = [t for t in ("CoLA", "SST-2", "MRPC", "STS-B", "RTE", "QQP", "MNLI-m", "MNLI-mm", "QNLI")
             if any(t in r["glue"] for r in rows)]
    ltd = any(r["layer_tokens_saved"] for r in rows)
    header = ["point", "shape", "steps", "s/step", "tokens", "tokens/s", "final MLM loss", "held-out MLM loss"]
    header += ["layer-tokens saved"] if ltd else []
    header += tasks + ["GLUE avg" if all(r["glue_average"] is not None for r in rows) else "GLUE mean (tasks run)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["point"], _f(r["shape"]), _f(r["steps"]), _f(r["s_per_step"], 2),
                 f"{r['tokens_seen'] / 1e6:.2f}M" if r["tokens_seen"] else "n/a", _f(r["tokens_per_s"], 0),
                 _f(r["final_loss"]), _f(r["val_loss"])]
        if ltd:
            share = r["layer_tokens_saved_share"]
            cells.append(f"{r['layer_tokens_saved'] / 1e6:.1f}M ({100 * share:.0f}%)" if r["layer_tokens_saved"] and share
                         else "0")
        cells += [_f(r["glue"].get(t), 1) for t in tasks]
        cells.append(_f(r["glue_average"] if r["glue_average"] is not None else r["glue_mean_run"], 1))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_loss_vs_glue(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Scatter of held-out MLM loss against GLUE score, one labelled dot per point."""
    pts = [(r["point"], r["val_loss"], r["glue_average"] if r["glue_average"] is not None else r["glue_mean_run"])
           for r in rows]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, loss, score in pts:
        ax.scatter(loss, score)
        ax.annotate(label, (loss, score), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("held-out MLM loss (lower is better)")
    ax.set_ylabel("GLUE score (higher is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_summary(name: str, scale: str, sweep_dir: Path, points: list[Point], commands: list[list[str]],
                  timings: dict[str, float]) -> Path:
    """Write `<sweep_dir>/experiment.md` (+ experiment.json, loss_vs_glue.png); return its path."""
    rows = [point_row(p) for p in points]
    devices = sorted({str(r["device"]) for r in rows if r["device"]}) or ["n/a"]
    budgets = sorted({r["budget_s"] for r in rows if r["budget_s"]})
    lines = [f"# Experiment {name} (scale {scale})", "",
             f"Measured {datetime.now().strftime('%Y-%m-%d %H:%M')} on {', '.join(devices)}; pretraining budget "
             f"{', '.join(f'{b:g} s' for b in budgets) or 'n/a'} per point. Held-out MLM loss at the masking rate "
             f"{_f(rows[0]['eval_mask_rate'] if rows else None, 2)} for every point; GLUE: median over trials of the "
             "final dev score per task.", ""]
    lines += experiment_table(rows) + [""]
    if plot_loss_vs_glue(rows, sweep_dir / "loss_vs_glue.png"):
        lines += ["![held-out MLM loss vs GLUE](loss_vs_glue.png)", ""]
    lines += ["Sweep points:", ""] + [f"- `{r['point']}`: `{r['swept'] or '(preset defaults)'}`" for r in rows] + [""]
    lines += ["Commands:", "", "```bash"] + [shlex.join(c) for c in commands] + ["```", ""]
    if timings:
        lines += ["Wall-clock per stage: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()), ""]
    lines += ["Full comparison (configs, curves, per-run sections): [report/report.md](report/report.md)", ""]
    path = sweep_dir / "experiment.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    (sweep_dir / "experiment.json").write_text(json.dumps({"name": name, "scale": scale, "rows": rows,
                                                           "timings_s": timings}, indent=2, default=str))
    return path


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cram experiment",
        description="Run an experiment preset: the pretraining sweep (cram pretrain -m +experiment=NAME), "
        "GLUE on every run, and one comparison report.",
        epilog="Extra Hydra overrides go after the options, e.g. `-- data=c4-filtered glue.trials=3`; glue.* "
        "ones go to cram glue, gpu/seed/paths to both, the rest to cram pretrain. Presets: "
        + ", ".join(available_presets()),
    )
    parser.add_argument("name", help="experiment preset (a file in configs/experiment/)")
    parser.add_argument("--scale", choices=SCALES, default="full",
                        help="tiny: a CPU smoke run of a few minutes per point; full: the preset as in the papers")
    parser.add_argument("--budget", default=None, help="pretraining budget per point (default: the scale's)")
    parser.add_argument("--gpu", default=None, help="GPU profile for both stages (default: auto)")
    parser.add_argument("--out", default=None, help="sweep folder (default: outputs/experiment/NAME-SCALE/<time>)")
    parser.add_argument("--skip-glue", action="store_true", help="pretraining and report only")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run folders, run nothing")
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite OUT/experiment.md from the runs already in --out, run nothing")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (key=value)")
    # Intermixed: overrides may come before or after the options.
    return parser.parse_intermixed_args(argv)


def main(argv: list[str]) -> int:
    """`cram experiment NAME [--scale tiny|full] [--budget B] [--gpu G] [--out DIR] [--dry-run] [overrides]`."""
    args = parse_args(argv)
    sweep_dir, points, commands = build_plan(args)
    print(f"experiment {args.name} (scale {args.scale}): {len(points)} points in {sweep_dir}")
    for p in points:
        print(f"  {p.run_dir.name}: {' '.join(p.swept) or '(preset defaults)'}")
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        return 0
    timings: dict[str, float] = {}
    if args.table_only:
        if not args.out:
            raise ConfigError("--table-only needs --out: the sweep folder to tabulate")
        summary = write_summary(args.name, args.scale, sweep_dir, points, commands, _previous_timings(sweep_dir))
        print(f"experiment table: {summary}")
        return 0
    cram = cram_command()
    for command in commands:
        stage = command[1]
        print("+ " + shlex.join(command), flush=True)
        if command[1] == "glue" and not (Path(command[2].removeprefix("ckpt=")) / "model.safetensors").is_file():
            print(f"  skipped: {command[2]} was not exported (its pretraining run failed)", file=sys.stderr)
            continue
        start = time.monotonic()
        code = subprocess.call([*cram, *command[1:]])
        timings[stage] = timings.get(stage, 0.0) + time.monotonic() - start
        if code != 0 and command[1] != "glue":
            # A failed pretraining sweep or report leaves nothing to compare; a failed GLUE run
            # leaves its row without scores.
            print(f"cram experiment: `{shlex.join(command)}` exited with {code}", file=sys.stderr)
            if command[1] == "pretrain" and not any((p.run_dir / "final").is_dir() for p in points):
                return code
    summary = write_summary(args.name, args.scale, sweep_dir, points, commands, timings)
    print(f"experiment table: {summary}")
    print(f"report: {sweep_dir / 'report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
