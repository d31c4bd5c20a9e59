"""`cram bench`: training-step throughput, memory and MFU of crammed-bert against transformers' BERT.

    cram bench model [--device cuda --precision bf16 --compile] [--hidden 256 --layers 4 --vocab 8192]
    cram bench model --device cuda --emulate rtx2080ti      # does the profile's micro-batch fit in 11 GB?
    cram bench model --export --baseline-dropout 0           # + the exported class, stepped as Trainer does
    cram bench data ...                                      # cramming.data.benchmark (loader throughput)
    cram bench glue ...                                      # cramming.glue.benchmark (finetuning, trials side by side)

`model` times full training steps (forward + backward + AdamW step) of the models in the same
process, interleaved (A B, B A, ...), warm-up excluded, and reports medians over repeats. All get
their best settings: fused AdamW (CUDA and CPU), autocast at --precision, torch.compile with --compile.
Inputs are random token ids with a fixed number of masked positions per row (25% by default):
crammed-bert scores only those (sparse prediction, static shapes); BertForMaskedLM gets the same
labels (-100 elsewhere) and computes its dense head, as it always does. With --export, the
exported `CrammedBertHFForMaskedLM` (what `AutoModelForMaskedLM` loads) runs too, called as
`transformers.Trainer` calls it: `model(input_ids=..., labels=...).loss`, so its sparse head gathers
the labelled rows itself; it keeps the default dense gradient of the tied embedding.

Peak memory per model = its resident state (weights, gradients, AdamW moments) + the most its
steps allocated on top, over one untimed step after the timed ones: from the CUDA allocator's
peak on GPU, from the kernel's resident-set high-water mark (reset first) on Linux CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, get_args

import torch

from cramming.benchtools import add_arch_options, add_out_option, arch_config, cpu_name, write_json_report
from cramming.gpu import Fixes, GpuProfile, Precision, load_profile, match_profile, require_runnable
from cramming.model.bert import CrammedBertForMLM, ModelConfig, count_parameters, training_flops_per_sequence

BASELINE = "BertForMaskedLM (sdpa)"
EXPORT = "CrammedBertHFForMaskedLM (export)"


def baseline_model(cfg: ModelConfig, seq_len: int, dropout: float) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    hf = BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(512, seq_len), hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return BertForMaskedLM._from_config(hf, attn_implementation="sdpa")


def export_model(cfg: ModelConfig) -> torch.nn.Module:
    """The exported transformers class with the same architecture (fresh weights)."""
    from cramming.model.export import CrammedBertConfig, CrammedBertHFForMaskedLM

    return CrammedBertHFForMaskedLM(CrammedBertConfig(**dataclasses.asdict(cfg)))


def baseline_flops_config(cfg: ModelConfig) -> ModelConfig:
    """BertForMaskedLM's shape as a ModelConfig, only for counting its FLOPs (dense head)."""
    return dataclasses.replace(cfg, ffn="gelu", head="nonlinear", sparse_prediction=False)


def detect_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The shipped profile's dense tensor peak for this GPU; None on CPU or in fp32 (no such peak)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    profile = match_profile(torch.cuda.get_device_name(device))
    return profile.peak_tflops if profile else None


