"""Train, save and load the tokenizer (step 3) with `tokenizers`.

Every kind gets the same five special tokens at ids 0..4 ([PAD] [UNK] [CLS] [SEP] [MASK]), the
normaliser of `normalize.py`, and a BERT-style post-processor (`[CLS] a [SEP]`, pairs
`[CLS] a [SEP] b [SEP]` with type ids 0/1) so GLUE finetuning can use the very same file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from cramming.data.normalize import build_normalizer
from cramming.errors import DataError

TokenizerKind = Literal["wordpiece", "bpe", "bytelevel-bpe", "unigram"]
TOKENIZER_KINDS: tuple[str, ...] = ("wordpiece", "bpe", "bytelevel-bpe", "unigram")

# name -> token string; the order fixes the ids (trainers put special tokens first, in order).
SPECIAL_TOKENS: dict[str, str] = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


def _model_and_trainer(kind: str, vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    specials = list(SPECIAL_TOKENS.values())
    unk = SPECIAL_TOKENS["unk"]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk, continuing_subword_prefix="##"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, continuing_subword_prefix="##"
        )
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=unk, continuing_subword_prefix="##"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.BPEDecoder(suffix="")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, continuing_subword_prefix="##"
        )
    elif kind == "bytelevel-bpe":
        # Byte-level (RoBERTa/GPT-2 style): every byte has a token, so there is never an [UNK].
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=unk)
    else:
        raise DataError(f"unknown tokenizer kind {kind!r}; choose one of: {', '.join(TOKENIZER_KINDS)}")
    return tok, trainer


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "wordpiece",
    vocab_size: int = 32768,
    *,
    lowercase: bool = True,
    strip_accents: bool = True,
    ascii_only: bool = True,
    min_frequency: int = 2,
    length: int | None = None,
    exact_vocab: bool = True,
) -> Tokenizer:
    """Train a tokenizer from scratch on `texts` (an iterator is fine; it is consumed once).

    With `exact_vocab`, a corpus too small to fill `vocab_size` raises DataError instead of
    silently producing a smaller vocabulary than the model config expects.
    """
    tok, trainer = _model_and_trainer(kind, vocab_size, min_frequency)
    tok.normalizer = build_normalizer(lowercase, strip_accents, ascii_only)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    got = tok.get_vocab_size()
    if got == len(SPECIAL_TOKENS) or got == 0:
        raise DataError("the tokenizer learned no tokens: the corpus is empty after normalisation")
    if exact_vocab and got < vocab_size:
        raise DataError(
            f"data.vocab_size={vocab_size} is too large for this corpus: the {kind} trainer found only "
            f"{got} tokens. Lower data.vocab_size (e.g. data.vocab_size={_round_down_pow2(got)}), use more text "
            f"(data.max_documents / data.max_chars / data.tokenizer_sample_chars), or set data.min_frequency=1"
        )
    for name, text in SPECIAL_TOKENS.items():
        if tok.token_to_id(text) is None:  # pragma: no cover - trainers always add them
            raise DataError(f"special token {name}={text} is missing from the trained tokenizer")
    if kind == "wordpiece":
        _canonical_wordpiece_ids(tok)
    add_post_processor(tok)
    return tok


def _canonical_wordpiece_ids(tok: Tokenizer) -> None:
    """Renumber a WordPiece vocabulary: specials first, then tokens in sorted order.

    The trainer breaks ties between equally frequent merges in hash-map order, so the same corpus
    can give the same tokens with different ids from run to run; WordPiece looks tokens up by
    string, so a canonical numbering makes the prepared shards reproducible at no cost.
    """
    vocab = tok.get_vocab()
    specials = list(SPECIAL_TOKENS.values())
    rest = sorted(t for t in vocab if t not in SPECIAL_TOKENS.values())
    ordered = {t: i for i, t in enumerate(specials + rest)}
    tok.model = models.WordPiece(ordered, unk_token=SPECIAL_TOKENS["unk"], continuing_subword_prefix="##")


def _round_down_pow2(n: int) -> int:
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def add_post_processor(tok: Tokenizer) -> None:
    """BERT-style templates: single `[CLS] $A [SEP]`, pair `[CLS] $A [SEP] $B [SEP]`."""
    cls, sep = SPECIAL_TOKENS["cls"], SPECIAL_TOKENS["sep"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A:0 {sep}:0",
        pair=f"{cls} $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """Name -> id of the five special tokens, e.g. {"pad": 0, ..., "mask": 4}."""
    ids = {name: tok.token_to_id(text) for name, text in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[n] for n, i in ids.items() if i is None]
    if missing:
        raise DataError(f"tokenizer lacks special token(s) {', '.join(missing)}")
    return ids  # type: ignore[return-value]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json`; a missing or corrupt file raises DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on parse errors
        raise DataError(f"tokenizer file {path} cannot be read: {err}") from None


def load_hf_tokenizer(path: str | Path):  # -> transformers.PreTrainedTokenizerFast
    """The same tokenizer wrapped as `transformers.PreTrainedTokenizerFast`, special tokens set."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    load_tokenizer(path)  # clear error first
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        cls_token=SPECIAL_TOKENS["cls"],
        sep_token=SPECIAL_TOKENS["sep"],
        mask_token=SPECIAL_TOKENS["mask"],
        # BERT-style pair inputs: GLUE needs the segment ids of the post-processor.
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
