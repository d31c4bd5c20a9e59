"""`cram data` under faults: SIGKILL in every phase (the rerun continues), a killed worker, disk full,
two builds of one config at once, corrupted outputs, hostile corpora."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_DATA, finish, flip_bit, truncate, wait_for, worker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cramming.corpus.shards import PackedDataset, load_manifest
from cramming.data.prepare import EXECUTION_ONLY_FIELDS, PHASE_TIMINGS, DataConfig, prepare, prepared_dir
from cramming.errors import DataError

BEHAVIOUR_KILL = ("the build runs in `<name>-<hash>.partial/` and commits its progress after every batch spooled or "
                  "encoded and every shard written; the same command continues after the last committed unit (the "
                  "tokenizer training and the ordering restart as a whole); output equals an uninterrupted build row "
                  "for row (shards, tokenizer, manifest but its timings); no worker process outlives the build")

# Small batches (an execution-only setting, outside the cache key) so that each phase has many
# units of work, and two worker processes (the pools start after the first four batches).
KILLED = {**TINY_DATA, "batch_docs": 20, "num_proc": 2}
# The rerun: the same folder (num_proc is execution-only too), in this process to count its work.
RERUN = {**KILLED, "num_proc": 1}
PHASES = list(PHASE_TIMINGS)
UNITS = {"spool": "batches", "tokenizer": "trainings", "encode": "batches", "order": "orderings", "shards": "shards"}


def _rows(folder: Path) -> np.ndarray:
    parts = []
    for split in ("train", "val"):
        ds = PackedDataset(folder, split)  # verifies every shard's sha256
        parts.append(ds.rows(np.arange(len(ds))))
    return np.concatenate(parts)


def _comparable(manifest: dict) -> dict:
    """A manifest without what may differ between builds of the same data: timings, execution settings."""
    out = {k: v for k, v in manifest.items() if k not in ("timings_s", "created", "manifest_sha256")}
    out["data_config"] = {k: v for k, v in out["data_config"].items() if k not in EXECUTION_ONLY_FIELDS}
    return out


def _assert_same_build(folder: Path, reference: Path) -> None:
    np.testing.assert_array_equal(_rows(folder), _rows(reference))
    assert (folder / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
    assert _comparable(load_manifest(folder)) == _comparable(load_manifest(reference))
    assert not [p.name for p in folder.parent.iterdir() if p != folder], "partial folders or lock files remain"


def _session(sid: int) -> list[int]:
    """Processes of session `sid` (the killed build and its workers ran in one)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            found.append(int(stat.parent.name))
    return found


def _killed_build(root: Path, fault: str) -> tuple[int, str]:
    """Run `prepare` of KILLED in a child with `fault`; wait until no process of its session is left."""
    proc = worker("prepare", {"data_root": str(root), "data": KILLED}, fault=fault)
    code, out = finish(proc)
    wait_for(lambda: not _session(proc.pid), timeout=20, what="the killed build's worker processes to exit")
    return code, out


