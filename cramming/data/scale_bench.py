"""`cram bench data --scale 1,4,16`: `cram data` on 1x, 4x, 16x the embedded corpus, phase by phase.

Each scale is a `data=local` build (defaults: WordPiece 32768, the config's filter, sort and
packing) of k copies of the decompressed embedded corpus (31 MB of text per copy; copies are fine
because dedup is off by default, and the tokenizer sample bound of 500M characters is not reached).
Each build runs in a child process in a session of its own; every `--poll` seconds the benchmark
reads /proc for all processes of that session (the build and its workers) and records the sum of
their anonymous resident memory (RssAnon: heap, arrays, the tokenizer) and total resident memory
(VmRSS, which adds file-backed pages such as memory-mapped files), with the phase the build is in
(from its progress.json). Per-phase times are the manifest's `timings_s`.

`--kill-at 0.6` also kills the largest build at 60% of its measured wall time (SIGKILL to the
build process; its workers exit on their own), reruns it, and reports the rerun's time as a
fraction of the full build. `--num-proc 1,2` repeats each scale with each worker count.

Usage: cram bench data --scale 1,4,16 [--num-proc 2] [--vocab-size 32768] [--kill-at 0.6] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cramming.benchtools import add_out_option, cpu_name, write_json_report
from cramming.data.prepare import PHASE_TIMINGS, DataConfig, prepared_dir
from cramming.data.sources import embedded_files

_CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
from cramming.data.prepare import DataConfig, prepare
t = time.perf_counter()
folder = prepare(DataConfig(**args["cfg"]), args["root"])
print(json.dumps({"folder": str(folder), "wall_s": time.perf_counter() - t}))
"""


def make_corpus(folder: Path, copies: int) -> int:
    """`copies` hard links to each decompressed embedded file under `folder`; the text's bytes."""
    base = folder.parent / "embedded-text"
    base.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for src in embedded_files():
        text = base / src.name.removesuffix(".xz")
        if not text.is_file():
            with lzma.open(src) as fh:
                text.write_bytes(fh.read())
        for k in range(copies):
            link = folder / f"{text.stem}-{k:02d}.txt"
            if not link.exists():
                os.link(text, link)
            total += text.stat().st_size
    return total


