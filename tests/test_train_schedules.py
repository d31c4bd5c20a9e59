"""Schedules, the budget clock and checkpoints: pure and fast (the run lock: tests/test_runs.py)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from cramming.errors import CheckpointError, ConfigError
from cramming.optim import schedules
from cramming.train.budget import Budget
from cramming.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cramming.train.config import RandomLTDConfig, TrainConfig

# --- learning rate ------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["one-cycle", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0.1, 0.5])
def test_lr_peaks_at_warmup_and_is_zero_at_deadline(schedule: str, warmup: float) -> None:
    assert schedules.lr_factor(0.0, schedule, warmup) == 0.0
    assert schedules.lr_factor(warmup, schedule, warmup) == pytest.approx(1.0)
    assert schedules.lr_factor(1.0, schedule, warmup) == 0.0
    grid = [i / 1000 for i in range(1001)]
    values = [schedules.lr_factor(p, schedule, warmup) for p in grid]
    assert max(values) == pytest.approx(1.0)
    assert grid[values.index(max(values))] == pytest.approx(warmup, abs=1e-3)
    # Monotone up to the peak, monotone down after it.
    peak = values.index(max(values))
    assert all(a <= b + 1e-12 for a, b in zip(values[:peak], values[1:peak + 1], strict=True))
    assert all(a >= b - 1e-12 for a, b in zip(values[peak:], values[peak + 1:], strict=False))


def test_one_cycle_is_the_exact_triangle() -> None:
    assert schedules.lr_factor(0.25, "one-cycle", 0.5) == pytest.approx(0.5)
    assert schedules.lr_factor(0.75, "one-cycle", 0.5) == pytest.approx(0.5)
    assert schedules.lr_factor(0.55, "linear", 0.1) == pytest.approx(0.5)
    assert schedules.lr_factor(0.55, "cosine", 0.1) == pytest.approx(0.5)
    assert schedules.lr_factor(2.0, "one-cycle", 0.5) == 0.0  # past the deadline stays at 0


def test_constant_schedule_and_no_warmup() -> None:
    assert schedules.lr_factor(0.05, "constant", 0.1) == pytest.approx(0.5)
    assert schedules.lr_factor(0.9, "constant", 0.1) == 1.0
    assert schedules.lr_factor(0.0, "linear", 0.0) == 1.0
    with pytest.raises(ValueError):
        schedules.lr_factor(0.5, "triangle", 0.5)


def test_schedule_names_are_the_literal_choices() -> None:
    import typing

    assert tuple(schedules.LR_SCHEDULES) == typing.get_args(schedules.LrSchedule)


@pytest.mark.parametrize(("factor", "reference"), [(schedules.warmup_cosine, "get_cosine_schedule_with_warmup"),
                                                   (schedules.one_cycle, "get_linear_schedule_with_warmup"),
                                                   (schedules.warmup_constant, "get_constant_schedule_with_warmup")])
@pytest.mark.parametrize(("warmup", "total"), [(0, 1), (0, 50), (3, 50), (6, 100), (25, 50), (17, 1234)])
def test_per_step_schedules_match_transformers(factor, reference: str, warmup: int, total: int) -> None:
    import functools

    import transformers

    # As GLUE steps them: the factor at step s is schedule(s / total), the warmup a fraction of the steps.
    opt_theirs, opt_mine = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0) for _ in range(2))
    args = (warmup, total) if reference != "get_constant_schedule_with_warmup" else (warmup,)
    theirs = getattr(transformers, reference)(opt_theirs, *args)
    mine = schedules.lambda_lr(opt_mine, functools.partial(factor, warmup_fraction=warmup / total), total)
    for step in range(total + 1):  # GLUE steps the scheduler once per optimizer step, `total` times
        assert mine.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], rel=1e-12, abs=1e-15), step
        for optimizer, scheduler in ((opt_theirs, theirs), (opt_mine, mine)):
            optimizer.step()
            scheduler.step()


def test_lambda_lr_scales_the_peak_by_the_factor_of_progress() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = schedules.lambda_lr(optimizer, lambda p: 1.0 - p, 4)
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.0])
    with pytest.raises(ValueError, match="total_steps"):
        schedules.lambda_lr(optimizer, lambda p: 1.0, 0)


# --- batch ramp -----------------------------------------------------------------------------------


def test_batch_ramp_hits_target_at_fraction() -> None:
    kw = dict(micro_batch_size=96, target_batch_size=4032, ramp_fraction=0.6)
    assert schedules.accumulation_steps(0.0, **kw) == 1
    assert schedules.accumulation_steps(0.6, **kw) == 42  # 4032 = 42 x 96, reached at 60%
    assert schedules.accumulation_steps(0.59, **kw) < 42
    assert schedules.accumulation_steps(1.0, **kw) == 42
    steps = [schedules.accumulation_steps(i / 100, **kw) for i in range(101)]
    assert steps == sorted(steps)  # never shrinks
    # Halfway through the ramp: halfway between 96 and 4032 sequences.
    assert schedules.batch_size(0.3, **kw) == pytest.approx((96 + 4032) / 2, abs=1)


def test_target_batch_rounds_down_to_whole_micro_batches() -> None:
    # The recipe's 4096 becomes the paper's 4032 = 42 x 96 on a 2080 Ti, and stays on 128/256 micro-batches.
    assert schedules.round_target_batch(4096, 96) == 4032
    assert schedules.round_target_batch(4096, 128) == 4096 and schedules.round_target_batch(4096, 256) == 4096
    assert schedules.round_target_batch(4096, 96, world_size=2) == 4032  # 21 x 96 x 2
    assert schedules.round_target_batch(4096, 100, world_size=3) == 3900
    assert schedules.round_target_batch(32, 8) == 32
    # At least one micro-batch per rank, however small the target.
    assert schedules.round_target_batch(64, 256) == 256 and schedules.round_target_batch(100, 64, world_size=2) == 128
    with pytest.raises(ValueError, match="micro_batch_size"):
        schedules.round_target_batch(4096, 0)


def test_batch_ramp_ddp_and_final_batch() -> None:
    assert schedules.accumulation_steps(0.0, 32, 256, 0.5, world_size=2) == 1
    assert schedules.accumulation_steps(0.5, 32, 256, 0.5, world_size=2) == 4  # 4 x 32 x 2 = 256
    assert schedules.accumulation_steps(0.2, 32, 256, 0.0) == 8  # no ramp: the target from the start
    kw = dict(final_batch_size=512, final_batch_fraction=0.1)
    assert schedules.accumulation_steps(0.89, 32, 256, 0.5, **kw) == 8
    assert schedules.accumulation_steps(0.9, 32, 256, 0.5, **kw) == 16


# --- random-LTD -----------------------------------------------------------------------------------


def test_mslg_grows_to_full_length_on_time() -> None:
    kw = dict(seq_len=128, start_keep=64, full_at_fraction=0.7, granularity=16)
    assert schedules.keep_tokens(0.0, **kw) == 64
    assert schedules.keep_tokens(0.7, **kw) == 128
    assert schedules.keep_tokens(0.69, **kw) == 112
    assert schedules.keep_tokens(1.0, **kw) == 128
    values = [schedules.keep_tokens(i / 1000, **kw) for i in range(1001)]
    assert values == sorted(values)
    assert set(values) == {64, 80, 96, 112, 128}
    assert all((v - 64) % 16 == 0 for v in values)
    # Linear growth: a quarter of the way to full, a quarter of the extra tokens (floored to 16).
    assert schedules.keep_tokens(0.7 * 0.25, **kw) == 80


def test_layer_token_progress() -> None:
    kw = dict(seq_len=128, num_layers=16, start_keep=64, full_at_fraction=0.7, granularity=16)
    assert schedules.layer_token_progress(0.0, **kw) == 0.0
    assert schedules.layer_token_progress(1.0, **kw) == pytest.approx(1.0)
    grid = [i / 200 for i in range(201)]
    q = [schedules.layer_token_progress(p, **kw) for p in grid]
    assert q == sorted(q)
    assert all(qi <= p + 1e-12 for qi, p in zip(q, grid, strict=True))  # layer-tokens lag data while dropping
    # Exact value on the first segment: all layers at keep=64 -> rate (2*128 + 14*64) / (16*128).
    rate0 = (2 * 128 + 14 * 64) / (16 * 128)
    segs = [(0.0, 0.175, 64), (0.175, 0.35, 80), (0.35, 0.525, 96), (0.525, 0.7, 112), (0.7, 1.0, 128)]
    total = sum((b - a) * (2 * 128 + 14 * k) / (16 * 128) for a, b, k in segs)
    assert schedules.layer_token_progress(0.1, **kw) == pytest.approx(0.1 * rate0 / total)
    # LayerToken LR: the warmup is stretched (LR lower early than with progress-driven LR).
    assert schedules.lr_factor(q[20], "one-cycle", 0.5) < schedules.lr_factor(grid[20], "one-cycle", 0.5)
    # No middle layers: nothing is dropped and layer-token progress is progress.
    assert schedules.layer_token_progress(0.3, 128, 2, 64, 0.7, 16) == pytest.approx(0.3)


# --- budget ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_time_budget_progress_reserve_and_resume_offset() -> None:
    clock = FakeClock()
    budget = Budget("time", 100.0, margin_s=2.0, clock=clock)
    clock.now += 50
    assert budget.progress(0, 0) == pytest.approx(0.5)
    budget.note_final_cost(3.0)
    assert budget.reserve_s == pytest.approx(5.0)
    clock.now += 44
    assert not budget.done(0, 0)
    clock.now += 1.5
    assert budget.done(0, 0)  # 95.5 + 5 >= 100
    assert budget.remaining_s() == pytest.approx(4.5)
    resumed = Budget("time", 100.0, elapsed_offset=60.0, clock=clock)
    assert resumed.elapsed() == pytest.approx(60.0)
    assert resumed.progress(0, 0) == pytest.approx(0.6)


def test_token_and_step_budgets() -> None:
    tokens = Budget("tokens", 1000)
    assert tokens.progress(5, 250) == 0.25 and not tokens.done(5, 999) and tokens.done(5, 1000)
    steps = Budget("steps", 10)
    assert steps.progress(5, 10**9) == 0.5 and steps.done(10, 0) and steps.remaining_s() is None
    with pytest.raises(ValueError):
        Budget("epochs", 1)


# --- config ---------------------------------------------------------------------------------------


def test_train_config_validation() -> None:
    assert TrainConfig().betas == (0.9, 0.98)
    assert TrainConfig().target_batch_size == 4096
    with pytest.raises(ConfigError, match="train.lr_schedule='triangle' must be one of: one-cycle, linear"):
        TrainConfig(lr_schedule="triangle")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="train.target_batch_size must be >= 1, got 0"):
        TrainConfig(target_batch_size=0)
    with pytest.raises(ConfigError, match="train.replace_mask \\+ train.replace_random"):
        TrainConfig(replace_mask=0.9, replace_random=0.2)
    with pytest.raises(ConfigError, match="train.random_ltd.full_at_fraction must be in"):
        RandomLTDConfig(full_at_fraction=0.0)


def test_shipped_train_configs_convert() -> None:
    from hydra import compose, initialize_config_dir

    from cramming.config import CONFIG_DIR, to_dataclass

    recipes = {}
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for path in (CONFIG_DIR / "train").glob("*.yaml"):
            cfg = compose(config_name="config", overrides=[f"train={path.stem}"])
            recipes[path.stem] = to_dataclass(TrainConfig, cfg.train, "train")
    assert {"cramming", "bert-original", "random-ltd"} <= set(recipes)
    cram, bert, ltd = recipes["cramming"], recipes["bert-original"], recipes["random-ltd"]
    assert (cram.lr, cram.betas, cram.eps, cram.grad_clip, cram.lr_schedule) == (1e-3, (0.9, 0.98), 1e-12, 0.5, "one-cycle")
    assert (bert.lr, bert.betas, bert.eps, bert.grad_clip, bert.lr_schedule) == (1e-4, (0.9, 0.999), 1e-6, 1.0, "linear")
    assert bert.target_batch_size == 256 and bert.ramp_fraction == 0 and bert.mask_rate == 0.15
    assert cram.target_batch_size == ltd.target_batch_size == 4096
    assert ltd.random_ltd.enabled and ltd.random_ltd.layer_token_lr and not cram.random_ltd.enabled


# --- checkpoints and lock -------------------------------------------------------------------------


def _tiny_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))


def test_checkpoint_roundtrip_prune_and_corruption(tmp_path) -> None:
    model = _tiny_module()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "counters": {"step": 3, "elapsed_s": 1.5}, "rng": {"torch": torch.get_rng_state()}}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, state, "train: {}\n", step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest.json", "step-00000002", "step-00000003"]
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-00000003"
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    loaded, config_text = load_checkpoint(ckpt, fresh)
    assert config_text == "train: {}\n" and loaded["counters"]["step"] == 3
    assert torch.equal(fresh[0].weight, model[0].weight)
    opt2 = torch.optim.AdamW(fresh.parameters())
    opt2.load_state_dict(loaded["optimizer"])
    # A flipped byte is detected and named.
    path = ckpt / "state.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="state.pt"):
        load_checkpoint(ckpt, fresh)


def test_crafted_pickle_is_refused(tmp_path) -> None:
    model = _tiny_module()
    ckpt = save_checkpoint(tmp_path, model, {"counters": {}}, "", 1)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "state.pt").write_bytes(pickle.dumps(Evil()))
    meta = json.loads((ckpt / "meta.json").read_text())
    import hashlib

    meta["files"]["state.pt"] = hashlib.sha256((ckpt / "state.pt").read_bytes()).hexdigest()  # a forger fixes the hash
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="safely"):
        load_checkpoint(ckpt, model)
    assert not marker.exists()


def test_partial_checkpoint_is_never_taken(tmp_path) -> None:
    model = _tiny_module()
    save_checkpoint(tmp_path, model, {"counters": {}}, "", 1)
    # A write killed before its rename leaves a hidden temp folder; one killed before meta.json
    # (impossible after rename, but a hand-copied folder) has no meta: neither is picked.
    (tmp_path / "checkpoints" / ".tmp-step-00000002-999999-1").mkdir()
    (tmp_path / "checkpoints" / "step-00000003").mkdir()
    (tmp_path / "checkpoints" / "latest.json").unlink()
    assert latest_checkpoint(tmp_path).name == "step-00000001"
