"""`cram data` under faults: SIGKILL at each write stage, disk full, corrupted outputs, hostile corpora."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_DATA, finish, flip_bit, truncate, worker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cramming.data.prepare import DataConfig, prepare, prepared_dir
from cramming.data.shards import PackedDataset, load_manifest
from cramming.errors import DataError

BEHAVIOUR_KILL = ("the folder is built under a temporary name and renamed only after manifest.json is written; "
                  "the re-run removes the stale temporary folder and rebuilds; outputs verify (sha256) and equal "
                  "an uninterrupted build row for row")


def _rows(folder: Path) -> np.ndarray:
    parts = []
    for split in ("train", "val"):
        ds = PackedDataset(folder, split)  # verifies every shard's sha256
        parts.append(ds.rows(np.arange(len(ds))))
    return np.concatenate(parts)


def _check_rebuild(root: Path, reference: Path) -> bool:
    """After a killed build: nothing under root looks finished; a re-run completes and matches reference."""
    cfg = DataConfig(**TINY_DATA)
    final = prepared_dir(cfg, root)
    assert not (final / "manifest.json").exists(), "a killed build left a folder that looks complete"
    folder = prepare(cfg, root)
    assert folder == final and not list(root.glob("*.tmp-*")), "stale temporary folders remain"
    np.testing.assert_array_equal(_rows(folder), _rows(reference))
    assert (folder / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
    return True


# Smaller tokenizer batches (an execution-only setting, outside the cache key) so that tokenization
# passes several fault points; the output must still equal the reference build exactly.
KILLED = {**TINY_DATA, "batch_docs": 100}

POINTS = {
    "data.tokenize:2": "during tokenization (2nd encoded batch)",
    "data.shard_write:3": "while writing a shard (3rd write)",
    "data.manifest": "half-way through writing manifest.json",
    "data.rename": "after manifest.json, before the folder rename",
}


@pytest.mark.parametrize("point", list(POINTS))
def test_sigkill_at_fault_point_then_rerun(point, tiny_data, tmp_path, outcome) -> None:
    root = tmp_path / "data"
    code, out = finish(worker("prepare", {"data_root": str(root), "data": KILLED}, fault=point))
    assert code == -9, f"the fault point {point} was not reached:\n{out}"
    ok = _check_rebuild(root, tiny_data)
    outcome.add(f"SIGKILL of `cram data` {POINTS[point].split(' (')[0]}",
                f"CRAMMING_FAULT={point} (the process SIGKILLs itself there)", BEHAVIOUR_KILL, ok,
                unit="rows", detail="re-run output identical to an uninterrupted build")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_moment_then_rerun(seed, tiny_data, tmp_path, outcome) -> None:
    """Kill at the k-th fault point of any kind, k drawn from the seed: tokenize, shard or manifest writes."""
    import random

    # A clean build passes ~6 tokenize points, ~6 shard writes and 2 manifest points.
    k = random.Random(seed).randint(1, 13)
    root = tmp_path / "data"
    code, out = finish(worker("prepare", {"data_root": str(root), "data": KILLED}, fault=f"*:{k}"))
    assert code in (-9, 0), out
    ok = _check_rebuild(root, tiny_data)
    outcome.add("SIGKILL of `cram data` at a random write point", "CRAMMING_FAULT=*:k, k drawn from the seed "
                "(the k-th tokenize/shard/manifest point)", BEHAVIOUR_KILL, ok, unit="rows",
                detail=f"seed {seed}: k={k}, {'killed' if code == -9 else 'finished before k'}")


def _enospc_after(limit: int):
    """An `open` replacement whose binary files raise ENOSPC once `limit` bytes were written in total."""
    import builtins

    real_open = builtins.open
    written = [0]

    class Full:
        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            if written[0] + len(data) > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            written[0] += len(data)
            return self._fh.write(data)

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._fh.__exit__(*exc)

    def fake_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return Full(fh) if ("w" in mode or "a" in mode) and str(file).endswith(".bin") else fh

    return fake_open


def test_disk_full_while_writing_a_shard(tmp_path, monkeypatch, outcome) -> None:
    import cramming.data.shards as shards

    root = tmp_path / "data"
    monkeypatch.setattr(shards, "open", _enospc_after(20_000), raising=False)
    with pytest.raises(DataError) as err:
        prepare(DataConfig(**TINY_DATA), root)
    msg = str(err.value)
    assert "No space left on device" in msg and "nothing was kept" in msg, msg
    assert not list(root.iterdir()), "a partial folder was left behind"
    monkeypatch.undo()
    ok = (prepare(DataConfig(**TINY_DATA), root) / "manifest.json").is_file()
    outcome.add("Disk full while writing a shard", "the shard writer's file raises OSError(ENOSPC) after 20 kB",
                "DataError 'writing <tmp folder> failed: No space left on device ... nothing was kept'; the "
                "partial folder is removed; the next run builds it", ok, unit="rows")


CORRUPTIONS = {
    "train shard truncated": ("train-00000.bin", lambda p: truncate(p, 0.7), r"train-00000.bin.*(bytes|sha256)"),
    "train shard bit flip": ("train-00000.bin", lambda p: flip_bit(p), r"train-00000.bin.*sha256"),
    "val shard bit flip": ("val-00000.bin", lambda p: flip_bit(p, 3), r"val-00000.bin.*sha256"),
    "manifest truncated": ("manifest.json", lambda p: truncate(p, 0.6), r"manifest.json"),
    "manifest bit flip (row count digit)": ("manifest.json", None, r"manifest.json.*checksum"),
    "manifest bit flip (non-UTF-8 byte)": ("manifest.json", lambda p: flip_bit(p, 40, 7), r"manifest.json"),
    "tokenizer truncated": ("tokenizer.json", lambda p: truncate(p, 0.5), r"tokenizer.json"),
    "tokenizer bit flip": ("tokenizer.json", lambda p: flip_bit(p, None, 1), r"tokenizer.json.*sha256"),
}


def _flip_row_count(path: Path) -> None:
    text = path.read_text()
    at = text.index('"num_sequences": ') + len('"num_sequences": ')
    digit = text[at]
    path.write_text(text[:at] + str((int(digit) + 1) % 10) + text[at + 1:])


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_prepared_file_is_detected(case, tiny_data, tmp_path, outcome) -> None:
    fname, damage, pattern = CORRUPTIONS[case]
    copy = tmp_path / tiny_data.name
    shutil.copytree(tiny_data, copy)
    (damage or _flip_row_count)(copy / fname)
    with pytest.raises(DataError, match=pattern) as err:
        PackedDataset(copy, "train")
        PackedDataset(copy, "val")
    assert str(copy / fname) in str(err.value) or fname in str(err.value)
    # `cram data` with the same config must not take the damaged folder for a cache hit either.
    with pytest.raises(DataError):
        load_manifest(copy) if "shard" not in case else PackedDataset(copy, case.split()[0])
    outcome.add(f"Corrupt prepared data: {case.split(' (')[0].replace(' bit flip', ' bit-flipped')}",
                "the file is truncated or one bit is flipped", "DataError naming the file (manifest checksum, "
                "shard sha256 and size, tokenizer sha256); nothing is loaded", True, detail=case)


# --- hostile corpora ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=80) | st.sampled_from([b"\x00\x00", b"\xff\xfe", b"ok text\n", b"\n\n", b"\xc3("]),
                min_size=1, max_size=12))
def test_fuzz_corpus_bytes_are_skipped_and_counted(tmp_path_factory, chunks) -> None:
    from cramming.data.sources import SourceStats, iter_documents

    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_bytes(b"".join(chunks))
    for unit in ("block", "line", "file"):
        cfg = DataConfig(name="f", source="local", local_paths=[str(folder)], local_unit=unit)
        stats = SourceStats()
        docs = list(iter_documents(cfg, stats))
        assert all(isinstance(d, str) for d in docs)
        raw = b"".join(chunks)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            assert stats.documents_skipped_unreadable + stats.files_skipped >= 1, "invalid UTF-8 went uncounted"
        else:
            assert stats.documents_skipped_unreadable == 0
        strict = DataConfig(name="f", source="local", local_paths=[str(folder)], local_unit=unit, strict=True)
        try:
            list(iter_documents(strict, SourceStats()))
        except DataError as err:
            assert "a.txt" in str(err)


def test_corpus_with_nul_and_invalid_utf8_builds_with_counted_skips(tmp_path, outcome) -> None:
    from cramming.data.sources import embedded_files

    text = "\n\n".join(p for p in __import__("lzma").open(embedded_files(["moby_dick"])[0], "rt").read(200_000).split("\n\n"))
    blocks = text.encode().split(b"\n\n")
    bad = 0
    for i in range(0, len(blocks), 7):  # every 7th block: invalid UTF-8 or NUL bytes
        blocks[i] = blocks[i] + (b"\xff\xfe broken" if i % 2 else b"\x00\x00 nul")
        bad += i % 2
    (tmp_path / "c.txt").write_bytes(b"\n\n".join(blocks))
    cfg = DataConfig(name="dirty", source="local", local_paths=[str(tmp_path / "c.txt")], vocab_size=300, seq_len=32,
                     compression_threshold=1.0)
    folder = prepare(cfg, tmp_path / "out")
    counts = json.loads((folder / "manifest.json").read_text())["counts"]
    assert counts["documents_skipped_unreadable"] == bad
    assert PackedDataset(folder).manifest["counts"]["train_sequences"] > 0
    outcome.add("Corpus with invalid UTF-8 and NUL bytes", "every 7th block of a text corpus gets \\xff\\xfe or NUL "
                "bytes; plus hypothesis: 25 random byte files x 3 document units",
                "undecodable documents are skipped whole and counted (`documents_skipped_unreadable`), NUL bytes "
                "are plain text; data.strict=true fails naming file:line", True, lost=bad, unit="documents",
                detail=f"{bad} invalid-UTF-8 documents skipped and counted")
