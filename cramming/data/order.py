"""Steps 6-7 of `cram data`: hold out validation rows, order the train rows, write them in order.

Everything here works on files in bounded memory, so a corpus of any size fits: the packed rows
(`FileArray`) are read a chunk at a time, the row permutations live in memory-mapped files, and the
prevalence order is a bucket sort (`argsort_descending`) that holds one bucket at a time. The
results equal the in-memory versions exactly: the validation rows are the first rows of
`default_rng([seed, 5]).permutation(n)`, the order is a stable sort by descending mean token
prevalence (ties keep the packing order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from tqdm.auto import tqdm

# How the train rows are ordered (data.sorting): by prevalence (the paper's curriculum), shuffled, or as packed.
Sorting = Literal["prevalence", "shuffle", "none"]

# Rows per bucket of the bucket sort, and per chunk of the passes over the rows (a chunk costs 8
# bytes per token in its int64 / float64 temporaries: 8 MB at 128 tokens per row).
BUCKET_ROWS = 1 << 20
CHUNK_ROWS = 1 << 13


class FileArray:
    """An array of `shape` stored flat in a file (the packed rows, the train order); indexing maps
    the file for that one read, so what was read once does not stay in this process's resident set.
    An index array is gathered `GATHER` entries per map: rows picked at random each touch a page of
    their own, and one map for all of them would hold ~4 KiB per row resident."""

    GATHER = 4096

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, key: Any) -> np.ndarray:
        mm = np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)
        out = mm[key]
        return np.array(out) if isinstance(out, np.memmap) else out  # a slice is a view into the map: copy it

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, np.ndarray) and len(key) > self.GATHER:
            return np.concatenate([self._read(key[i:i + self.GATHER]) for i in range(0, len(key), self.GATHER)])
        return self._read(key)


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, size):
        yield s, min(n, s + size)


def _scratch(path: Path, dtype: Any, n: int) -> np.ndarray:
    """A new file of `n` values, mapped as a plain ndarray (numpy's shuffle and sort take their fast
    paths only for ndarray itself, not the memmap subclass)."""
    return np.memmap(path, dtype=dtype, mode="w+", shape=(max(1, n),))[:n].view(np.ndarray)


def split_validation(n_rows: int, val_fraction: float, val_max: int, seed: int, scratch: Path) -> np.ndarray:
    """The sorted held-out row indices: the first n_val of `default_rng([seed, 5]).permutation(n_rows)`.

    The permutation is shuffled in a memory-mapped file, not in RAM (8 bytes per row).
    """
    n_val = min(math.ceil(val_fraction * n_rows), val_max, n_rows - 1)
    path = scratch / "perm.bin"
    perm = _scratch(path, np.int64, n_rows)
    for a, b in _chunks(n_rows, BUCKET_ROWS):
        perm[a:b] = np.arange(a, b)
    np.random.default_rng([seed, 5]).shuffle(perm)  # what Generator.permutation(n) does, in place
    val = np.sort(np.array(perm[:n_val]))
    del perm
    path.unlink()
    return val


def train_rows(val: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The row index of each position in the train split (all rows but the sorted `val`, in order)."""
    # The p-th train row is p plus the number of held-out rows before it: the count of i with
    # val[i] - i <= p.
    return positions + np.searchsorted(val - np.arange(len(val)), positions, side="right")


