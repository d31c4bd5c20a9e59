"""What the two benchmarks share (`cram bench model` in cramming/bench.py, `cram bench glue` in
cramming/glue/benchmark.py): the --arch options and the model shape they describe, the machine's
name, and the --out JSON report.

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


def add_arch_options(parser: argparse.ArgumentParser, arch_default: str, arch_help: str,
                     seq_len_help: str | None = None) -> None:
    """The options `arch_config` reads: --arch (a preset name) and the shape overrides, --seq-len."""
    parser.add_argument("--arch", default=arch_default, help=arch_help)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--intermediate", type=int, help="FFN width (default: the preset's, or 4 x --hidden)")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--seq-len", type=int, default=128, help=seq_len_help)


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


def add_out_option(parser: argparse.ArgumentParser) -> None:
    """The --out option `write_json_report` writes to."""
    parser.add_argument("--out", type=Path, help="write the report as JSON here")


def write_json_report(out: Path | None, report: dict[str, Any]) -> None:
    """Write a benchmark's figures to `--out` as indented JSON, and say where (nothing without --out)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
