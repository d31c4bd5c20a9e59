"""Examples to token ids, in the pair format of the model being finetuned.

Two encoders, one signature (`Encoder`: a split and a length -> `Encoded`):

- `encode_with_cls_sep`: [CLS] a [SEP] (b [SEP]) placed here, for crammed models, whose tokenizer
  has no post-processor (packed pretraining needs none);
- `encode_with_template`: the tokenizer's own special tokens and pair format (its post-processor),
  for any transformers checkpoint: [CLS] a [SEP] b [SEP] with segment ids for BERT,
  <s> a </s></s> b </s> for RoBERTa.

Both truncate longest first (the longer text loses a token until the pair fits), as BERT's GLUE
scripts do, so a short premise survives a long hypothesis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from cramming.glue.batching import make_loader
from cramming.glue.tasks import Split


@dataclass
class Encoded:
    """Token ids of each example with its special tokens, and the labels."""

    input_ids: list[list[int]]
    labels: list[int] | list[float]
    token_type_ids: list[list[int]] | None = None
    """Segment ids (0 for the first text, 1 for the second) for models that read them; None otherwise."""

    def loader(self, batch_size: int, collate: object, shuffle: bool, seed: int, workers: int) -> DataLoader:
        """The recipe's loader over these examples (`batching.make_loader`)."""
        return make_loader(self.input_ids, self.labels, batch_size, collate, shuffle, seed, workers, self.token_type_ids)


Encoder = Callable[[Split, int], Encoded]
"""(split, max tokens per example) -> the split's encoded examples."""


def encode_with_cls_sep(tokenizer: Any, split: Split, max_len: int) -> Encoded:
    """[CLS] a [SEP] (b [SEP]) around the tokenizer's ids of the texts, without its post-processor."""
    cls_id, sep_id = tokenizer.convert_tokens_to_ids("[CLS]"), tokenizer.convert_tokens_to_ids("[SEP]")
    a_ids = tokenizer(split.texts_a, add_special_tokens=False, verbose=False)["input_ids"]
    out: list[list[int]] = []
    if split.texts_b is None:
        for a in a_ids:
            out.append([cls_id, *a[: max_len - 2], sep_id])
    else:
        b_ids = tokenizer(split.texts_b, add_special_tokens=False, verbose=False)["input_ids"]
        budget = max_len - 3
        for a, b in zip(a_ids, b_ids, strict=True):
            la, lb = len(a), len(b)
            while la + lb > budget:
                if la >= lb:
                    la -= 1
                else:
                    lb -= 1
            out.append([cls_id, *a[:la], sep_id, *b[:lb], sep_id])
    return Encoded(out, split.labels)


def encode_with_template(tokenizer: Any, split: Split, max_len: int) -> Encoded:
    """The tokenizer's own encoding of single texts or pairs (its special tokens, its segment ids when
    the model reads them), truncated longest first to `max_len` tokens."""
    texts = (split.texts_a,) if split.texts_b is None else (split.texts_a, split.texts_b)
    enc = tokenizer(*texts, truncation="longest_first", max_length=max_len, verbose=False)
    types = enc["token_type_ids"] if "token_type_ids" in tokenizer.model_input_names else None
    return Encoded(enc["input_ids"], split.labels, types)


def example_formats(encode: Encoder, tokenizer: Any) -> tuple[str, str]:
    """(single, pair) as the model sees them, e.g. ('[CLS] A [SEP]', '[CLS] A [SEP] B [SEP]'): each
    special token by name, each text as A or B. Text without any special token means the tokenizer
    has no template for the model's inputs."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    formats = []
    for texts_b in (None, ["b"]):
        ids = encode(Split(["a"], texts_b, [0], "format probe"), 16).input_ids[0]
        parts: list[str] = []
        for i in ids:
            if i in special:
                parts.append(tokenizer.convert_ids_to_tokens(i))
            elif not parts or parts[-1] not in ("A", "B"):
                parts.append("B" if "A" in parts else "A")
        formats.append(" ".join(parts))
    return formats[0], formats[1]
