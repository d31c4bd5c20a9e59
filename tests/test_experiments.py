"""Experiment presets (configs/experiment/) and their runner (cramming/experiment.py).

Every preset must compose with Hydra at both scales, expand into the intended sweep points, and
every point must convert into the stages' typed configs without unknown keys. The runner's
--dry-run must print the exact commands. One slow test runs a tiny preset end to end.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from cramming import experiment
from cramming.config import to_dataclass
from cramming.data.prepare import DataConfig
from cramming.glue import GlueConfig
from cramming.gpu import GpuProfile, resolve_gpu
from cramming.model.bert import ModelConfig
from cramming.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
PRESETS = experiment.available_presets()
EXPECTED = {"cramming-ablation": 4, "roberta-masking": 9, "random-ltd": 2, "shape-sweep": 4,
            "batch-schedule": 2, "lr-schedule": 3, "vocab-size": 4}


@functools.cache
def _points(name: str, scale: str, *extra: str) -> list[tuple[experiment.Point, Any]]:
    """The sweep points of a preset with their composed configs (cached: composing takes a while)."""
    overrides = experiment.base_overrides(name, scale, extra=list(extra))
    points = experiment.sweep_points(overrides, Path("/tmp/sweep"))
    return [(p, experiment.compose(p.overrides)) for p in points]


def test_all_issue_presets_are_shipped() -> None:
    assert sorted(EXPECTED) == PRESETS


@pytest.mark.parametrize("scale", experiment.SCALES)
@pytest.mark.parametrize("name", PRESETS)
def test_preset_points_compose_into_stage_configs(name: str, scale: str) -> None:
    points = _points(name, scale)
    assert len(points) == EXPECTED[name]
    labels = [p.label for p, _ in points]
    assert len(set(labels)) == len(labels), f"sweep points share a label: {labels}"
    for point, cfg in points:
        assert cfg.hydra.sweeper.params, "the preset must set hydra.sweeper.params"
        sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
        assert sweep["subdir"] == "${hydra.job.num}_${experiment.point}"
        arch = to_dataclass(ModelConfig, cfg.arch, "arch")
        to_dataclass(TrainConfig, cfg.train, "train")
        to_dataclass(DataConfig, cfg.data, "data")
        to_dataclass(GlueConfig, cfg.glue, "glue")
        assert isinstance(resolve_gpu(cfg.gpu), GpuProfile)
        assert arch.hidden_size % arch.num_heads == 0
        assert cfg.train.prepare_data is True  # points with their own data prepare it themselves
        assert cfg.experiment.name == name and cfg.experiment.scale == scale
        assert point.run_dir.name == f"{point.num}_{point.label}"
        if scale == "tiny":
            assert arch.hidden_size <= 192 and arch.num_layers <= 8, "tiny must stay CPU-sized"
            assert cfg.budget == "90s"
            assert cfg.glue.data_dir == "cramming/assets/glue_demo" and cfg.glue.trials == 1
        else:
            assert cfg.budget == "24h"  # config.yaml's default: the full scale changes nothing


@pytest.mark.parametrize("scale", experiment.SCALES)
def test_budget_and_gpu_pass_through(scale: str) -> None:
    overrides = experiment.base_overrides("lr-schedule", scale, budget="7m", gpu="cpu")
    for point in experiment.sweep_points(overrides, Path("/tmp/sweep")):
        cfg = experiment.compose(point.overrides)
        assert cfg.budget == "7m"
        assert cfg.gpu.name == "cpu"


def test_cramming_ablation_resets_one_group_per_point() -> None:
    cfgs = {p.label: c for p, c in _points("cramming-ablation", "full")}
    full = cfgs["full-recipe"]
    assert (full.arch.name, full.train.name, full.data.compression_filter, full.data.sorting) == \
        ("crammed-bert", "cramming", True, "prevalence")
    assert cfgs["bert-arch"].arch.name == "bert-original" and cfgs["bert-arch"].train.name == "cramming"
    assert cfgs["bert-arch"].arch.norm_position == "post"
    assert cfgs["bert-train"].train.name == "bert-original" and cfgs["bert-train"].arch.name == "crammed-bert"
    assert cfgs["bert-train"].train.lr == pytest.approx(1e-4)
    data = cfgs["bert-data"]
    assert (data.data.compression_filter, data.data.sorting, data.arch.name, data.train.name) == \
        (False, "shuffle", "crammed-bert", "cramming")
    # The sorted order must reach the model, and the loss must be measured the same way for all.
    assert all(c.train.shuffle is False and c.train.eval_mask_rate == 0.15 for c in cfgs.values())


def test_cramming_ablation_tiny_keeps_the_bert_arch_choices_at_a_small_size() -> None:
    cfgs = {p.label: c for p, c in _points("cramming-ablation", "tiny")}
    arch = to_dataclass(ModelConfig, cfgs["bert-arch"].arch, "arch")
    assert (arch.hidden_size, arch.num_layers) == (128, 4)
    assert (arch.norm_position, arch.position, arch.ffn, arch.bias, arch.dropout) == ("post", "learned", "gelu", True, 0.1)
    train = to_dataclass(TrainConfig, cfgs["bert-train"].train, "train")
    assert (train.ramp_fraction, train.target_batch_size, train.lr_schedule) == (0.0, 128, "linear")


def test_random_ltd_off_vs_on() -> None:
    cfgs = {p.label: c for p, c in _points("random-ltd", "tiny")}
    assert set(cfgs) == {"cramming", "random-ltd"}
    assert cfgs["cramming"].train.random_ltd.enabled is False
    assert cfgs["random-ltd"].train.random_ltd.enabled is True
    assert cfgs["random-ltd"].train.random_ltd.layer_token_lr is True


def test_shape_sweep_gives_each_shape_its_own_size_at_both_scales() -> None:
    for scale, base in (("full", (16, 768)), ("tiny", (4, 128))):
        cfgs = {p.label: c for p, c in _points("shape-sweep", scale)}
        shapes = {label: (c.arch.num_layers, c.arch.hidden_size) for label, c in cfgs.items()}
        assert shapes["crammed-bert-16x768"] == base
        assert len(set(shapes.values())) == len(shapes), shapes
        depth = {label: s[0] for label, s in shapes.items()}
        assert depth["deep-narrow-32x512"] > depth["crammed-bert-16x768"] > depth["wide-shallow-8x1024"]
    full = {p.label: c for p, c in _points("shape-sweep", "full")}
    assert (full["deep-narrow-24x640"].arch.num_layers, full["deep-narrow-24x640"].arch.hidden_size) == (24, 640)
    assert full["wide-shallow-8x1024"].arch.intermediate_size == 4096


def test_roberta_masking_crosses_static_dynamic_with_the_rate() -> None:
    points = _points("roberta-masking", "tiny")
    seen = set()
    for point, cfg in points:
        data = to_dataclass(DataConfig, cfg.data, "data")
        static = data.static_masking_copies > 0
        assert point.label.startswith("static" if static else "dynamic")
        if static:
            assert data.static_mask_rate == cfg.train.mask_rate  # masks stored at the run's rate
        # Only the dynamic-doc-bounded point keeps rows inside documents (DOC-SENTENCES).
        assert data.packing == ("doc-bounded" if point.label.startswith("dynamic-doc-bounded") else "full-sentences")
        seen.add((static, data.packing, cfg.train.mask_rate))
        assert cfg.train.eval_mask_rate == 0.15
    assert seen == {(s, p, r) for s, p in ((False, "full-sentences"), (True, "full-sentences"), (False, "doc-bounded"))
                    for r in (0.15, 0.25, 0.4)}
    # The tiny corpus is small enough to be read several times (static masks then recur).
    assert points[0][1].data.max_chars == 400000


def test_schedules_and_vocab_points() -> None:
    lr = {c.train.lr_schedule for _, c in _points("lr-schedule", "tiny")}
    assert lr == {"one-cycle", "linear", "cosine"}
    ramps = {c.train.ramp_fraction for _, c in _points("batch-schedule", "tiny")}
    assert ramps == {0.0, 0.6}
    vocab = _points("vocab-size", "tiny")
    assert {c.data.vocab_size for _, c in vocab} == {2**13, 2**14, 2**15, 2**16}
    assert all(c.data.max_chars is None and c.train.prepare_data for _, c in vocab)  # whole corpus at tiny


def test_a_command_line_sweep_replaces_the_presets() -> None:
    points = _points("batch-schedule", "tiny", "train.ramp_fraction=0.0,0.3,0.9")
    assert [c.train.ramp_fraction for _, c in points] == [0.0, 0.3, 0.9]


def test_unknown_preset_and_scale_are_config_errors() -> None:
    from cramming.errors import ConfigError

    with pytest.raises(ConfigError, match="cramming-ablation"):
        experiment.base_overrides("no-such-preset", "tiny")
    with pytest.raises(ConfigError, match="tiny"):
        experiment.base_overrides("random-ltd", "huge")


def test_dry_run_prints_the_exact_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    code = experiment.main(["random-ltd", "--scale", "tiny", "--budget", "2m", "--gpu", "cpu", "--out", str(out),
                            "--dry-run", "glue.trials=2", "seed=3"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    demo = experiment.GLUE_DEMO_DIR
    assert f"cram pretrain -m +experiment=random-ltd +experiment/scale=tiny budget=2m gpu=cpu seed=3 " \
           f"hydra.sweep.dir={out}" in lines
    for label in ("0_cramming", "1_random-ltd"):
        assert (f"cram glue ckpt={out / label / 'final'} +experiment/scale=tiny glue.trials=2 seed=3 gpu=cpu "
                f"glue.data_dir={demo} hydra.run.dir={out / ('glue_' + label)}") in lines
    assert f"cram report {out} --out {out / 'report'} --name 'random-ltd (tiny)'" in lines
    assert not out.exists()  # nothing ran


def test_dry_run_wrapper_script(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "run_experiment.py"), "shape-sweep", "--dry-run",
                           "--out", str(tmp_path / "s"), "data=c4-filtered"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cram pretrain -m +experiment=shape-sweep +experiment/scale=full data=c4-filtered" in proc.stdout
    assert proc.stdout.count("cram glue ckpt=") == 4
    assert "glue_demo" not in proc.stdout  # full scale: the real GLUE tasks
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "run_experiment.py"), "nope", "--dry-run"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "choose one of" in bad.stderr


@pytest.mark.slow
def test_tiny_random_ltd_end_to_end(tmp_path: Path) -> None:
    """The whole runner on a shortened tiny random-ltd: sweep, GLUE, report, experiment table."""
    out = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "run_experiment.py"), "random-ltd", "--scale", "tiny", "--gpu", "cpu",
           "--budget", "25s", "--out", str(out), f"paths.data_root={tmp_path / 'data'}", "data.max_chars=1500000",
           "glue.tasks=[rte,sst2]", "glue.epochs=1", "glue.max_train_examples=128", "glue.max_eval_examples=128"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["point"]: r for r in json.loads((out / "experiment.json").read_text())["rows"]}
    assert set(rows) == {"cramming", "random-ltd"}
    assert rows["cramming"]["layer_tokens_saved"] == 0
    assert rows["random-ltd"]["layer_tokens_saved"] > 0
    for r in rows.values():
        assert r["steps"] > 0 and r["val_loss"] is not None
        assert set(r["glue"]) == {"RTE", "SST-2"}
    table = (out / "experiment.md").read_text()
    assert "layer-tokens saved" in table and "| random-ltd |" in table
    report = (out / "report" / "report.md").read_text()
    assert "0_cramming" in report and "1_random-ltd" in report


def test_experiment_table_reads_run_folders(tmp_path: Path) -> None:
    """The table's numbers come from the files of docs/design.md (summary, metrics, config, results)."""
    run, glue = tmp_path / "1_random-ltd", tmp_path / "glue_1_random-ltd"
    (run / ".hydra").mkdir(parents=True)
    glue.mkdir()
    (run / ".hydra" / "config.yaml").write_text(
        "experiment: {tiny: {arch: {num_layers: 4}}}\n"
        "arch: {name: crammed-bert, hidden_size: 128, num_layers: '${oc.select:experiment.tiny.arch.num_layers,2}'}\n"
        "train: {name: random-ltd, eval_mask_rate: 0.15}\n")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"event": "eval", "step": 0, "elapsed_s": 1.0, "val_loss": 9.0},
        {"step": 10, "elapsed_s": 5.0, "loss": 8.0}, {"step": 30, "elapsed_s": 15.0, "loss": 7.0}]) + "\n")
    (run / "summary.json").write_text(json.dumps({
        "steps": 30, "tokens_seen": 1_000_000, "tokens_per_s": 5000.0, "final_loss": 7.0, "val_loss": 7.5,
        "layer_tokens_saved": 1_000_000, "device": "cpu", "budget_s": 90.0, "elapsed_s": 88.0}))
    (glue / "results.json").write_text(json.dumps({"tasks": {}, "glue": {
        "columns": {"RTE": 52.0, "SST-2": 60.0, "CoLA": None}, "average": None, "mean_of_columns_run": 56.0}}))
    point = experiment.Point(1, "random-ltd", ["train=random-ltd"], ["train=random-ltd"], run, glue)
    row = experiment.point_row(point)
    assert row["shape"] == "4x128"  # the saved config's interpolation is resolved
    assert row["s_per_step"] == pytest.approx(0.5)
    assert row["layer_tokens_saved_share"] == pytest.approx(0.25)
    assert row["glue"] == {"RTE": 52.0, "SST-2": 60.0} and row["glue_mean_run"] == 56.0
    table = experiment.experiment_table([row])
    assert table[0].split(" | ")[-1] == "GLUE mean (tasks run) |"
    assert "| random-ltd | 4x128 | 30 | 0.50 | 1.00M | 5000 | 7.000 | 7.500 | 1.0M (25%) | 60.0 | 52.0 | 56.0 |" in table
