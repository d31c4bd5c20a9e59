"""The config boundary: budgets, GPU profiles, strict dataclass conversion, composition of every shipped config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cramming.config import CONFIG_DIR, config_hash, parse_budget, resolve_paths, to_dataclass
from cramming.errors import ConfigError
from cramming.gpu import GpuProfile, available_profiles, load_profile, resolve_gpu


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("24h", 86400), ("90m", 5400), ("45s", 45), ("1.5h", 5400), ("1d", 86400), ("24", 86400),
     (24, 86400), (0.5, 1800), (" 2H ", 7200), (".5m", 30), ("10M", 600)],
)
def test_budget_forms(text, seconds):
    assert parse_budget(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["banana", "", "h", "24x", "1h30m", "-3h", "0", "0h", 0, -1, "nan", "inf", True, "1e3h"])
def test_budget_rejects_with_accepted_forms(bad):
    with pytest.raises(ConfigError) as err:
        parse_budget(bad)
    assert "24h" in str(err.value) and "90m" in str(err.value)


def test_all_profiles_load_and_follow_the_paper():
    names = available_profiles()
    assert set(names) >= {"cpu", "rtx2080ti", "rtxa4000", "rtxa6000", "a100", "h100"}
    profiles = {n: load_profile(n) for n in names}
    assert profiles["rtx2080ti"].micro_batch_size == 96
    assert profiles["rtx2080ti"].precision == "fp16"  # Turing has no bf16
    assert profiles["rtx2080ti"].target_batch_size == 4032
    assert profiles["rtxa4000"].micro_batch_size == 128
    assert profiles["rtxa6000"].micro_batch_size == 256
    for name in ("rtxa4000", "rtxa6000", "a100", "h100"):
        assert profiles[name].precision == "bf16"
        assert profiles[name].target_batch_size == 4096
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
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert gpu.detect_profile_name() == expected


def test_profile_validation():
    with pytest.raises(ConfigError, match="target_batch_size"):
        GpuProfile(micro_batch_size=64, target_batch_size=32)
    with pytest.raises(ConfigError, match="precision"):
        GpuProfile(precision="int8")


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