class UnitCounter(Counter):
    """Units of work each phase does in this process (batches normalised or encoded, tokenizer
    trainings, orderings, shards opened)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        from cramming.corpus import shards
        from cramming.data import order, pack, spool, tokenizer

        for module, name, phase in ((spool, "_normalize", "spool"), (tokenizer, "train_tokenizer", "tokenizer"),
                                    (pack, "_encode", "encode"), (order, "order_train", "order"),
                                    (shards.ShardWriter, "_open", "shards")):
            monkeypatch.setattr(module, name, self._counting(getattr(module, name), phase))

    def _counting(self, fn, phase: str):
        def counted(*args, **kwargs):
            self[phase] += 1
            return fn(*args, **kwargs)

        return counted


@pytest.fixture(scope="module")
def full_units(tmp_path_factory) -> Counter:
    """The units of work of an uninterrupted build of RERUN."""
    with pytest.MonkeyPatch.context() as mp:
        units = UnitCounter(mp)
        prepare(DataConfig(**RERUN), tmp_path_factory.mktemp("full"))
    return Counter(units)


# point -> (what the row says, the phase it interrupts, units of that phase the killed run finished
# (None: the phase restarts as a whole)).
POINTS = {
    "data.spool:6": ("while spooling documents (6th batch)", "spool", 6),
    "data.tokenizer:20": ("during tokenizer training", "tokenizer", None),
    "data.tokenize:7": ("during tokenization (7th encoded batch)", "encode", 7),
    "data.order": ("while ordering the rows", "order", None),
    "data.shard_write:3": ("while writing a shard (3rd write)", "shards", 2),
    "data.manifest": ("half-way through writing manifest.json", None, None),
    "data.rename": ("after manifest.json, before the folder rename", None, None),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_sigkill_in_each_phase_then_rerun_continues(point, tiny_data, full_units, tmp_path, monkeypatch,
                                                     outcome) -> None:
    what, phase, finished = POINTS[point]
    root = tmp_path / "data"
    code, out = _killed_build(root, point)
    assert code == -9, f"the fault point {point} was not reached:\n{out}"
    final = prepared_dir(DataConfig(**KILLED), root)
    assert not (final / "manifest.json").exists(), "a killed build left a folder that looks complete"
    assert final.with_name(final.name + ".partial").is_dir(), "the killed build's progress was not kept"
    units = UnitCounter(monkeypatch)
    assert prepare(DataConfig(**RERUN), root) == final
    _assert_same_build(final, tiny_data)
    cut = PHASES.index(phase) if phase else len(PHASES)
    assert all(units[p] == 0 for p in PHASES[:cut]), f"finished phases were redone: {dict(units)}"
    assert all(units[p] == full_units[p] for p in PHASES[cut + 1:]), (dict(units), dict(full_units))
    if phase is None:
        lost, unit = 0, "units"
    elif finished is None:  # the phase restarts: what the killed run did of it is lost
        lost, unit = units[phase], UNITS[phase]
        assert units[phase] == full_units[phase]
    else:  # units redone that the killed run had finished
        lost, unit = units[phase] - (full_units[phase] - finished), UNITS[phase]
    outcome.add(f"SIGKILL of `cram data` {what.split(' (')[0]}", f"CRAMMING_FAULT={point} (the process SIGKILLs "
                "itself there; two worker processes)", BEHAVIOUR_KILL, True, lost=lost, unit=unit, bound=1,
                detail=f"{point}: the rerun did {dict(units) or 'no phase work'} of {dict(full_units)} units")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 9, 12, 17])  # draws that land in five different phases
def test_sigkill_at_random_moment_then_rerun(seed, tiny_data, tmp_path, outcome) -> None:
    """Kill at the k-th fault point of any kind, k drawn from the seed: any phase, any unit."""
    # A clean build passes ~15 spool, ~30 tokenizer, ~15 tokenize, 1 order, ~6 shard and 2 manifest points.
    k = random.Random(seed).randint(1, 68)
    root = tmp_path / "data"
    code, out = _killed_build(root, f"*:{k}")
    assert code in (-9, 0), out
    progress = sorted((root / (prepared_dir(DataConfig(**KILLED), root).name + ".partial")).glob("progress.json"))
    phases = json.loads(progress[0].read_text())["phases"] if progress else {}
    interrupted = next((p for p in PHASES if not phases.get(p, {}).get("done")), "manifest/rename")
    prepare(DataConfig(**RERUN), root)
    _assert_same_build(prepared_dir(DataConfig(**KILLED), root), tiny_data)
    outcome.add("SIGKILL of `cram data` at a random point", "CRAMMING_FAULT=*:k, k drawn from the seed (the k-th "
                "spool/tokenizer/tokenize/order/shard/manifest point)", BEHAVIOUR_KILL, True, unit="units",
                detail=f"seed {seed}: k={k}, {'killed in ' + interrupted if code == -9 else 'finished before k'}")


def test_killed_worker_process_then_rerun(tiny_data, full_units, tmp_path, monkeypatch, outcome) -> None:
    root = tmp_path / "data"
    code, out = _killed_build(root, "data.worker:2")  # each encoding worker dies at its 2nd batch
    assert code == 2, out
    assert "worker process ended abruptly" in out and "progress is kept in" in out and "Traceback" not in out, out
    units = UnitCounter(monkeypatch)
    prepare(DataConfig(**RERUN), root)
    _assert_same_build(prepared_dir(DataConfig(**KILLED), root), tiny_data)
    assert units["spool"] == units["tokenizer"] == 0 and 0 < units["encode"] < full_units["encode"], dict(units)
    outcome.add("SIGKILL of a `cram data` worker process (as by the OOM killer)", "CRAMMING_FAULT=data.worker:2 "
                "(each encoding worker SIGKILLs itself at its 2nd batch)", "the build stops with exit 2: 'a worker "
                "process ended abruptly ... lower data.num_proc'; its progress is kept and the rerun continues "
                "encoding after the last committed batch; output equals an uninterrupted build", True, unit="batches",
                detail=f"the rerun encoded {units['encode']} of {full_units['encode']} batches")


def test_two_builds_of_one_config_at_once_build_it_once(tiny_data, tmp_path, outcome) -> None:
    from cramming.data.workdir import BuildLock

    root = tmp_path / "data"
    root.mkdir()
    final = prepared_dir(DataConfig(**KILLED), root)
    lock = final.with_name(final.name + ".lock")
    with BuildLock(lock):  # held here until both builds wait for it: then they race for it
        procs = [worker("prepare", {"data_root": str(root), "data": KILLED}) for _ in range(2)]
        inode = str(os.stat(lock).st_ino)
        wait_for(lambda: sum("->" in line and line.split()[-3].endswith(f":{inode}")
                             for line in Path("/proc/locks").read_text().splitlines()) == 2,
                 timeout=60, what="both builds to wait for the lock")
    results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    outs = [out for _, out in results]
    built = [o for o in outs if "prepared " + str(final) in o and "cache hit" not in o]
    reused = [o for o in outs if "prepared by another process meanwhile" in o]
    assert len(built) == 1 and len(reused) == 1, outs
    _assert_same_build(final, tiny_data)
    outcome.add("Two `cram data` of one config at once (a sweep starting together)", "two builds started while a "
                "third process holds `<name>-<hash>.lock`, then released", "flock on the lock file: one builds, the "
                "other waits ('waiting for pid N, which is preparing the same data') and then reuses the folder",
                True, detail="one build, one cache hit after waiting")


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


def test_disk_full_while_writing_a_shard(tiny_data, tmp_path, monkeypatch, outcome) -> None:
    import cramming.corpus.shards as shards

    root = tmp_path / "data"
    with monkeypatch.context() as patched:
        patched.setattr(shards, "open", _enospc_after(20_000), raising=False)
        with pytest.raises(DataError) as err:
            prepare(DataConfig(**RERUN), root)
    msg = str(err.value)
    assert "No space left on device" in msg and "is kept in" in msg and "run the same command again" in msg, msg
    units = UnitCounter(monkeypatch)
    prepare(DataConfig(**RERUN), root)
    _assert_same_build(prepared_dir(DataConfig(**RERUN), root), tiny_data)
    assert [units[p] for p in PHASES[:-1]] == [0, 0, 0, 0], dict(units)
    outcome.add("Disk full while writing a shard", "the shard writer's file raises OSError(ENOSPC) after 20 kB",
                "DataError 'writing <partial folder> failed: No space left on device ... the finished part of the build "
                "(N MB) is kept ... run the same command again to continue'; the rerun continues with the shards "
                "(nothing before them is redone) and equals an uninterrupted build", True, unit="shards", bound=1,
                detail=f"the rerun wrote {units['shards']} shards and redid no other phase")


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
