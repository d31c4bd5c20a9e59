#!/usr/bin/env python
"""Data preprocessing benchmarks: ours vs datasets.map + group_texts (cramming/data/benchmark.py), or with
--scale 1,4,16 `cram data` on 1x/4x/16x the embedded corpus, per phase (cramming/data/scale_bench.py)."""

import sys

from cramming.data.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
