"""Train, save and load the tokenizer (step 3) with `tokenizers`.

Every kind gets the same five special tokens at ids 0..4 ([PAD] [UNK] [CLS] [SEP] [MASK]), the
normaliser of `normalize.py`, and a BERT-style post-processor (`[CLS] a [SEP]`, pairs
`[CLS] a [SEP] b [SEP]` with type ids 0/1) so GLUE finetuning can use the very same file.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal, get_args

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from cramming.data.normalize import build_normalizer
from cramming.errors import DataError

TokenizerKind = Literal["wordpiece", "bpe", "bytelevel-bpe", "unigram"]
"""The tokenizer models `train_tokenizer` builds (and `data.tokenizer` accepts)."""

# name -> token string; the order fixes the ids (trainers put special tokens first, in order).
SPECIAL_TOKENS: dict[str, str] = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


def _model_and_trainer(kind: TokenizerKind, vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
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
        # The pieces are WordPiece-style (a word's first piece bare, the others "##"-prefixed), so
        # they decode like WordPiece: BPEDecoder would keep the "##" and space every piece.
        tok.decoder = decoders.WordPiece(prefix="##")
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
        raise DataError(f"unknown tokenizer kind {kind!r}; choose one of: {', '.join(get_args(TokenizerKind))}")
    return tok, trainer


def train_tokenizer(
    corpus: Callable[[], Iterable[str | list[str]]],
    kind: TokenizerKind = "wordpiece",
    vocab_size: int = 32768,
    *,
    lowercase: bool = True,
    strip_accents: bool = True,
    ascii_only: bool = True,
    min_frequency: int = 2,
    length: int | None = None,
    exact_vocab: bool = True,
    normalized: bool = False,
) -> Tokenizer:
    """Train a tokenizer from scratch on the texts (or batches of texts) that `corpus()` yields.

    `corpus` is called twice for the wordpiece and bpe kinds: a quick pass over its characters
    (see `_continuing_pieces`), then the training pass. With `exact_vocab`, a corpus too small to
    fill `vocab_size` raises DataError instead of silently producing a smaller vocabulary than the
    model config expects. `normalized`: the texts are normalised with these flags already (the
    spool of `cram data`); the normaliser is idempotent, so training skips it (about a third of
    the training time) and it is attached afterwards.
    """
    tok, trainer = _model_and_trainer(kind, vocab_size, min_frequency)
    normalizer = build_normalizer(lowercase, strip_accents, ascii_only)
    tok.normalizer = None if normalized else normalizer
    prefix = getattr(trainer, "continuing_subword_prefix", None)  # UnigramTrainer has none
    if prefix:
        trainer.special_tokens = list(SPECIAL_TOKENS.values()) + _continuing_pieces(corpus(), tok, prefix)
    tok.train_from_iterator(corpus(), trainer=trainer, length=length)
    if prefix:
        tok = _without_added_tokens_beyond_specials(tok)
    if kind == "unigram":
        tok = _canonical_unigram(tok)
    tok.normalizer = normalizer
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
    add_post_processor(tok)
    return tok


def _continuing_pieces(corpus: Iterable[str | list[str]], tok: Tokenizer, prefix: str) -> list[str]:
    """`prefix + c` for every character c that follows another one inside a word of the corpus, sorted.

    Why: the BPE/WordPiece trainers of `tokenizers` (0.23) number these continuing pieces in the
    order they meet them while iterating a hash map of the corpus's words, and break ties between
    equally frequent merges by those numbers, so the same corpus gives a different vocabulary
    (other tokens, not just other ids) from one process to the next (huggingface/tokenizers#1794).
    Given to the trainer as special tokens, the same pieces are numbered before that loop, in this
    order.
    """
    inside: dict[str, bool] = {}

    def stays_inside(c: str) -> bool:
        # The BERT pre-tokenizer splits at whitespace and around punctuation, one character at a
        # time: a character stays inside words if two of it stay one piece.
        if c not in inside:
            inside[c] = len(tok.pre_tokenizer.pre_tokenize_str(c + c)) == 1
        return inside[c]

    found: set[str] = set()
    for item in corpus:
        texts = [item] if isinstance(item, str) else item
        if tok.normalizer is not None:
            texts = [tok.normalizer.normalize_str(t) for t in texts]
        # Character pairs cost ~5x the character set: scan them only while a batch has a word
        # character not yet seen continuing a word, which on real text ends after a few batches.
        if not any(stays_inside(c) for c in set().union(*texts) - found):
            continue
        pairs = set().union(*map(itertools.pairwise, texts))
        found.update(b for a, b in pairs if stays_inside(a) and stays_inside(b))
    return sorted(prefix + c for c in found)


def _without_added_tokens_beyond_specials(tok: Tokenizer) -> Tokenizer:
    """The tokenizer with only the five special tokens as added tokens.

    Training registers every trainer special token as an added token; the continuing pieces of
    `_continuing_pieces` must stay ordinary vocabulary entries (matched inside words, kept when
    decoding with skip_special_tokens). tokenizers has no call to remove added tokens, so this
    edits its JSON form.
    """
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in SPECIAL_TOKENS.values()]
    return Tokenizer.from_str(json.dumps(data))


# The score step of tokenizers' UnigramTrainer between the corpus characters it adds back after training.
_ADDED_CHAR_STEP = 0.0001
# Decimals kept of a unigram score: the trainer's sums differ in their last digits from one process
# to the next (by about 1e-14 on 200 KB of text, more on more text), and a millionth of a log
# probability changes no segmentation worth having. Two processes' values can still fall on either
# side of a rounding boundary, only rarely.
_SCORE_DECIMALS = 6


def _canonical_unigram(tok: Tokenizer) -> Tokenizer:
    """The trained unigram tokenizer with its pieces in one order: by score, ties by the piece.

    Why: tokenizers' UnigramTrainer (0.23) iterates hash maps and sets seeded afresh in every
    process (Rust's, not Python's: PYTHONHASHSEED does not matter), so the same corpus gives the
    same pieces with other ids: equal scores keep the order of a hash set, the characters training
    dropped get made-up scores handed out in that order (see `_added_chars_in_order`), and the
    EM sums run over the words in hash order, so scores differ in their last digits.
    """
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    specials, pieces = vocab[: len(SPECIAL_TOKENS)], _added_chars_in_order(vocab[len(SPECIAL_TOKENS):])
    pieces = [[piece, round(score, _SCORE_DECIMALS)] for piece, score in pieces]
    data["model"]["vocab"] = specials + sorted(pieces, key=lambda ps: (-ps[1], ps[0]))
    return Tokenizer.from_str(json.dumps(data))


def _added_chars_in_order(pieces: list[list]) -> list[list]:
    """`pieces` ([piece, score]) with the trainer's made-up character scores given in character order.

    The trainer adds back every corpus character that training dropped, with the scores lowest,
    lowest + step, lowest + 2 step, ... (lowest: the lowest score of the model) in hash-set order.
    Those rungs are found again from the lowest score and handed out to the same characters sorted.
    """
    lowest = min(score for _, score in pieces)
    chars = {i: score for i, (piece, score) in enumerate(pieces) if len(piece) == 1}
    rungs, penalty = set(), 0.0
    while lowest + penalty in chars.values():  # the trainer's own float arithmetic, rung by rung
        rungs.add(lowest + penalty)
        penalty += _ADDED_CHAR_STEP
    on_rungs = sorted((i for i, score in chars.items() if score in rungs), key=lambda i: pieces[i][0])
    scores = sorted(pieces[i][1] for i in on_rungs)
    out = [list(p) for p in pieces]
    for i, score in zip(on_rungs, scores, strict=True):
        out[i][1] = score
    return out


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
