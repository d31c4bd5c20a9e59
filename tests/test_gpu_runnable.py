"""A GPU profile this machine cannot run stops the stage before any work, with one actionable line.

The unit tests emulate each machine by patching torch's CUDA queries; the CLI tests run `cram`
with no GPU visible (CUDA_VISIBLE_DEVICES=""), which is this machine on a CPU build of torch and
"a CUDA build that sees no GPU" on a GPU machine: both messages name the same way out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cramming.errors import ConfigError
from cramming.gpu import GpuProfile, available_profiles, load_profile, require_runnable

CUDA_PROFILES = [name for name in available_profiles() if load_profile(name).device == "cuda"]


def machine(monkeypatch: pytest.MonkeyPatch, built: bool, gpu: str | None = None, bf16: bool = False) -> None:
    """Emulate torch's view of a machine: a CUDA build or not, and the visible GPU (None: none).

    is_bf16_supported answers True with its default including_emulation=True, as torch >= 2.3 does
    on a Turing card, so only the check that asks for native bf16 sees `bf16`.
    """
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)


def refusal(profile: GpuProfile) -> str:
    with pytest.raises(ConfigError) as err:
        require_runnable(profile)
    message = str(err.value)
    assert "\n" not in message  # the CLI prints it as one line
    return message


@pytest.mark.parametrize("name", CUDA_PROFILES)
def test_cpu_build_of_torch_names_gpu_cpu_auto_and_the_cuda_install(monkeypatch, name):
    machine(monkeypatch, built=False)
    message = refusal(load_profile(name))
    assert f"gpu={name} needs a CUDA GPU" in message and "CPU build" in message
    assert "gpu=cpu" in message and "gpu=auto" in message
    assert "pip install" in message and "--index-url https://download.pytorch.org/whl/cu" in message


def test_cuda_build_without_a_visible_gpu_names_cuda_visible_devices_and_the_driver(monkeypatch):
    machine(monkeypatch, built=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    message = refusal(load_profile("rtx2080ti"))
    assert "sees none with CUDA_VISIBLE_DEVICES=''" in message and "driver" in message and "nvidia-smi" in message
    assert "gpu=cpu" in message and "gpu=auto" in message
    assert "CPU build" not in message


@pytest.mark.parametrize("name", [n for n in CUDA_PROFILES if load_profile(n).precision == "bf16"])
def test_bf16_profile_on_a_gpu_without_bf16_names_fp16(monkeypatch, name):
    machine(monkeypatch, built=True, gpu="NVIDIA GeForce RTX 2080 Ti", bf16=False)
    message = refusal(load_profile(name))
    assert f"gpu={name} runs in bf16" in message and "NVIDIA GeForce RTX 2080 Ti" in message
    assert "gpu.precision=fp16" in message and "gpu=auto" in message


@pytest.mark.parametrize(("name", "gpu", "bf16"), [
    ("rtx2080ti", "NVIDIA GeForce RTX 2080 Ti", False),  # fp16 needs no bf16
    ("a100", "NVIDIA A100-SXM4-80GB", True),
])
def test_profiles_the_gpu_runs_pass(monkeypatch, name, gpu, bf16):
    machine(monkeypatch, built=True, gpu=gpu, bf16=bf16)
    require_runnable(load_profile(name))


@pytest.mark.parametrize("built", [False, True])
def test_cpu_profiles_run_anywhere(monkeypatch, built):
    machine(monkeypatch, built=built)
    require_runnable(load_profile("cpu"))
    # A bf16 request on the CPU runs fp32 (cramming.optim.precision), so it is no reason to stop.
    require_runnable(GpuProfile(device="cpu", precision="bf16"))


def test_the_message_quotes_what_the_caller_asked_for(monkeypatch):
    machine(monkeypatch, built=False)
    with pytest.raises(ConfigError, match=r"^--device cuda needs a CUDA GPU"):
        require_runnable(GpuProfile(device="cuda"), "--device cuda")


# ---------------------------------------------------------------------------------------------
# The CLI, with no GPU visible
# ---------------------------------------------------------------------------------------------


def cram(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "cramming.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def paths(tmp_path: Path) -> list[str]:
    return [f"paths.data_root={tmp_path / 'data'}", f"paths.out_root={tmp_path / 'out'}"]


def assert_refused(out: subprocess.CompletedProcess, stage: str, *names: str) -> str:
    """Exit 2 with one error line (no traceback) that names each of `names`; returns that line."""
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith(f"cram {stage}: error:")]
    assert len(errors) == 1 and "needs a CUDA GPU" in errors[0], out.stderr
    for name in names:
        assert name in errors[0]
    return errors[0]


def test_cram_pretrain_on_the_design_card_stops_before_preparing_data(tmp_path):
    out = cram("pretrain", "budget=24h", "gpu=rtx2080ti", "data=embedded", *paths(tmp_path), cwd=tmp_path)
    assert_refused(out, "pretrain", "gpu=rtx2080ti", "gpu=cpu", "gpu=auto")
    assert not (tmp_path / "data").exists()


def test_cram_glue_stops_before_reading_the_checkpoint(tmp_path):
    out = cram("glue", "gpu=a100", f"ckpt={tmp_path / 'missing'}", *paths(tmp_path), cwd=tmp_path)
    assert_refused(out, "glue", "gpu=a100", "gpu=cpu", "gpu=auto")


@pytest.mark.parametrize("args", [["model", "--device", "cuda"], ["model", "--emulate", "rtx2080ti"],
                                  ["glue", "--device", "cuda"]])
def test_cram_bench_names_the_cpu_flag(tmp_path, args):
    out = cram("bench", *args, "--out", str(tmp_path / "bench.json"), cwd=tmp_path)
    assert_refused(out, "bench", args[-2] + " " + args[-1], "--device cpu")
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("gpu", ["cpu", "auto"])
def test_gpu_cpu_and_auto_pass_the_check(tmp_path, gpu):
    # With train.prepare_data=false the stage stops at the missing data folder, right after the check.
    out = cram("pretrain", "budget=1m", f"gpu={gpu}", "train.prepare_data=false", *paths(tmp_path), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "is not prepared" in out.stderr and "needs a CUDA GPU" not in out.stderr
    out = cram("glue", f"gpu={gpu}", f"ckpt={tmp_path / 'missing'}", *paths(tmp_path), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "missing" in out.stderr and "needs a CUDA GPU" not in out.stderr
