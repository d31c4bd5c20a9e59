"""`data.packing`: full-sentences (rows across documents, the default) vs doc-bounded (rows inside one
document, padded): the rows, prevalence sorting, masking, the loader's attention_mask, the model's
loss and one tiny pretraining run on padded rows."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cramming.config import parse_budget
from cramming.corpus.masking import IGNORE_INDEX, MLMMasker
from cramming.corpus.shards import PackedDataset, build_loader, load_manifest
from cramming.data import order, pack
from cramming.data.prepare import DataConfig, prepare
from cramming.data.tokenizer import load_tokenizer
from cramming.errors import ConfigError
from cramming.gpu import GpuProfile

PAD, SEP = 0, 3
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
L = 32
VOCAB = 55  # every word of WORDS is then a single wordpiece token (the trainer finds exactly 55)


def _docs() -> list[str]:
    # Each document repeats ONE word (a single token each), so a row mixing two documents would
    # hold two different word tokens. Lengths cover < 1 row, several rows, and exact multiples.
    rng = random.Random(0)
    lengths = [rng.randint(3, 100) for _ in range(200)] + [L, L - 1, 2 * L, 2 * L - 1, L + 1]
    return [" ".join([WORDS[i % len(WORDS)]] * n) for i, n in enumerate(lengths)]


def _cfg(path: Path, **kw) -> DataConfig:
    base = dict(name="pk", source="local", local_paths=[str(path)], local_unit="line", vocab_size=VOCAB,
                min_frequency=1, compression_filter=False, val_fraction=0.0, sorting="none", seq_len=L)
    return DataConfig(**{**base, **kw})


def _all_rows(folder: Path) -> np.ndarray:
    ds = PackedDataset(folder, "train")
    return ds.rows(np.arange(len(ds)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    os.environ.setdefault("CRAMMING_NO_PROGRESS", "1")
    folder = tmp_path_factory.mktemp("corpus")
    docs = _docs()
    (folder / "c.txt").write_text("\n".join(docs) + "\n")
    return folder / "c.txt", docs


@pytest.fixture(scope="module")
def doc_folder(corpus, tmp_path_factory) -> Path:
    return prepare(_cfg(corpus[0], packing="doc-bounded"), tmp_path_factory.mktemp("doc"))


def _expected_doc_rows(doc_ids: list[list[int]]) -> np.ndarray:
    rows = []
    for ids in doc_ids:
        ids = ids + [SEP]
        if len(ids) % L == 1:  # a lone trailing [SEP] does not get a row of its own
            ids = ids[:-1]
        for s in range(0, len(ids), L):
            piece = ids[s:s + L]
            rows.append(piece + [PAD] * (L - len(piece)))
    return np.array(rows)


def test_doc_bounded_rows_match_a_per_document_reference(corpus, doc_folder: Path) -> None:
    _, docs = corpus
    tok = load_tokenizer(doc_folder / "tokenizer.json")
    doc_ids = [tok.encode(d, add_special_tokens=False).ids for d in docs]
    assert all(len(set(ids)) == 1 for ids in doc_ids)  # one token per word, as the test needs
    rows = _all_rows(doc_folder)
    assert np.array_equal(rows, _expected_doc_rows(doc_ids))
    m = load_manifest(doc_folder)
    assert m["packing"] == "doc-bounded" and m["data_config"]["packing"] == "doc-bounded"
    c = m["counts"]
    assert c["tokens"] + c["pad_tokens"] == L * c["sequences"] and c["tokens_dropped_tail"] == 0
    assert c["tokens"] == int((rows != PAD).sum()) and c["pad_tokens"] > 0


def test_doc_bounded_rows_never_mix_documents_and_pad_only_at_the_end(doc_folder: Path) -> None:
    rows = _all_rows(doc_folder)
    for row in rows:
        real = row[row != PAD]
        n = len(real)
        assert n > 0 and (row[:n] != PAD).all() and (row[n:] == PAD).all()  # pads form a suffix
        words = set(real.tolist()) - {SEP}
        assert len(words) == 1  # one document's content only (and never a row of a lone [SEP])
        seps = np.flatnonzero(row == SEP)
        assert len(seps) <= 1 and (len(seps) == 0 or seps[0] == n - 1)  # [SEP] only ends a document
        if n < L:
            assert row[n - 1] == SEP  # a padded row is the last of its document


def test_full_sentences_default_is_unchanged(corpus, tmp_path: Path) -> None:
    path, docs = corpus
    cfg = _cfg(path)
    assert cfg.packing == "full-sentences"
    folder = prepare(cfg, tmp_path)
    tok = load_tokenizer(folder / "tokenizer.json")
    stream: list[int] = []
    for d in docs:
        stream += tok.encode(d, add_special_tokens=False).ids + [SEP]
    n = len(stream) // L
    rows = _all_rows(folder)
    assert rows.ravel().tolist() == stream[: n * L]  # cut every L tokens across documents, no padding
    m = load_manifest(folder)
    assert m["packing"] == "full-sentences" and "pad_tokens" not in m["counts"]
    assert m["counts"]["tokens_dropped_tail"] == len(stream) - n * L
    # The default's rows stay byte-identical when the packer is handed document lengths.
    enc_rows = tmp_path / "r.bin"
    packer = pack.RowPacker(enc_rows, L, np.uint16)
    arr = np.array(stream, dtype=np.uint32)
    packer.add(arr[:100], np.array([100]))
    packer.add(arr[100:])
    assert packer.close() == len(stream) - n * L and packer.rows == n
    assert np.fromfile(enc_rows, dtype=np.uint16)[: n * L].tolist() == stream[: n * L]
    # Reopened at a committed size (a resumed build), it continues exactly where that size ends.
    resumed = pack.RowPacker(enc_rows, L, np.uint16, tokens=100)
    resumed.add(arr[100:])
    resumed.close()
    assert np.fromfile(enc_rows, dtype=np.uint16).tolist() == stream


def test_doc_packer_edge_cases(tmp_path: Path) -> None:
    docs = [[7] * 3, [8] * 4, [9] * 3, [], [5] * 9]  # with [SEP]: 4 (exact row), 5 (lone [SEP]), 4, 1, 10
    ids = np.array([t for d in docs for t in d + [SEP]], dtype=np.uint32)
    lengths = np.array([len(d) + 1 for d in docs])
    p = pack.DocRowPacker(tmp_path / "r.bin", 4, np.uint16, PAD)
    p.add(ids[:9], lengths[:2])
    p.add(ids[9:], lengths[2:])
    assert p.close() == 0
    got = np.fromfile(tmp_path / "r.bin", dtype=np.uint16).reshape(-1, 4).tolist()
    assert got == [[7, 7, 7, 3], [8, 8, 8, 8], [9, 9, 9, 3], [5, 5, 5, 5], [5, 5, 5, 5], [5, 3, 0, 0]]
    assert (p.rows, p.tokens, p.pad_tokens) == (6, 22, 2)
    with pytest.raises(ValueError, match="lengths"):
        pack.DocRowPacker(tmp_path / "s.bin", 4, np.uint16, PAD).add(ids, lengths[:2])


def test_prevalence_ignores_padding(tmp_path: Path) -> None:
    rows = np.array([[5, 6, 0, 0, 0, 0], [5, 5, 5, 6, 6, 6], [6, 0, 0, 0, 0, 0]])
    scores = order.row_scores(rows, order.token_probabilities(rows, 10, pad_id=0), pad_id=0)
    p5, p6 = 4 / 9, 5 / 9  # 9 real tokens: four 5s, five 6s; pads are not counted
    assert scores == pytest.approx([(p5 + p6) / 2, (3 * p5 + 3 * p6) / 6, p6])
    # Without pad_id (full-sentences) the formula is the original one, pads counted like any token.
    counts = np.bincount(rows.ravel(), minlength=10)
    assert order.row_scores(rows, order.token_probabilities(rows, 10)) == pytest.approx((counts / counts.sum())[rows].mean(1))
    got = order.order_train(rows, np.zeros(0, np.int64), "prevalence", 10, 0, tmp_path / "o.bin", tmp_path,
                            pad_id=0, progress=False)
    assert got.tolist() == [2, 0, 1]  # by real tokens only; the tie keeps its order


def test_doc_bounded_prevalence_sorting_is_monotone(corpus, tmp_path: Path) -> None:
    folder = prepare(_cfg(corpus[0], packing="doc-bounded", sorting="prevalence", val_fraction=0.05), tmp_path)
    rows = _all_rows(folder)
    real = rows != PAD
    counts = np.bincount(rows[real].ravel(), minlength=VOCAB)
    val = PackedDataset(folder, "val")
    vrows = val.rows(np.arange(len(val)))
    counts += np.bincount(vrows[vrows != PAD].ravel(), minlength=VOCAB)
    prob = counts / counts.sum()
    scores = (prob[rows] * real).sum(1) / real.sum(1)
    assert (np.diff(scores) <= 1e-12).all()


@pytest.mark.parametrize("fixed_count", [False, True])
def test_masker_never_masks_padding(fixed_count: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (64, L))
    lengths = torch.randint(1, L + 1, (64,))
    lengths[:4] = torch.tensor([1, 2, 3, 4])  # shorter than K = round(0.15 * 32) = 5 real tokens
    pad = torch.arange(L)[None, :] >= lengths[:, None]
    ids[pad] = PAD
    masker = MLMMasker(50, 4, [0, 1, 2, 3, 4], mask_rate=0.15, fixed_count=fixed_count)
    out = masker(ids, generator=gen)
    assert (out["input_ids"][pad] == PAD).all() and (out["input_ids"][~pad] != PAD).all()
    assert (out["labels"][pad] == IGNORE_INDEX).all()
    assert (out["labels"][~pad] != IGNORE_INDEX).any()
    if fixed_count:
        k = masker.num_targets(L)
        targets = (out["masked_labels"] != IGNORE_INDEX).sum(1)
        # K targets among the real tokens when there are enough; else every real token, the rest -100.
        assert torch.equal(targets, torch.clamp(lengths, max=k))
        on_pad = pad.gather(1, out["masked_positions"])
        assert (out["masked_labels"][on_pad] == IGNORE_INDEX).all()


def _tiny_model(seq_len: int = L):
    from cramming.model.bert import CrammedBertForMLM, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(name="t", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=50,
                      max_seq_len=seq_len, dropout=0.0)
    return CrammedBertForMLM(cfg).eval()


def test_model_ignores_padding_in_attention_and_loss() -> None:
    model = _tiny_model()
    real = torch.randint(5, 50, (1, 10))
    padded = torch.cat([real, torch.zeros(1, L - 10, dtype=torch.long)], 1)
    mask = (padded != PAD).long()
    with torch.no_grad():
        a = model(real)["logits"]
        b = model(padded, attention_mask=mask)["logits"][:, :10]
        c = model(padded)["logits"][:, :10]
    assert torch.allclose(a, b, atol=1e-5)  # real tokens do not see the pads
    assert not torch.allclose(a, c, atol=1e-5)  # (without the mask they would)
    # Fixed-count targets that fall on pads (-100) do not enter the loss.
    masker = MLMMasker(50, 4, [0, 1, 2, 3, 4], mask_rate=0.5, fixed_count=True)  # K = 16 > 10 real tokens
    batch = masker(padded, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(batch["input_ids"], labels=batch["labels"], masked_positions=batch["masked_positions"],
                    attention_mask=mask)
    keep = batch["masked_labels"][0] != IGNORE_INDEX
    assert int(keep.sum()) == 10
    ref = torch.nn.functional.cross_entropy(out["logits"][0][keep].float(), batch["masked_labels"][0][keep])
    assert torch.isfinite(out["loss"]) and out["loss"] == pytest.approx(float(ref), rel=1e-5)


def test_loader_adds_attention_mask_only_for_doc_bounded(doc_folder: Path, corpus, tmp_path: Path) -> None:
    ds = PackedDataset(doc_folder)
    masker = MLMMasker(VOCAB, 4, [0, 1, 2, 3, 4], fixed_count=True)
    batch = next(build_loader(ds, 8, masker, shuffle=False, seed=0))
    raw = torch.from_numpy(ds.rows(np.arange(8)).astype(np.int64))
    assert torch.equal(batch["attention_mask"], (raw != PAD).long())
    assert (batch["attention_mask"] == 0).any()
    assert (batch["labels"][raw == PAD] == IGNORE_INDEX).all()
    full = PackedDataset(prepare(_cfg(corpus[0]), tmp_path))
    assert "attention_mask" not in next(build_loader(full, 8, masker, shuffle=False, seed=0))
    # The trainer hands the model only what its forward accepts: attention_mask is among them.
    from cramming.train.inputs import model_kwargs

    assert "attention_mask" in model_kwargs(_tiny_model(), batch, torch.device("cpu"))


def test_doc_bounded_static_masks_get_attention_mask(corpus, tmp_path: Path) -> None:
    folder = prepare(_cfg(corpus[0], packing="doc-bounded", static_masking_copies=1, static_fixed_count=True),
                     tmp_path)
    ds = PackedDataset(folder)
    batch = next(build_loader(ds, 8, None, shuffle=False, seed=0))
    stored = torch.from_numpy(ds.rows(np.arange(8)).astype(np.int64))
    assert torch.equal(batch["attention_mask"], (stored != PAD).long())
    assert (batch["labels"][stored == PAD] == IGNORE_INDEX).all()


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="packing"):
        DataConfig(packing="doc-sentences")  # type: ignore[arg-type]


def test_tiny_pretrain_on_doc_bounded_data(tmp_path: Path) -> None:
    from cramming.model.bert import ModelConfig
    from cramming.train.config import TrainConfig
    from cramming.train.loop import pretrain

    data = prepare(DataConfig(name="tinydoc", source="embedded", embedded_files=["moby_dick"], max_chars=100_000,
                              vocab_size=300, seq_len=L, val_fraction=0.05, compression_threshold=1.0,
                              packing="doc-bounded"), tmp_path / "data")
    assert load_manifest(data)["counts"]["pad_tokens"] > 0
    arch = ModelConfig(name="tiny-test", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=L)
    gpu = GpuProfile(name="cpu", micro_batch_size=16, num_workers=0)
    train = TrainConfig(target_batch_size=32, log_interval=1, eval_batches=2, checkpoint_interval_minutes=0.0,
                        reserve_margin_s=1.0, fixed_count=True)
    pretrain(train, arch, gpu, data, tmp_path / "run", budget=parse_budget("3steps"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    assert np.isfinite(summary["final_loss"]) and np.isfinite(summary["val_loss"])
