"""Document filters: exact deduplication (step 2) and the compression-ratio filter (step 4)."""

from __future__ import annotations

import hashlib


class ExactDeduplicator:
    """Drops documents whose exact (normalised) text was seen before.

    Keeps one 64-bit blake2b digest per distinct document as a Python int (about 50 bytes each),
    not the text, so 20e6 documents cost about 1 GB; a collision between two different documents
    has probability ~n^2/2^65 and would only drop one of them.
    """

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self.duplicates = 0

    def is_new(self, data: bytes) -> bool:
        """True the first time a document (its UTF-8 bytes) is seen; counts repeats in `duplicates`."""
        if not self.remember(data):
            self.duplicates += 1
            return False
        return True

    def remember(self, data: bytes) -> bool:
        """Record a document as seen without counting it; False if it already was (a resumed build
        re-reads the documents it kept before)."""
        digest = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        if digest in self._seen:
            return False
        self._seen.add(digest)
        return True


def passes_compression(num_tokens: int, num_chars: int, threshold: float) -> bool:
    """The Cramming compression filter: keep a document iff tokens <= threshold * characters.

    Text the tokenizer compresses badly (minified HTML, base64, tables of numbers) has many tokens
    per character; prose with a tokenizer trained on prose has few.
    """
    return num_tokens <= threshold * num_chars
