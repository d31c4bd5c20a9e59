"""Run an experiment preset end to end: pretraining sweep, GLUE for every run, one comparison report.

    python scripts/run_experiment.py cramming-ablation --scale tiny --gpu cpu [--budget 2m] [--dry-run]
    python scripts/run_experiment.py random-ltd --budget 24h --gpu rtx2080ti data=c4-filtered

A thin wrapper of `cramming.experiment.main`; see that module and docs/experiments.md.
"""

from __future__ import annotations

import sys

from cramming.errors import CrammingError
from cramming.experiment import main

if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except CrammingError as err:
        print(f"run_experiment: error: {err}", file=sys.stderr)
        sys.exit(2)
