"""MLMMasker: rates, the 80/10/10 split, specials, fixed-count shapes."""

from __future__ import annotations

import pytest
import torch

from cramming.corpus.masking import IGNORE_INDEX, MLMMasker

VOCAB, MASK, SPECIALS = 1000, 4, [0, 1, 2, 3, 4]


def batch(bsz: int = 64, seq_len: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (bsz, seq_len), generator=g)
    ids[:, -10:] = 0  # padding
    ids[:, 0] = 2  # [CLS]
    ids[:, 50] = 3  # [SEP]
    return ids


@pytest.mark.parametrize("rate", [0.15, 0.4])
def test_dynamic_rates_and_split(rate: float) -> None:
    masker = MLMMasker(VOCAB, MASK, SPECIALS, mask_rate=rate)
    gen = torch.Generator().manual_seed(1)
    targets = masked = randomized = kept = maskable = 0
    for i in range(40):
        ids = batch(seed=i)
        out = masker(ids, generator=gen)
        special = ids < 5
        tgt = out["labels"] != IGNORE_INDEX
        assert not (tgt & special).any(), "a special token became a target"
        assert torch.equal(out["input_ids"][~tgt], ids[~tgt]), "non-targets must be unchanged"
        assert torch.equal(out["labels"][tgt], ids[tgt])
        new = out["input_ids"][tgt]
        maskable += int((~special).sum())
        targets += int(tgt.sum())
        masked += int((new == MASK).sum())
        same = new == ids[tgt]
        kept += int(same.sum())
        rnd = (new != MASK) & ~same
        randomized += int(rnd.sum())
        assert (new[rnd] >= 5).all(), "random replacements must be ordinary tokens"
    assert abs(targets / maskable - rate) < 0.01
    assert abs(masked / targets - 0.8) < 0.02
    # random draws may hit the original token (1/995), counted as kept: tolerance covers it
    assert abs(randomized / targets - 0.1) < 0.015
    assert abs(kept / targets - 0.1) < 0.015


def test_custom_split_no_random() -> None:
    masker = MLMMasker(VOCAB, MASK, SPECIALS, mask_rate=0.25, replace_mask=1.0, replace_random=0.0)
    ids = batch(seed=3)
    out = masker(ids, generator=torch.Generator().manual_seed(0))
    tgt = out["labels"] != IGNORE_INDEX
    assert (out["input_ids"][tgt] == MASK).all()


def test_fixed_count_shapes_and_positions() -> None:
    masker = MLMMasker(VOCAB, MASK, SPECIALS, mask_rate=0.15, fixed_count=True)
    ids = batch(bsz=8)
    out = masker(ids, generator=torch.Generator().manual_seed(0))
    k = round(0.15 * 128)
    pos = out["masked_positions"]
    assert pos.shape == (8, k) and pos.dtype == torch.long
    assert (pos[:, 1:] > pos[:, :-1]).all(), "positions sorted and distinct"
    assert not (ids.gather(1, pos) < 5).any(), "enough ordinary tokens: no special position chosen"
    assert torch.equal(out["masked_labels"], ids.gather(1, pos))
    assert ((out["labels"] != IGNORE_INDEX).sum(1) == k).all()


def test_fixed_count_short_row_keeps_static_shape() -> None:
    masker = MLMMasker(VOCAB, MASK, SPECIALS, mask_rate=0.5, fixed_count=True)
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[0, :3] = torch.tensor([7, 8, 9])  # only 3 maskable tokens, K = 5
    out = masker(ids, generator=torch.Generator().manual_seed(0))
    assert out["masked_positions"].shape == (2, 5)
    assert int((out["labels"][0] != IGNORE_INDEX).sum()) == 3
    assert (out["labels"][1] == IGNORE_INDEX).all() and torch.equal(out["input_ids"][1], ids[1])


def test_generator_reproducible() -> None:
    masker = MLMMasker(VOCAB, MASK, SPECIALS)
    ids = batch()
    a = masker(ids, generator=torch.Generator().manual_seed(5))
    b = masker(ids, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        MLMMasker(VOCAB, MASK, SPECIALS, mask_rate=0.0)
    with pytest.raises(ValueError):
        MLMMasker(VOCAB, MASK, SPECIALS, replace_mask=0.9, replace_random=0.2)
