"""`cram data` end to end on small fixtures: packing, [SEP], normalisation, filter, sorting, cache,
integrity checks, bad input, the CLI."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cramming.corpus.shards import PackedDataset, load_manifest
from cramming.data.normalize import build_normalizer, normalize_text
from cramming.data.prepare import DataConfig, prepare, prepared_dir
from cramming.data.tokenizer import load_hf_tokenizer, load_tokenizer
from cramming.errors import ConfigError, DataError


def small(**kw) -> DataConfig:
    """A tiny embedded config (Austen paragraphs, ~300 KB) unless overridden."""
    base = dict(name="t", source="embedded", embedded_files=["austen"], max_chars=300_000, vocab_size=800,
                compression_threshold=0.6, val_fraction=0.02, num_proc=1)
    base.update(kw)
    return DataConfig(**base)


def all_rows(folder: Path) -> np.ndarray:
    parts = [PackedDataset(folder, s).rows(np.arange(len(PackedDataset(folder, s, verify=False)))) for s in ("train", "val")]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return prepare(small(), tmp_path_factory.mktemp("data"))


def test_layout_and_manifest(built: Path) -> None:
    m = load_manifest(built)
    assert built.name.startswith("t-") and built == prepared_dir(small(), built.parent)
    assert m["seq_len"] == 128 and m["vocab_size"] == 800 and m["dtype"] == "uint16"
    assert m["special_tokens"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    for split in ("train", "val"):
        info = m["splits"][split]
        assert info["num_sequences"] == sum(s["rows"] for s in info["shards"]) > 0
        for s in info["shards"]:
            assert (built / s["path"]).stat().st_size == s["rows"] * 128 * 2
    c = m["counts"]
    assert c["sequences"] == c["train_sequences"] + c["val_sequences"]
    assert c["tokens"] == 128 * c["sequences"]
    assert c["documents_read"] == c["documents_packed"] + c["documents_filtered"]
    assert set(m["timings_s"]) >= {"read_normalize_dedup", "tokenizer", "tokenize_filter_pack", "write_shards", "total"}
    assert m["data_config"]["vocab_size"] == 800 and m["config_hash"] in built.name
    assert not list(built.glob("*.tmp*")) and not (built / "docs.bin").exists()
    ds = PackedDataset(built)
    row = ds[0]
    assert row.dtype.is_floating_point is False and str(row.dtype) == "torch.int64" and row.shape == (128,)
    assert len(ds) == m["splits"]["train"]["num_sequences"]


def test_tokenizer_is_bert_style_and_loads_in_transformers(built: Path) -> None:
    hf = load_hf_tokenizer(built / "tokenizer.json")
    enc = hf("Emma was Happy.", "Mr. Knightley — café!")
    ids = enc["input_ids"]
    assert ids[0] == 2 and ids.count(3) == 2 and ids[-1] == 3
    assert set(enc["token_type_ids"]) == {0, 1}
    # The saved tokenizer normalises: case, accents and non-ASCII do not matter.
    assert hf("CAFÉ 東京")["input_ids"] == hf("cafe")["input_ids"]
    assert hf.pad_token_id == 0 and hf.mask_token_id == 4


def test_normalisation() -> None:
    norm = build_normalizer()
    assert normalize_text(norm, "  Héllo WÖRLD, ñandú — 東京 Café  ") == "hello world, nandu   cafe"
    assert normalize_text(build_normalizer(False, False, False), "Héllo") == "Héllo"
    assert normalize_text(build_normalizer(lowercase=False), "Émile") == "Emile"


def test_rows_separated_by_sep_in_order(tmp_path: Path) -> None:
    # Documents whose words are each a single token; with no filter, no split, no sorting the rows
    # are exactly: doc1 [SEP] doc2 [SEP] ... cut every 128 tokens, tail dropped.
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(300)]
    (tmp_path / "c.txt").write_text("\n".join(docs) + "\n")
    cfg = DataConfig(name="sep", source="local", local_paths=[str(tmp_path / "c.txt")], local_unit="line",
                     vocab_size=5000, min_frequency=1, compression_filter=False, val_fraction=0.0,
                     sorting="none", tokenizer="wordpiece")
    with pytest.raises(DataError, match="too large"):
        prepare(cfg, tmp_path / "out")  # 8 words: nowhere near 5000 tokens to learn
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    cfg = DataConfig(**{**cfg.__dict__, "vocab_size": 40})
    folder = prepare(cfg, tmp_path / "out")
    tok = load_tokenizer(folder / "tokenizer.json")
    stream: list[int] = []
    for d in docs:
        stream += tok.encode(d, add_special_tokens=False).ids + [3]
    rows = all_rows(folder)
    n = len(stream) // 128
    assert rows.shape == (n, 128)
    assert rows.ravel().tolist() == stream[: n * 128]
    assert load_manifest(folder)["counts"]["tokens_dropped_tail"] == len(stream) - n * 128


def test_compression_filter_drops_planted_documents(tmp_path: Path, embedded_prose: list[str]) -> None:
    prose = embedded_prose
    b64 = base64.b64encode(random.Random(1).randbytes(4000)).decode()
    html = "".join(f'<div class="c{i}"><a href="/p?id={i * 7919}&x=q{i}">k{i}</a></div>' for i in range(120))
    docs = prose[:200] + [b64] + prose[200:] + [html]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    cfg = DataConfig(name="filt", source="local", local_paths=[str(tmp_path / "corpus.txt")], vocab_size=1000,
                     compression_threshold=0.45, val_fraction=0.0, sorting="none")
    folder = prepare(cfg, tmp_path / "out")
    counts = load_manifest(folder)["counts"]
    assert counts["documents_filtered"] >= 2
    assert counts["chars_filtered"] >= len(b64) + len(html)
    tok = load_tokenizer(folder / "tokenizer.json")
    flat = all_rows(folder).ravel()

    def contains(text: str) -> bool:
        ids = tok.encode(text, add_special_tokens=False).ids
        window = np.array(ids[len(ids) // 2: len(ids) // 2 + 12])
        hits = np.flatnonzero(flat[: len(flat) - len(window)] == window[0])
        return any((flat[h:h + len(window)] == window).all() for h in hits)

    assert not contains(b64) and not contains(html)
    long_prose = [p for p in prose if len(p) > 2000]
    assert long_prose and all(contains(p) for p in long_prose[:5])


def test_prevalence_sorting_is_monotone(built: Path) -> None:
    m = load_manifest(built)
    train = PackedDataset(built).rows(np.arange(m["splits"]["train"]["num_sequences"]))
    counts = np.bincount(all_rows(built).ravel(), minlength=m["vocab_size"])
    prob = counts / counts.sum()
    score = prob[train].mean(axis=1)
    assert (np.diff(score) <= 1e-12).all()
    assert score[0] > score[-1]


def test_shuffle_and_none_orders(tmp_path: Path) -> None:
    a = prepare(small(sorting="none", max_chars=120_000), tmp_path)
    # The tokenizers trainers break ties in hash order, so reuse a's tokenizer (tokenizer_file)
    # to compare row sets exactly.
    b = prepare(small(sorting="shuffle", max_chars=120_000, tokenizer_file=str(a / "tokenizer.json")), tmp_path)
    ra, rb = all_rows(a), all_rows(b)
    assert ra.shape == rb.shape and not np.array_equal(ra, rb)
    assert sorted(map(bytes, ra)) == sorted(map(bytes, rb))  # same rows, other order


def test_cache_hit_does_not_rebuild(built: Path, caplog) -> None:
    manifest = built / "manifest.json"
    before = manifest.stat().st_mtime_ns
    caplog.set_level("INFO")
    start = time.perf_counter()
    assert prepare(small(), built.parent) == built
    assert time.perf_counter() - start < 2.0
    assert manifest.stat().st_mtime_ns == before
    assert "cache hit" in caplog.text


def test_interrupted_build_is_restarted(tmp_path: Path) -> None:
    cfg = small(max_chars=60_000)
    final = prepared_dir(cfg, tmp_path)
    stale = final.with_name(final.name + ".tmp-999999999")  # a pid that cannot exist
    stale.mkdir(parents=True)
    (stale / "train-00000.bin").write_bytes(b"half")
    final.mkdir()  # a folder without manifest: never trusted
    assert prepare(cfg, tmp_path) == final
    assert not stale.exists() and (final / "manifest.json").is_file()


def test_tampered_and_truncated_shards(built: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    shard = copy / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-00000.bin.*sha256"):
        PackedDataset(copy)
    PackedDataset(copy, verify=False)  # opting out of verification still opens it
    shard.write_bytes(bytes(data[:-256]))
    with pytest.raises(DataError, match="train-00000.bin.*bytes"):
        PackedDataset(copy, verify=False)
    shard.unlink()
    with pytest.raises(DataError, match="missing train-00000.bin"):
        load_manifest(copy)


def test_manifest_problems(built: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 999
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="format_version 999"):
        load_manifest(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json is missing"):
        PackedDataset(copy)
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "nope")


def test_empty_and_emptied_corpora(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("\n\n\n")
    with pytest.raises(DataError, match="empty corpus"):
        prepare(DataConfig(name="e", source="local", local_paths=[str(tmp_path / "empty")]), tmp_path / "o")
    (tmp_path / "cjk.txt").write_text("東京タワー\n\n北京大学\n")
    with pytest.raises(DataError, match="empty after normalisation"):
        prepare(DataConfig(name="e", source="local", local_paths=[str(tmp_path / "cjk.txt")]), tmp_path / "o")
    with pytest.raises(DataError, match="filtering removed the whole corpus"):
        prepare(small(compression_threshold=0.01, max_chars=50_000), tmp_path / "o")
    assert not list((tmp_path / "o").iterdir()), "failed builds leave nothing behind"


def test_non_utf8_skipped_or_strict(tmp_path: Path, embedded_prose: list[str]) -> None:
    good = tmp_path / "c" / "good.txt"
    good.parent.mkdir()
    good.write_text("\n\n".join(embedded_prose) + "\n")
    (tmp_path / "c" / "bad.txt").write_bytes(b"fine first block\n\nbroken \xff\xfe block\n\nfine again\n")
    cfg = DataConfig(name="u", source="local", local_paths=[str(tmp_path / "c")], vocab_size=300,
                     compression_threshold=0.8)
    folder = prepare(cfg, tmp_path / "o")
    assert load_manifest(folder)["counts"]["documents_skipped_unreadable"] == 1
    with pytest.raises(DataError, match=r"bad.txt:3 is not valid UTF-8"):
        prepare(DataConfig(**{**cfg.__dict__, "strict": True}), tmp_path / "o")


def test_static_masking(tmp_path: Path) -> None:
    folder = prepare(small(max_chars=100_000, static_masking_copies=2, static_mask_rate=0.2), tmp_path)
    m = load_manifest(folder)
    assert m["static_masking"]["copies"] == 2
    ds = PackedDataset(folder)
    base = m["static_masking"]["base_sequences"]
    assert len(ds) == 2 * base
    labels = ds.labels(np.arange(len(ds)))
    ids = ds.rows(np.arange(len(ds)))
    tgt = labels != -100
    assert abs(tgt.mean() - 0.2) < 0.03
    assert not np.array_equal(tgt[:base], tgt[base:]), "each copy has its own masks"
    assert np.array_equal(np.where(tgt[:base], labels[:base], ids[:base])[~tgt[base:]], ids[base:][~tgt[base:]])
    assert (ids[tgt] == 4).mean() > 0.7


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="sorting"):
        DataConfig(sorting="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="local_paths"):
        DataConfig(name="x", source="local")
    with pytest.raises(ConfigError, match="tokenizer"):
        DataConfig(tokenizer="sentencepiece")


@pytest.mark.parametrize("kind", ["bpe", "bytelevel-bpe", "unigram"])
def test_other_tokenizers(kind: str, tmp_path: Path) -> None:
    folder = prepare(small(tokenizer=kind, max_chars=80_000, vocab_size=600, compression_threshold=1.0), tmp_path)
    m = load_manifest(folder)
    assert m["special_tokens"]["mask"] == 4 and m["vocab_size"] <= 600
    hf = load_hf_tokenizer(folder)
    ids = hf("a b", "c")["input_ids"]
    assert ids[0] == 2 and ids.count(3) == 2


def test_cli_writes_manifest_shards_tokenizer(tmp_path: Path) -> None:
    env = {**os.environ, "CRAMMING_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "cramming.cli", "data", "data=embedded", "data.vocab_size=500",
           "data.max_documents=1500", "data.embedded_files=[austen]", "data.compression_threshold=0.6",
           f"paths.data_root={tmp_path / 'root'}", f"paths.out_root={tmp_path / 'out'}"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "prepared data:" in res.stdout and "1500 read" in res.stdout
    (folder,) = (tmp_path / "root").iterdir()
    assert folder.name.startswith("embedded-")
    assert {"manifest.json", "tokenizer.json", "train-00000.bin", "val-00000.bin"} <= {p.name for p in folder.iterdir()}
    bad = subprocess.run([*cmd[:5], "data.vocab_size=30000", *cmd[6:]], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "too large" in bad.stderr and "Traceback" not in bad.stderr


def test_dedup_and_multiprocess_tokenization(tmp_path: Path, embedded_prose: list[str]) -> None:
    blocks = embedded_prose
    docs = blocks + blocks[:25] + [blocks[0].upper()]
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n")
    norm = build_normalizer()
    expected = len(docs) - len({normalize_text(norm, d) for d in docs})
    cfg = DataConfig(name="dd", source="local", local_paths=[str(tmp_path / "c.txt")], vocab_size=600,
                     compression_threshold=0.6, dedup=True)
    one = prepare(cfg, tmp_path / "o")
    counts = load_manifest(one)["counts"]
    # the upper-cased copy is a duplicate after normalisation (lowercase)
    assert counts["documents_deduplicated"] == expected >= 26
    two = prepare(DataConfig(**{**cfg.__dict__, "num_proc": 2, "batch_docs": 50, "tokenizer_file": str(one / "tokenizer.json")}),
                  tmp_path / "o")
    assert two != one
    assert np.array_equal(all_rows(one), all_rows(two)), "worker processes produce the same rows"