def token_probabilities(rows: Any, vocab_size: int, pad_id: int | None = None, progress: bool = False) -> np.ndarray:
    """Unigram probability of every token id over `rows` (padding not counted when `pad_id` is given)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for a, b in tqdm(list(_chunks(len(rows), CHUNK_ROWS)), desc="count tokens", disable=not progress):
        counts += np.bincount(np.asarray(rows[a:b]).ravel(), minlength=vocab_size)[:vocab_size]
    if pad_id is not None:
        counts[pad_id] = 0
    return counts / max(1, counts.sum())


def row_scores(chunk: np.ndarray, prob: np.ndarray, pad_id: int | None = None) -> np.ndarray:
    """Mean unigram probability of each row's tokens; with `pad_id` (doc-bounded rows) the mean of
    its real tokens, so many pads do not make a short row score as "most prevalent"."""
    if pad_id is None:
        return prob[chunk].mean(axis=1)
    real = np.maximum(1, (chunk != pad_id).sum(axis=1))  # prob[pad] is 0: the sum covers real tokens
    return prob[chunk].sum(axis=1) / real


def argsort_descending(keys: np.ndarray, out: np.ndarray, scratch: Path, bucket_rows: int = BUCKET_ROWS) -> None:
    """`out[:] = argsort(-keys, kind="stable")`, holding about `bucket_rows` keys in RAM at a time.

    Keys are spread over buckets of consecutive key ranges (edges from quantiles of a sample),
    each bucket's positions are spooled to a file in ascending order, then the buckets are sorted
    one by one from the highest range down. Equal keys share a bucket, so ties keep their order.
    """
    n = len(keys)
    if n <= bucket_rows:
        out[:] = np.argsort(-np.asarray(keys), kind="stable")
        return
    n_buckets = -(-n // bucket_rows)
    sample = np.asarray(keys[:: max(1, n // (64 * n_buckets))])
    edges = np.unique(np.quantile(sample, np.linspace(0, 1, n_buckets + 1)[1:-1]))
    paths = [scratch / f"bucket-{b:05d}.bin" for b in range(len(edges) + 1)]
    files = [open(p, "wb") for p in paths]  # noqa: SIM115
    try:
        for a, b in _chunks(n, bucket_rows):
            bucket = np.searchsorted(edges, np.asarray(keys[a:b]), side="right")
            by_bucket = np.argsort(bucket, kind="stable")  # grouped, ascending positions within each
            bounds = np.searchsorted(bucket[by_bucket], np.arange(len(files) + 1))
            for j, fh in enumerate(files):
                fh.write((by_bucket[bounds[j]:bounds[j + 1]] + a).astype(np.int64).tobytes())
    finally:
        for fh in files:
            fh.close()
    pos = 0
    for path in reversed(paths):
        idx = np.fromfile(path, dtype=np.int64)
        out[pos:pos + len(idx)] = idx[np.argsort(-np.asarray(keys[idx]), kind="stable")]
        pos += len(idx)
        path.unlink()


def order_train(rows: Any, val: np.ndarray, sorting: Sorting, vocab_size: int, seed: int, out_path: Path,
                scratch: Path, pad_id: int | None = None, progress: bool = True) -> np.ndarray:
    """The train rows (all but `val`) in `sorting` order, written to `out_path` (int64) and returned
    memory-mapped: by descending mean prevalence (likely rows first), shuffled, or as packed.

    `pad_id`: padding to leave out of the prevalence scores (doc-bounded rows).
    """
    if sorting not in get_args(Sorting):
        raise ValueError(f"unknown sorting {sorting!r}")
    n_train = len(rows) - len(val)
    order = _scratch(out_path, np.int64, n_train)
    if sorting != "prevalence":
        for a, b in _chunks(n_train, BUCKET_ROWS):
            order[a:b] = train_rows(val, np.arange(a, b))
        if sorting == "shuffle":
            np.random.default_rng([seed, 6]).shuffle(order)  # = Generator.permutation(train rows)
        return order
    prob = token_probabilities(rows, vocab_size, pad_id, progress)
    keys_path = scratch / "scores.bin"
    keys = _scratch(keys_path, np.float64, n_train)
    for a, b in tqdm(list(_chunks(n_train, CHUNK_ROWS)), desc="score rows", disable=not progress):
        keys[a:b] = row_scores(rows[train_rows(val, np.arange(a, b))], prob, pad_id)
    argsort_descending(keys, order, scratch)
    for a, b in _chunks(n_train, BUCKET_ROWS):
        order[a:b] = train_rows(val, np.asarray(order[a:b]))
    del keys
    keys_path.unlink()
    return order


def write_in_order(rows: Any, order: np.ndarray, write: Callable[..., None], *, start: int = 0,
                   transform: Callable[[np.ndarray, int], tuple[np.ndarray, ...]] | None = None,
                   chunk_rows: int = 1 << 15, desc: str = "write shards", progress: bool = True) -> None:
    """`write(*transform(rows[order[a:b]], a))` chunk by chunk, for the positions from `start` on.

    `transform(chunk, a)` (e.g. static masking, seeded by `a`) always sees whole chunks of the
    same grid, so a write resumed at any `start` produces the same rows; what precedes `start`
    in its first chunk is dropped after the transform.
    """
    grid = [(a, b) for a, b in _chunks(len(order), chunk_rows) if b > start]
    for a, b in tqdm(grid, desc=desc, disable=not progress):
        out = (rows[np.asarray(order[a:b])],) if transform is None else transform(rows[np.asarray(order[a:b])], a)
        skip = max(0, start - a)
        write(*(x[skip:] for x in out))
