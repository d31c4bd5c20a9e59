#!/usr/bin/env python
"""Data preprocessing benchmark (ours vs datasets.map + group_texts); see cramming/data/benchmark.py."""

import sys

from cramming.data.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
