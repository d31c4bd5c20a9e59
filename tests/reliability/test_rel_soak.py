"""Soak (slow): a tiny model trained for minutes with checkpoints every 30 s and three random SIGKILLs,
compared with an uninterrupted run of the same step budget.

What the design promises (docs/training.md, Reliability): with a step budget (`budget=<N>steps`), a resumed
run takes exactly the same number of optimizer steps, sees the same data order and masks, and its LR
is the same function of the step; at most one checkpoint interval of work is redone after each kill.
The weights are compared and the difference is reported, not asserted: the tiny model has no
dropout, so they come out identical as long as the restored RNG and CPU kernels are deterministic,
but bit-identity is not part of the contract.
"""

from __future__ import annotations

import json
import random
import time

import pytest
import torch
from conftest import TINY_TARGET_BATCH, finish, wait_for, worker
from safetensors.torch import load_file

from cramming.train.checkpoint import latest_checkpoint

INTERVAL_MIN = 0.5


def _records(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train() -> dict:
    return dict(target_batch_size=TINY_TARGET_BATCH, checkpoint_interval_minutes=INTERVAL_MIN, log_interval=5,
                eval_batches=2, reserve_margin_s=0.5, keep_checkpoints=2)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_soak_three_random_sigkills(tiny_data, tmp_path, outcome) -> None:
    rng = random.Random(2024)
    arch = dict(hidden_size=64, intermediate_size=128)
    # Calibrate: steps per second of this machine right now, to size a run of about 4.5 minutes.
    calib = tmp_path / "calib"
    code, out = finish(worker("pretrain", {"run_dir": str(calib), "data_dir": str(tiny_data), "train": _train(),
                                           "budget": "60steps", "arch": arch}))
    assert code == 0, out
    recs = [r for r in _records(calib) if r.get("event") != "eval"]
    rate = (recs[-1]["step"] - recs[0]["step"]) / max(1e-6, recs[-1]["elapsed_s"] - recs[0]["elapsed_s"])
    steps = max(200, int(rate * 270))

    ref = tmp_path / "ref"
    t0 = time.monotonic()
    code, out = finish(worker("pretrain", {"run_dir": str(ref), "data_dir": str(tiny_data), "train": _train(),
                                           "budget": f"{steps}steps", "arch": arch}), timeout=1200)
    ref_wall = time.monotonic() - t0
    assert code == 0, out

    soak = tmp_path / "soak"
    payload = {"run_dir": str(soak), "data_dir": str(tiny_data), "train": _train(), "budget": f"{steps}steps",
               "arch": arch}
    kills = []
    t0 = time.monotonic()
    for i in range(3):
        proc = worker("pretrain", {**payload, "resume": i > 0})
        # A random moment: after the first checkpoint of this process, 20-80 s into it.
        wait_for(lambda: latest_checkpoint(soak) is not None, 120, "a first checkpoint")
        time.sleep(rng.uniform(20, 80))
        assert proc.poll() is None, "the run finished before the kill; lower the sleep"
        before = max((r["elapsed_s"] for r in _records(soak) if r.get("event") != "eval"), default=0.0)
        proc.kill()
        finish(proc)
        saved = torch.load(latest_checkpoint(soak) / "state.pt", weights_only=True)["counters"]
        kills.append({"killed_at_elapsed_s": before, "resumed_from_elapsed_s": saved["elapsed_s"],
                      "lost_s": round(before - saved["elapsed_s"], 2), "resumed_from_step": saved["step"]})
    code, out = finish(worker("pretrain", {**payload, "resume": True}), timeout=1200)
    soak_wall = time.monotonic() - t0
    assert code == 0, out

    ref_sum = json.loads((ref / "summary.json").read_text())
    soak_sum = json.loads((soak / "summary.json").read_text())
    ref_lr = {r["step"]: r["lr"] for r in _records(ref) if r.get("event") != "eval"}
    soak_lr = {r["step"]: r["lr"] for r in _records(soak) if r.get("event") != "eval"}
    common = sorted(set(ref_lr) & set(soak_lr))
    wa, wb = load_file(ref / "final" / "model.safetensors"), load_file(soak / "final" / "model.safetensors")
    max_diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    lost = max(k["lost_s"] for k in kills)
    bound = 60 * INTERVAL_MIN + 5.0  # one interval + one step, a log interval and the checkpoint write
    survived = (soak_sum["steps"] == ref_sum["steps"] == steps and soak_sum["tokens_seen"] == ref_sum["tokens_seen"]
                and all(ref_lr[s] == soak_lr[s] for s in common) and lost <= bound)
    detail = (f"{steps} steps each; uninterrupted {ref_wall:.0f} s wall, soak {soak_wall:.0f} s wall incl. 3 restarts; "
              f"kills {[k['lost_s'] for k in kills]} s lost; same steps/tokens ({soak_sum['tokens_seen']}); LR equal "
              f"at all {len(common)} logged steps; max |weight diff| vs uninterrupted {max_diff:.3g}")
    (tmp_path / "soak.json").write_text(json.dumps({"kills": kills, "detail": detail}, indent=2))
    print(detail)
    outcome.add("Soak: 3 random SIGKILLs during ~10 min of training", "SIGKILL 20-80 s (seeded) after each "
                "(re)start's first checkpoint; checkpoints every 30 s; step budget sized to ~4.5 min",
                "resume from the newest checkpoint each time; same final step count, tokens and per-step LR as an "
                "uninterrupted run", survived, lost=lost, unit="s of training", bound=bound, detail=detail)
    assert survived, detail
