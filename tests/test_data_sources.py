"""Sources: local formats and units, the hub code path on local json files, offline failures."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

from cramming.corpus.shards import load_manifest
from cramming.data import sources
from cramming.data.prepare import DataConfig, prepare
from cramming.data.sources import HubSource, SourceStats, iter_documents, iter_hub
from cramming.errors import ConfigError, DataError


def docs_of(**kw) -> tuple[list[str], SourceStats]:
    cfg = DataConfig(name="s", **kw)
    stats = SourceStats()
    return list(iter_documents(cfg, stats)), stats


def test_embedded_blocks_and_selection() -> None:
    it = iter_documents(DataConfig(embedded_files=["moby_dick"]), SourceStats())
    first = [next(it) for _ in range(3)]
    assert all(d.strip() and "\n\n" not in d for d in first)
    with pytest.raises(DataError, match="unknown embedded file"):
        list(iter_documents(DataConfig(embedded_files=["nope"]), SourceStats()))


def test_local_text_units(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one two\nthree\n\nfour five\n")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"six\n\nseven\n"))
    (tmp_path / ".hidden.txt").write_text("never\n")
    d, _ = docs_of(source="local", local_paths=[str(tmp_path)], local_unit="block")
    assert d == ["one two\nthree", "four five", "six", "seven"]
    d, _ = docs_of(source="local", local_paths=[str(tmp_path)], local_unit="line")
    assert d == ["one two", "three", "four five", "six", "seven"]
    d, _ = docs_of(source="local", local_paths=[str(tmp_path / "a.txt")], local_unit="file")
    assert d == ["one two\nthree\n\nfour five"]
    d, _ = docs_of(source="local", local_paths=[str(tmp_path / "*.txt")], local_unit="line")
    assert d == ["one two", "three", "four five"]
    with pytest.raises(DataError, match="does not exist"):
        docs_of(source="local", local_paths=[str(tmp_path / "missing")])


def test_local_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [{"text": "hello world"}, {"body": {"t": "nested"}}, {"text": "again"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    d, stats = docs_of(source="local", local_paths=[str(tmp_path / "d.jsonl")])
    assert d == ["hello world", "again"] and stats.documents_skipped_unreadable == 2
    d, _ = docs_of(source="local", local_paths=[str(tmp_path / "d.jsonl")], text_field="body.t")
    assert d == ["nested"]
    with pytest.raises(DataError, match="d.jsonl:2 has no string field"):
        docs_of(source="local", local_paths=[str(tmp_path / "d.jsonl")], strict=True, text_field="text")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a b c", "d e"], "id": [1, 2]}), tmp_path / "p.parquet")
    d, _ = docs_of(source="local", local_paths=[str(tmp_path / "p.parquet")], text_field="content")
    assert d == ["a b c", "d e"]
    with pytest.raises(DataError, match="no column 'text'"):
        docs_of(source="local", local_paths=[str(tmp_path / "p.parquet")])


def test_zst_needs_zstandard(tmp_path: Path) -> None:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        (tmp_path / "x.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(DataError, match="zstandard"):
            docs_of(source="local", local_paths=[str(tmp_path / "x.jsonl.zst")])
    else:
        pytest.skip("zstandard installed: the missing-package message cannot be shown")


def pile_like(tmp_path: Path) -> Path:
    text = (
        "the old man and the sea went out in the boat at dawn and came back late in the night. " * 8
    )
    recs = []
    for i in range(300):
        name = ["Gutenberg (PG-19)", "Github", "Wikipedia (en)", "Pile-CC"][i % 4]
        recs.append({"text": f"{name} doc {i}: {text}", "meta": {"pile_set_name": name}})
    path = tmp_path / "pile.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def test_hub_code_path_on_local_json(tmp_path: Path) -> None:
    path = pile_like(tmp_path)
    src = HubSource(path="json", data_files=[str(path)], subset_field="meta.pile_set_name",
                    subsets=["Gutenberg (PG-19)", "Wikipedia (en)"])
    d = list(iter_hub([src], 5, SourceStats(), strict=False))
    assert len(d) == 150 and all(x.startswith(("Gutenberg", "Wikipedia")) for x in d)
    # two sources are interleaved, so a document limit samples both
    a = HubSource(path="json", data_files=[str(path)], subset_field="meta.pile_set_name", subsets=["Github"])
    b = HubSource(path="json", data_files=[str(path)], subset_field="meta.pile_set_name", subsets=["Pile-CC"])
    d = list(iter_hub([a, b], 5, SourceStats(), strict=False))[:4]
    assert [x.split()[0] for x in d] == ["Github", "Pile-CC", "Github", "Pile-CC"]
    # and the whole pipeline runs on it, with max_documents
    cfg = DataConfig(name="pile", source="hub", hub_sources=[src], max_documents=100, vocab_size=100,
                     compression_threshold=0.8)
    folder = prepare(cfg, tmp_path / "out")
    assert load_manifest(folder)["counts"]["documents_read"] == 100


def test_offline_hub_fails_fast_with_advice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(name="c4", source="hub", hub_sources=[HubSource(path="allenai/c4", name="en")])
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        prepare(cfg, tmp_path)
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "allenai/c4" in msg and "offline" in msg and "data=local" in msg
    assert not list(tmp_path.iterdir()), "a build that cannot start leaves nothing behind"


def test_unreachable_hub_fails_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    import huggingface_hub

    def unreachable(self, repo_id, **kw):
        assert kw.get("timeout") == 3.0
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    with pytest.raises(DataError, match=r"wikimedia/wikipedia.*ConnectionError.*data=local"):
        list(sources.iter_hub([HubSource(path="wikimedia/wikipedia", name="20231101.en")], 3.0, SourceStats(), False))


def test_packaged_builder_needs_files() -> None:
    with pytest.raises(ConfigError, match=r"data.hub_sources\[json\].data_files is empty"):
        HubSource(path="json")
