"""A small WordPiece tokenizer, and a tiny export built on it, for the GLUE tests."""

from __future__ import annotations

from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(lines: list[str], vocab_size: int, path: Path) -> Path:
    """Train a lowercasing WordPiece tokenizer with the project's special tokens on `lines`; save to `path`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL))
    tok.save(str(path))
    return path


def tiny_glue_export(root: Path, tsv_files: list[Path], rows: int, vocab_size: int) -> Path:
    """A tiny pretraining export (random weights, seed 0) in `root/final`, with a WordPiece tokenizer
    trained on the text of the first `rows` lines of each TSV file; returns the export folder."""
    import torch
    from tokenizers import Tokenizer

    from cramming.model import ModelConfig, build_model, save_pretrained

    lines: list[str] = []
    for tsv in tsv_files:
        lines += tsv.read_text(encoding="utf-8-sig").splitlines()[1:rows]
    tok = train_wordpiece(lines, vocab_size, root / "tokenizer.json")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=Tokenizer.from_file(str(tok)).get_vocab_size(), hidden_size=32, num_layers=2,
                         num_heads=2, intermediate_size=64)
    return save_pretrained(build_model(config, "mlm"), root / "final", tok)
