"""Tokenizer training (cramming/data/tokenizer.py): reproducible vocabularies, clean added tokens."""

from __future__ import annotations

import json

import pytest

from cramming.data.tokenizer import SPECIAL_TOKENS, train_tokenizer

# Ten words seen once each: every candidate merge has count 1, so the few merges that fit in the
# vocabulary are decided by the trainer's tie-break alone. Without fixed ids for the continuing
# pieces, 20 trainings here gave 19 different vocabularies (tokenizers 0.23.3).
TIED = "xab xcd xef xgh xij xkl xmn xop xqr xst"


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_same_corpus_gives_the_same_tokenizer(kind: str) -> None:
    trained = {train_tokenizer(lambda: [TIED], kind, 49, min_frequency=1).to_str() for _ in range(5)}
    assert len(trained) == 1


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_continuing_pieces_are_ordinary_tokens(kind: str) -> None:
    tok = train_tokenizer(lambda: [TIED], kind, 49, min_frequency=1)
    assert [t["content"] for t in json.loads(tok.to_str())["added_tokens"]] == list(SPECIAL_TOKENS.values())
    encoding = tok.encode("xtsr", add_special_tokens=False)
    assert encoding.tokens == ["x", "##t", "##s", "##r"]
    assert tok.decode(encoding.ids, skip_special_tokens=True) == tok.decode(encoding.ids, skip_special_tokens=False)
