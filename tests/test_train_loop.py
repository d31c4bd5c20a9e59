"""The training loop end to end on CPU: tiny model, tiny data, seconds-long budgets.

Subprocess tests run this file as a script (`python tests/test_train_loop.py <run_dir> ...`) so a
real process can be killed or signalled mid-run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cramming.config import parse_budget
from cramming.errors import CrammingError
from cramming.faults import NAN_STEPS_ENV
from cramming.gpu import GpuProfile
from cramming.runs import RunLock
from cramming.train.checkpoint import latest_checkpoint
from cramming.train.config import RandomLTDConfig, TrainConfig
from cramming.train.loop import Interrupted, pretrain

REPO = Path(__file__).resolve().parents[1]


def tiny_data(root: Path) -> Path:
    from cramming.data.prepare import DataConfig, prepare

    os.environ.setdefault("CRAMMING_NO_PROGRESS", "1")
    cfg = DataConfig(name="tiny", source="embedded", embedded_files=["moby_dick"], max_chars=300_000,
                     vocab_size=300, seq_len=32, val_fraction=0.05, compression_threshold=1.0)
    return prepare(cfg, root)


def tiny_arch():
    from cramming.model.bert import ModelConfig

    return ModelConfig(name="tiny-test", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=32)


GPU = GpuProfile(name="cpu", micro_batch_size=16, num_workers=0)


def train_cfg(**overrides) -> TrainConfig:
    # eval_fraction=0: held-out losses at the start and end only, unless a test asks for them.
    base = dict(target_batch_size=64, log_interval=2, eval_batches=4, checkpoint_interval_minutes=0.0,
                reserve_margin_s=1.0, eval_fraction=0.0)
    return TrainConfig(**{**base, **overrides})


def tiny_run(root: Path, steps: int = 3) -> Path:
    """A finished tiny pretraining run (Python API) in root/run, its export in final/."""
    pretrain(train_cfg(), tiny_arch(), GPU, tiny_data(root / "data"), root / "run", budget=parse_budget(f"{steps}steps"))
    return root / "run"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data"))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_time_budget_run_ends_in_budget_with_export_and_falling_loss(data_dir, tmp_path, caplog) -> None:
    from cramming.model.export import load_model

    budget = 12.0
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="cramming.train"):
        final = pretrain(train_cfg(lr=5e-3), tiny_arch(), GPU, data_dir, tmp_path, budget=parse_budget(f"{budget}s"), seed=0)
    wall = time.monotonic() - start
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["elapsed_s"] <= budget + 1.0, summary  # overrun within a second
    assert wall <= budget + 2.0
    assert summary["elapsed_s"] >= 0.6 * budget  # and the budget was actually used
    assert summary["budget_kind"] == "time" and summary["budget_s"] == budget
    assert summary["overrun_s"] == pytest.approx(summary["elapsed_s"] - budget, abs=1e-3)
    for key in ("budget_s", "steps", "tokens_seen", "final_loss", "val_loss", "tokens_per_s", "mfu", "device",
                "gpu_profile", "precision", "compile", "skipped_steps", "layer_tokens_saved"):
        assert key in summary
    assert summary["compile"] == "eager" and summary["skipped_steps"] == 0 and summary["device"] == "cpu"
    recs = records(tmp_path)
    train = [r for r in recs if r.get("event") != "eval"]
    evals = [r for r in recs if r.get("event") == "eval"]
    assert {"step", "elapsed_s", "progress", "loss", "lr", "batch_size", "tokens_seen", "tokens_per_s", "mfu"} <= set(train[0])
    # Loss falls (by how much depends on how many steps a busy shared CPU fits into 12 s).
    assert train[-1]["loss"] < train[0]["loss"] - 0.1
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.1
    assert max(r["batch_size"] for r in train) == 64 and train[0]["batch_size"] < 64  # the ramp ran to the target
    # The schedule ran to its end with training: the last step (cut to what still fitted) at ~0 LR.
    assert train[-1]["progress"] >= 0.97 and train[-1]["lr"] <= 0.02 * 5e-3, train[-1]
    # The LR is the one-cycle schedule of progress, and the run went well past the peak.
    from cramming.optim.schedules import lr_factor

    # Each record holds the progress its step's LR was computed from (unrounded), so they agree exactly.
    assert all(r["lr"] == 5e-3 * lr_factor(r["progress"], "one-cycle", 0.5) for r in train)
    assert train[-1]["progress"] > 0.6 and max(r["lr"] for r in train) <= 5e-3
    assert (tmp_path / "loss.png").stat().st_size > 1000
    model = load_model(final)
    assert summary["val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert json.loads((final / "config.json").read_text())["cramming_training"]["steps"] == summary["steps"]
    assert sum(p.numel() for p in model.parameters()) > 0
    assert not (tmp_path / ".lock").exists()
    # The tiny corpus (a few thousand rows) is read many times over in 12 s: said once, early, from the
    # measured throughput, and counted as epochs in the records and the summary.
    revisits = [r.getMessage() for r in caplog.records if "will revisit its data" in r.getMessage()]
    assert len(revisits) == 1 and "at the measured" in revisits[0], revisits
    assert summary["epochs"] > 1 and train[-1]["epochs"] == summary["epochs"]
    assert summary["rows_drawn"] == summary["tokens_seen"] // 32


def test_step_and_token_budgets(data_dir, tmp_path) -> None:
    from cramming.optim.schedules import lr_factor

    pretrain(train_cfg(), tiny_arch(), GPU, data_dir, tmp_path / "s", budget=parse_budget("7steps"))
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["budget_kind"] == "steps"
    assert summary["budget_s"] is None and summary["overrun_s"] is None and summary["budget_amount"] == 7
    # Step n's LR is read at its end, progress n / 7 (which no rounding keeps: the record holds the
    # exact value), so the last step's LR is the schedule's end, 0.
    train = [r for r in records(tmp_path / "s") if r.get("event") != "eval"]
    assert [r["progress"] for r in train] == [r["step"] / 7 for r in train]
    assert all(r["lr"] == 1e-3 * lr_factor(r["progress"], "one-cycle", 0.5) for r in train)
    assert train[-1]["step"] == 7 and train[-1]["lr"] == 0.0
    pretrain(train_cfg(ramp_fraction=0.0), tiny_arch(), GPU, data_dir, tmp_path / "t", budget=parse_budget("10ktokens"))
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["budget_kind"] == "tokens" and summary["budget_s"] is None
    assert summary["tokens_seen"] == 5 * 64 * 32  # 2048 tokens a step: the 5th step crosses 10k
    # The last step takes only the micro-batches (16 x 32 tokens each) that the tokens left need.
    pretrain(train_cfg(ramp_fraction=0.0, log_interval=1), tiny_arch(), GPU, data_dir, tmp_path / "u",
             budget=parse_budget("9000tokens"))
    train = [r for r in records(tmp_path / "u") if r.get("event") != "eval"]
    assert [r["batch_size"] for r in train] == [64, 64, 64, 64, 32] and train[-1]["tokens_seen"] == 9216
    assert train[-1]["lr"] == 0.0


def test_held_out_loss_about_twenty_times_a_run(data_dir, tmp_path) -> None:
    # The default interval is a fraction of the run (5%), whatever the budget's length.
    pretrain(train_cfg(eval_fraction=0.05, ramp_fraction=0.0), tiny_arch(), GPU, data_dir, tmp_path,
             budget=parse_budget("40steps"))
    evals = [r for r in records(tmp_path) if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == list(range(0, 41, 2))  # the start, then every 5%, the last reused
    assert json.loads((tmp_path / "summary.json").read_text())["val_loss"] == evals[-1]["val_loss"]


def test_too_few_steps_for_the_schedule_are_warned_with_a_batch_that_fits(data_dir, tmp_path, caplog) -> None:
    with caplog.at_level("WARNING", logger="cramming.train"):
        pretrain(train_cfg(ramp_fraction=0.0), tiny_arch(), GPU, data_dir, tmp_path, budget=parse_budget("20ktokens"))
    warned = [r.getMessage() for r in caplog.records if "too few" in r.getMessage()]
    # 20,000 tokens are 10 steps of 64 rows of 32; ~100 steps want 625 tokens, i.e. 16 rows (one micro-batch).
    assert len(warned) == 1 and "about 10 optimizer steps" in warned[0], warned
    assert "train.target_batch_size=16 gives about 100" in warned[0]


def test_cpu_profile_caps_the_target_batch(caplog) -> None:
    from cramming.gpu import load_profile
    from cramming.train.loop import _batch_plan

    cpu = load_profile("cpu")
    with caplog.at_level("INFO", logger="cramming.train"):
        assert _batch_plan(TrainConfig(), cpu, 1).target == 256  # not the recipe's 4096
    assert any("gpu.max_target_batch_size=null" in r.getMessage() for r in caplog.records)
    uncapped = dataclasses.replace(cpu, max_target_batch_size=None)
    assert _batch_plan(TrainConfig(), uncapped, 1).target == 4096
    assert _batch_plan(TrainConfig(target_batch_size=64), cpu, 1).target == 64


def test_a_stopped_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(data_dir, tmp_path, monkeypatch) -> None:
    # Dropout on, a ramp and a step budget: the resumed run must continue the same data, masks,
    # optimizer state and random stream (restored after the probe step, which draws from it).
    from safetensors.torch import load_file

    from cramming.train import loop

    cfg = train_cfg(ramp_fraction=0.5)
    arch = dataclasses.replace(tiny_arch(), dropout=0.1)
    pretrain(cfg, arch, GPU, data_dir, tmp_path / "whole", budget=parse_budget("6steps"))

    class SignalAfterThreeSteps(loop.StopSignals):
        """A SIGTERM that arrives once three steps are done (the flag is read at each step boundary)."""

        @property
        def received(self) -> int | None:
            return signal.SIGTERM if len(records_so_far()) >= 3 else None

        @received.setter
        def received(self, value: int | None) -> None:
            """StopSignals.__init__ and its handler assign the flag; here it follows the records only."""

    def records_so_far() -> list:
        path = tmp_path / "cut" / "metrics.jsonl"
        return [r for r in records(tmp_path / "cut") if r.get("event") != "eval"] if path.exists() else []

    monkeypatch.setattr(loop, "StopSignals", SignalAfterThreeSteps)
    with pytest.raises(Interrupted):
        pretrain(train_cfg(ramp_fraction=0.5, log_interval=1), arch, GPU, data_dir, tmp_path / "cut",
                 budget=parse_budget("6steps"))
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000003"
    pretrain(cfg, arch, GPU, data_dir, tmp_path / "cut", budget=parse_budget("6steps"), resume=True)
    whole = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6, msg=key)


def test_target_batch_is_rounded_down_to_whole_micro_batches(data_dir, tmp_path, caplog) -> None:
    with caplog.at_level("INFO", logger="cramming.train"):
        pretrain(train_cfg(target_batch_size=56, ramp_fraction=0.0, log_interval=1), tiny_arch(), GPU, data_dir,
                 tmp_path, budget=parse_budget("2steps"))
    train = [r for r in records(tmp_path) if r.get("event") != "eval"]
    assert [r["batch_size"] for r in train] == [48, 48]  # 3 micro-batches of 16, not above 56
    assert any("rounded down" in r.getMessage() and "48 sequences" in r.getMessage() for r in caplog.records)


def test_nan_loss_is_skipped_and_counted(data_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(NAN_STEPS_ENV, "2,3")
    pretrain(train_cfg(), tiny_arch(), GPU, data_dir, tmp_path / "a", budget=parse_budget("6steps"))
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(tmp_path / "a") if r.get("loss") is not None)
    # Too many in a row: stop with a clear message and a checkpoint.
    monkeypatch.setenv(NAN_STEPS_ENV, ",".join(str(i) for i in range(100)))
    with pytest.raises(Interrupted, match="3 non-finite steps in a row") as stop:
        pretrain(train_cfg(max_nonfinite_steps=3), tiny_arch(), GPU, data_dir, tmp_path / "b", budget=parse_budget("50steps"))
    assert stop.value.exit_code == 3
    assert latest_checkpoint(tmp_path / "b").name == "step-00000003"


def test_random_ltd_logs_keep_and_savings(data_dir, tmp_path) -> None:
    from cramming.model.bert import ModelConfig

    arch = ModelConfig(name="ltd", hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64, max_seq_len=32)
    cfg = train_cfg(log_interval=1,
                    random_ltd=RandomLTDConfig(enabled=True, start_keep=16, full_at_fraction=0.5, granularity=8))
    pretrain(cfg, arch, GPU, data_dir, tmp_path, budget=parse_budget("10steps"))
    train = [r for r in records(tmp_path) if r.get("event") != "eval"]
    assert [r["keep_tokens"] for r in train] == [16, 16, 16, 24, 24, 32, 32, 32, 32, 32]
    expected = sum(r["batch_size"] * 2 * (32 - r["keep_tokens"]) for r in train)
    assert train[-1]["layer_tokens_saved"] == expected > 0
    assert json.loads((tmp_path / "summary.json").read_text())["layer_tokens_saved"] == expected


def test_second_run_in_same_folder_refuses(data_dir, tmp_path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import socket

        tmp_path.mkdir(exist_ok=True)
        (tmp_path / ".lock").write_text(json.dumps({"pid": child.pid, "host": socket.gethostname()}))
        with pytest.raises(CrammingError, match="in use by another run"):
            pretrain(train_cfg(), tiny_arch(), GPU, data_dir, tmp_path, budget=parse_budget("2steps"))
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        child.kill()
        child.wait()
    with RunLock(tmp_path):
        pass


# --- subprocesses: signals, SIGKILL + resume, DDP ---------------------------------------------------


def _spawn(run_dir: Path, data_dir: Path, budget: float, resume: bool = False) -> subprocess.Popen:
    args = [sys.executable, __file__, "run", str(run_dir), str(data_dir), str(budget), "1" if resume else "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def _wait_for_steps(run_dir: Path, steps: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(r.get("step", 0) >= steps for r in records(run_dir) if r.get("event") != "eval"):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {steps} within {timeout}s")


def test_sigterm_writes_checkpoint_and_exits_zero(data_dir, tmp_path) -> None:
    proc = _spawn(tmp_path, data_dir, 120)
    _wait_for_steps(tmp_path, 4)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "received SIGTERM: checkpoint written" in out
    ckpt = latest_checkpoint(tmp_path)
    assert int(ckpt.name.split("-")[1]) >= 4
    assert not (tmp_path / ".lock").exists() and not (tmp_path / "final").exists()


@pytest.mark.slow
def test_resume_after_sigkill_continues_elapsed_and_steps(data_dir, tmp_path) -> None:
    budget = 14.0
    proc = _spawn(tmp_path, data_dir, budget)  # checkpoints every 0.03 min = 1.8 s
    _wait_for_steps(tmp_path, 1)
    time.sleep(4.0)
    proc.kill()
    proc.wait()
    ckpt = latest_checkpoint(tmp_path)
    saved = torch.load(ckpt / "state.pt", weights_only=True)["counters"]
    killed_at = max(r["elapsed_s"] for r in records(tmp_path))
    assert saved["step"] > 0 and saved["elapsed_s"] > 1.0
    # At most one checkpoint interval (plus one step and the logging lag) of training is lost.
    assert killed_at - saved["elapsed_s"] <= 1.8 + 1.5
    proc = _spawn(tmp_path, data_dir, budget, resume=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    summary = json.loads((tmp_path / "summary.json").read_text())
    recs = records(tmp_path)
    resumed = [r for r in recs if r.get("event") != "eval" and r["step"] > saved["step"]]
    assert resumed and resumed[0]["elapsed_s"] >= saved["elapsed_s"]  # the clock continued
    assert summary["steps"] > saved["step"]
    assert summary["elapsed_s"] <= budget + 1.0  # total budget across both processes
    assert (tmp_path / "final" / "model.safetensors").is_file()


def _ddp_worker(rank: int, world_size: int, port: int, data_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from safetensors.torch import save_file

    from cramming.model import bert

    built = []

    class Capture(bert.CrammedBertForMLM):
        def __init__(self, config):
            super().__init__(config)
            built.append(self)

    bert.CrammedBertForMLM = Capture  # keep a handle on this rank's model
    torch.set_num_threads(1)
    pretrain(train_cfg(checkpoint_interval_minutes=0.0), tiny_arch(), GPU, data_dir, Path(out_dir) / "run",
             budget=parse_budget("6steps"))
    save_file({k: v.contiguous() for k, v in built[0].state_dict().items()}, f"{out_dir}/rank{rank}.safetensors")


def test_ddp_two_process_gloo_identical_weights(data_dir, tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(data_dir), str(tmp_path)), nprocs=2, join=True)
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    # Each step saw a global batch: the ramp counts micro-batches over both ranks.
    assert all(r["batch_size"] % 32 == 0 for r in records(tmp_path / "run") if r.get("event") != "eval")


def _main(argv: list[str]) -> int:
    """Subprocess entry: `run <run_dir> <data_dir> <budget seconds> <resume 0|1>`."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    run_dir, data_dir, budget, resume = Path(argv[1]), Path(argv[2]), float(argv[3]), argv[4] == "1"
    torch.set_num_threads(1)
    try:
        pretrain(train_cfg(checkpoint_interval_minutes=0.03, log_interval=1), tiny_arch(), GPU, data_dir, run_dir,
                 budget=parse_budget(f"{budget}s"), resume=resume)
    except Interrupted as stop:
        print(f"cram pretrain: {stop}", flush=True)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


