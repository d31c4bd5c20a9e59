"""`cram bench data`: preprocessing throughput and peak memory, ours vs the usual path.

The usual path is what most users write today (transformers' `run_mlm.py`): documents in a
`datasets.Dataset`, `Dataset.map` with a transformers fast tokenizer, then `group_texts`
(concatenate, cut into 128-token blocks). Both run on the same text (the embedded corpus or a
slice of it), with the same tokenizer file, in separate child processes so each gets its own peak
RSS (`VmHWM` of /proc/self/status; `ru_maxrss` elsewhere). Tokenizer training is done once beforehand and is not
timed for either side. Also measured: loader + dynamic masking throughput of `build_loader`.

Usage: python scripts/bench_data.py [--max-chars N] [--vocab-size 8192] [--workers 2] [--out f.json]
       python scripts/bench_data.py --scale 1,4,16 [...]   (the scale benchmark: cramming/data/scale_bench.py)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cramming.benchtools import add_out_option, write_json_report

_PEAK = r"""
import resource

def _peak_kb():
    # VmHWM belongs to this process's own address space (reset by exec); ru_maxrss is not: Linux
    # carries the parent's peak over fork + exec, which would hide the child's own peak.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

_CHILD_OURS = _PEAK + r"""
import json, os, sys, time
args = json.loads(sys.argv[1])
from cramming.data.prepare import DataConfig, prepare
rss_imports = _peak_kb()
t = time.perf_counter()
folder = prepare(DataConfig(**args["cfg"]), args["root"])
wall = time.perf_counter() - t
m = json.load(open(os.path.join(folder, "manifest.json")))
print(json.dumps(dict(wall_s=wall, maxrss_kb=_peak_kb(),
                      rss_after_imports_kb=rss_imports, sequences=m["counts"]["sequences"],
                      tokens=m["counts"]["tokens"], folder=str(folder), timings_s=m["timings_s"])))
"""

_CHILD_BASELINE = _PEAK + r"""
import json, sys, time
args = json.loads(sys.argv[1])
from itertools import chain
from datasets import Dataset, disable_progress_bars
from transformers import PreTrainedTokenizerFast
from cramming.data.sources import SourceStats, iter_embedded
disable_progress_bars()
rss_imports = _peak_kb()
t = time.perf_counter()
docs, chars = [], 0
for d in iter_embedded(args["files"] or None, SourceStats()):
    docs.append(d); chars += len(d)
    if args["max_chars"] and chars >= args["max_chars"]:
        break
tok = PreTrainedTokenizerFast(tokenizer_file=args["tokenizer"], pad_token="[PAD]", unk_token="[UNK]",
                              cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
ds = Dataset.from_dict({"text": docs})
del docs
block = args["seq_len"]

def tokenize_function(examples):  # as in run_mlm.py (line_by_line=False)
    return tok(examples["text"], return_special_tokens_mask=True)

def group_texts(examples):  # as in run_mlm.py
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total = (len(concatenated[list(examples.keys())[0]]) // block) * block
    return {k: [t[i:i + block] for i in range(0, total, block)] for k, t in concatenated.items()}

ds = ds.map(tokenize_function, batched=True, remove_columns=["text"])
ds = ds.map(group_texts, batched=True)
wall = time.perf_counter() - t
print(json.dumps(dict(wall_s=wall, maxrss_kb=_peak_kb(),
                      rss_after_imports_kb=rss_imports, sequences=len(ds), tokens=len(ds) * block)))
"""