def make_batches(cfg: ModelConfig, batch: int, seq_len: int, num_masked: int, device: torch.device, n: int = 4):
    """A few random masked batches (rotated through) with exactly `num_masked` targets per row."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(5, cfg.vocab_size, (batch, seq_len), generator=g)
        positions = torch.rand(batch, seq_len, generator=g).argsort(dim=1)[:, :num_masked].sort(dim=1).values
        labels = torch.full_like(ids, -100).scatter(1, positions, ids.gather(1, positions))
        ids = ids.scatter(1, positions, 4)  # [MASK]
        out.append(tuple(t.to(device) for t in (ids, labels, positions)))
    return out


class Runner:
    """One model with its optimizer and step function."""

    def __init__(self, name: str, model: torch.nn.Module, ours: bool, args: argparse.Namespace, device: torch.device,
                 flops_per_seq: float) -> None:
        self.name, self.ours, self.args, self.device = name, ours, args, device
        self.params = count_parameters(model)
        self.model = model.to(device).train()
        # Fused AdamW exists for CUDA and CPU: both models get it (their best setting on either).
        fused = device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-12,
                                           weight_decay=0.01, fused=fused or None)
        self.forward = torch.compile(model, fullgraph=ours, dynamic=False) if args.compile else model
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        self.scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
        self.flops_per_seq = flops_per_seq
        self.rates: list[float] = []
        self.peak_bytes = 0
        self.losses: list[float] = []

    def step(self, ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            if self.ours:
                loss = self.forward(ids, labels=labels, masked_positions=positions)["loss"]
            else:
                loss = self.forward(input_ids=ids, labels=labels).loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def state_bytes(self) -> int:
        tensors = [p for p in self.model.parameters()] + [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def run(self, batches: list, steps: int, timed: bool) -> None:
        cuda = self.device.type == "cuda"
        start = time.perf_counter()
        for i in range(steps):
            loss = self.step(*batches[i % len(batches)])
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        self.losses.append(float(loss))  # the only host sync besides the timer's
        if timed:
            self.rates.append(steps * batches[0][0].numel() / elapsed)

    def measure_memory(self, batches: list) -> None:
        """Peak of this model alone over one untimed step: its resident state (weights, gradients,
        AdamW moments) + what the step allocated on top of what was resident before it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.run(batches, 1, timed=False)
            extra = torch.cuda.max_memory_allocated() - start
        else:
            # Separate from the timed blocks: returning cached pages to the OS makes the next step
            # fault them back in, which would be timed otherwise.
            start = _cpu_reset_peak()
            if start is None:
                return
            self.run(batches, 1, timed=False)
            extra = _cpu_peak_rss() - start
        self.peak_bytes = extra + self.state_bytes()

    def result(self, peak_tflops: float | None, seq_len: int) -> dict[str, Any]:
        rate = statistics.median(self.rates) if self.rates else float("nan")
        mfu = None
        if peak_tflops:
            mfu = self.flops_per_seq * rate / seq_len / (peak_tflops * 1e12)
        return {
            "model": self.name, "params": self.params, "tokens_per_s": rate, "tokens_per_s_all": self.rates,
            "peak_mem_mb": self.peak_bytes / 2**20 if self.peak_bytes else None, "mfu": mfu,
            "flops_per_seq": self.flops_per_seq, "final_loss": self.losses[-1] if self.losses else None,
        }


def _proc_status_bytes(key: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    return None


def _cpu_reset_peak() -> int | None:
    """Start a CPU peak-memory window (Linux): return cached free memory to the OS, reset VmHWM.

    Returns the resident bytes now, or None where the kernel offers no resettable peak.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed pages; they would hide new ones
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5 = reset the peak RSS to the current RSS
    except OSError:
        return None
    return _proc_status_bytes("VmRSS")


def _cpu_peak_rss() -> int:
    return _proc_status_bytes("VmHWM") or 0


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# Kernel or operator name fragments -> the share of step time they stand for (first match wins).
PROFILE_GROUPS = (
    ("attention", ("flash", "fmha", "attention")),
    ("matmul", ("gemm", "cutlass", "xmma", "matmul", "aten::mm", "aten::bmm", "aten::addmm", "nvjet")),
    ("optimizer", ("adam",)),
    ("softmax / cross-entropy", ("softmax", "nll")),
    ("fused element-wise (triton)", ("triton",)),
)


def profile_steps(runner: Runner, batches: list, steps: int, path: Path) -> dict[str, Any]:
    """Profile `steps` training steps: top operators/kernels table to `path`, time shares by group.

    On CUDA the shares are of GPU kernel time (what MFU is lost to); on CPU of operator self time.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        runner.run(batches, steps, timed=False)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by=key, row_limit=40) + "\n")
    # On CUDA only kernels count (names without the aten:: prefix of host-side operators).
    rows = [(e.key, getattr(e, key)) for e in events if getattr(e, key) > 0 and (not cuda or not e.key.startswith("aten::"))]
    total = sum(t for _, t in rows) or 1.0
    shares: dict[str, float] = {}
    for name, t in rows:
        group = next((g for g, frags in PROFILE_GROUPS if any(f in name.lower() for f in frags)), "other")
        shares[group] = shares.get(group, 0.0) + t / total
    return {"table": str(path), "steps": steps, "time_per_step_ms": total / steps / 1e3,
            "shares": dict(sorted(shares.items(), key=lambda kv: -kv[1]))}


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# What `cram bench model` users type instead when this machine cannot run what they asked for.
BENCH_FIXES = Fixes(
    cpu="--device cpu (the default without CUDA), without --emulate or --memory-fraction",
    no_bf16="--precision fp16 (or --emulate a profile without bf16, e.g. --emulate rtx2080ti)",
)


