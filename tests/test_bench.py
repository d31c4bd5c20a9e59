"""Smoke test of `cram bench model`: it runs tiny and reports sane numbers (no timing asserts)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cramming import bench
from cramming.benchtools import arch_config
from cramming.model.bert import ModelConfig


@pytest.mark.slow
def test_bench_model_runs_and_reports_sane_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(["model", "--device", "cpu", "--hidden", "32", "--layers", "2", "--heads", "2", "--vocab", "200",
                       "--seq-len", "32", "--batch-size", "4", "--repeats", "2", "--steps", "2", "--warmup", "1",
                       "--threads", "1", "--out", str(out), "--profile", str(tmp_path / "profile.txt")])
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["model"] for r in report["results"]] == ["crammed-bert", "BertForMaskedLM (sdpa)"]
    for r in report["results"]:
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]) and len(r["tokens_per_s_all"]) == 2
        assert r["flops_per_seq"] > 0 and math.isfinite(r["final_loss"]) and r["mfu"] is None
        if Path("/proc/self/clear_refs").exists():  # Linux: the CPU peak is measured too
            assert r["peak_mem_mb"] > 0
    assert report["results"][1]["ratio"] == 1.0 and report["num_masked"] == 8
    ours, base = report["results"]
    paired = [a / b for a, b in zip(ours["tokens_per_s_all"], base["tokens_per_s_all"], strict=True)]
    assert ours["ratio_all"] == pytest.approx(paired) and min(paired) <= ours["ratio"] <= max(paired)
    profiled = report["profile"]
    assert (tmp_path / "profile.txt").read_text().count("aten::mm") >= 1 and profiled["time_per_step_ms"] > 0
    assert sum(profiled["shares"].values()) == pytest.approx(1.0) and profiled["shares"]["matmul"] > 0
    table = capsys.readouterr().out
    assert "| crammed-bert |" in table and "tokens/s" in table


def test_both_benchmarks_read_one_set_of_arch_options():
    from cramming.glue import benchmark as glue_bench

    model_args = bench.build_parser().parse_args(["model", "--hidden", "48", "--seq-len", "300"])
    glue_args = glue_bench.build_parser().parse_args(["--hidden", "48", "--seq-len", "300"])
    assert (model_args.arch, glue_args.arch) == ("crammed-bert", "demo")  # each benchmark's own default
    cfg = arch_config(ModelConfig, glue_args)
    # The preset with the overrides: BERT's 4x FFN ratio kept, the positions long enough for --seq-len.
    assert (cfg.name, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.max_seq_len) == ("demo", 48, 192, 4, 300)
    assert arch_config(ModelConfig, model_args).name == "crammed-bert"


def test_bench_rejects_unknown_arch():
    with pytest.raises(SystemExit):
        bench.main(["model", "--arch", "nope"])


def test_bench_export_row_is_timed_against_the_baseline(tmp_path):
    out = tmp_path / "bench.json"
    code = bench.main(["model", "--device", "cpu", "--hidden", "32", "--layers", "2", "--heads", "2", "--vocab", "200",
                       "--seq-len", "32", "--batch-size", "4", "--repeats", "2", "--steps", "1", "--warmup", "1",
                       "--threads", "1", "--export", "--baseline-dropout", "0", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    ours, base, export = report["results"]
    assert [r["model"] for r in report["results"]] == ["crammed-bert", bench.BASELINE, bench.EXPORT]
    assert export["params"] == ours["params"] and math.isfinite(export["final_loss"])
    paired = [a / b for a, b in zip(export["tokens_per_s_all"], base["tokens_per_s_all"], strict=True)]
    assert export["ratio_all"] == pytest.approx(paired) and base["ratio"] == 1.0
    # The export gathers its targets from the labels, so its last block computes every row.
    assert export["flops_per_seq"] > ours["flops_per_seq"]
