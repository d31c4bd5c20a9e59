"""Steps 1-2 of `cram data`: read, normalise, deduplicate, and spool the documents to disk.

The normalised documents go to `docs.bin` (UTF-8, concatenated) with their end offsets in
`docs.idx` (int64), so tokenizer training and encoding read them again without a second download
and without holding the corpus in RAM. Documents are normalised in batches, in `num_proc`
processes when the corpus is large enough (`parallel.ordered_map`), and the spool commits its
progress after every batch: a killed build re-reads the source up to the committed position,
without normalising again, and continues from there.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cramming.data import sources
from cramming.data.filters import ExactDeduplicator
from cramming.data.normalize import TextNormalizer
from cramming.data.parallel import ordered_map
from cramming.data.workdir import WorkDir, close_durably, open_append
from cramming.faults import fault_point

DOCS, INDEX = "docs.bin", "docs.idx"
# Raw characters per normalisation task (besides data.batch_docs documents): bounds the memory of
# a batch of long documents (books, speeches).
BATCH_CHARS = 1 << 20


class DocSpool:
    """Append-only store of documents: `docs.bin` + `docs.idx`, reopened at a committed size."""

    def __init__(self, folder: Path, docs: int = 0, nbytes: int = 0) -> None:
        self._data = open_append(Path(folder) / DOCS, nbytes)
        self._index = open_append(Path(folder) / INDEX, 8 * docs)
        self.docs, self.bytes = docs, nbytes

    def add(self, blob: bytes, lengths: np.ndarray) -> None:
        """Append documents given as one UTF-8 `blob` and the byte length of each."""
        self._data.write(blob)
        self._index.write((self.bytes + np.cumsum(lengths, dtype=np.int64)).astype("<i8").tobytes())
        self.docs += len(lengths)
        self.bytes += len(blob)

    def flush(self) -> None:
        self._data.flush()
        self._index.flush()

    def close(self) -> None:
        close_durably(self._data)
        close_durably(self._index)


class SpoolReader:
    """Documents `[a, b)` of a spool, read with `pread` (not memory-mapped, so the corpus never
    counts towards this process's resident memory)."""

    def __init__(self, folder: Path, docs: int) -> None:
        self.folder = Path(folder)
        self.docs = docs
        self.ends = np.memmap(self.folder / INDEX, dtype="<i8", mode="r", shape=(docs,)) if docs else np.zeros(0, np.int64)
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.docs

    def offsets(self, a: int, b: int) -> np.ndarray:
        """Byte offsets of documents a..b-1: b - a + 1 values, absolute positions in docs.bin."""
        start = int(self.ends[a - 1]) if a > 0 else 0
        return np.concatenate([[start], np.asarray(self.ends[a:b], dtype=np.int64)])

    def texts(self, a: int, b: int) -> list[str]:
        return self.read(self.offsets(a, b))

    def read(self, offsets: np.ndarray) -> list[str]:
        """The documents delimited by consecutive absolute `offsets`."""
        if self._fd is None:
            self._fd = os.open(self.folder / DOCS, os.O_RDONLY)
        base = int(offsets[0])
        blob = os.pread(self._fd, int(offsets[-1]) - base, base)
        return [blob[int(x) - base:int(y) - base].decode("utf-8") for x, y in itertools.pairwise(offsets)]

    def ranges(self, start: int, batch_docs: int, batch_bytes: int) -> Iterator[tuple[int, int]]:
        """Document ranges [a, b) from `start` on, of at most `batch_docs` documents and (unless one
        document is larger) about `batch_bytes` bytes: a batch's encodings are large, so bounding
        its bytes bounds the memory of each encode call."""
        a = start
        while a < self.docs:
            base = int(self.ends[a - 1]) if a > 0 else 0
            b = int(np.searchsorted(self.ends, base + batch_bytes, side="right"))
            b = max(a + 1, min(self.docs, a + batch_docs, b))
            yield a, b
            a = b


# ---------------------------------------------------------------------------------------------
# Normalisation (in worker processes when num_proc > 1)
# ---------------------------------------------------------------------------------------------

_NORMALIZE: dict[str, TextNormalizer] = {}


def _init_normalizer(lowercase: bool, strip_accents: bool, ascii_only: bool, in_worker: bool) -> None:
    del in_worker  # the same in every process
    _NORMALIZE["fn"] = TextNormalizer(lowercase, strip_accents, ascii_only)


@dataclass
class NormalizedBatch:
    blob: bytes  # the normalised documents, UTF-8, concatenated (empty ones contribute nothing)
    lengths: np.ndarray  # int64 bytes of each document in `blob` (0 = empty after normalisation)
    chars: np.ndarray  # int64 characters of each normalised document
    raw_docs: int
    raw_chars: int
    seconds: float  # spent normalising


def _normalize(texts: list[str]) -> NormalizedBatch:
    start = time.perf_counter()
    norm = _NORMALIZE["fn"]
    normalized = [norm(t) for t in texts]
    encoded = [t.encode("utf-8") for t in normalized]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    chars = np.fromiter(map(len, normalized), dtype=np.int64, count=len(normalized))
    return NormalizedBatch(b"".join(encoded), lengths, chars, len(texts), sum(map(len, texts)),
                           time.perf_counter() - start)


def _raw_batches(docs: Iterable[str], batch_docs: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= batch_docs or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _limited(docs: Iterable[str], max_documents: int | None, max_chars: int | None) -> Iterator[str]:
    """The first documents of `docs`, up to `max_documents` and until `max_chars` were read;
    stops without reading one document more (so file counts match the documents used)."""
    count = chars = 0
    for doc in docs:
        count += 1
        chars += len(doc)
        yield doc
        if (max_documents is not None and count >= max_documents) or (max_chars is not None and chars >= max_chars):
            return


# ---------------------------------------------------------------------------------------------
# The phase
# ---------------------------------------------------------------------------------------------

# Counts committed with each batch; the source position is `documents_read`.
_COUNTS = ("documents_read", "chars_read", "docs", "bytes", "chars", "documents_empty_after_normalization",
           "documents_deduplicated")


def _dedup_after(spool_dir: Path, docs: int, duplicates: int) -> ExactDeduplicator:
    """The deduplicator of a resumed build: remembers every document spooled so far."""
    dedup = ExactDeduplicator()
    dedup.duplicates = duplicates
    if docs:
        reader = SpoolReader(spool_dir, docs)
        for a, b in reader.ranges(0, 10_000, 1 << 24):
            for text in reader.texts(a, b):
                dedup.remember(text.encode("utf-8"))
    return dedup


def _kept(batch: NormalizedBatch, dedup: ExactDeduplicator | None) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The non-empty (and, with dedup, first-seen) documents of a batch: blob, lengths, chars."""
    keep = batch.lengths > 0
    if dedup is None and keep.all():
        return batch.blob, batch.lengths, batch.chars
    starts = np.cumsum(batch.lengths) - batch.lengths
    doc = [batch.blob[a:a + n] for a, n in zip(starts.tolist(), batch.lengths.tolist(), strict=True)]
    if dedup is not None:
        for i in np.flatnonzero(keep):
            keep[i] = dedup.is_new(doc[i])
    return b"".join(doc[i] for i in np.flatnonzero(keep)), batch.lengths[keep], batch.chars[keep]


def spool_corpus(cfg: Any, work: WorkDir, num_proc: int, progress: bool) -> dict[str, Any]:
    """Read `cfg`'s documents into the spool of `work` (resuming its committed part); the counts."""
    state = work.begin("spool")
    if state.get("done"):
        return state
    counts = {k: int(state.get(k, 0)) for k in _COUNTS}
    spool = DocSpool(work.path, counts["docs"], counts["bytes"])
    dedup = _dedup_after(work.path, counts["docs"], counts["documents_deduplicated"]) if cfg.dedup else None
    stats = sources.SourceStats()
    docs = _limited(sources.iter_documents(cfg, stats), cfg.max_documents, cfg.max_chars)
    # Resuming: read past the documents already spooled (their counts are committed) without
    # normalising them again; reading them again also rebuilds the source statistics.
    batches = _raw_batches(itertools.islice(docs, counts["documents_read"], None), cfg.batch_docs)
    bar = tqdm(total=cfg.max_documents, initial=counts["documents_read"], desc="read+normalise", unit="doc",
               disable=not progress, mininterval=1.0)
    # Mostly-ASCII text normalises far faster than it is read (TextNormalizer): workers then only
    # add the cost of shipping it to them and back. They start when normalising took most of the
    # time of the first batches (text needing the Rust normaliser, e.g. web pages).
    timing = {"start": time.perf_counter(), "normalize": 0.0}
    try:
        for batch in ordered_map(_normalize, batches, num_proc, initializer=_init_normalizer,
                                 initargs=(cfg.lowercase, cfg.strip_accents, cfg.ascii_only),
                                 worth_workers=lambda: timing["normalize"] > (time.perf_counter() - timing["start"]) / 2):
            timing["normalize"] += batch.seconds
            blob, lengths, chars = _kept(batch, dedup)
            spool.add(blob, lengths)
            counts["documents_read"] += batch.raw_docs
            counts["chars_read"] += batch.raw_chars
            counts["documents_empty_after_normalization"] += int((batch.lengths == 0).sum())
            counts["docs"], counts["bytes"] = spool.docs, spool.bytes
            counts["chars"] += int(chars.sum())
            if dedup is not None:
                counts["documents_deduplicated"] = dedup.duplicates
            spool.flush()
            work.commit("spool", counts)
            fault_point("data.spool")
            bar.update(batch.raw_docs)
    finally:
        bar.close()
    spool.close()
    result = {**counts, **{f.name: getattr(stats, f.name) for f in fields(stats) if f.name != "documents_read"}}
    work.commit("spool", result, done=True)
    return work.state("spool")
