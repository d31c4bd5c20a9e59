"""One rank of the multi-process tests (tests/test_train_ddp.py), launched by torchrun:

    python -m torch.distributed.run --nproc_per_node=2 --master_port=<port> tests/ddp_worker.py '<json>'

The JSON holds `run_dir`, `data_dir`, `budget`, `resume`, `train` (overrides of test_train_loop's
train_cfg; `random_ltd` as a dict), `arch` (overrides of its tiny_arch), `record_ltd` (trace every
random-LTD draw of kept tokens, through cramming.faults.trace) and `hard_timeout_s`: a rank still
running then is hung, prints where (every thread's stack) and exits (torchrun starts each rank in
a session of its own, so the test cannot reach them through torchrun's process group). The fault
hooks are set by the test in the environment. Exit codes follow `cram`: 0 done, 2 a user error
(`RankLost` among them), else the code of `Interrupted`.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import logging
import sys
from typing import Any

import torch
from test_train_loop import GPU, tiny_arch, train_cfg

from cramming import faults
from cramming.config import parse_budget
from cramming.errors import CrammingError
from cramming.model import random_ltd
from cramming.train.config import RandomLTDConfig
from cramming.train.loop import Interrupted, pretrain


def record_ltd_draws() -> None:
    """Trace each draw of kept-token indices, so that the test can compare the ranks' choices."""
    draw = random_ltd.sample_indices

    def traced(*args: Any, **kwargs: Any) -> torch.Tensor:
        idx = draw(*args, **kwargs)
        faults.trace("ltd", kept=idx.tolist())
        return idx

    random_ltd.sample_indices = traced  # apply_layer looks it up in the module at each call


def main(payload: dict[str, Any]) -> int:
    faulthandler.dump_traceback_later(payload["hard_timeout_s"], exit=True)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if payload.get("record_ltd"):
        record_ltd_draws()
    overrides = dict(payload.get("train", {}))
    if "random_ltd" in overrides:
        overrides["random_ltd"] = RandomLTDConfig(**overrides["random_ltd"])
    arch = dataclasses.replace(tiny_arch(), **payload.get("arch", {}))
    try:
        final = pretrain(train_cfg(**overrides), arch, GPU, payload["data_dir"], payload["run_dir"],
                         budget=parse_budget(payload["budget"]), resume=bool(payload.get("resume")))
    except Interrupted as stop:
        print(f"cram pretrain: {stop}", file=sys.stderr, flush=True)
        return stop.exit_code
    except CrammingError as err:
        print(f"cram pretrain: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"cram pretrain: finished; model exported to {final}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
