"""How the CLI chains stages where one needs another's output (floor 4: it may import every stage).

`cram pretrain` trains on a prepared data folder; when that folder is missing, it is prepared here
with `cramming.data.prepare` first (unless train.prepare_data=false), before the budget's clock
starts, so that the train stage itself never builds data.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from cramming.config import format_duration, to_dataclass
from cramming.errors import DataError
from cramming.gpu import require_runnable

log = logging.getLogger(__name__)


def data_dir(cfg: DictConfig, prepare_data: bool) -> Path:
    """The prepared folder of `cfg.data`, prepared now if missing and `prepare_data` allows it."""
    from cramming.corpus.shards import MANIFEST
    from cramming.data import prepare

    data_cfg = to_dataclass(prepare.DataConfig, cfg.data, "data")
    folder = prepare.prepared_dir(data_cfg, cfg.paths.data_root)
    if (folder / MANIFEST).is_file():
        return folder
    if prepare_data:
        # Before the train stage starts the budget clock: preparation is not charged to the budget.
        # Runs of a sweep that start together build the folder once (prepare() holds a lock for it).
        log.info("prepared data not found at %s: preparing it now, outside the budget "
                 "(train.prepare_data=false stops here instead)", folder)
        start = time.monotonic()
        folder = prepare.prepare(data_cfg, cfg.paths.data_root)
        log.info("data ready in %s (not counted in the budget): %s", format_duration(time.monotonic() - start), folder)
        return folder
    name = cfg.data.get("name", "<name>")
    overrides = [a for a in sys.argv[1:] if a.startswith(("data.", "paths.data_root"))]
    raise DataError(
        f"the data for data={name} is not prepared (no {folder / MANIFEST}). Run "
        f"`cram data data={name} {' '.join(overrides)}`".rstrip() + " first with the same data overrides, "
        "or drop train.prepare_data=false to prepare it here"
    )


def pretrain(cfg: DictConfig) -> None:
    """`cram pretrain`: validate the job (or the run to resume) and that this machine can run its GPU
    profile, find or prepare its data, train."""
    from cramming.train import trainer

    job = trainer.load_job(cfg)
    require_runnable(job.gpu)  # before data preparation, which can take hours
    trainer.run(job, data_dir(job.cfg, job.train.prepare_data))
