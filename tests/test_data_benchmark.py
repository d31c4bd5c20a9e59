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


def test_scale_benchmark_pieces(tmp_path: Path) -> None:
    from cramming.data import scale_bench
    from cramming.data.sources import embedded_files

    nbytes = scale_bench.make_corpus(tmp_path / "corpus-2x", 2)
    files = sorted((tmp_path / "corpus-2x").iterdir())
    assert len(files) == 2 * len(embedded_files()) and nbytes == sum(f.stat().st_size for f in files)
    # One build of a small config in a child session: per-phase memory of the process tree, then a
    # build killed at once and its rerun.
    cfg = dict(name="sb", source="embedded", embedded_files=["moby_dick"], max_chars=100_000, vocab_size=300,
               seq_len=32, compression_threshold=1.0, num_proc=2, batch_docs=20)
    res = scale_bench.run_build(cfg, tmp_path / "out", poll=0.05)
    assert res["killed_in"] is None and res["timings_s"]["total"] > 0
    assert 0 < res["peak_anon_mb"] <= res["peak_rss_mb"] and "encode" in res["phase_peaks_mb"]
    killed = scale_bench.run_build(cfg, tmp_path / "killed", poll=0.05, kill_after=0.0)
    assert killed["killed_in"] is not None and "timings_s" not in killed
    assert scale_bench.run_build(cfg, tmp_path / "killed", poll=0.05)["timings_s"]["total"] > 0
