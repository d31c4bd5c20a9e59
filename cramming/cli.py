"""The `cram` command: `cram <stage> [overrides]`.

`data`, `pretrain` and `glue` are Hydra applications over one primary config
(`configs/config.yaml`): overrides, `-m` sweeps, `--cfg job`, `--help` and per-run output
folders work as Hydra users expect. `report`, `bench`, `experiment` and `push` take paths and flags,
so they use argparse. STAGES below is the whole map from a stage's name to the code that runs it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cramming.errors import ConfigError, CrammingError

# Each entry imports its stage when called, so that `cram --help` does not pay for torch and a
# stage that fails to import cannot break the others.


def _data(cfg: Any) -> None:
    from cramming.data.prepare import run

    run(cfg)


def _pretrain(cfg: Any) -> None:
    from cramming.pipeline import pretrain

    pretrain(cfg)


def _glue(cfg: Any) -> None:
    from cramming.glue.finetune import run
    from cramming.report import write_glue_tables

    # The stage writes the results file; its tables (results.md) are the report's to render.
    write_glue_tables(run(cfg))


def _report(argv: list[str]) -> int:
    from cramming.report import main

    return main(argv)


def _bench(argv: list[str]) -> int:
    from cramming.bench import main

    return main(argv)


def _experiment(argv: list[str]) -> int:
    from cramming.experiment import main

    return main(argv)


def _push(argv: list[str]) -> int:
    from cramming.hub import main

    return main(argv)


@dataclass(frozen=True)
class Stage:
    entry: Callable[[Any], Any]
    """Takes the composed config (a Hydra stage) or the remaining arguments (an argparse stage)."""
    hydra: bool
    description: str


STAGES: dict[str, Stage] = {
    "data": Stage(_data, True, "download/read, normalise, filter, train the tokenizer, pack 128-token shards"),
    "pretrain": Stage(_pretrain, True, "pretrain within a wall-clock budget (one-cycle LR, batch ramp, compile)"),
    "glue": Stage(_glue, True, "finetune a checkpoint on GLUE tasks, N trials each, median table"),
    "report": Stage(_report, False, "tables and plots for one or more run folders"),
    "bench": Stage(_bench, False, "throughput, memory and MFU benchmarks against transformers' BERT"),
    "experiment": Stage(_experiment, False, "a paper's ablation or sweep: pretrain each point, GLUE, one report"),
    "push": Stage(_push, False, "upload an export (and its run's checkpoints) to a Hugging Face Hub repository"),
}

USAGE = """usage: cram <stage> [options]

cramming: pretrain a BERT-style masked language model on one GPU within a wall-clock budget,
then finetune and score it on GLUE. Stages read and write folders, so each can run alone.

stages:
{stages}

Run `cram <stage> --help` for that stage's options and config groups.
"""


def _usage() -> str:
    return USAGE.format(stages="\n".join(f"  {name:<9} {stage.description}" for name, stage in STAGES.items()))


def _report_user_error(stage: str, err: CrammingError) -> None:
    print(f"cram {stage}: error: {err}", file=sys.stderr)
    raise SystemExit(2)


def _run_hydra_stage(stage: str, argv: list[str]) -> None:
    import hydra
    from omegaconf import DictConfig

    from cramming.config import CONFIG_DIR, MOVED_KEYS, parse_budget

    # Hydra would refuse an override of a key that moved with its own "not in struct" message;
    # say where the key went instead.
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" in arg and key in MOVED_KEYS:
            _report_user_error(stage, ConfigError(f"{key} moved: {MOVED_KEYS[key]}"))

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
    def entry(cfg: DictConfig) -> None:
        try:
            # Validate settings every stage shares before importing (and possibly building) anything.
            parse_budget(cfg.budget)
            STAGES[stage].entry(cfg)
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
    name, rest = argv[0], argv[1:]
    stage = STAGES.get(name)
    if stage is None:
        print(f"cram: unknown stage {name!r}; choose one of: {', '.join(STAGES)}", file=sys.stderr)
        raise SystemExit(2)
    if stage.hydra:
        _run_hydra_stage(name, rest)
        return
    try:
        code = stage.entry(rest)
    except CrammingError as err:
        _report_user_error(name, err)
    raise SystemExit(code or 0)


if __name__ == "__main__":
    main()