def test_progress_bar_counts_time_left_between_log_steps(data_dir, tmp_path, capsys) -> None:
    # No log step until the end: the bar's time left must still move with every step.
    pretrain(train_cfg(log_interval=10_000, log_interval_s=0.0), tiny_arch(), GPU, data_dir, tmp_path, budget=parse_budget("6s"))
    shown = set(re.findall(r"left=([^,\]\s]+)", capsys.readouterr().err))
    assert len(shown - {"-"}) >= 2, shown


def test_budget_smaller_than_setup_warns_and_skips_the_repeated_eval(data_dir, tmp_path, caplog) -> None:
    with caplog.at_level("WARNING", logger="cramming.train"):
        pretrain(train_cfg(), tiny_arch(), GPU, data_dir, tmp_path, budget=parse_budget("0.2s"))
    assert any("budget is spent before the first step" in r.getMessage() for r in caplog.records)
    summary = json.loads((tmp_path / "summary.json").read_text())
    evals = [r for r in records(tmp_path) if r.get("event") == "eval"]
    # No step taken: the start-of-run held-out loss is the final one, measured once.
    assert summary["steps"] == 0 and len(evals) == 1 and summary["val_loss"] == evals[0]["val_loss"]
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_final_phase_reuses_an_interval_eval_of_the_last_step(data_dir, tmp_path) -> None:
    # An interval this short evaluates after every step, the last one included: the final phase
    # must reuse that loss instead of evaluating the same weights again inside the reserve.
    pretrain(train_cfg(eval_interval_minutes=1e-9), tiny_arch(), GPU, data_dir, tmp_path, budget=parse_budget("3steps"))
    evals = [r for r in records(tmp_path) if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "summary.json").read_text())["val_loss"] == evals[-1]["val_loss"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """About 180 training rows of 32 tokens: a few optimizer steps of 64 rows read them all."""
    from cramming.data.prepare import DataConfig, prepare

    cfg = DataConfig(name="small", source="embedded", embedded_files=["moby_dick"], max_chars=20_000,
                     vocab_size=300, seq_len=32, val_fraction=0.1, compression_threshold=1.0)
    return prepare(cfg, tmp_path_factory.mktemp("small"))


def _revisit_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "will revisit its data" in r.getMessage()]


