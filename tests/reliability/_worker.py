"""Child process of the reliability suite: runs one stage through the Python API so a test can kill it.

    python tests/reliability/_worker.py prepare '{"data_root": ..., "data": {...}}'
    python tests/reliability/_worker.py pretrain '{"run_dir": ..., "data_dir": ..., "train": {...}, "budget": "20steps",
                                                   "resume": false}'

Exit codes follow `cram`: 0 done (or stopped by SIGTERM with a checkpoint), 130 SIGINT, 2 user error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import TINY_ARCH, TINY_GPU  # noqa: E402


def main(argv: list[str]) -> int:
    import torch

    from cramming.errors import CrammingError

    torch.set_num_threads(1)
    command, payload = argv[0], json.loads(argv[1])
    try:
        if command == "prepare":
            import logging

            from cramming.data.prepare import DataConfig, prepare

            # INFO shows whether this process built the data or found it built ("cache hit").
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
            print("prepared", prepare(DataConfig(**payload["data"]), payload["data_root"]), flush=True)
            return 0
        if command == "pretrain":
            from cramming.config import parse_budget
            from cramming.gpu import GpuProfile
            from cramming.model.bert import ModelConfig
            from cramming.train.config import TrainConfig
            from cramming.train.loop import Interrupted, pretrain

            try:
                final = pretrain(TrainConfig(**payload["train"]), ModelConfig(**{**TINY_ARCH, **payload.get("arch", {})}),
                                 GpuProfile(**TINY_GPU), payload["data_dir"], payload["run_dir"],
                                 budget=parse_budget(payload.get("budget", "1h")), resume=bool(payload.get("resume")))
            except Interrupted as stop:
                print(f"worker: {stop}", flush=True)
                return stop.exit_code
            print("finished", final, flush=True)
            return 0
    except CrammingError as err:
        print(f"worker: error: {err}", flush=True)
        return 2
    raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
