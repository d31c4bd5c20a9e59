"""Does pretraining help? One `cram pretrain` run on the embedded corpus, then the same GLUE finetuning
(tasks, rows, epochs, LR, batch, seeds) of its export and of the same architecture from random weights
(`ckpt=random-init`, same tokenizer), and a table of both.

    python scripts/transfer.py --out outputs/transfer-demo --glue-dir ../shared/data/glue

Every stage is an ordinary `cram` command (printed before it runs), so each step can be rerun by hand.
The comparison is per seed: trial i of every task ran with seed base+i for both models, so a seed's
score is the mean of its tasks' headline scores (CoLA MCC, STS-B Spearman, RTE accuracy, ...), and
the spread of a model is max - min over its seeds. Pretraining wins when the gap of the means exceeds
both spreads and the pretrained model's worst seed beats random-init's best. `summary.json` in --out
holds every number; the exit status is 0 whether or not pretraining won (the caller judges;
`--require-win` exits 1 if it did not).

The defaults are the regime measured in docs/experiments.md ("Transfer, shown on the CPU"): a small
model (1.4M parameters), 64-token rows, batch 32 from the first step (no ramp), lr 2e-3 with a 5%
warmup and linear decay, shuffled rows, 8000 steps of pretraining, then GLUE at lr 5e-4 on 4000
training rows of CoLA, STS-B and RTE, 2 epochs, 3 seeds. The held-out MLM loss sits on the unigram
plateau (about 5.8-6.0; the unigram cross-entropy is 6.68) for the first ~4000 steps whatever the
schedule's length, then falls (4.26 after 7683 steps of a 20-minute run); 8 minutes (2632 steps)
never left the plateau. The tasks are those where the gain shows: STS-B and RTE (the pair tasks);
SST-2 favours neither model and CoLA stays at chance for both, but the measurement's rules want
CoLA in. On the shared 2-core machine, with one thread, the whole run takes 30-40 minutes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The architecture both models share (the demo preset made smaller: a few-minute CPU run reaches
# several hundred steps). Keys of the `arch` group.
ARCH = {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "intermediate_size": 512, "max_seq_len": 64}
DATA = {"vocab_size": 8192, "max_chars": 8000000, "seq_len": 64}
# The pretraining regime: every change against the cramming recipe that the measurement needed.
TRAIN = {"target_batch_size": 32, "ramp_fraction": 0, "lr_schedule": "linear", "warmup_fraction": 0.05,
         "lr": 2e-3, "shuffle": True, "eval_mask_rate": 0.15, "eval_fraction": 0.1, "log_interval": 20}


def _overrides(group: str, values: dict) -> list[str]:
    return [f"{group}.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def _run(cmd: list[str], log: Path) -> float:
    print("+ " + shlex.join(cmd), flush=True)
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-20:]
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n" + "\n".join(tail))
    return time.monotonic() - start


def seed_scores(results_file: Path) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    """Per task and seed the trial's headline score (mean of the task's headline keys), and per seed
    the mean over the tasks."""
    results = json.loads(results_file.read_text())
    per_task: dict[str, dict[int, float]] = {}
    for name, task in results["tasks"].items():
        per_task[name] = {t["seed"]: statistics.fmean(t["final"][k] for k in task["headline"]) for t in task["trials"]}
    seeds = sorted(set.intersection(*(set(v) for v in per_task.values())))
    return per_task, {s: statistics.fmean(per_task[n][s] for n in per_task) for s in seeds}


def _val_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output root (paths.out_root of every stage)")
    p.add_argument("--glue-dir", type=Path, required=True, help="GLUE files in the official layout (<dir>/CoLA/train.tsv ...)")
    p.add_argument("--budget", default="8000steps", help="cram pretrain budget (default %(default)s)")
    p.add_argument("--tasks", default="cola,stsb,rte")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--glue-lr", default="5e-4")
    p.add_argument("--train-examples", type=int, default=4000)
    p.add_argument("--eval-examples", type=int, default=None, help="dev rows per task (default: all)")
    p.add_argument("--cram", default=str(Path(sys.executable).with_name("cram")))
    p.add_argument("--skip-pretrain", action="store_true", help="reuse <out>/pretrain/pretrained")
    p.add_argument("--require-win", action="store_true",
                   help="exit 1 unless pretraining won (the gap exceeds both spreads, the seeds do not overlap)")
    p.add_argument("extra", nargs="*", help="more pretraining overrides (train.lr=1e-3 ...)")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    arch = ["arch=demo", *_overrides("arch", ARCH)]
    common = ["gpu=cpu", f"paths.out_root={args.out}"]
    data = ["data=embedded", *_overrides("data", DATA)]
    run_dir = args.out / "pretrain" / "pretrained"
    times = {}
    if not args.skip_pretrain:
        times["pretrain_s"] = _run([args.cram, "pretrain", *arch, *data, *common, *_overrides("train", TRAIN),
                                    f"budget={args.budget}", "run_name=pretrained", *args.extra],
                                   args.out / "pretrain.log")
    glue = [f"glue.data_dir={args.glue_dir}", f"glue.tasks=[{args.tasks}]", f"glue.trials={args.trials}",
            f"glue.epochs={args.epochs}", f"glue.lr={args.glue_lr}", f"glue.max_train_examples={args.train_examples}",
            f"glue.max_eval_examples={'null' if args.eval_examples is None else args.eval_examples}",
            f"glue.max_seq_len={ARCH['max_seq_len']}"]
    models = {"pretrained": [f"ckpt={run_dir / 'final'}"],
              "random-init": ["ckpt=random-init", *arch, f"glue.tokenizer={run_dir / 'final'}"]}
    summary: dict = {"budget": args.budget, "arch": ARCH, "data": DATA, "train": TRAIN, "extra": args.extra,
                     "glue": glue, "val_loss": _val_losses(run_dir), "models": {}}
    for name, source in models.items():
        times[f"glue_{name}_s"] = _run([args.cram, "glue", *source, *common, *glue, f"run_name={name}"],
                                       args.out / f"glue-{name}.log")
        per_task, per_seed = seed_scores(args.out / "glue" / name / "results.json")
        values = list(per_seed.values())
        summary["models"][name] = {"per_task": per_task, "per_seed": per_seed, "mean": statistics.fmean(values),
                                   "spread": max(values) - min(values)}
    summary["times"] = times
    pre, rnd = summary["models"]["pretrained"], summary["models"]["random-init"]
    summary["gap"] = pre["mean"] - rnd["mean"]
    summary["separated"] = min(pre["per_seed"].values()) > max(rnd["per_seed"].values())
    summary["win"] = summary["gap"] > max(pre["spread"], rnd["spread"]) and summary["separated"]
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    tasks = list(pre["per_task"])
    print("\n| model | " + " | ".join(tasks) + " | mean of tasks per seed | mean | spread (max-min) |")
    print("|---|" + "---:|" * (len(tasks) + 3))
    for name, m in summary["models"].items():
        cells = [" / ".join(f"{v:.1f}" for v in m["per_task"][t].values()) for t in tasks]
        seeds = " / ".join(f"{v:.1f}" for v in m["per_seed"].values())
        print(f"| {name} | " + " | ".join(cells) + f" | {seeds} | {m['mean']:.2f} | {m['spread']:.2f} |")
    vl = summary["val_loss"]
    print(f"\nheld-out MLM loss (15% masks): {vl[0][1]:.2f} at step 0 -> {vl[-1][1]:.2f} at step {vl[-1][0]}")
    print(f"gap {summary['gap']:+.2f} vs largest spread {max(pre['spread'], rnd['spread']):.2f}, seeds "
          f"{'apart' if summary['separated'] else 'overlapping'}: "
          f"{'pretraining wins' if summary['win'] else 'no clear win'}; times {json.dumps({k: round(v) for k, v in times.items()})}")
    return 0 if summary["win"] or not args.require_win else 1


if __name__ == "__main__":
    sys.exit(main())
