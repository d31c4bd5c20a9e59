"""The `cram` command: `cram <stage> [overrides]`.

`data`, `pretrain` and `glue` are Hydra applications over one primary config
(`cramming/configs/config.yaml`): overrides, `-m` sweeps, `--cfg job`, `--help` and per-run output
folders work as Hydra users expect. `report` and `bench` take paths and flags, so they use argparse.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from cramming.errors import CrammingError

# stage -> (module, function, one-line description). Modules are imported lazily so that
# `cram --help` stays fast and a stage that fails to import cannot break the others.
HYDRA_STAGES: dict[str, tuple[str, str, str]] = {
    "data": ("cramming.data.prepare", "run", "download/read, normalise, filter, train the tokenizer, pack 128-token shards"),
    "pretrain": ("cramming.train.trainer", "run", "pretrain within a wall-clock budget (one-cycle LR, batch ramp, compile)"),
    "glue": ("cramming.glue.finetune", "run", "finetune a checkpoint on GLUE tasks, N trials each, median table"),
}
ARGPARSE_STAGES: dict[str, tuple[str, str, str]] = {
    "report": ("cramming.report", "main", "tables and plots for one or more run folders"),
    "bench": ("cramming.bench", "main", "throughput, memory and MFU benchmarks against transformers' BERT"),
    "experiment": ("cramming.experiment", "main", "a paper's ablation or sweep: pretrain each point, GLUE, one report"),
}

USAGE = """usage: cram <stage> [options]

cramming: pretrain a BERT-style masked language model on one GPU within a wall-clock budget,
then finetune and score it on GLUE. Stages read and write folders, so each can run alone.

stages:
{stages}

Run `cram <stage> --help` for that stage's options and config groups.
"""


def _usage() -> str:
    rows = {**HYDRA_STAGES, **ARGPARSE_STAGES}
    return USAGE.format(stages="\n".join(f"  {name:<9} {desc}" for name, (_, _, desc) in rows.items()))


def _load(stage: str, module: str, function: str) -> Callable:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and (err.name == module or module.startswith(err.name + ".")):
            print(f"cram {stage}: this stage is not built yet ({module} is missing).", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    return getattr(mod, function)


def _report_user_error(stage: str, err: CrammingError) -> None:
    print(f"cram {stage}: error: {err}", file=sys.stderr)
    raise SystemExit(2)


def _run_hydra_stage(stage: str, argv: list[str]) -> None:
    import hydra
    from omegaconf import DictConfig

    from cramming.config import CONFIG_DIR, parse_budget

    module, function, _ = HYDRA_STAGES[stage]

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
    def entry(cfg: DictConfig) -> None:
        try:
            # Validate settings every stage shares before importing (and possibly building) anything.
            parse_budget(cfg.budget)
            target = _load(stage, module, function)
            target(cfg)
        except CrammingError as err:
            _report_user_error(stage, err)

    # Hydra reads sys.argv. The job name, which picks the output folder outputs/<stage>/..., comes
    # from this variable (see config.yaml) rather than an extra override, which argparse would
    # reject when the user's overrides and flags such as `--cfg job` are interleaved.
    os.environ["CRAM_STAGE"] = stage
    sys.argv = [f"cram {stage}", *argv]
    entry()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `cram` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    stage, rest = argv[0], argv[1:]
    if stage in HYDRA_STAGES:
        _run_hydra_stage(stage, rest)
        return
    if stage in ARGPARSE_STAGES:
        module, function, _ = ARGPARSE_STAGES[stage]
        target = _load(stage, module, function)
        try:
            code = target(rest)
        except CrammingError as err:
            _report_user_error(stage, err)
        raise SystemExit(code or 0)
    print(f"cram: unknown stage {stage!r}; choose one of: {', '.join([*HYDRA_STAGES, *ARGPARSE_STAGES])}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
