"""Tokenize, filter, pack and order (steps 4-6).

The normalised documents are spooled to disk (`DocSpool`: one UTF-8 byte stream plus an offsets
array), so tokenizer training and encoding read them again without a second download and without
holding the corpus in RAM. Encoding runs in batches (`Tokenizer.encode_batch`, Rust threads), in
`num_proc` processes when asked; each batch applies the compression filter with the token counts
it just computed (one encode pass serves both steps), appends [SEP] after every kept document, and
the main process cuts the concatenated stream into rows of exactly `seq_len` tokens, written
straight to a flat file (`RowPacker`, RoBERTa's FULL-SENTENCES). With `packing="doc-bounded"`
(`DocRowPacker`, like RoBERTa's DOC-SENTENCES) a row never crosses a document boundary: each
document (with its [SEP]) is cut into rows on its own and its last row is filled with [PAD]. Ordering works on that file with numpy (uint16 rows), chunk by chunk.
"""

from __future__ import annotations

import array
import itertools
import mmap
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cramming.config import fault_point
from cramming.data.filters import passes_compression


class DocSpool:
    """Append-only store of documents: `docs.bin` (UTF-8, concatenated) + `offsets` (int64)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "docs.bin"
        self._fh = open(self.path, "wb")  # noqa: SIM115
        self._offsets = array.array("q", [0])  # 8 bytes per document, not a list of ints
        self.chars = 0

    def add(self, text: str) -> None:
        data = text.encode("utf-8")
        self._fh.write(data)
        self._offsets.append(self._offsets[-1] + len(data))
        self.chars += len(text)

    def close(self) -> np.ndarray:
        """Finish writing; the offsets (len = documents + 1)."""
        self._fh.close()
        self.offsets = np.frombuffer(self._offsets, dtype=np.int64).copy()
        del self._offsets
        return self.offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1 if hasattr(self, "offsets") else len(self._offsets) - 1


def read_docs(path: Path, offsets: np.ndarray) -> list[str]:
    """Documents delimited by consecutive `offsets` (absolute byte positions) in `path`."""
    if len(offsets) < 2 or offsets[-1] == offsets[0]:
        return [""] * max(0, len(offsets) - 1)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        blob = mm[int(offsets[0]):int(offsets[-1])]
    base = int(offsets[0])
    return [blob[int(a) - base:int(b) - base].decode("utf-8") for a, b in itertools.pairwise(offsets)]


def iter_doc_batches(path: Path, offsets: np.ndarray, batch_docs: int) -> Iterator[list[str]]:
    for start in range(0, len(offsets) - 1, batch_docs):
        yield read_docs(path, offsets[start:start + batch_docs + 1])


# ---------------------------------------------------------------------------------------------
# Encoding (runs in worker processes when num_proc > 1)
# ---------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_json: str, sep_id: int, threshold: float | None, spool: str, threads: bool) -> None:
    if not threads:
        # Several processes each spawning a full Rust thread pool would oversubscribe the cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    # Spooled text is already normalised; the normaliser is idempotent, so skipping it is safe.
    tok.normalizer = None
    _WORKER.update(tok=tok, sep=sep_id, threshold=threshold, spool=Path(spool))


@dataclass
class EncodedBatch:
    ids: np.ndarray  # uint32, kept documents each followed by [SEP]
    lengths: np.ndarray  # int64, tokens of each kept document in `ids`, its [SEP] included
    kept: int
    filtered: int
    chars_filtered: int
    chars_kept: int
    docs: int


def _encode(offsets: np.ndarray) -> EncodedBatch:
    tok, sep, threshold = _WORKER["tok"], _WORKER["sep"], _WORKER["threshold"]
    texts = read_docs(_WORKER["spool"], offsets)
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False) if hasattr(tok, "encode_batch_fast") \
        else tok.encode_batch(texts, add_special_tokens=False)
    keep_ids: list[list[int]] = []
    filtered = chars_filtered = chars_kept = 0
    for text, enc in zip(texts, encodings, strict=True):
        ids = enc.ids
        if threshold is not None and not passes_compression(len(ids), len(text), threshold):
            filtered += 1
            chars_filtered += len(text)
            continue
        chars_kept += len(text)
        keep_ids.append(ids)
        keep_ids.append([sep])
    total = sum(len(x) for x in keep_ids)
    arr = np.fromiter(itertools.chain.from_iterable(keep_ids), dtype=np.uint32, count=total)
    lengths = np.fromiter((len(x) + 1 for x in keep_ids[::2]), dtype=np.int64, count=len(keep_ids) // 2)
    return EncodedBatch(arr, lengths, len(keep_ids) // 2, filtered, chars_filtered, chars_kept, len(texts))


def batch_offsets(offsets: np.ndarray, batch_docs: int, batch_bytes: int) -> Iterator[np.ndarray]:
    """Offset slices of at most `batch_docs` documents and (unless one document is larger) about
    `batch_bytes` bytes: encodings of a batch of long documents (speeches, books) are big, so
    capping the bytes caps the memory of each encode_batch call."""
    n_docs = len(offsets) - 1
    start = 0
    while start < n_docs:
        limit = min(n_docs, start + batch_docs)
        # last document index whose end stays within the byte budget (at least one document)
        end = int(np.searchsorted(offsets, offsets[start] + batch_bytes, side="right")) - 1
        end = max(start + 1, min(limit, end))
        yield offsets[start:end + 1]
        start = end


class RowPacker:
    """Concatenates token streams and writes every full row of `seq_len` to a flat file."""

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype) -> None:
        self.seq_len, self.dtype = seq_len, np.dtype(dtype)
        self._fh = open(path, "wb")  # noqa: SIM115
        self._tail = np.empty(0, dtype=np.uint32)
        self.rows = 0
        self.tokens = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> None:
        del lengths  # rows run across documents: their boundaries do not matter here
        buf = np.concatenate([self._tail, ids]) if len(self._tail) else ids
        n = len(buf) // self.seq_len
        if n:
            self._fh.write(buf[: n * self.seq_len].astype(self.dtype).tobytes())
            self.rows += n
            self.tokens += n * self.seq_len
        self._tail = buf[n * self.seq_len:].copy()

    def close(self) -> int:
        """Finish; the number of tokens in the last, incomplete row (dropped: no padding)."""
        self._fh.close()
        return len(self._tail)


class DocRowPacker:
    """Writes rows that never cross a document boundary (RoBERTa's DOC-SENTENCES, without its
    sentence sampling): each document and its [SEP] is cut into rows of `seq_len`, and the last,
    partial row of a document is filled with `pad_id`. Nothing is carried from one document to the
    next, so nothing is dropped at the end either.

    A final piece holding only the document's [SEP] (its text filled the previous row exactly) is
    not written: a row of one [SEP] and padding has nothing to predict.
    """

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype, pad_id: int) -> None:
        self.seq_len, self.dtype, self.pad_id = seq_len, np.dtype(dtype), int(pad_id)
        self._fh = open(path, "wb")  # noqa: SIM115
        self.rows = 0
        self.tokens = 0  # real tokens written (padding excluded)
        self.pad_tokens = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> None:
        if lengths is None:
            raise ValueError("doc-bounded packing needs the length of every document")
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(ids):
            raise ValueError(f"document lengths sum to {int(lengths.sum())}, the batch has {len(ids)} tokens")
        if not len(lengths):
            return
        L = self.seq_len
        # Tokens kept per document: all, except a trailing [SEP] that would open a row of its own.
        keep = np.where(lengths % L == 1, lengths - 1, lengths)
        n_rows = -(-keep // L)  # ceil
        total_rows = int(n_rows.sum())
        if total_rows == 0:
            return
        # Vectorised scatter: token j of document d goes to flat position row_start[d] * L + j.
        src_start = np.cumsum(lengths) - lengths
        row_start = np.cumsum(n_rows) - n_rows
        offset = np.arange(len(ids), dtype=np.int64) - np.repeat(src_start, lengths)
        kept = offset < np.repeat(keep, lengths)
        dest = np.repeat(row_start * L, lengths) + offset
        out = np.full(total_rows * L, self.pad_id, dtype=self.dtype)
        out[dest[kept]] = ids[kept]
        self._fh.write(out.tobytes())
        self.rows += total_rows
        real = int(keep.sum())
        self.tokens += real
        self.pad_tokens += total_rows * L - real

    def close(self) -> int:
        """Finish; 0 (no tail is dropped: every document's last row is padded)."""
        self._fh.close()
        return 0


def encode_and_pack(spool: Path, offsets: np.ndarray, tokenizer_json: str, sep_id: int, threshold: float | None,
                    rows_path: Path, seq_len: int, dtype: np.dtype, *, num_proc: int = 1, batch_docs: int = 1000,
                    batch_bytes: int = 1 << 20, progress: bool = True, packing: str = "full-sentences",
                    pad_id: int | None = None) -> dict[str, int]:
    """Steps 4-5: filter by compression ratio, tokenize, append [SEP], pack into rows.

    `packing`: "full-sentences" (rows run across documents) or "doc-bounded" (each document on
    rows of its own, the last one filled with `pad_id`; see `DocRowPacker`).
    """
    packer: RowPacker | DocRowPacker
    if packing == "full-sentences":
        packer = RowPacker(rows_path, seq_len, dtype)
    elif packing == "doc-bounded":
        if pad_id is None:
            raise ValueError("doc-bounded packing needs pad_id")
        packer = DocRowPacker(rows_path, seq_len, dtype, pad_id)
    else:
        raise ValueError(f"unknown packing {packing!r}")
    n_docs = len(offsets) - 1
    tasks = batch_offsets(offsets, batch_docs, batch_bytes)
    counts = dict(documents_filtered=0, chars_filtered=0, documents_packed=0, chars_packed=0)
    init_args = (tokenizer_json, sep_id, threshold, str(spool), num_proc <= 1)
    bar = tqdm(total=n_docs, desc="tokenize+filter+pack", unit="doc", disable=not progress, mininterval=1.0)

    def consume(results: Iterator[EncodedBatch]) -> None:
        for res in results:
            fault_point("data.tokenize")
            packer.add(res.ids, res.lengths)
            counts["documents_filtered"] += res.filtered
            counts["chars_filtered"] += res.chars_filtered
            counts["documents_packed"] += res.kept
            counts["chars_packed"] += res.chars_kept
            bar.update(res.docs)
            bar.set_postfix(rows=packer.rows, refresh=False)

    try:
        if num_proc <= 1:
            _init_worker(*init_args)
            consume(map(_encode, tasks))
        else:
            # spawn, not fork: the parent's tokenizers thread pool does not survive a fork.
            with mp.get_context("spawn").Pool(num_proc, initializer=_init_worker, initargs=init_args) as pool:
                consume(pool.imap(_encode, tasks, chunksize=1))
    finally:
        bar.close()
        counts["tokens_dropped_tail"] = packer.close()
    counts["sequences"] = packer.rows
    counts["tokens"] = packer.tokens
    if isinstance(packer, DocRowPacker):
        counts["pad_tokens"] = packer.pad_tokens  # only doc-bounded rows have padding
    return counts


# ---------------------------------------------------------------------------------------------
# Ordering
# ---------------------------------------------------------------------------------------------


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, size):
        yield s, min(n, s + size)


