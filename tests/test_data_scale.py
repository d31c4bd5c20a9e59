"""`cram data` at scale: the fast normaliser, bounded-memory ordering, worker processes, resumed builds
(interrupted in this process; SIGKILLs are in tests/reliability/test_rel_data.py) and the hub path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cramming.corpus.shards import PackedDataset, load_manifest
from cramming.data import order, pack, parallel
from cramming.data.normalize import TextNormalizer, build_normalizer, normalize_text
from cramming.data.prepare import DataConfig, prepare, prepared_dir
from cramming.data.sources import HubSource
from cramming.errors import ConfigError, DataError

FLAGS = [(a, b, c) for a in (True, False) for b in (True, False) for c in (True, False)]


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRAMMING_NO_PROGRESS", "1")


def small(**kw) -> DataConfig:
    base = dict(name="sc", source="embedded", embedded_files=["moby_dick"], max_chars=120_000, vocab_size=300,
                seq_len=32, val_fraction=0.05, compression_threshold=1.0, shard_sequences=300, batch_docs=20,
                num_proc=1)
    return DataConfig(**{**base, **kw})


def all_rows(folder: Path) -> np.ndarray:
    return np.concatenate([PackedDataset(folder, s).rows(np.arange(len(PackedDataset(folder, s, verify=False))))
                           for s in ("train", "val")])


def same_build(a: Path, b: Path) -> bool:
    drop = ("timings_s", "created", "manifest_sha256", "data_config")
    ma, mb = ({k: v for k, v in load_manifest(f).items() if k not in drop} for f in (a, b))
    return ma == mb and np.array_equal(all_rows(a), all_rows(b)) and \
        (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


# --- normalisation ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=60) | st.text(max_size=30),
       st.sampled_from(FLAGS))
def test_fast_normalizer_equals_the_tokenizers_one(text: str, flags: tuple[bool, bool, bool]) -> None:
    assert TextNormalizer(*flags)(text) == normalize_text(build_normalizer(*flags), text)


# --- ordering in bounded memory ----------------------------------------------------------------


@pytest.mark.parametrize("bucket_rows", [7, 64, 10_000])
def test_bucket_sort_equals_a_stable_argsort(bucket_rows: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    keys = np.round(rng.random(3000), 2)  # many ties
    keys[100:400] = 0.5  # a run of equal keys larger than a bucket
    mm = np.memmap(tmp_path / "k.bin", dtype=np.float64, mode="w+", shape=keys.shape)
    mm[:] = keys
    out = np.empty(len(keys), dtype=np.int64)
    order.argsort_descending(mm, out, tmp_path, bucket_rows=bucket_rows)
    assert np.array_equal(out, np.argsort(-keys, kind="stable"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.bin"]  # its bucket files are gone


def test_split_and_orders_equal_the_in_memory_versions(tmp_path: Path) -> None:
    n, seed = 5000, 3
    val = order.split_validation(n, 0.01, 2048, seed, tmp_path)
    perm = np.random.default_rng([seed, 5]).permutation(n)
    assert np.array_equal(val, np.sort(perm[:50]))
    train = np.sort(perm[50:])
    assert np.array_equal(order.train_rows(val, np.arange(n - 50)), train)
    rows = np.random.default_rng(1).integers(0, 40, size=(n, 8))
    shuffled = order.order_train(rows, val, "shuffle", 40, seed, tmp_path / "o.bin", tmp_path, progress=False)
    assert np.array_equal(shuffled, np.random.default_rng([seed, 6]).permutation(train))
    by_prevalence = order.order_train(rows, val, "prevalence", 40, seed, tmp_path / "p.bin", tmp_path, progress=False)
    prob = np.bincount(rows.ravel(), minlength=40) / rows.size
    assert np.array_equal(by_prevalence, train[np.argsort(-prob[rows].mean(1)[train], kind="stable")])
    assert np.array_equal(order.order_train(rows, val, "none", 40, seed, tmp_path / "n.bin", tmp_path,
                                            progress=False), train)


# --- worker processes -----------------------------------------------------------------------


def _init(offset: int, in_worker: bool) -> None:
    parallel_state["offset"], parallel_state["in_worker"] = offset, in_worker


def _task(i: int) -> tuple[int, bool, int]:
    return i + parallel_state["offset"], parallel_state["in_worker"], os.getpid()


parallel_state: dict = {}


def test_ordered_map_keeps_order_across_the_switch_to_workers() -> None:
    got = list(parallel.ordered_map(_task, range(30), 2, initializer=_init, initargs=(100,)))
    assert [g[0] for g in got] == list(range(100, 130))
    assert [g[1] for g in got[:4]] == [False] * 4 and all(g[1] for g in got[4:])  # 2 per worker inline first
    assert os.getpid() not in {g[2] for g in got[4:]}
    assert [g[1] for g in parallel.ordered_map(_task, range(5), 1, initializer=_init, initargs=(0,))] == [False] * 5
    # Not worth workers (e.g. text that normalises faster than it is read): everything stays here.
    kept = list(parallel.ordered_map(_task, range(9), 2, initializer=_init, initargs=(0,), worth_workers=lambda: False))
    assert [g[0] for g in kept] == list(range(9)) and not any(g[1] for g in kept)


def test_num_proc_defaults_to_the_available_cores() -> None:
    assert DataConfig().num_proc == 0 and parallel.resolve_num_proc(0) == len(os.sched_getaffinity(0))
    assert parallel.resolve_num_proc(3) == 3
    with pytest.raises(ConfigError, match="num_proc"):
        DataConfig(num_proc=-1)


def test_workers_give_the_same_build(tmp_path: Path, embedded_prose: list[str]) -> None:
    # Accented text takes the Rust normaliser, so normalising dominates and its workers start too.
    accented = [doc.replace("e", "é").replace("a", "à") for doc in embedded_prose]
    (tmp_path / "c.txt").write_text("\n\n".join(accented))
    cfg = small(source="local", local_paths=[str(tmp_path / "c.txt")], max_chars=None)
    one = prepare(cfg, tmp_path / "one")
    two = prepare(DataConfig(**{**cfg.__dict__, "num_proc": 2}), tmp_path / "two")  # 20-document batches
    assert same_build(one, two)


# --- resuming in this process ------------------------------------------------------------------


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, module, name: str, nth: int) -> None:
    real, calls = getattr(module, name), [0]

    def fn(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fn)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    os.environ["CRAMMING_NO_PROGRESS"] = "1"
    return prepare(small(), tmp_path_factory.mktemp("ref"))


@pytest.mark.parametrize("static", [0, 2])
def test_ctrl_c_keeps_the_progress_and_the_rerun_continues(static: int, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = small(static_masking_copies=static, packing="doc-bounded" if static else "full-sentences")
    fresh = prepare(cfg, tmp_path / "fresh")
    with monkeypatch.context() as m:
        _interrupt_at(m, pack, "_encode", 5)
        with pytest.raises(KeyboardInterrupt):
            prepare(cfg, tmp_path / "r")
    partial = prepared_dir(cfg, tmp_path / "r").with_name(prepared_dir(cfg, tmp_path / "r").name + ".partial")
    encoded = json.loads((partial / "progress.json").read_text())["phases"]["encode"]
    assert encoded["docs_encoded"] == 4 * 20 and not encoded["done"]
    assert not (tmp_path / "r" / (partial.name[: -len(".partial")] + ".lock")).exists()
    with monkeypatch.context() as m:  # and once more in the middle of the static-masked shards
        _interrupt_at(m, order, "write_in_order", 2)
        with pytest.raises(KeyboardInterrupt):
            prepare(cfg, tmp_path / "r")
    assert same_build(prepare(cfg, tmp_path / "r"), fresh)


def test_changed_source_files_start_the_build_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "c.txt"
    text = "\n\n".join(f"paragraph {i}: " + "the whale and the sea and the ship. " * (5 + i % 7) for i in range(400))
    corpus.write_text(text)
    cfg = DataConfig(name="ch", source="local", local_paths=[str(corpus)], vocab_size=100, seq_len=32,
                     compression_threshold=1.0, batch_docs=20, num_proc=1)
    with monkeypatch.context() as m:
        _interrupt_at(m, pack, "_encode", 3)
        with pytest.raises(KeyboardInterrupt):
            prepare(cfg, tmp_path / "r")
    corpus.write_text(text.replace("whale", "squid"))
    got = prepare(cfg, tmp_path / "r")
    assert same_build(got, prepare(cfg, tmp_path / "fresh"))


def test_a_partial_build_that_does_not_match_its_progress_starts_over(reference: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        _interrupt_at(m, pack, "_encode", 3)
        with pytest.raises(KeyboardInterrupt):
            prepare(small(), tmp_path)
    (partial,) = tmp_path.glob("*.partial")
    with open(partial / "rows.bin", "r+b") as fh:  # as after a power cut: the file lost its tail
        fh.truncate(10)
    assert same_build(prepare(small(), tmp_path), reference)


def test_failed_input_leaves_nothing_and_a_stale_lock_file_blocks_nothing(tmp_path: Path) -> None:
    cfg = small(compression_threshold=0.01)
    final = prepared_dir(cfg, tmp_path)
    final.with_name(final.name + ".lock").write_text("12345")  # left by a killed process: no flock held
    with pytest.raises(DataError, match="filtering removed the whole corpus"):
        prepare(cfg, tmp_path)
    assert not list(tmp_path.iterdir())


# --- the hub path -----------------------------------------------------------------------------


def _jsonl(tmp_path: Path, n: int = 600) -> Path:
    path = tmp_path / "c4-like.jsonl"
    words = "the old man and the sea went out in the boat at dawn and came back late in the night".split()
    rng = np.random.default_rng(0)
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": f"doc {i}: " + " ".join(rng.choice(words, 40 + i % 50)), "url": str(i)}) + "\n")
    return path


def test_hub_stream_dropped_mid_way_is_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets` streaming from local files, the code path of C4 and the Pile: a connection that drops
    after 250 records stops the build with a clear message; the rerun skips what was read and continues."""
    import datasets

    src = HubSource(path="json", data_files=[str(_jsonl(tmp_path))])
    cfg = DataConfig(name="hub", source="hub", hub_sources=[src], max_documents=500, vocab_size=120, seq_len=32,
                     compression_threshold=1.0, batch_docs=50, num_proc=1)
    real = datasets.load_dataset

    def dropping(*args, **kwargs):
        assert kwargs.get("streaming") is True
        for i, record in enumerate(real(*args, **kwargs)):
            if i == 250:
                raise ConnectionError("Connection reset by peer")
            yield record

    with monkeypatch.context() as m:
        m.setattr(datasets, "load_dataset", dropping)
        with pytest.raises(DataError, match=r"reading failed after 250 documents.*ConnectionError.*progress is kept"):
            prepare(cfg, tmp_path / "r")
    spooled = json.loads(next((tmp_path / "r").glob("*.partial/progress.json")).read_text())["phases"]["spool"]
    assert spooled["documents_read"] == 250
    resumed = prepare(cfg, tmp_path / "r")
    assert load_manifest(resumed)["counts"]["documents_read"] == 500
    assert same_build(resumed, prepare(cfg, tmp_path / "fresh"))

