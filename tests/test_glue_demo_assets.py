"""The GLUE subsets shipped for `make demo`: sizes, official-layout quirks, checksums, reproducibility."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "cramming" / "assets" / "glue_demo"
make = load_script("make_glue_demo")

EXPECTED_ROWS = {
    "CoLA/train.tsv": 2000, "CoLA/dev.tsv": 1043, "SST-2/train.tsv": 2000, "SST-2/dev.tsv": 872,
    "MRPC/train.tsv": 2000, "MRPC/dev.tsv": 408, "STS-B/train.tsv": 2000, "STS-B/dev.tsv": 1500,
    "RTE/train.tsv": 2490, "RTE/dev.tsv": 277,
}


def _provenance_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (ASSETS / "PROVENANCE.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].endswith(".tsv"):
            rows[cells[0]] = cells
    return rows


def _read(name: str) -> list[list[str]]:
    """Rows as the official GLUE readers see them: tab-separated, quoting off, BOM dropped."""
    with open(ASSETS / name, encoding="utf-8-sig", newline="") as fh:
        return list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_every_file_has_the_stated_row_count():
    for name, rows in EXPECTED_ROWS.items():
        header = 0 if name.startswith("CoLA") else 1
        assert len(_read(name)) - header == rows, name


def test_total_size_is_a_few_megabytes():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert 1_000_000 < total < 5_000_000


def test_layout_quirks_are_preserved():
    cola_dev = (ASSETS / "CoLA" / "dev.tsv").read_bytes()
    assert not cola_dev.endswith(b"\n")  # as the official file
    cola_train = _read("CoLA/train.tsv")
    assert all(len(r) == 4 and r[1] in ("0", "1") for r in cola_train)  # no header row
    assert (ASSETS / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality\t#1 ID\t#2 ID")
    assert _read("SST-2/train.tsv")[0] == ["sentence", "label"]
    assert _read("RTE/dev.tsv")[0] == ["index", "sentence1", "sentence2", "label"]
    stsb = _read("STS-B/train.tsv")
    assert stsb[0][-3:] == ["sentence1", "sentence2", "score"]
    assert all(len(r) == len(stsb[0]) for r in stsb)
    assert all(0.0 <= float(r[-1]) <= 5.0 for r in stsb[1:])


def test_labels_are_not_degenerate():
    """A sample must keep both classes in a real proportion, or the demo's scores mean nothing."""
    for name, col in [("CoLA/train.tsv", 1), ("SST-2/train.tsv", -1), ("MRPC/train.tsv", 0), ("RTE/train.tsv", -1)]:
        rows = _read(name)[(0 if name.startswith("CoLA") else 1):]
        labels = [r[col] for r in rows]
        share = max(labels.count(v) for v in set(labels)) / len(labels)
        assert len(set(labels)) == 2 and share < 0.8, name


def test_provenance_checksums_and_rows_match_the_files():
    rows = _provenance_rows()
    assert set(rows) == set(EXPECTED_ROWS)
    for name, cells in rows.items():
        assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == cells[2], name
        assert int(cells[1]) == EXPECTED_ROWS[name], name
        # A full split is a byte-identical copy of its source.
        if cells[5].startswith("all"):
            assert cells[2] == cells[4], name
    text = (ASSETS / "PROVENANCE.md").read_text(encoding="utf-8")
    assert "not comparable" in text and "Licences" in text


def test_subset_rows_are_real_rows_of_the_source_in_order():
    """Checks the cutting logic on a synthetic file: header kept, order kept, deterministic."""
    split = make.Split("X", "train", 3, 10, "unused", True)
    source = b"h1\th2\n" + b"".join(b"r%d\tv\n" % i for i in range(10))
    out = make.subset(split, source)
    lines = out.split(b"\n")
    assert lines[0] == b"h1\th2" and len(lines) == 5 and lines[-1] == b""
    indices = [int(line.split(b"\t")[0][1:]) for line in lines[1:-1]]
    assert indices == sorted(indices) and indices == make.pick(split, 10)
    assert make.subset(split, source) == out


def test_shipped_files_are_reproducible_from_shared(shared_dir):
    assert make.main(["--source", str(shared_dir / "data" / "glue"), "--out", str(ASSETS), "--check"]) == 0


def test_the_official_layout_reader_parses_the_assets():
    tasks = pytest.importorskip("cramming.glue.tasks")
    for name in ("cola", "sst2", "mrpc", "stsb", "rte"):
        data = tasks.load_local_task(tasks.TASK_SPECS[name], ASSETS)
        assert len(data.train.labels) == EXPECTED_ROWS[f"{tasks.TASK_SPECS[name].folder}/train.tsv"]