def _session_memory_kb(sid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) summed over the processes of session `sid`, in kB."""
    anon = rss = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) != sid:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        for line in status.splitlines():
            if line.startswith("RssAnon:"):
                anon += int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss += int(line.split()[1])
    return anon, rss


def _phase(partial: Path) -> str:
    """The phase a build is in, from its partial folder: start (before it exists), spool ... shards,
    finish (its manifest is written)."""
    final = partial.with_name(partial.name.removesuffix(".partial"))
    if (partial / "manifest.json").exists() or (final / "manifest.json").exists():
        return "finish"
    try:
        phases = json.loads((partial / "progress.json").read_text())["phases"]
    except (OSError, ValueError, KeyError):
        return "spool" if partial.exists() else "start"  # spool: before its first commit
    return next((p for p in PHASE_TIMINGS if not phases.get(p, {}).get("done")), "finish")


def run_build(cfg: dict[str, Any], root: Path, poll: float, kill_after: float | None = None) -> dict[str, Any]:
    """One build in a child session, its memory polled; killed after `kill_after` seconds if given."""
    partial = prepared_dir(DataConfig(**cfg), root)
    partial = partial.with_name(partial.name + ".partial")
    env = {**os.environ, "CRAMMING_NO_PROGRESS": "1"}
    log = root.parent / f"{root.name}.log"
    root.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps({"cfg": cfg, "root": str(root)})],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, start_new_session=True)
        start, peaks, killed_in = time.perf_counter(), {}, None
        while True:
            anon, rss = _session_memory_kb(proc.pid)
            if not anon and proc.poll() is not None:
                break  # the build and all its workers have exited
            phase = _phase(partial)
            old = peaks.get(phase, (0, 0))
            peaks[phase] = (max(old[0], anon), max(old[1], rss))
            if kill_after is not None and killed_in is None and time.perf_counter() - start >= kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                killed_in = phase
            time.sleep(poll)
        out = proc.stdout.read()
    wall = time.perf_counter() - start
    if killed_in is None and proc.returncode != 0:
        raise RuntimeError(f"the build failed (exit {proc.returncode}); see {log}")
    result: dict[str, Any] = {"wall_s": round(wall, 2), "killed_in": killed_in,
                              "peak_anon_mb": round(max(a for a, _ in peaks.values()) / 1024, 1),
                              "peak_rss_mb": round(max(r for _, r in peaks.values()) / 1024, 1),
                              "phase_peaks_mb": {p: [round(a / 1024, 1), round(r / 1024, 1)] for p, (a, r) in peaks.items()}}
    if killed_in is None:
        manifest = json.loads((Path(json.loads(out.strip().splitlines()[-1])["folder"]) / "manifest.json").read_text())
        result["timings_s"] = manifest["timings_s"]
    return result


def _table(rows: list[dict[str, Any]]) -> list[str]:
    names = list(PHASE_TIMINGS.values())
    lines = ["| scale | text MB | num_proc | wall s | MB/s | " + " | ".join(f"{n} s" for n in names)
             + " | peak anon MB | peak RSS MB | anon MB by phase |", "|" + " ---: |" * (8 + len(names))]
    for r in rows:
        t = r["timings_s"]
        by_phase = ", ".join(f"{p} {v[0]:.0f}" for p, v in r["phase_peaks_mb"].items() if p in PHASE_TIMINGS)
        lines.append(f"| {r['scale']}x | {r['mb']:.0f} | {r['num_proc']} | {r['wall_s']:.1f} | {r['mb_per_s']:.2f} | "
                     + " | ".join(f"{t[n]:.1f}" for n in names)
                     + f" | {r['peak_anon_mb']:.0f} | {r['peak_rss_mb']:.0f} | {by_phase} |")
    return lines


def main(argv: list[str]) -> int:
    """Run the scale benchmark; prints a markdown table, writes JSON with --out."""
    p = argparse.ArgumentParser(prog="cram bench data --scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", required=True, help="comma-separated corpus multiples, e.g. 1,4,16")
    p.add_argument("--num-proc", default="0", help="comma-separated data.num_proc values (0 = the available cores)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--poll", type=float, default=0.2, help="seconds between memory samples")
    p.add_argument("--kill-at", type=float, default=None, help="also kill the largest build at this fraction of its time")
    p.add_argument("--workdir", type=Path, default=None, help="keep corpora and outputs here (default: a temp dir)")
    add_out_option(p)
    args = p.parse_args(argv)
    scales = [int(s) for s in args.scale.split(",")]
    procs = [int(n) for n in args.num_proc.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="cram-bench-scale-") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    rows = []
    for scale in scales:
        corpus = work / f"corpus-{scale}x"
        nbytes = make_corpus(corpus, scale)
        for num_proc in procs:
            cfg = {**_local_config(corpus, args.vocab_size), "num_proc": num_proc}
            print(f"building {scale}x ({nbytes / 1e6:.0f} MB), num_proc={num_proc} ...", file=sys.stderr)
            res = run_build(cfg, work / f"out-{scale}x-p{num_proc}", args.poll)
            rows.append({"scale": scale, "mb": nbytes / 1e6, "num_proc": num_proc,
                         "mb_per_s": round(nbytes / 1e6 / res["wall_s"], 3), **res})
    result: dict[str, Any] = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "rows": rows,
                              "date": time.strftime("%Y-%m-%d")}
    if args.kill_at is not None:
        result["resume"] = _resume_check(rows[-1], work, args)
    print(f"\n{result['cpu']}, {result['cores']} cores available, vocab {args.vocab_size}\n")
    print("\n".join(_table(rows)))
    if "resume" in result:
        r = result["resume"]
        print(f"\nkilled at {r['killed_after_s']:.0f} s ({args.kill_at:.0%}) in phase {r['killed_in']}; the rerun "
              f"took {r['rerun_wall_s']:.1f} s = {r['rerun_fraction']:.0%} of the full build")
    write_json_report(args.out, result)
    if tmp:
        tmp.cleanup()
    return 0


def _local_config(corpus: Path, vocab_size: int) -> dict[str, Any]:
    return {"name": f"scale-{corpus.name}", "source": "local", "local_paths": [str(corpus)], "vocab_size": vocab_size}


def _resume_check(full: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Kill a build like `full` at `--kill-at` of its wall time, rerun it; the rerun's share of `full`."""
    cfg = {**_local_config(work / f"corpus-{full['scale']}x", args.vocab_size), "num_proc": full["num_proc"]}
    root = work / f"out-{full['scale']}x-killed"
    after = args.kill_at * full["wall_s"]
    killed = run_build(cfg, root, args.poll, kill_after=after)
    rerun = run_build(cfg, root, args.poll)
    return {"scale": full["scale"], "killed_after_s": round(after, 1), "killed_in": killed["killed_in"],
            "rerun_wall_s": rerun["wall_s"], "rerun_fraction": round(rerun["wall_s"] / full["wall_s"], 3),
            "rerun_timings_s": rerun["timings_s"], "rerun_peak_anon_mb": rerun["peak_anon_mb"]}
