"""Steps 4-5 of `cram data`: tokenize, filter by compression, pack into rows (resumable).

Encoding runs in batches of spooled documents (`Tokenizer.encode_batch`), in `num_proc` worker
processes when there are enough batches (`parallel.ordered_map`; with one process the Rust thread
pool of `tokenizers` runs the batch). Each batch applies the compression filter with the token
counts it just computed (one encode pass serves both steps) and appends [SEP] after every kept
document; the main process appends the batch to `rows.bin` and commits its progress, so a killed
build continues after the last committed batch.

`RowPacker` (RoBERTa's FULL-SENTENCES, the default) writes the token stream as it comes: row i is
tokens [i * seq_len, (i + 1) * seq_len), and the tail of the last, incomplete row is dropped.
`DocRowPacker` (like RoBERTa's DOC-SENTENCES) writes rows that never cross a document boundary:
each document (with its [SEP]) is cut into rows on its own and its last row is filled with [PAD].
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cramming.data.filters import passes_compression
from cramming.data.parallel import ordered_map
from cramming.data.spool import SpoolReader
from cramming.data.workdir import close_durably, open_append
from cramming.faults import fault_point


class RowPacker:
    """Appends token streams to a flat file; its first `rows` * `seq_len` tokens are the rows (the
    tail after them, an incomplete row, stays in the file and is never read)."""

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype, tokens: int = 0) -> None:
        self.seq_len, self.dtype = seq_len, np.dtype(dtype)
        self._fh = open_append(Path(path), tokens * self.dtype.itemsize)
        self.written = tokens  # tokens in the file, the incomplete last row included

    def add(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> None:
        del lengths  # rows run across documents: their boundaries do not matter here
        self._fh.write(np.asarray(ids).astype(self.dtype, copy=False).tobytes())
        self.written += len(ids)

    @property
    def rows(self) -> int:
        return self.written // self.seq_len

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    def state(self) -> dict[str, int]:
        return {"tokens_written": self.written}

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> int:
        """Finish; the number of tokens in the last, incomplete row (dropped: no padding)."""
        close_durably(self._fh)
        return self.written - self.tokens


class DocRowPacker:
    """Writes rows that never cross a document boundary (RoBERTa's DOC-SENTENCES, without its
    sentence sampling): each document and its [SEP] is cut into rows of `seq_len`, and the last,
    partial row of a document is filled with `pad_id`. Nothing is carried from one document to the
    next, so nothing is dropped at the end either.

    A final piece holding only the document's [SEP] (its text filled the previous row exactly) is
    not written: a row of one [SEP] and padding has nothing to predict.
    """

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype, pad_id: int, rows: int = 0, tokens: int = 0,
                 pad_tokens: int = 0) -> None:
        self.seq_len, self.dtype, self.pad_id = seq_len, np.dtype(dtype), int(pad_id)
        self._fh = open_append(Path(path), rows * seq_len * self.dtype.itemsize)
        self.rows = rows
        self.tokens = tokens  # real tokens written (padding excluded)
        self.pad_tokens = pad_tokens

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

    def state(self) -> dict[str, int]:
        return {"rows": self.rows, "tokens": self.tokens, "pad_tokens": self.pad_tokens}

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> int:
        """Finish; 0 (no tail is dropped: every document's last row is padded)."""
        close_durably(self._fh)
        return 0


def open_packer(packing: str, path: Path, seq_len: int, dtype: np.dtype, pad_id: int | None,
                state: dict[str, Any]) -> RowPacker | DocRowPacker:
    """The packer of `packing`, reopened at the committed `state` (empty: a new file)."""
    if packing == "full-sentences":
        return RowPacker(path, seq_len, dtype, state.get("tokens_written", 0))
    if packing == "doc-bounded":
        if pad_id is None:
            raise ValueError("doc-bounded packing needs pad_id")
        return DocRowPacker(path, seq_len, dtype, pad_id, state.get("rows", 0), state.get("tokens", 0),
                            state.get("pad_tokens", 0))
    raise ValueError(f"unknown packing {packing!r}")


# ---------------------------------------------------------------------------------------------
# Encoding (in worker processes when num_proc > 1)
# ---------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_encoder(tokenizer_json: str, sep_id: int, threshold: float | None, spool_dir: str, docs: int,
                  dtype: str, in_worker: bool) -> None:
    if in_worker:
        # One single-threaded tokenizer per process: a full Rust thread pool in each of
        # num_proc processes would oversubscribe the cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    # Spooled text is already normalised; the normaliser is idempotent, so skipping it is safe.
    tok.normalizer = None
    _WORKER.update(tok=tok, sep=sep_id, threshold=threshold, spool=SpoolReader(Path(spool_dir), docs),
                   dtype=np.dtype(dtype), in_worker=in_worker)


