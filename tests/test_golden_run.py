"""Behaviour guard for refactors: a fixed-step CPU pretraining run must reproduce a recorded run.

`tests/golden/pretrain_steps.json` was recorded on main before the package was reshaped (issue 15),
at commit b181fad plus the reproducible tokenizer training of cramming/data/tokenizer.py (before
it, each fresh `prepare` could train a different vocabulary, so this run was not reproducible).
A change that alters any per-step loss, LR or batch size of this run changes training behaviour; if
that is intended, re-record it with `python tests/test_golden_run.py --record` and say why in the commit.

Re-recorded for issue 25: a step's LR is read at the progress where the step ends (step 1 of 12 at
1/12, the last at 12/12 = LR 0), and the recipe decays the embedding table; the first step's loss,
every batch size and token count were unchanged when it was re-recorded.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden" / "pretrain_steps.json"
STEPS = 12


def _run(tmp: Path) -> list[dict]:
    import torch

    from cramming.config import parse_budget
    from cramming.data.prepare import DataConfig, prepare
    from cramming.gpu import GpuProfile
    from cramming.model.bert import ModelConfig
    from cramming.train.config import TrainConfig
    from cramming.train.loop import pretrain

    os.environ.setdefault("CRAMMING_NO_PROGRESS", "1")
    torch.set_num_threads(1)  # thread count changes reduction order; one thread is the same everywhere
    data = prepare(DataConfig(name="golden", source="embedded", embedded_files=["austen"], max_chars=200_000,
                              vocab_size=400, seq_len=32, val_fraction=0.05, compression_threshold=1.0), tmp / "data")
    arch = ModelConfig(name="golden", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=32)
    train = TrainConfig(target_batch_size=32, log_interval=1, eval_batches=2, checkpoint_interval_minutes=0.0,
                        reserve_margin_s=0.0, eval_fraction=0.0)
    gpu = GpuProfile(name="cpu", micro_batch_size=8, num_workers=0)
    pretrain(train, arch, gpu, data, tmp / "run", budget=parse_budget(f"{STEPS}steps"), seed=0)
    recs = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "lr", "batch_size", "tokens_seen", "val_loss")
    return [{k: r[k] for k in keys if k in r} | {"event": r.get("event", "train")} for r in recs]


def test_fixed_step_run_matches_the_recorded_run(tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    got = _run(tmp_path)
    assert [r["event"] for r in got] == [r["event"] for r in golden]
    for new, old in zip(got, golden, strict=True):
        assert set(new) == set(old), (new, old)
        for key, value in old.items():
            if isinstance(value, float):
                assert new[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, new, old)
            else:
                assert new[key] == value, (key, new, old)


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(_run(Path(tmp)), indent=1) + "\n")
    print(f"recorded {GOLDEN}")
