"""`gpu.micro_batch_size=auto` on the CPU, with an out-of-memory error injected above a threshold size:
the size chosen, the target batch rounded to it, the cache, a probe that leaves no trace, and a resume
that keeps the size it started with."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_train_loop import records, tiny_arch, tiny_data, train_cfg

from cramming.config import parse_budget, to_dataclass
from cramming.errors import ConfigError
from cramming.gpu import GpuProfile, resolve_gpu
from cramming.train import microbatch
from cramming.train.checkpoint import latest_checkpoint
from cramming.train.loop import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

AUTO = GpuProfile(name="cpu", micro_batch_size="auto", num_workers=0)
FITS_UP_TO = 20  # the injected memory: a micro-batch of more sequences "runs out of memory"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CRAMMING_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / microbatch.CACHE_FILE


def inject_oom(monkeypatch, fits_up_to: int = FITS_UP_TO) -> list[int]:
    """Make a training step of more than `fits_up_to` sequences raise CUDA's out-of-memory error;
    returns the sizes the probe tried (smaller steps really run)."""
    tried: list[int] = []
    real = microbatch.train_step

    def step(model, optimizer, scaler, batch, device, precision) -> None:
        tried.append(len(batch["input_ids"]))
        real(model, optimizer, scaler, batch, device, precision)  # allocate, as a real step does...
        if len(batch["input_ids"]) > fits_up_to:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")  # ...then fail as a full device would

    monkeypatch.setattr(microbatch, "train_step", step)
    return tried


@pytest.mark.parametrize(("fits_up_to", "limit", "largest", "failed_at"),
                         [(20, 100, 16, 24), (3, 100, 3, 4), (500, 100, 100, None), (100, 6, 6, None),
                          (47, 4096, 40, 48)])
def test_search_doubles_then_bisects_in_multiples_of_eight(fits_up_to, limit, largest, failed_at) -> None:
    search = microbatch.largest_fitting(lambda n: n <= fits_up_to, limit)
    assert (search.largest, search.failed_at) == (largest, failed_at)
    assert len(search.tried) <= 2 * max(1, limit).bit_length()


def test_nothing_fits_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not even one sequence fits"):
        microbatch.largest_fitting(lambda n: False, 64)


def test_cache_answers_only_what_it_knows(tmp_path) -> None:
    path, entry = tmp_path / "c.json", {"device": "cpu", "arch": {"name": "x"}, "seq_len": 32, "precision": "fp32",
                                        "ddp": False, "torch": "2.9"}
    assert microbatch.cached(path, entry, 64) is None
    microbatch.remember(path, entry, microbatch.Search(16, 24))
    assert microbatch.cached(path, entry, 64) == 16 and microbatch.cached(path, entry, 8) == 8
    assert microbatch.cached(path, {**entry, "seq_len": 128}, 64) is None  # another model: another entry
    microbatch.remember(path, entry, microbatch.Search(32, None))  # ran up to a limit of 32 without failing
    assert microbatch.cached(path, entry, 32) == 32 and microbatch.cached(path, entry, 64) is None
    path.write_text("{not json")
    assert microbatch.cached(path, entry, 64) is None  # a broken cache is probed again


def test_profile_takes_auto_and_an_unlisted_gpu_defaults_to_it(monkeypatch) -> None:
    assert to_dataclass(GpuProfile, {"micro_batch_size": "auto"}, "gpu").micro_batch_size == "auto"
    with pytest.raises(ConfigError, match="micro_batch_size"):
        to_dataclass(GpuProfile, {"micro_batch_size": "big"}, "gpu")

    class Props:
        total_memory = 24 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: Props())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    auto = OmegaConf.create({"name": "auto", "micro_batch_size": None})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA GeForce RTX 4090")
    unlisted = resolve_gpu(auto)
    assert unlisted.name == "rtxa4000" and unlisted.micro_batch_size == "auto" and unlisted.precision == "bf16"
    auto.micro_batch_size = 64  # the user's number wins
    assert resolve_gpu(auto).micro_batch_size == 64
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA RTX A6000")
    auto.micro_batch_size = None
    assert resolve_gpu(auto).micro_batch_size == 256  # a listed card keeps its profile's number


def test_auto_probes_rounds_the_target_caches_and_leaves_no_trace(data_dir, tmp_path, cache, monkeypatch,
                                                                  caplog) -> None:
    tried = inject_oom(monkeypatch)
    with caplog.at_level(logging.INFO, logger="cramming.train"):
        pretrain(train_cfg(target_batch_size=100, ramp_fraction=0.0), tiny_arch(), AUTO, data_dir, tmp_path / "auto",
                 budget=parse_budget("3steps"))
    assert tried == [8, 16, 32, 24]
    said = [r.getMessage() for r in caplog.records if "micro_batch_size=auto" in r.getMessage()]
    assert len(said) == 1 and "16 sequences" in said[0] and "counted in the budget" in said[0]
    assert "target batch: 96 sequences, 6 micro-batches of 16" in caplog.text  # 100 rounded down to whole ones
    train = [r for r in records(tmp_path / "auto") if r.get("event") != "eval"]
    assert {r["batch_size"] for r in train} == {96}
    saved = OmegaConf.create((latest_checkpoint(tmp_path / "auto") / "config.yaml").read_text())
    assert saved.gpu.micro_batch_size == 16  # the number, not `auto`: a resume keeps it
    (entry,) = json.loads(cache.read_text()).values()
    assert (entry["largest"], entry["failed_at"], entry["device"]) == (16, 24, "cpu")

    # The probe leaves no trace: the same run given 16 by hand computes the same losses.
    pretrain(train_cfg(target_batch_size=100, ramp_fraction=0.0), tiny_arch(),
             GpuProfile(name="cpu", micro_batch_size=16, num_workers=0), data_dir, tmp_path / "manual",
             budget=parse_budget("3steps"))
    assert [r.get("loss") for r in records(tmp_path / "manual")] == [r.get("loss") for r in records(tmp_path / "auto")]

    # The next run on this device and model reads the cache: no probe.
    tried.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cramming.train"):
        pretrain(train_cfg(target_batch_size=100, ramp_fraction=0.0), tiny_arch(), AUTO, data_dir, tmp_path / "again",
                 budget=parse_budget("1steps"))
    assert tried == [] and "16 sequences, cached for cpu" in caplog.text


def test_resume_keeps_the_micro_batch_it_started_with(data_dir, tmp_path, cache, monkeypatch) -> None:
    from cramming.train.trainer import load_job

    inject_oom(monkeypatch)
    run_dir = tmp_path / "run"
    pretrain(train_cfg(target_batch_size=64), tiny_arch(), AUTO, data_dir, run_dir, budget=parse_budget("2steps"))
    # A different answer would come now (less memory, no cache): the resumed run must not ask.
    cache.unlink()
    tried = inject_oom(monkeypatch, fits_up_to=8)
    job = load_job(OmegaConf.create({"resume": str(run_dir)}))  # as `cram pretrain resume=<run>` reads it
    assert job.gpu.micro_batch_size == 16
    pretrain(job.train, tiny_arch(), job.gpu, data_dir, run_dir, budget=parse_budget("4steps"), resume=True)
    assert tried == []
    resumed = [r for r in records(run_dir) if r.get("event") != "eval" and r["step"] > 2]
    assert resumed and all(r["batch_size"] % 16 == 0 for r in resumed)
