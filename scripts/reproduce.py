"""The paper's whole pipeline, resumable: data -> 24h pretraining -> GLUE (8 tasks x 5 trials) -> report.

    python scripts/reproduce.py --budget 24h --gpu auto --data c4-filtered [--dry-run]

(`make reproduce BUDGET=24h GPU=rtx2080ti DATA=c4-filtered`, `make reproduce DRY_RUN=1`.)

Each step is skipped when its output already exists for the same settings: prepared data is cached
by the hash of its config, the pretraining run folder is named by a hash of the settings (and is
resumed if it has no final export yet), and `cram glue` skips trials already in its results.json.
So an interrupted reproduction continues where it stopped when the same command is run again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

HUB_HOST = ("huggingface.co", 443)
# C4's first 20e6 documents, tokenized, filtered and packed, plus the download cache.
DISK_NEEDED_GB = {"c4-filtered": 60, "pile": 60, "bookcorpus-wiki": 30, "embedded": 1, "local": 1}
HUB_SOURCES = {"c4-filtered", "pile", "bookcorpus-wiki"}


def settings_id(args: argparse.Namespace) -> str:
    key = json.dumps({"budget": args.budget, "gpu": args.gpu, "data": args.data, "seed": args.seed}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def check_requirements(args: argparse.Namespace) -> list[str]:
    """What is missing for the full run, as sentences a user can act on."""
    problems: list[str] = []
    try:
        import torch

        if not torch.cuda.is_available():
            problems.append("no CUDA GPU is visible: the paper's run needs one (set GPU=cpu only for a toy run)")
    except ImportError:
        problems.append("PyTorch is not installed: run `make install` first")
    root = Path(args.data_root)
    root.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(root).free / 2**30
    need = DISK_NEEDED_GB.get(args.data, 10)
    if free_gb < need:
        problems.append(f"{free_gb:.0f} GB free under {root}, about {need} GB needed for data={args.data}")
    if args.data in HUB_SOURCES:
        try:
            socket.create_connection(HUB_HOST, timeout=5).close()
        except OSError:
            problems.append(f"cannot reach {HUB_HOST[0]}: data={args.data} streams from the Hugging Face hub "
                            "(use data=local with your own files, or data=embedded offline)")
    return problems


def plan(args: argparse.Namespace) -> list[list[str]]:
    """The commands to run, with the steps that are already done left out."""
    run = f"reproduce-{settings_id(args)}"
    out = Path(args.out_root)
    pretrain_dir = out / "pretrain" / run
    glue_dir = out / "glue" / run
    common = [f"gpu={args.gpu}", f"data={args.data}", f"seed={args.seed}",
              f"paths.data_root={args.data_root}", f"paths.out_root={args.out_root}"]
    steps = [["cram", "data", *common]]
    if not (pretrain_dir / "final" / "model.safetensors").is_file():
        pretrain = ["cram", "pretrain", f"budget={args.budget}", "arch=crammed-bert", "train=cramming",
                    *common, f"run_name={run}"]
        if (pretrain_dir / "checkpoints").is_dir():
            pretrain.append(f"resume={pretrain_dir}")
        steps.append(pretrain)
    steps.append(["cram", "glue", f"ckpt={pretrain_dir / 'final'}", "glue=cramming", *common, f"run_name={run}"])
    steps.append(["cram", "report", str(pretrain_dir), str(glue_dir), "--out", str(out / "report" / run)])
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="24h")
    parser.add_argument("--gpu", default="auto")
    parser.add_argument("--data", default="c4-filtered")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="data_cache")
    parser.add_argument("--out-root", default="outputs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the checks, run nothing")
    parser.add_argument("--skip-checks", action="store_true", help="run even if a requirement seems missing")
    args = parser.parse_args(argv)

    problems = check_requirements(args)
    for problem in problems:
        print(f"missing: {problem}", file=sys.stderr)
    steps = plan(args)
    if args.dry_run:
        print("# the commands `make reproduce` would run:")
        for step in steps:
            print(shlex.join(step))
        return 0
    if problems and not args.skip_checks:
        print("reproduce: stopping before the first step; fix the above or pass SKIP_CHECKS=1", file=sys.stderr)
        return 2
    for step in steps:
        print(f"\n$ {shlex.join(step)}", flush=True)
        code = subprocess.call(step)
        if code != 0:
            print(f"reproduce: step failed with exit code {code}; run the same command again to continue",
                  file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
