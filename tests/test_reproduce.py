"""`make reproduce`'s planner: exact commands, steps skipped or resumed from what is on disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]
reproduce = load_script("reproduce")


def _args(tmp_path: Path, **kw):
    parser_args = reproduce.argparse.Namespace(budget="24h", gpu="auto", data="c4-filtered", seed=0,
                                               data_root=str(tmp_path / "cache"), out_root=str(tmp_path / "out"),
                                               dry_run=True, skip_checks=False)
    for k, v in kw.items():
        setattr(parser_args, k, v)
    return parser_args


def test_plan_runs_every_stage_in_order(tmp_path):
    steps = reproduce.plan(_args(tmp_path))
    assert [s[1] for s in steps] == ["data", "pretrain", "glue", "report"]
    pretrain = steps[1]
    assert "budget=24h" in pretrain and "arch=crammed-bert" in pretrain and "train=cramming" in pretrain
    assert not any(a.startswith("resume=") for a in pretrain)


def test_plan_resumes_an_interrupted_run_and_skips_a_finished_one(tmp_path):
    args = _args(tmp_path)
    run = tmp_path / "out" / "pretrain" / f"reproduce-{reproduce.settings_id(args)}"
    (run / "checkpoints").mkdir(parents=True)
    pretrain = reproduce.plan(args)[1]
    assert f"resume={run}" in pretrain
    (run / "final").mkdir()
    (run / "final" / "model.safetensors").write_bytes(b"x")
    assert [s[1] for s in reproduce.plan(args)] == ["data", "glue", "report"]


def test_settings_change_the_run_name(tmp_path):
    a = reproduce.settings_id(_args(tmp_path))
    b = reproduce.settings_id(_args(tmp_path, budget="12h"))
    assert a != b


def test_dry_run_prints_commands(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce.py"), "--dry-run", "--budget", "2h",
                          "--data-root", str(tmp_path / "c"), "--out-root", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    lines = [line for line in out.stdout.splitlines() if line.startswith("cram ")]
    assert len(lines) == 4 and "budget=2h" in lines[1]
