"""Tokenizer training (cramming/data/tokenizer.py): reproducible vocabularies, clean added tokens,
kinds that decode back to the text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cramming.data.tokenizer import SPECIAL_TOKENS, load_hf_tokenizer, train_tokenizer

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


# Trains the unigram kind on the paragraphs of a file and prints tokenizer.json.
_TRAIN_UNIGRAM = """
import sys
from pathlib import Path
from cramming.data.tokenizer import train_tokenizer
texts = Path(sys.argv[1]).read_text().split("\\n\\n")
sys.stdout.write(train_tokenizer(lambda: texts, "unigram", 800, min_frequency=1).to_str())
"""


def test_unigram_is_the_same_in_every_process(tmp_path: Path, embedded_prose: list[str]) -> None:
    """Real prose (equal scores, four characters that training drops and the trainer adds back)
    plus TIED: another process with another hash seed gives the same tokenizer.json, so the same ids."""
    corpus = tmp_path / "corpus.txt"
    texts = [*embedded_prose, TIED]
    corpus.write_text("\n\n".join(texts))
    trained = [
        subprocess.run([sys.executable, "-c", _TRAIN_UNIGRAM, str(corpus)], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}, timeout=300).stdout
        for seed in ("1", "2")
    ]
    assert trained[0] == trained[1]
    from tokenizers import Tokenizer

    first, second = (Tokenizer.from_str(t) for t in trained)
    assert [e.ids for e in first.encode_batch(texts)] == [e.ids for e in second.encode_batch(texts)]


def test_bpe_decodes_to_the_normalised_text(tmp_path: Path, embedded_prose: list[str]) -> None:
    """decode(encode(s)) == normalise(s), also through transformers (the export's wrapper) with
    words of several pieces, which used to come back spaced out, "##" and all.

    As with the wordpiece kind, the BERT pre-tokenizer forgets whether punctuation had a space
    before it; the decoder puts back . , ! ? without one (so "e.g." comes back "e. g.").
    """
    tok = train_tokenizer(lambda: embedded_prose[:60], "bpe", 600)
    text = "The Élan of UNBELIEVABLE words, she said. An extraordinary day!"
    encoding = tok.encode(text)
    assert any(t.startswith("##") for t in encoding.tokens)  # words of several pieces are in there
    normalised = tok.normalizer.normalize_str(text)
    assert normalised == "the elan of unbelievable words, she said. an extraordinary day!"
    assert tok.decode(encoding.ids) == normalised
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = load_hf_tokenizer(tmp_path)
    word = hf("extraordinary", add_special_tokens=False)["input_ids"]
    assert len(word) > 1 and hf.decode(word) == "extraordinary"
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == normalised


def test_bpe_export_fill_mask_shows_whole_words(tmp_path: Path, embedded_prose: list[str]) -> None:
    import torch
    from transformers import pipeline

    from cramming.model import ModelConfig, build_model, save_pretrained

    tok = train_tokenizer(lambda: embedded_prose[:60], "bpe", 600)
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=600, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    out = save_pretrained(build_model(config), tmp_path / "final", tmp_path / "tokenizer.json")
    fill = pipeline("fill-mask", model=str(out))
    for prediction in fill("an extraordinary [MASK] of unbelievable words.", top_k=3):
        # The prediction may be a "##" piece that joins the word before it, as in BERT.
        assert prediction["sequence"].startswith("an extraordinary") and "##" not in prediction["sequence"]
        assert prediction["sequence"].endswith(" of unbelievable words.")
