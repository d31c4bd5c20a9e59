"""`cram pretrain` end to end through the CLI (Hydra): files, log lines, the missing-data message,
SIGTERM to the whole process group (as a terminal, Slurm or `docker stop` sends it) and
`resume=<run_dir>`."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from cramming.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DATA = ["data.embedded_files=[moby_dick]", "data.max_chars=200000", "data.vocab_size=300", "data.seq_len=32",
        "data.compression_threshold=1.0"]
GPU = ["gpu=cpu", "gpu.micro_batch_size=16", "train.target_batch_size=64", "arch=tiny"]


def _cram(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CRAMMING_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cramming.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw)


def test_missing_data_names_the_command(tmp_path) -> None:
    proc = _cram(["pretrain", *GPU, *DATA, f"paths.data_root={tmp_path}/data", f"paths.out_root={tmp_path}/out",
                  "train.prepare_data=false"], tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "is not prepared" in out and "cram data data=embedded data.embedded_files=[moby_dick]" in out
    assert "drop train.prepare_data=false" in out
    assert "Traceback" not in out
    assert not (tmp_path / "data").exists()  # nothing was prepared


def test_train_stage_does_not_build_data() -> None:
    # Preparing missing data is the CLI's orchestration (cramming.pipeline); the train stage only reads it.
    code = "import sys, cramming.train.trainer; print('cramming.data.prepare' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


# A few optimizer steps: these tests are about what happens around training, not training itself.
SHORT = ["budget=3steps", "train.eval_batches=2", "gpu.num_workers=0"]


def _cram_here(args: list[str], monkeypatch) -> int:
    """`cram ...` in this process (the same Hydra application the console script runs)."""
    from cramming.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.delenv("CRAM_STAGE", raising=False)  # restored after the test; the CLI sets it
    monkeypatch.setenv("CRAMMING_NO_PROGRESS", "1")
    try:
        main(args)
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def test_pretrain_prepares_missing_data_once_and_outside_the_budget(tmp_path, monkeypatch) -> None:
    from cramming.data import prepare as prepare_module
    from cramming.train import loop

    events: list[tuple[str, float]] = []
    real_prepare = prepare_module.prepare

    def recording_prepare(*args, **kwargs):
        folder = real_prepare(*args, **kwargs)
        events.append(("prepared", time.monotonic()))
        return folder

    class RecordingBudget(loop.Budget):
        def __post_init__(self) -> None:
            super().__post_init__()
            events.append(("budget clock starts", self._start))

    monkeypatch.setattr(prepare_module, "prepare", recording_prepare)
    monkeypatch.setattr(loop, "Budget", RecordingBudget)
    common = ["pretrain", *GPU, *DATA, *SHORT, f"paths.data_root={tmp_path}/data", f"paths.out_root={tmp_path}/out"]
    assert _cram_here([*common, "run_name=first"], monkeypatch) == 0
    # Prepared (the default), then trained; the budget's clock started only after preparation ended.
    assert [name for name, _ in events] == ["prepared", "budget clock starts"]
    assert events[1][1] >= events[0][1]
    run = tmp_path / "out" / "pretrain" / "first"
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert len(list((tmp_path / "data").glob("*/manifest.json"))) == 1
    assert "preparing it now, outside the budget" in (run / "pretrain.log").read_text()
    # The next run finds the prepared folder and trains at once.
    events.clear()
    assert _cram_here([*common, "run_name=second"], monkeypatch) == 0
    assert [name for name, _ in events] == ["budget clock starts"]
    assert "preparing" not in (tmp_path / "out" / "pretrain" / "second" / "pretrain.log").read_text()


def test_tilde_paths_mean_home_in_every_stage(tmp_path, monkeypatch) -> None:
    from cramming.report import main as report_main

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "glue").symlink_to(REPO / "cramming" / "assets" / "glue_demo")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    # Quoted for Hydra's override grammar, as in a shell: cram data "paths.data_root='~/dc'".
    paths = ["paths.data_root='~/dc'", "paths.out_root='~/out'", "run_name=r"]
    assert _cram_here(["data", *DATA, *paths], monkeypatch) == 0
    # No preparation allowed: pretrain must find what `cram data` wrote under $HOME/dc.
    assert _cram_here(["pretrain", *GPU, *DATA, *SHORT, *paths, "train.prepare_data=false"], monkeypatch) == 0
    run = home / "out" / "pretrain" / "r"
    assert (run / "final" / "model.safetensors").is_file()
    assert _cram_here(["glue", "gpu=cpu", *paths, "ckpt='~/out/pretrain/r/final'", "glue.data_dir='~/glue'",
                       "glue.tasks=[rte]", "glue.trials=1", "glue.epochs=1", "glue.max_train_examples=16",
                       "glue.max_eval_examples=16"], monkeypatch) == 0
    assert (home / "out" / "glue" / "r" / "results.json").is_file()
    assert report_main(["~/out/pretrain/r"]) == 0 and (run / "report.md").is_file()
    assert list((home / "dc").glob("*/manifest.json"))
    assert not any(p.name == "~" for p in tmp_path.rglob("*")), "a literal ~ folder was created"


def _saved_before_one_home(overrides: list[str], **old: dict) -> DictConfig:
    """A run config as checkpoints saved it before the budget and target batch had one home each."""
    from hydra import compose, initialize_config_dir

    from cramming.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)
    for group, values in old.items():
        cfg[group].update(values)
    return OmegaConf.create(OmegaConf.to_yaml(OmegaConf.create(cfg)))


@pytest.mark.parametrize(
    ("overrides", "old", "budget", "target"),
    [(["budget=24h", "gpu=rtx2080ti"], dict(train=dict(budget_kind="steps", budget_steps=300, budget_tokens=None,
                                                       target_batch_size=None), gpu=dict(target_batch_size=4032)),
      "300steps", 4032),
     (["budget=90m", "gpu=cpu"], dict(train=dict(budget_kind="tokens", budget_steps=None, budget_tokens=400_000),
                                      gpu=dict(target_batch_size=256)), "400000tokens", 4096),
     (["budget=90m", "gpu=cpu", "train=bert-original"],
      dict(train=dict(budget_kind="time", budget_steps=None, budget_tokens=None, target_batch_size=None),
           gpu=dict(target_batch_size=256)), "90m", 256),
     (["budget=1h", "gpu=auto"], dict(train=dict(budget_kind="time", budget_steps=None, budget_tokens=None,
                                                 target_batch_size=None), gpu=dict(target_batch_size=None)),
      "1h", 4096)],
)
def test_saved_config_from_before_one_home_resumes_with_its_budget(overrides, old, budget, target) -> None:
    from cramming.config import parse_budget, to_dataclass
    from cramming.gpu import resolve_gpu
    from cramming.train.config import TrainConfig
    from cramming.train.trainer import upgrade_saved_config

    saved = _saved_before_one_home(overrides, **old)
    with pytest.raises(ConfigError, match="moved"):  # as saved, today's dataclasses reject the old keys
        to_dataclass(TrainConfig, saved.train, "train")
    upgraded = upgrade_saved_config(saved)
    assert upgraded.budget == budget and parse_budget(upgraded.budget) == parse_budget(budget)
    assert to_dataclass(TrainConfig, upgraded.train, "train").target_batch_size == target
    assert "target_batch_size" not in upgraded.gpu
    resolve_gpu(upgraded.gpu)
    assert upgrade_saved_config(copy.deepcopy(upgraded)) == upgraded  # today's configs pass through unchanged


def test_saved_config_from_before_the_decay_keys_resumes_as_it_started() -> None:
    # Runs saved with one flag for vectors and embeddings (false in every recipe) exempted the
    # embedding table; they resume so, while new runs decay it. A saved train.seed becomes the seed.
    from cramming.config import to_dataclass
    from cramming.train.config import TrainConfig
    from cramming.train.trainer import upgrade_saved_config

    saved = _saved_before_one_home(["budget=1h", "gpu=cpu"])
    assert to_dataclass(TrainConfig, saved.train, "train").decay_embeddings  # today's default
    for key in ("decay_embeddings", "decay_norms_biases"):
        del saved.train[key]
    saved.train.decay_norms_biases_embeddings, saved.train.seed = False, 7
    with pytest.raises(ConfigError, match="decay_norms_biases_embeddings moved: it is two keys now"):
        to_dataclass(TrainConfig, saved.train, "train")
    upgraded = upgrade_saved_config(saved)
    train = to_dataclass(TrainConfig, upgraded.train, "train")
    assert not train.decay_embeddings and not train.decay_norms_biases and upgraded.seed == 7


@pytest.mark.slow
def test_cli_sigterm_then_resume(tmp_path) -> None:
    common = [*GPU, *DATA, f"paths.data_root={tmp_path}/data", f"paths.out_root={tmp_path}/out", "run_name=r",
              "train.log_interval=1"]
    run_dir = tmp_path / "out" / "pretrain" / "r"
    proc = _cram(["pretrain", "budget=40s", *common], tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, DataLoader workers included
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "received SIGTERM: checkpoint written" in out and f"resume={run_dir}" in out
    steps_before = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    assert steps_before >= 3

    proc = _cram(["pretrain", f"resume={run_dir}"], tmp_path)  # the saved config is used
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "finished; model exported to" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] > steps_before and summary["elapsed_s"] <= 40 + 1.5
    assert summary["arch"] == "tiny" and summary["train_recipe"] == "cramming"
    for name in ("final/model.safetensors", "final/config.json", "final/tokenizer.json", "loss.png", "metrics.jsonl",
                 ".hydra/config.yaml"):
        assert (run_dir / name).is_file(), name
    assert "pretraining tiny/cramming" in (run_dir / "pretrain.log").read_text()
