"""Text normalisation (step 1): lowercase, strip accents, drop non-ASCII.

Built from `tokenizers.normalizers` so that exactly the same normaliser runs when the corpus is
prepared and inside the saved `tokenizer.json` (GLUE text is normalised the same way).
"""

from __future__ import annotations

from tokenizers import Regex, normalizers


def build_normalizer(lowercase: bool = True, strip_accents: bool = True, ascii_only: bool = True) -> normalizers.Normalizer | None:
    """The normaliser for the given flags, or None when all are off.

    Order matters: NFD splits accented letters into base + combining mark so that StripAccents can
    drop the mark ("é" -> "e") before the ASCII filter would otherwise delete the whole letter.
    """
    steps: list[normalizers.Normalizer] = []
    if strip_accents:
        steps += [normalizers.NFD(), normalizers.StripAccents()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    if ascii_only:
        steps.append(normalizers.Replace(Regex(r"[^\x00-\x7F]"), ""))
    if not steps:
        return None
    return normalizers.Sequence(steps)


def normalize_text(normalizer: normalizers.Normalizer | None, text: str) -> str:
    """Apply `normalizer` (None = identity) and trim surrounding whitespace."""
    if normalizer is not None:
        text = normalizer.normalize_str(text)
    return text.strip()
