"""Schedules, the budget clock and checkpoints: pure and fast (the run lock: tests/test_runs.py)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from cramming.config import parse_budget
from cramming.errors import CheckpointError, ConfigError
from cramming.optim import schedules
from cramming.optim.batch_plan import BatchPlan
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


# --- batch plan ----------------------------------------------------------------------------------


def test_batch_ramp_hits_target_at_fraction() -> None:
    plan = BatchPlan.build(4032, 96, ramp_fraction=0.6)
    assert plan.accumulation(0.0) == 1
    assert plan.accumulation(0.6) == 42  # 4032 = 42 x 96, reached at 60%
    assert plan.accumulation(0.59) < 42
    assert plan.accumulation(1.0) == 42 == plan.target_accumulation
    steps = [plan.accumulation(i / 100) for i in range(101)]
    assert steps == sorted(steps)  # never shrinks
    # Halfway through the ramp: halfway between 96 and 4032 sequences.
    assert plan.batch_size(0.3) == pytest.approx((96 + 4032) / 2, abs=1)
    assert plan.sequences(3) == 288


def test_target_batch_rounds_down_to_whole_micro_batches() -> None:
    # The recipe's 4096 becomes the paper's 4032 = 42 x 96 on a 2080 Ti, and stays on 128/256 micro-batches.
    assert BatchPlan.build(4096, 96).target == 4032
    assert BatchPlan.build(4096, 128).target == 4096 and BatchPlan.build(4096, 256).target == 4096
    assert BatchPlan.build(4096, 96, world_size=2).target == 4032  # 21 x 96 x 2
    assert BatchPlan.build(4096, 100, world_size=3).target == 3900
    assert BatchPlan.build(32, 8).target == 32
    # At least one micro-batch per rank, however small the target.
    assert BatchPlan.build(64, 256).target == 256 and BatchPlan.build(100, 64, world_size=2).target == 128
    with pytest.raises(ValueError, match="micro-batch"):
        BatchPlan.build(4096, 0)
    with pytest.raises(ValueError, match="whole number of rounds"):
        BatchPlan(96, 4096)


def test_batch_ramp_ddp_final_batch_and_passes() -> None:
    ddp = BatchPlan.build(256, 32, world_size=2, ramp_fraction=0.5)
    assert ddp.accumulation(0.0) == 1 and ddp.accumulation(0.5) == 4  # 4 x 32 x 2 = 256
    assert ddp.rows_per_pass(1000) == 960  # the loader drops the part that does not fill a round
    assert BatchPlan.build(256, 32).accumulation(0.2) == 8  # no ramp: the target from the start
    final = BatchPlan.build(256, 32, ramp_fraction=0.5, final_batch_size=512, final_batch_fraction=0.1)
    assert final.accumulation(0.89) == 8 and final.accumulation(0.9) == 16


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


def test_layer_tokens_count_the_middle_layers_at_the_kept_length() -> None:
    assert schedules.layer_tokens(10, None, 128, 16) == 10 * 128 * 16
    assert schedules.layer_tokens(10, 64, 128, 16) == 10 * (2 * 128 + 14 * 64)
    assert schedules.layer_tokens(10, 64, 128, 2) == 10 * 128 * 2  # no middle layers: nothing dropped


# --- budget ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _budget(text: str, **kw) -> Budget:
    return Budget(parse_budget(text), **kw)


def test_time_budget_progress_runs_to_the_end_of_training_not_the_deadline() -> None:
    clock = FakeClock()
    budget = _budget("100s", margin_s=2.0, clock=clock)
    clock.now += 49
    assert budget.progress(0, 0) == pytest.approx(49 / 98)  # training ends at 100 - 2 s
    budget.note_final_cost(3.0)
    assert budget.reserve_s == pytest.approx(5.0) and budget.training_end_s() == pytest.approx(95.0)
    clock.now += 45.5
    assert not budget.done(0, 0) and budget.progress(0, 0) == pytest.approx(94.5 / 95)
    clock.now += 0.5
    assert budget.done(0, 0) and budget.progress(0, 0) == 1.0
    assert budget.remaining_s() == pytest.approx(5.0)
    resumed = _budget("100s", elapsed_offset=60.0, margin_s=0.0, clock=clock)
    assert resumed.elapsed() == pytest.approx(60.0) and resumed.progress(0, 0) == pytest.approx(0.6)


def test_token_and_step_budgets() -> None:
    tokens = _budget("1000tokens")
    assert tokens.progress(5, 250) == 0.25 and not tokens.done(5, 999) and tokens.done(5, 1000)
    steps = _budget("10steps")
    assert steps.progress(5, 10**9) == 0.5 and steps.done(10, 0) and steps.remaining_s() is None


def test_the_last_step_takes_what_still_fits() -> None:
    plan = BatchPlan.build(256, 32)  # 8 micro-batches a step
    clock = FakeClock()
    budget = _budget("100s", margin_s=0.0, clock=clock)
    assert budget.next_accumulation(plan, 3, 0, 128, elapsed=50.0, per_micro_s=1.0) == 8
    assert budget.next_accumulation(plan, 3, 0, 128, elapsed=97.0, per_micro_s=1.0) == 3
    assert budget.next_accumulation(plan, 3, 0, 128, elapsed=99.4, per_micro_s=1.0) == 1  # 0.6 rounds to 1
    assert budget.next_accumulation(plan, 3, 0, 128, elapsed=99.6, per_micro_s=1.0) == 0  # 0.4 rounds to 0
    assert budget.next_accumulation(plan, 3, 0, 128, elapsed=97.0) == 8  # pace unknown: the plan's
    # Tokens: no more rounds than the tokens left need; the plan of the whole run follows the same rule.
    tokens = _budget(f"{20 * 32 * 128}tokens")
    assert tokens.next_accumulation(plan, 2, 16 * 32 * 128, 128) == 4
    assert tokens.planned_accumulations(plan, 128) == [8, 8, 4]
    assert _budget("5steps").planned_accumulations(plan, 128) == [8] * 5
    assert budget.planned_accumulations(plan, 128) is None


# --- the loop's step plan: LR to the end of training, LayerToken LR per budget kind ----------------


def _simulate(budget_text: str, train: TrainConfig, per_micro_s: float, *, micro: int = 32, seq_len: int = 128,
              layers: int = 16, setup_s: float = 5.0, margin_s: float = 2.0) -> tuple[list, Budget]:
    """The loop's planning (loop.plan_step) over a whole run with an injected clock on which every
    micro-batch takes `per_micro_s`; returns the steps planned and the budget."""
    from types import SimpleNamespace

    from cramming.model.bert import ModelConfig
    from cramming.train import loop
    from cramming.train.state import TrainState

    clock = FakeClock()
    budget = _budget(budget_text, margin_s=margin_s, clock=clock)
    clock.now += setup_s
    plan = BatchPlan.build(train.target_batch_size, micro, 1, train.ramp_fraction)
    arch = ModelConfig(num_layers=layers, max_seq_len=seq_len)
    planned = budget.planned_accumulations(plan, seq_len)
    s = SimpleNamespace(budget=budget, plan=plan, seq_len=seq_len, train=train, arch=arch, planned=planned,
                        planned_layer_tokens=loop._planned_layer_tokens(train, arch, budget, plan, planned, seq_len))
    state, pace, steps = TrainState(), loop.Pace(0), []
    while (step := loop.plan_step(s, state, loop.Clock(budget.elapsed(), 0, pace.per_micro_s, 0.0))) is not None:
        clock.now += step.accum * per_micro_s
        state.step += 1
        state.tokens += step.sequences * seq_len
        if step.keep is not None:
            state.layer_tokens_saved += step.sequences * (layers - 2) * (seq_len - step.keep)
        pace.observe(step.accum * per_micro_s, step.accum, state.step)
        steps.append(step)
    return steps, budget


@pytest.mark.parametrize("ramp", [0.0, 0.6])
@pytest.mark.parametrize("target_steps", [20, 37, 200])
def test_time_budget_lr_reaches_zero_when_training_ends(ramp: float, target_steps: int) -> None:
    # A budget that fits `target_steps` optimizer steps at the target batch (8 micro-batches of 0.7 s).
    train = TrainConfig(target_batch_size=256, ramp_fraction=ramp)
    budget_s = 5.0 + 2.0 + target_steps * 8 * 0.7
    steps, budget = _simulate(f"{budget_s}s", train, per_micro_s=0.7)
    assert steps[-1].lr <= 0.02 * train.lr, (len(steps), steps[-1])
    assert len(steps) >= target_steps
    # Training ended within half a micro-batch of its end, before the reserve.
    assert abs(budget.elapsed() - budget.training_end_s()) <= 0.35 + 1e-9


def test_a_short_time_budget_still_uses_its_schedule() -> None:
    # The case: 60 s, full steps of 128 micro-batches at 0.16 s (20 s a step). Before, the run
    # stopped at 36% of its schedule; now the last step is cut to fit and the schedule ends with it.
    train = TrainConfig(target_batch_size=4096, ramp_fraction=0.6)
    steps, budget = _simulate("60s", train, per_micro_s=0.16)
    assert budget.progress(len(steps), 0) == pytest.approx(1.0, abs=0.01)
    assert steps[-1].lr <= 0.05 * train.lr


def test_layer_token_lr_under_a_time_budget_follows_time() -> None:
    # Under a time budget compute per second is constant, so layer-tokens consumed are the time
    # fraction: the one-cycle LR peaks at half the training time (not at 58% as the MSLG integral had it).
    train = TrainConfig(target_batch_size=256, ramp_fraction=0.0, random_ltd=RandomLTDConfig(enabled=True))
    plain = TrainConfig(target_batch_size=256, ramp_fraction=0.0)
    steps, budget = _simulate("1000s", train, per_micro_s=0.5)
    baseline, _ = _simulate("1000s", plain, per_micro_s=0.5)
    assert [s.lr for s in steps] == pytest.approx([s.lr for s in baseline])
    quarter = min(steps, key=lambda s: abs(s.progress - 0.25))
    assert quarter.lr / train.lr == pytest.approx(0.5, abs=0.02)  # 0.368 before
    assert steps[-1].lr <= 0.02 * train.lr


@pytest.mark.parametrize("budget_text", ["300steps", "6000ktokens"])
def test_layer_token_lr_counts_layer_tokens_for_step_and_token_budgets(budget_text: str) -> None:
    # Counted as consumed against the planned total, batch ramp included: 1 exactly at the last step,
    # and below the plain schedule's progress while tokens are dropped (the warmup is stretched).
    train = TrainConfig(target_batch_size=256, ramp_fraction=0.6, random_ltd=RandomLTDConfig(enabled=True))
    steps, _ = _simulate(budget_text, train, per_micro_s=0.5)
    plain, _ = _simulate(budget_text, TrainConfig(target_batch_size=256, ramp_fraction=0.6), per_micro_s=0.5)
    assert len(steps) == len(plain)
    assert steps[-1].lr == 0.0 and plain[-1].lr == 0.0
    early = len(steps) // 5
    assert steps[early].lr < plain[early].lr
    peak = max(range(len(steps)), key=lambda i: steps[i].lr)
    assert peak > max(range(len(plain)), key=lambda i: plain[i].lr)


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