def _caps_memory(args: argparse.Namespace) -> bool:
    return bool(args.emulate) or args.memory_fraction is not None


def _checked_profile(args: argparse.Namespace, device: torch.device) -> GpuProfile:
    """What the benchmark will run, as a profile for gpu.require_runnable: capping GPU memory
    (--emulate, --memory-fraction) needs CUDA even where --device defaulted to cpu."""
    return GpuProfile(name="bench", device="cuda" if _caps_memory(args) else device.type, precision=args.precision)


def _asked(args: argparse.Namespace) -> str:
    """The flags that asked for CUDA, as the error message quotes them."""
    if args.emulate:
        return f"--emulate {args.emulate}"
    if args.memory_fraction is not None:
        return "--memory-fraction"
    return f"--device {args.device} --precision {args.precision}"


def bench_model(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    emulate = load_profile(args.emulate) if args.emulate else None
    if emulate is not None:
        args.precision = emulate.precision  # before the check: the emulated card's precision must run here
    require_runnable(_checked_profile(args, device), _asked(args), BENCH_FIXES)
    if _caps_memory(args) and device.type != "cuda":
        raise SystemExit("--emulate and --memory-fraction cap GPU memory: they need --device cuda")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))

    emulated = None
    if emulate is not None:
        if emulate.memory_gb is None:
            raise SystemExit(f"--emulate needs a GPU profile with memory_gb; {args.emulate!r} has none")
        args.batch_size = args.batch_size or emulate.micro_batch_size
        total = torch.cuda.get_device_properties(device).total_memory
        args.memory_fraction = min(1.0, emulate.memory_gb * 1e9 / total)
        emulated = emulate.name
    if args.memory_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction, torch.cuda.current_device())
    args.batch_size = args.batch_size or 16

    cfg = arch_config(ModelConfig, args)
    num_masked = max(1, round(args.mask_fraction * args.seq_len))
    torch.manual_seed(0)
    specs = [("crammed-bert" if args.arch == "crammed-bert" else args.arch, "ours")]
    if not args.no_baseline:
        specs.append((BASELINE, "baseline"))
    if args.export:
        specs.append((EXPORT, "export"))
    runners: list[Runner] = []
    fits: dict[str, bool] = {}
    batches = make_batches(cfg, args.batch_size, args.seq_len, num_masked, device)
    for name, kind in specs:
        ours = kind == "ours"
        if ours:
            model = CrammedBertForMLM(cfg)
            model.use_sparse_embedding_grad(not args.compile)  # as the trainer sets it
        elif kind == "export":
            model = export_model(cfg)
        else:
            model = baseline_model(cfg, args.seq_len, args.baseline_dropout)
        flops_cfg = baseline_flops_config(cfg) if kind == "baseline" else cfg
        runner = Runner(name, model, ours, args, device, training_flops_per_sequence(flops_cfg, args.seq_len, num_masked, fixed_positions=ours))
        try:
            runner.run(batches, args.warmup, timed=False)  # warm-up (and compile) excluded from timing
            fits[name] = True
            runners.append(runner)
        except Exception as err:  # an OOM under an emulated card is a result, not a crash
            if not (_is_oom(err) and device.type == "cuda"):
                raise
            fits[name] = False
            del runner, model
            torch.cuda.empty_cache()

    for repeat in range(args.repeats):
        order = runners if repeat % 2 == 0 else runners[::-1]
        for runner in order:
            runner.run(batches, args.steps, timed=True)

    for runner in runners:
        runner.measure_memory(batches)
    profiled = None
    if args.profile and runners and runners[0].ours:
        profiled = profile_steps(runners[0], batches, args.steps, args.profile)
    peak = args.peak_tflops or detect_peak_tflops(device, args.precision)
    results = [r.result(peak, args.seq_len) for r in runners]
    base = next((r for r in results if r["model"] == BASELINE), None)
    for r in results:
        # Each repeat times every model back to back, so a ratio per repeat cancels slow drifts in
        # the machine's speed (other tenants on a shared CPU); the median of those is the figure.
        paired = [a / b for a, b in zip(r["tokens_per_s_all"], base["tokens_per_s_all"], strict=True)] if base else []
        r["ratio_all"] = paired
        r["ratio"] = statistics.median(paired) if paired else None
        r["ratio_quartiles"] = _quartiles(paired) if paired else None
    return {
        "command": "cram bench " + " ".join(args.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "precision": args.precision, "compile": args.compile,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "num_masked": num_masked,
        "arch": dataclasses.asdict(cfg), "peak_tflops": peak, "emulate": emulated,
        "memory_fraction": args.memory_fraction, "fits": fits, "results": results, "profile": profiled,
    }


def markdown(report: dict[str, Any]) -> str:
    def fmt(v: Any, spec: str) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = [
        f"{report['device']}, {report['precision']}, compile={report['compile']}, batch {report['batch_size']} x "
        f"{report['seq_len']}, {report['num_masked']} masked/row, hidden {report['arch']['hidden_size']}, "
        f"{report['arch']['num_layers']} layers, vocab {report['arch']['vocab_size']}",
        "",
        "| model | params (M) | tokens/s | ratio vs baseline (quartiles) | peak mem (MB) | MFU |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        mfu = fmt(r["mfu"] * 100 if r["mfu"] is not None else None, ".1f") + ("%" if r["mfu"] is not None else "")
        spread = r.get("ratio_quartiles")
        ratio = fmt(r["ratio"], ".2f") + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | {fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{ratio} | {fmt(r['peak_mem_mb'], ',.0f')} | {mfu} |")
    if report.get("profile"):
        shares = ", ".join(f"{k} {v:.0%}" for k, v in report["profile"]["shares"].items())
        lines += ["", f"crammed-bert profile ({report['profile']['time_per_step_ms']:.1f} ms/step profiled): {shares}; "
                  f"table in {report['profile']['table']}"]
    if report["emulate"] or report["memory_fraction"] is not None:
        fits = ", ".join(f"{k}: {'fits' if v else 'OOM'}" for k, v in report["fits"].items())
        lines += ["", f"memory cap {report['memory_fraction']:.3f} of the GPU ({report['emulate'] or 'custom'}): {fits}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cram bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="training-step throughput / memory / MFU vs transformers' BertForMaskedLM")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--precision", choices=get_args(Precision), default="fp32")
    m.add_argument("--compile", action="store_true", help="torch.compile both models (ours with fullgraph)")
    add_arch_options(m, "crammed-bert", "arch preset (configs/arch/*.yaml)")
    m.add_argument("--batch-size", type=int, help="sequences per step (default 16, or the emulated profile's)")
    m.add_argument("--mask-fraction", type=float, default=0.25, help="masked tokens per row (fixed count)")
    m.add_argument("--repeats", type=int, default=5, help="timed blocks per model (median reported)")
    m.add_argument("--steps", type=int, default=5, help="training steps per timed block")
    m.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    m.add_argument("--threads", type=int, help="CPU threads (default: the cores available)")
    m.add_argument("--baseline-dropout", type=float, default=0.1, help="BertConfig's default 0.1; 0 to match ours")
    m.add_argument("--no-baseline", action="store_true")
    m.add_argument("--export", action="store_true",
                   help="also time the exported CrammedBertHFForMaskedLM, called with labels as transformers.Trainer calls it")
    m.add_argument("--peak-tflops", type=float, help="override the profile's peak for MFU")
    m.add_argument("--memory-fraction", type=float, help="torch.cuda.set_per_process_memory_fraction cap")
    m.add_argument("--emulate", help="GPU profile to emulate by memory cap (e.g. rtx2080ti): its micro-batch and precision")
    add_out_option(m)
    m.add_argument("--profile", type=Path, help="also profile --steps steps of crammed-bert: kernel table to this file")
    sub.add_parser("data", help="data loader + masking throughput (cramming.data.benchmark)", add_help=False)
    sub.add_parser("glue", help="GLUE finetuning throughput, trials sequential vs side by side (cramming.glue.benchmark)",
                   add_help=False)
    return parser


def main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] == "data":
        from cramming.data import benchmark  # another stage's module: import only when asked

        return int(benchmark.main(argv[1:]) or 0)
    if argv and argv[0] == "glue":
        import cramming.glue.benchmark  # another stage's module: import only when asked

        return int(cramming.glue.benchmark.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    args.argv = argv
    report = bench_model(args)
    print(markdown(report))
    write_json_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
