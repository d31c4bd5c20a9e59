"""build_loader: order, shuffle per epoch, resumption by index, DDP disjointness, workers."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from cramming.corpus.masking import MLMMasker
from cramming.corpus.shards import PackedDataset, _MicroBatches, build_loader
from cramming.data.prepare import DataConfig, prepare
from cramming.errors import DataError


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> PackedDataset:
    cfg = DataConfig(name="ld", source="embedded", embedded_files=["kjv"], max_chars=150_000, vocab_size=600,
                     compression_threshold=0.6)
    return PackedDataset(prepare(cfg, tmp_path_factory.mktemp("ld")))


def masker_for(ds: PackedDataset, **kw) -> MLMMasker:
    sp = ds.manifest["special_tokens"]
    return MLMMasker(ds.manifest["vocab_size"], sp["mask"], sp.values(), **kw)


def take(it, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(it, n))


def test_in_order_batches_and_epochs(ds: PackedDataset) -> None:
    batches = take(build_loader(ds, 8, None, shuffle=False, seed=0), 3)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(8, 128)] * 3
    assert torch.equal(batches[1]["input_ids"], torch.stack([ds[i] for i in range(8, 16)]))
    mb = _MicroBatches(ds, 8, None, True, 3, 0, 1)
    e0 = np.concatenate([mb.row_indices(n) for n in range(mb.batches_per_epoch)])
    e1 = np.concatenate([mb.row_indices(n) for n in range(mb.batches_per_epoch, 2 * mb.batches_per_epoch)])
    assert len(set(e0.tolist())) == len(e0) == mb.batches_per_epoch * 8
    assert not np.array_equal(e0, e1), "each epoch has its own permutation"


def test_resume_matches_uninterrupted_stream(ds: PackedDataset) -> None:
    m = masker_for(ds, fixed_count=True)
    full = take(build_loader(ds, 4, m, shuffle=True, seed=7), 12)
    resumed = take(build_loader(ds, 4, m, shuffle=True, seed=7, start_batch=8), 4)
    for a, b in zip(full[8:], resumed, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    other = take(build_loader(ds, 4, m, shuffle=True, seed=8), 1)[0]
    assert not torch.equal(other["input_ids"], full[0]["input_ids"])


def test_ddp_ranks_disjoint(ds: PackedDataset) -> None:
    world = 3
    seen = []
    for rank in range(world):
        mb = _MicroBatches(ds, 4, None, True, 1, rank, world)
        seen.append(set(np.concatenate([mb.row_indices(n) for n in range(mb.batches_per_epoch)]).tolist()))
    for a, b in itertools.combinations(seen, 2):
        assert not a & b
    assert sum(map(len, seen)) > 0.9 * len(ds)
    # and the masks differ per rank even at the same batch index
    m = masker_for(ds)
    r0 = take(build_loader(ds, 4, m, shuffle=False, seed=0, rank=0, world_size=2), 1)[0]
    r1 = take(build_loader(ds, 4, m, shuffle=False, seed=0, rank=1, world_size=2), 1)[0]
    assert not torch.equal(r0["labels"] != -100, r1["labels"] != -100)


def test_workers_give_the_same_stream(ds: PackedDataset) -> None:
    m = masker_for(ds)
    a = take(build_loader(ds, 4, m, shuffle=True, seed=2, start_batch=3), 5)
    b = take(build_loader(ds, 4, m, shuffle=True, seed=2, start_batch=3, num_workers=2), 5)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def test_too_small_for_a_batch(ds: PackedDataset) -> None:
    with pytest.raises(DataError, match="too few"):
        build_loader(ds, len(ds) + 1, None, shuffle=False, seed=0)


def test_static_masks_through_loader(tmp_path: Path) -> None:
    cfg = DataConfig(name="st", source="embedded", embedded_files=["kjv"], max_chars=60_000, vocab_size=500,
                     compression_threshold=0.6, static_masking_copies=2, static_fixed_count=True)
    sds = PackedDataset(prepare(cfg, tmp_path))
    batch = take(build_loader(sds, 4, None, shuffle=False, seed=0), 1)[0]
    assert torch.equal(batch["labels"], torch.from_numpy(sds.labels(np.arange(4)).astype(np.int64)))
    k = round(0.15 * 128)
    assert batch["masked_positions"].shape == (4, k)
    assert ((batch["labels"] != -100).sum(1) == k).all()
