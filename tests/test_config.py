"""The config boundary: budgets, GPU profiles, strict dataclass conversion, composition of every shipped config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cramming.config import CONFIG_DIR, BudgetSpec, config_hash, parse_budget, resolve_paths, to_dataclass
from cramming.errors import ConfigError
from cramming.gpu import GpuProfile, available_profiles, load_profile, resolve_gpu


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("24h", 86400), ("90m", 5400), ("45s", 45), ("1.5h", 5400), ("1d", 86400), ("24", 86400),
     (24, 86400), (0.5, 1800), (" 2H ", 7200), (".5m", 30), ("10M", 600)],
)
def test_budget_forms(text, seconds):
    spec = parse_budget(text)
    assert spec.kind == "time" and spec.amount == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "kind", "amount"),
    [("300steps", "steps", 300), ("1step", "steps", 1), (" 2 Steps ", "steps", 2), ("1e3steps", "steps", 1000),
     ("400ktokens", "tokens", 400_000), ("2.5Mtokens", "tokens", 2_500_000), ("1e9tokens", "tokens", 1e9),
     ("1.1ktokens", "tokens", 1100), ("1token", "tokens", 1), ("3Gtokens", "tokens", 3e9), ("64 TOKENS", "tokens", 64)],
)
def test_budget_counts(text, kind, amount):
    assert parse_budget(text) == BudgetSpec(kind, amount)


@pytest.mark.parametrize("spec", [BudgetSpec("time", 5400), BudgetSpec("time", 0.5), BudgetSpec("steps", 300),
                                  BudgetSpec("tokens", 2.5e6), BudgetSpec("tokens", 1e20)])
def test_budget_spec_text_parses_back(spec):
    assert parse_budget(str(spec)) == spec


@pytest.mark.parametrize("bad", ["banana", "", "h", "24x", "1h30m", "-3h", "0", "0h", 0, -1, "nan", "inf", True, "1e3h",
                                 "0steps", "-5steps", "2.5steps", "1.5tokens", "steps", "10Ksteps5", "1e9999tokens",
                                 "5 tokens steps", "3epochs"])
def test_budget_rejects_with_accepted_forms(bad):
    with pytest.raises(ConfigError) as err:
        parse_budget(bad)
    message = str(err.value)
    assert repr(bad) in message
    assert all(form in message for form in ("24h", "90m", "300steps", "400ktokens"))


def test_budget_spec_validates():
    with pytest.raises(ConfigError, match="budget.kind='epochs' must be one of: time, tokens, steps"):
        BudgetSpec("epochs", 1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="budget.amount must be a positive number"):
        BudgetSpec("steps", 0)


def test_all_profiles_load_and_follow_the_paper():
    names = available_profiles()
    assert set(names) >= {"cpu", "rtx2080ti", "rtxa4000", "rtxa6000", "a100", "h100"}
    profiles = {n: load_profile(n) for n in names}
    assert profiles["rtx2080ti"].micro_batch_size == 96
    assert profiles["rtx2080ti"].precision == "fp16"  # Turing has no bf16
    assert profiles["rtxa4000"].micro_batch_size == 128
    assert profiles["rtxa6000"].micro_batch_size == 256
    for name in ("rtxa4000", "rtxa6000", "a100", "h100"):
        assert profiles[name].precision == "bf16"
    assert profiles["cpu"].precision == "fp32" and profiles["cpu"].device == "cpu"
    assert not profiles["cpu"].compile


def test_unknown_profile_lists_choices():
    with pytest.raises(ConfigError, match="rtx2080ti"):
        load_profile("gtx480")


def test_auto_profile_without_cuda_is_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = OmegaConf.load(CONFIG_DIR / "gpu" / "auto.yaml")
    assert resolve_gpu(auto).name == "cpu"
    auto.micro_batch_size = 4
    profile = resolve_gpu(auto)
    assert profile.micro_batch_size == 4 and profile.precision == "fp32"


@pytest.mark.parametrize(
    ("device_name", "bf16", "memory_gb", "expected"),
    [("NVIDIA GeForce RTX 2080 Ti", False, 11, "rtx2080ti"), ("NVIDIA RTX A4000", True, 16, "rtxa4000"),
     ("NVIDIA RTX A6000", True, 48, "rtxa6000"), ("NVIDIA A100-SXM4-80GB", True, 80, "a100"),
     ("NVIDIA H100 80GB HBM3", True, 80, "h100"),
     # Unlisted cards fall back to the closest profile by memory, with bf16 only where supported.
     ("NVIDIA GeForce RTX 4090", True, 24, "rtxa4000"), ("Tesla T4", False, 15, "rtx2080ti")],
)
def test_auto_profile_detection(monkeypatch, device_name, bf16, memory_gb, expected):
    import torch

    from cramming import gpu

    class Props:
        total_memory = memory_gb * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: device_name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: Props())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert gpu.detect_profile_name() == expected


def test_profile_validation():
    with pytest.raises(ConfigError, match="gpu.micro_batch_size must be >= 1, got 0"):
        GpuProfile(micro_batch_size=0)
    with pytest.raises(ConfigError, match="gpu.precision='int8' must be one of: fp32, bf16, fp16"):
        GpuProfile(precision="int8")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="gpu.device='tpu' must be one of: cpu, cuda"):
        GpuProfile(device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="gpu.num_workers must be >= 0"):
        GpuProfile(num_workers=-1)


def test_moved_keys_say_where_they_live_now():
    from cramming.train.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        to_dataclass(TrainConfig, {"budget_kind": "steps", "budget_steps": 300}, "train")
    message = str(err.value)
    assert "train.budget_kind moved" in message and "budget=<N>steps" in message and "valid keys are" in message
    with pytest.raises(ConfigError, match=r"gpu.target_batch_size moved: use train.target_batch_size=<N>"):
        to_dataclass(GpuProfile, {"target_batch_size": 4096}, "gpu")
    # Through Hydra, an added (+) key reaches the dataclass and gets the same hint.
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+train.budget_tokens=1000"])
    with pytest.raises(ConfigError, match=r"train.budget_tokens moved: use budget=<N>tokens"):
        to_dataclass(TrainConfig, cfg.train, "train")


@dataclasses.dataclass
class _Inner:
    depth: int = 1


@dataclasses.dataclass
class _Outer:
    name: str = "x"
    rate: float = 0.5
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    sizes: list[int] = dataclasses.field(default_factory=list)


def test_to_dataclass_converts_nested_and_coerces_ints():
    out = to_dataclass(_Outer, OmegaConf.create({"rate": 1, "inner": {"depth": 3}, "sizes": [1, 2]}), "grp")
    assert out == _Outer(name="x", rate=1.0, inner=_Inner(depth=3), sizes=[1, 2])
    assert isinstance(out.rate, float)


def test_to_dataclass_rejects_unknown_keys_and_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        to_dataclass(_Outer, {"rat": 0.1}, "grp")
    assert "grp.rat" in str(err.value) and "rate" in str(err.value) and "inner" in str(err.value)
    with pytest.raises(ConfigError, match="grp.inner.deep"):
        to_dataclass(_Outer, {"inner": {"deep": 2}}, "grp")


def test_config_hash_is_stable_and_sensitive():
    a = config_hash({"a": 1, "b": [1, 2]})
    assert a == config_hash({"b": [1, 2], "a": 1})
    assert a != config_hash({"a": 2, "b": [1, 2]})
    assert config_hash(_Outer()) == config_hash(dataclasses.asdict(_Outer()))


def _group_options() -> list[tuple[str, str]]:
    groups = [p for p in Path(CONFIG_DIR).iterdir() if p.is_dir()]
    return sorted((g.name, f.stem) for g in groups for f in g.glob("*.yaml"))


def _group_dataclasses() -> dict:
    from cramming.data.prepare import DataConfig
    from cramming.glue import GlueConfig
    from cramming.model.bert import ModelConfig
    from cramming.train.config import TrainConfig

    return {"gpu": GpuProfile, "arch": ModelConfig, "data": DataConfig, "train": TrainConfig, "glue": GlueConfig}


@pytest.mark.parametrize(("group", "option"), [g for g in _group_options() if g[0] != "experiment"])
def test_every_shipped_config_composes_into_its_dataclass(group, option):
    # data=local needs the user's files; any path will do for composition.
    extra = ["data.local_paths=[corpus]"] if (group, option) == ("data", "local") else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{group}={option}", *extra])
    assert cfg[group].name == option
    # Every key of every shipped option is a field of its stage's dataclass, and its values validate.
    node = resolve_gpu(cfg.gpu) if group == "gpu" else to_dataclass(_group_dataclasses()[group], cfg[group], group)
    assert node.name == (option if option != "auto" else node.name)
    OmegaConf.to_container(cfg, resolve=False)


def test_resolve_paths_expands_home_in_configured_paths_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "paths.data_root='~/dc'", "paths.out_root='~/out'", "resume='~/out/pretrain/r'", "ckpt=random-init",
            "glue.data_dir='~/glue'", "data=local", "data.local_paths=['~/corpus.txt']"])
    resolved = resolve_paths(cfg)
    assert resolved.paths.data_root == f"{tmp_path}/dc" and resolved.paths.out_root == f"{tmp_path}/out"
    assert resolved.resume == f"{tmp_path}/out/pretrain/r" and resolved.glue.data_dir == f"{tmp_path}/glue"
    assert resolved.ckpt == "random-init" and resolved.glue.tokenizer is None
    # The data config is the prepared folder's cache key: left as written, in every stage alike.
    assert list(resolved.data.local_paths) == ["~/corpus.txt"]
    assert cfg.paths.data_root == "~/dc"  # a copy; the composed config is not changed


def test_hydra_output_dirs_expand_home(tmp_path, monkeypatch):
    # Hydra creates these folders before a stage runs: a `~` must not become a literal folder.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CRAM_STAGE", "pretrain")  # names the stage's folder, as `cram pretrain` sets it
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["paths.out_root='~/out'", "run_name=r",
                                                       "+experiment=lr-schedule"], return_hydra_config=True)
    assert cfg.hydra.run.dir == f"{tmp_path}/out/pretrain/r"
    assert cfg.hydra.sweep.dir.startswith(f"{tmp_path}/out/experiment/lr-schedule-")