def test_epochs_count_the_wrap_around_and_a_step_budget_warns_before_training(small_data, tmp_path, caplog) -> None:
    from cramming.corpus.shards import PackedDataset

    rows = len(PackedDataset(small_data, "train")) // 16 * 16  # whole micro-batches of 16 per pass
    with caplog.at_level("WARNING", logger="cramming.train"):
        pretrain(train_cfg(ramp_fraction=0.0), tiny_arch(), GPU, small_data, tmp_path, budget=parse_budget("8steps"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows_drawn"] == 8 * 64 and summary["rows_per_epoch"] == rows
    assert summary["epochs"] == pytest.approx(8 * 64 / rows) and summary["epochs"] > 1
    train = [r for r in records(tmp_path) if r.get("event") != "eval"]
    assert [r["epochs"] for r in train] == pytest.approx([r["tokens_seen"] / (rows * 32) for r in train])
    [warning] = _revisit_warnings(caplog)
    # Before the first step: the budget's own numbers, against one pass of the data.
    assert "this steps budget" in warning and "16,384 tokens (512 rows of 32)" in warning
    assert f"({rows:,} rows)" in warning and f"{8 * 64 / rows:.1f} epochs" in warning


def test_no_revisit_warning_when_the_budget_fits_in_one_pass(small_data, tmp_path, caplog) -> None:
    with caplog.at_level("WARNING", logger="cramming.train"):
        pretrain(train_cfg(ramp_fraction=0.0), tiny_arch(), GPU, small_data, tmp_path, budget=parse_budget(f"{2 * 64 * 32}tokens"))
    assert _revisit_warnings(caplog) == []
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] < 1


@pytest.mark.parametrize(("pass_rows", "warns"), [(6_000, False), (1_000, True)])
def test_time_budget_projection_from_the_first_steps(pass_rows, warns, caplog) -> None:
    from cramming.train.budget import Budget
    from cramming.train.inputs import DataPasses

    now = [0.0]
    budget = Budget(parse_budget("100s"), margin_s=0.0, clock=lambda: now[0])
    passes = DataPasses(pass_rows, seq_len=100, enabled=True)
    with caplog.at_level("WARNING", logger="cramming.train"):
        passes.observe(budget, tokens=1_000, elapsed=1.0, logged=True)  # first step: the baseline only
        passes.observe(budget, tokens=2_000, elapsed=2.0, logged=False)  # not a record: undecided
        assert not passes.checked
        passes.observe(budget, tokens=6_000, elapsed=5.0, logged=True)  # 1,250 tokens/s over 4 s
    # 6,000 + 1,250 x 95 s = 124,750 tokens = 1,247.5 rows of 100, against one pass of `pass_rows`.
    assert passes.checked and bool(_revisit_warnings(caplog)) is warns
    if warns:
        assert "1,250 tokens/s" in caplog.text and "124,750 tokens (1,248 rows of 100)" in caplog.text
