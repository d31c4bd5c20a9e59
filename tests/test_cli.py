"""The `cram` command as a user types it: help, resolved config, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def cram(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "cramming.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_stages(tmp_path):
    out = cram("--help", cwd=tmp_path)
    assert out.returncode == 0
    for stage in ("data", "pretrain", "glue", "report", "bench", "experiment"):
        assert stage in out.stdout


def test_cli_imports_no_stage_until_one_runs():
    # `cram --help` must stay fast: the table's entries import their stage only when called.
    code = ("import sys, cramming.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'hydra') or m.startswith("
            "('cramming.data', 'cramming.train', 'cramming.glue', 'cramming.report', 'cramming.pipeline'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_stage_table_is_what_help_lists(tmp_path):
    from cramming.cli import STAGES

    assert {name for name, stage in STAGES.items() if stage.hydra} == {"data", "pretrain", "glue"}
    listed = [line.split()[0] for line in cram("--help", cwd=tmp_path).stdout.split("stages:")[1].splitlines()
              if line.startswith("  ")]
    assert listed == list(STAGES)


def test_no_stage_is_an_error(tmp_path):
    out = cram(cwd=tmp_path)
    assert out.returncode == 2 and "usage" in out.stdout


def test_unknown_stage(tmp_path):
    out = cram("train", cwd=tmp_path)
    assert out.returncode == 2 and "unknown stage 'train'" in out.stderr


def test_stage_help_lists_groups_and_choices(tmp_path):
    out = cram("pretrain", "--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "gpu: a100, auto, cpu, h100, rtx2080ti, rtxa4000, rtxa6000" in out.stdout
    for group in ("arch:", "data:", "train:", "glue:"):
        assert group in out.stdout
    assert "cram pretrain budget=24h" in out.stdout


def test_cfg_job_prints_resolved_rtx2080ti_profile(tmp_path):
    out = cram("pretrain", "--cfg", "job", "budget=24h", "gpu=rtx2080ti", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["gpu"]["micro_batch_size"] == 96
    assert cfg["gpu"]["precision"] == "fp16"
    # The target batch is the recipe's only (the trainer rounds 4096 to 4032 = 42 x 96 micro-batches here).
    assert cfg["train"]["target_batch_size"] == 4096 and "target_batch_size" not in cfg["gpu"]
    assert cfg["budget"] == "24h" and "budget_kind" not in cfg["train"]


@pytest.mark.parametrize("bad", ["banana", "0steps"])
def test_bad_budget_names_accepted_forms(tmp_path, bad):
    out = cram("pretrain", f"budget={bad}", cwd=tmp_path)
    assert out.returncode != 0
    assert bad in out.stderr and "24h" in out.stderr and "90m" in out.stderr and "300steps" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("override", "hint"), [("train.budget_kind=steps", "budget=<N>steps"),
                                               ("+train.budget_steps=300", "budget=300steps"),
                                               ("gpu.target_batch_size=64", "train.target_batch_size")])
def test_moved_key_says_where_it_went(tmp_path, override, hint):
    out = cram("pretrain", override, "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 2 and hint in out.stderr and "moved" in out.stderr
    assert "Traceback" not in out.stderr and "not in struct" not in out.stderr


def test_unknown_group_option_is_rejected(tmp_path):
    out = cram("pretrain", "gpu=gtx480", "--cfg", "job", cwd=tmp_path)
    assert out.returncode != 0
    assert "gtx480" in out.stderr


@pytest.mark.parametrize("stage", ["report", "bench", "experiment"])
def test_argparse_stages_have_help(tmp_path, stage):
    out = cram(stage, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()
