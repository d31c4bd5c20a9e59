"""What the two benchmarks share (`cram bench model` in cramming/bench.py, `cram bench glue` in
cramming/glue/benchmark.py): the model shape their --arch options describe, and the machine's name.

A ground-floor module, so that the GLUE stage's benchmark needs neither the top floor nor the model
package: the shape is built into whatever config dataclass the caller passes (the model's
`ModelConfig`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cramming.config import CONFIG_DIR

T = TypeVar("T")


def arch_config(cls: type[T], args: argparse.Namespace) -> T:
    """The `--arch` preset (configs/arch/<name>.yaml) with the --hidden/--layers/--heads/--intermediate/
    --vocab overrides, as `cls`, and long enough for --seq-len."""
    path = CONFIG_DIR / "arch" / f"{args.arch}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (CONFIG_DIR / "arch").glob("*.yaml"))
        raise SystemExit(f"unknown --arch {args.arch!r}; choose one of: {', '.join(names)}")
    cfg: Any = cls(**(yaml.safe_load(path.read_text()) or {}))
    overrides = {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
                 "intermediate_size": args.intermediate, "vocab_size": args.vocab}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.hidden is not None and args.intermediate is None:
        overrides["intermediate_size"] = 4 * args.hidden  # keep BERT's 4x ratio when only the width changes
    return dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, args.seq_len), **overrides)


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the machine type."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {platform.machine()}"
    return platform.processor() or platform.machine()


def write_json_report(out: Path | None, report: dict[str, Any]) -> None:
    """Write a benchmark's figures to `--out` as indented JSON (nothing without --out)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