def _child(code: str, args: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    res = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _loader_throughput(folder: Path, micro_batch: int, workers: int, batches: int) -> float:
    from cramming.corpus.masking import MLMMasker
    from cramming.corpus.shards import PackedDataset, build_loader

    ds = PackedDataset(folder)
    sp = ds.manifest["special_tokens"]
    masker = MLMMasker(ds.manifest["vocab_size"], sp["mask"], sp.values())
    it = build_loader(ds, micro_batch, masker, shuffle=True, seed=0, num_workers=workers)
    for _ in range(min(5, batches)):  # warm-up: worker start, page cache
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * micro_batch / (time.perf_counter() - t)
    del it
    return rate


def main(argv: list[str]) -> int:
    """Run the benchmark; prints a markdown table, writes JSON with --out. Returns an exit code.

    With `--scale 1,4,16` it runs the scale benchmark instead (`cramming/data/scale_bench.py`).
    """
    if any(a == "--scale" or a.startswith("--scale=") for a in argv):
        from cramming.data.scale_bench import main as scale_main

        return scale_main(argv)
    p = argparse.ArgumentParser(prog="cram bench data", description=__doc__.split("\n\n")[0],
                                epilog="cram bench data --scale 1,4,16 --help: the scale benchmark's options")
    p.add_argument("--max-chars", type=int, default=None, help="use only the first N characters of the corpus")
    p.add_argument("--files", nargs="*", default=[], help="embedded file stems to use (default: all)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--num-proc", type=int, default=1, help="our tokenizer processes (1 = Rust threads only)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader benchmark")
    p.add_argument("--micro-batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=200, help="micro-batches timed in the loader benchmark")
    add_out_option(p)
    p.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: a temp dir)")
    args = p.parse_args(argv)

    from cramming.data.prepare import DataConfig, prepare

    tmp = tempfile.TemporaryDirectory(prefix="cram-bench-data-") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CRAMMING_NO_PROGRESS": "1", "HF_DATASETS_CACHE": str(work / "hf-cache"),
           "TOKENIZERS_PARALLELISM": "true"}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    base = dict(name="bench", source="embedded", embedded_files=args.files, max_chars=args.max_chars,
                vocab_size=args.vocab_size, seq_len=args.seq_len, num_proc=args.num_proc)

    print(f"training the shared tokenizer (vocab {args.vocab_size}) ...", file=sys.stderr)
    os.environ["CRAMMING_NO_PROGRESS"] = "1"
    t = time.perf_counter()
    full = prepare(DataConfig(**base), work / "tok")
    full_pipeline_s = time.perf_counter() - t
    manifest = json.loads((full / "manifest.json").read_text())
    raw_chars = manifest["counts"]["chars_read"]
    tokenizer = str(full / "tokenizer.json")
    # Raw size in bytes, as read (UTF-8): the MB in MB/s.
    from cramming.data.sources import SourceStats, iter_embedded

    raw_bytes, chars = 0, 0
    for d in iter_embedded(args.files or None, SourceStats()):
        raw_bytes += len(d.encode("utf-8"))
        chars += len(d)
        if args.max_chars and chars >= args.max_chars:
            break
    mb = raw_bytes / 1e6

    print("running our pipeline ...", file=sys.stderr)
    ours = _child(_CHILD_OURS, {"cfg": {**base, "tokenizer_file": tokenizer}, "root": str(work / "ours")}, env)
    print("running the datasets.map + group_texts baseline ...", file=sys.stderr)
    baseline = _child(_CHILD_BASELINE, {"files": args.files, "max_chars": args.max_chars, "tokenizer": tokenizer,
                                        "seq_len": args.seq_len}, env)
    print("timing the loader ...", file=sys.stderr)
    loader = {
        f"workers={w}": _loader_throughput(Path(ours["folder"]), args.micro_batch, w, args.batches)
        for w in sorted({0, args.workers})
    }

    def row(name: str, r: dict[str, Any]) -> dict[str, Any]:
        return dict(pipeline=name, wall_s=round(r["wall_s"], 2), mb_per_s=round(mb / r["wall_s"], 3),
                    mb_per_s_per_core=round(mb / r["wall_s"] / cores, 3), peak_rss_mb=round(r["maxrss_kb"] / 1024, 1),
                    rss_after_imports_mb=round(r["rss_after_imports_kb"] / 1024, 1),
                    peak_minus_imports_mb=round((r["maxrss_kb"] - r["rss_after_imports_kb"]) / 1024, 1),
                    sequences=r["sequences"])

    rows = [row("cramming (normalise, filter, tokenize, pack, sort, write shards)", ours),
            row("datasets.map + group_texts (run_mlm.py style, in memory)", baseline)]
    result = {
        "raw_mb": round(mb, 3), "raw_chars": raw_chars, "cores": cores, "vocab_size": args.vocab_size,
        "seq_len": args.seq_len, "num_proc": args.num_proc, "rows": rows,
        "speedup": round(baseline["wall_s"] / ours["wall_s"], 3),
        "peak_rss_ratio": round(baseline["maxrss_kb"] / ours["maxrss_kb"], 3),
        "ours_timings_s": ours["timings_s"],
        "full_pipeline_with_tokenizer_training_s": round(full_pipeline_s, 2),
        "loader_sequences_per_s": {k: round(v, 1) for k, v in loader.items()},
        "loader_micro_batch": args.micro_batch,
    }
    cols = list(rows[0])
    print(f"\nraw text: {mb:.2f} MB ({raw_chars} chars), {cores} cores, vocab {args.vocab_size}, seq_len {args.seq_len}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"\nspeed-up (baseline wall / ours): {result['speedup']}x; peak RSS ratio (baseline / ours): "
          f"{result['peak_rss_ratio']}x")
    print(f"our full pipeline incl. tokenizer training: {full_pipeline_s:.1f}s")
    print("loader + dynamic masking, micro-batch "
          f"{args.micro_batch}: " + ", ".join(f"{k}: {v:.0f} seq/s" for k, v in loader.items()))
    write_json_report(args.out, result)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
