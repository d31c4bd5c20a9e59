"""The data benchmark runs end to end on a small slice and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

from cramming.data.benchmark import main


def test_benchmark_small_slice(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = main(["--files", "austen", "--max-chars", "300000", "--vocab-size", "1000", "--batches", "5",
                 "--micro-batch", "16", "--workers", "0", "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    ours, base = res["rows"]
    assert ours["sequences"] > 100 and base["sequences"] > 100
    assert ours["mb_per_s"] > 0 and base["peak_rss_mb"] > 0 and res["speedup"] > 0
    assert res["loader_sequences_per_s"]["workers=0"] > 0
    assert "| pipeline |" in capsys.readouterr().out