@dataclass
class EncodedBatch:
    ids: np.ndarray  # kept documents each followed by [SEP], in the shards' token dtype
    lengths: np.ndarray  # int64, tokens of each kept document in `ids`, its [SEP] included
    kept: int
    filtered: int
    chars_filtered: int
    chars_kept: int
    docs: int


def _encode(doc_range: tuple[int, int]) -> EncodedBatch:
    if _WORKER["in_worker"]:
        fault_point("data.worker")  # a worker process dies (the reliability suite's OOM-kill stand-in)
    tok, sep, threshold = _WORKER["tok"], _WORKER["sep"], _WORKER["threshold"]
    texts = _WORKER["spool"].texts(*doc_range)
    # encode_batch_fast (tokenizers >= 0.20.1) skips the offsets we never use.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
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
    arr = np.fromiter(itertools.chain.from_iterable(keep_ids), dtype=_WORKER["dtype"], count=total)
    lengths = np.fromiter((len(x) + 1 for x in keep_ids[::2]), dtype=np.int64, count=len(keep_ids) // 2)
    return EncodedBatch(arr, lengths, len(keep_ids) // 2, filtered, chars_filtered, chars_kept, len(texts))


_COUNTS = ("documents_filtered", "chars_filtered", "documents_packed", "chars_packed")


def encode_and_pack(spool: SpoolReader, tokenizer_json: str, sep_id: int, threshold: float | None,
                    rows_path: Path, seq_len: int, dtype: np.dtype, *, state: dict[str, Any],
                    commit: Callable[[dict[str, Any]], None], num_proc: int = 1, batch_docs: int = 1000,
                    batch_bytes: int = 1 << 18, progress: bool = True, packing: str = "full-sentences",
                    pad_id: int | None = None) -> dict[str, int]:
    """Steps 4-5 over the spooled documents, from the committed `state` on; returns the counts.

    `commit(state)` is called after every batch with what a resumed call needs. A batch's
    encodings take ~120 bytes per token while they exist, hence `batch_bytes` (256 KiB of text:
    ~30 MB per process at a time). `packing`:
    "full-sentences" (rows run across documents) or "doc-bounded" (each document on rows of its
    own, the last one filled with `pad_id`; see `DocRowPacker`).
    """
    packer = open_packer(packing, rows_path, seq_len, dtype, pad_id, state)
    counts = {k: int(state.get(k, 0)) for k in _COUNTS}
    done = int(state.get("docs_encoded", 0))
    init_args = (tokenizer_json, sep_id, threshold, str(spool.folder), len(spool), np.dtype(dtype).name)
    bar = tqdm(total=len(spool), initial=done, desc="tokenize+filter+pack", unit="doc", disable=not progress,
               mininterval=1.0)
    try:
        tasks = spool.ranges(done, batch_docs, batch_bytes)
        for res in ordered_map(_encode, tasks, num_proc, initializer=_init_encoder, initargs=init_args):
            packer.add(res.ids, res.lengths)
            counts["documents_filtered"] += res.filtered
            counts["chars_filtered"] += res.chars_filtered
            counts["documents_packed"] += res.kept
            counts["chars_packed"] += res.chars_kept
            done += res.docs
            packer.flush()
            commit({**counts, **packer.state(), "docs_encoded": done})
            fault_point("data.tokenize")
            bar.update(res.docs)
            bar.set_postfix(rows=packer.rows, refresh=False)
    finally:
        bar.close()
    counts["tokens_dropped_tail"] = packer.close()
    counts["sequences"] = packer.rows
    counts["tokens"] = packer.tokens
    if isinstance(packer, DocRowPacker):
        counts["pad_tokens"] = packer.pad_tokens  # only doc-bounded rows have padding
    return counts