def prevalence_scores(rows: np.ndarray, vocab_size: int, chunk_rows: int = 1 << 16,
                      progress: bool = True, pad_id: int | None = None) -> np.ndarray:
    """Mean unigram probability of the tokens of each row (probabilities counted over `rows`).

    With `pad_id` (doc-bounded rows) padding is neither counted nor averaged: a short row scores by
    its real tokens only, and the many pads do not become the "most prevalent token".
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for a, b in tqdm(list(_chunks(len(rows), chunk_rows)), desc="count tokens", disable=not progress):
        counts += np.bincount(np.asarray(rows[a:b]).ravel(), minlength=vocab_size)[:vocab_size]
    if pad_id is not None:
        counts[pad_id] = 0
    prob = counts / max(1, counts.sum())
    scores = np.empty(len(rows), dtype=np.float64)
    for a, b in tqdm(list(_chunks(len(rows), chunk_rows)), desc="score rows", disable=not progress):
        chunk = np.asarray(rows[a:b])
        if pad_id is None:
            scores[a:b] = prob[chunk].mean(axis=1)
        else:  # prob[pad] is 0, so the sum covers the real tokens; divide by their number
            real = np.maximum(1, (chunk != pad_id).sum(axis=1))
            scores[a:b] = prob[chunk].sum(axis=1) / real
    return scores


def order_rows(rows: np.ndarray, indices: np.ndarray, sorting: str, vocab_size: int, seed: int,
               progress: bool = True, pad_id: int | None = None) -> np.ndarray:
    """`indices` reordered: by descending mean prevalence (likely rows first), shuffled, or as is.

    `pad_id`: padding to leave out of the prevalence scores (doc-bounded rows).
    """
    if sorting == "none":
        return indices
    if sorting == "shuffle":
        return np.random.default_rng([seed, 6]).permutation(indices)
    if sorting == "prevalence":
        scores = prevalence_scores(rows, vocab_size, progress=progress, pad_id=pad_id)[indices]
        return indices[np.argsort(-scores, kind="stable")]
    raise ValueError(f"unknown sorting {sorting!r}")


def write_in_order(rows: np.ndarray, order: np.ndarray, write: Callable[[np.ndarray, int], None],
                   chunk_rows: int = 1 << 15, desc: str = "write shards", progress: bool = True) -> None:
    """Call `write(rows[order[a:b]], a)` chunk by chunk (bounded memory)."""
    for a, b in tqdm(list(_chunks(len(order), chunk_rows)), desc=desc, disable=not progress):
        write(np.asarray(rows[order[a:b]]), a)
