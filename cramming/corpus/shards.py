"""Shards on disk, the manifest, the memmap dataset and the resumable masked-batch loader.

Layout (docs/design.md): `train-00000.bin`, ... and `val-00000.bin` hold rows of exactly
`seq_len` token ids (uint16, or uint32 when the vocabulary exceeds 65535), C order, no header.
`manifest.json` lists every shard with its row count and sha256 and is written last, so a folder
without it is incomplete and never read.

With static masking (`static_masking` in the manifest) each train shard holds pre-masked rows and
has a sibling `*.labels.bin` (int32, -100 where not a target) with the same number of rows.

Doc-bounded rows (`packing: doc-bounded` in the manifest) end in [PAD]; the loader then adds an
`attention_mask` (1 = real token) to every batch so the model does not attend to padding.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cramming.errors import DataError
from cramming.faults import fault_point
from cramming.fileio import sha256_file, write_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON without its own `manifest_sha256` field.

    Stored in the manifest, it makes any change to the file detectable (a flipped digit in a row
    count or a config value would otherwise still parse as valid JSON).
    """
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON atomically (see `write_atomic`); a crash leaves the previous file or none."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", fault="data.manifest")


class ShardWriter:
    """Appends rows to `<prefix>-00000.bin`, ... and hashes them as they are written.

    `shards`: the manifest entries of shards a killed build already finished; writing continues
    with the next shard. `on_shard(shards)` is called each time a shard is finished.
    """

    def __init__(self, folder: Path, prefix: str, seq_len: int, dtype: np.dtype, rows_per_shard: int,
                 labels: bool = False, shards: list[dict[str, Any]] | None = None,
                 on_shard: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        self.folder, self.prefix, self.seq_len, self.dtype = Path(folder), prefix, seq_len, np.dtype(dtype)
        self.rows_per_shard = rows_per_shard
        self.with_labels = labels
        self.shards: list[dict[str, Any]] = [dict(s) for s in shards or []]
        self.on_shard = on_shard
        self._fh = self._lfh = None
        self._hash = self._lhash = None
        self._rows = 0

    @property
    def rows_written(self) -> int:
        """Rows in finished shards and the one being written (whose entry says 0 rows until finished)."""
        return sum(s["rows"] for s in self.shards) + (self._rows if self._fh is not None else 0)

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):05d}.bin"
        self.shards.append({"path": name, "rows": 0, "sha256": None})
        self._fh, self._hash, self._rows = open(self.folder / name, "wb"), hashlib.sha256(), 0
        if self.with_labels:
            lname = f"{self.prefix}-{len(self.shards) - 1:05d}.labels.bin"
            self.shards[-1].update(labels_path=lname, labels_sha256=None)
            self._lfh, self._lhash = open(self.folder / lname, "wb"), hashlib.sha256()

    def _close(self) -> None:
        if self._fh is None:
            return
        for fh in (self._fh, self._lfh):
            if fh is not None:  # a finished shard is never rewritten by a resumed build: make it durable
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
        self.shards[-1].update(rows=self._rows, sha256=self._hash.hexdigest())
        if self._lfh is not None:
            self.shards[-1]["labels_sha256"] = self._lhash.hexdigest()
        self._fh = self._lfh = None
        if self.on_shard is not None:
            self.on_shard([dict(s) for s in self.shards])

    def write(self, rows: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Append `rows` ([n, seq_len]); `labels` (int32, same shape) when writing static masks."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        assert rows.ndim == 2 and rows.shape[1] == self.seq_len, rows.shape
        start = 0
        while start < len(rows):
            if self._fh is None or self._rows >= self.rows_per_shard:
                self._close()
                self._open()
            take = min(len(rows) - start, self.rows_per_shard - self._rows)
            data = rows[start:start + take].tobytes()
            self._fh.write(data)
            fault_point("data.shard_write")
            self._hash.update(data)
            if self.with_labels:
                assert labels is not None
                ldata = np.ascontiguousarray(labels[start:start + take], dtype=np.int32).tobytes()
                self._lfh.write(ldata)
                self._lhash.update(ldata)
            self._rows += take
            start += take

    def finish(self) -> dict[str, Any]:
        """Close the last shard; the split's manifest entry."""
        self._close()
        return {"num_sequences": sum(s["rows"] for s in self.shards), "shards": self.shards}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check `manifest.json` of a prepared folder; every problem is a DataError."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise DataError(f"prepared data folder {folder} does not exist; run `cram data` first")
    if not path.is_file():
        raise DataError(
            f"{path} is missing: {folder} is not a finished `cram data` output (an interrupted run?). "
            "Delete the folder and run `cram data` again"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: invalid JSON or invalid UTF-8
        raise DataError(f"{path} is not valid JSON ({err}); delete {folder} and run `cram data` again") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {version!r}, this version of cramming reads {FORMAT_VERSION}; "
            f"re-run `cram data` to rebuild {folder}"
        )
    for key in ("seq_len", "vocab_size", "dtype", "tokenizer", "special_tokens", "splits"):
        if key not in manifest:
            raise DataError(f"{path} lacks the key {key!r}; re-run `cram data` to rebuild {folder}")
    missing = [manifest["tokenizer"]] if not (folder / manifest["tokenizer"]).is_file() else []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for key in ("path", "labels_path"):
                if key in shard and not (folder / shard[key]).is_file():
                    missing.append(shard[key])
    if missing:
        raise DataError(f"{folder} is incomplete: missing {', '.join(missing)}; delete it and run `cram data` again")
    # Integrity (manifests written before these fields existed skip the check).
    if "manifest_sha256" in manifest and manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise DataError(f"{path} fails its checksum (corrupt or edited); delete {folder} and run `cram data` again")
    tok_digest = manifest.get("tokenizer_sha256")
    if tok_digest is not None and sha256_file(folder / manifest["tokenizer"]) != tok_digest:
        raise DataError(f"tokenizer file {folder / manifest['tokenizer']} fails its sha256 check (corrupt or "
                        f"tampered); delete {folder} and run `cram data` again")
    return manifest


class PackedDataset:
    """Random access to the rows of one split: `ds[i] -> LongTensor[seq_len]`.

    Shards are memory-mapped lazily in each process (so the object pickles cheaply into
    DataLoader workers); `verify` checks every shard's sha256 once, at construction.
    """

    def __init__(self, folder: str | Path, split: str = "train", verify: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.folder} has no split {split!r} (splits: {', '.join(self.manifest['splits'])})")
        self.split = split
        self.seq_len = int(self.manifest["seq_len"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shards = self.manifest["splits"][split]["shards"]
        static = self.manifest.get("static_masking")
        self.static_masking: dict[str, Any] | None = static if (static and split == "train") else None
        self._ends = np.cumsum([s["rows"] for s in self.shards], dtype=np.int64)
        # Manifests written before the `packing` field existed are full-sentences (no padding).
        self.packing: str = self.manifest.get("packing", "full-sentences")
        self.pad_id: int = int(self.manifest["special_tokens"].get("pad", 0))
        for shard in self.shards:
            self._check_size(shard["path"], shard["rows"] * self.seq_len * self.dtype.itemsize)
            if "labels_path" in shard:
                self._check_size(shard["labels_path"], shard["rows"] * self.seq_len * 4)
        if verify:
            self.verify()
        self._maps: list[np.ndarray] | None = None
        self._label_maps: list[np.ndarray] | None = None

    def _check_size(self, name: str, expected: int) -> None:
        size = (self.folder / name).stat().st_size
        if size != expected:
            raise DataError(f"shard {self.folder / name} has {size} bytes, the manifest says {expected}: "
                            "it is truncated or was modified; delete the folder and run `cram data` again")

    def verify(self) -> None:
        """Recompute each shard's sha256; a mismatch raises DataError naming the shard."""
        for shard in self.shards:
            for key, hkey in (("path", "sha256"), ("labels_path", "labels_sha256")):
                if key not in shard:
                    continue
                path = self.folder / shard[key]
                if sha256_file(path) != shard[hkey]:
                    raise DataError(f"shard {path} fails its sha256 check (corrupt or tampered); "
                                    "delete the folder and run `cram data` again")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = state["_label_maps"] = None
        return state

    def _open(self) -> None:
        self._maps = [
            np.memmap(self.folder / s["path"], dtype=self.dtype, mode="r", shape=(s["rows"], self.seq_len))
            for s in self.shards
        ]
        if self.static_masking:
            self._label_maps = [
                np.memmap(self.folder / s["labels_path"], dtype=np.int32, mode="r", shape=(s["rows"], self.seq_len))
                for s in self.shards
            ]

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _gather(self, indices: np.ndarray, labels: bool = False) -> np.ndarray:
        if self._maps is None:
            self._open()
        maps = self._label_maps if labels else self._maps
        assert maps is not None
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((len(indices), self.seq_len), dtype=np.int32 if labels else self.dtype)
        shard_of = np.searchsorted(self._ends, indices, side="right")
        starts = np.concatenate([[0], self._ends[:-1]])
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = maps[s][indices[sel] - starts[s]]
        return out

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows `indices` as a numpy array [n, seq_len] (one fancy-index read per shard)."""
        return self._gather(indices)

    def labels(self, indices: np.ndarray) -> np.ndarray:
        """Stored labels (int32, -100 = not a target) of statically masked rows."""
        if not self.static_masking:
            raise DataError(f"{self.folder} split {self.split} is not statically masked: it has no labels")
        return self._gather(indices, labels=True)

    def __getitem__(self, i: int):  # -> torch.LongTensor[seq_len]
        import torch

        if i < 0:
            i += len(self)
        return torch.from_numpy(self._gather(np.array([i])).astype(np.int64)[0])


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------


def mix_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of ints (decorrelated, unlike seed + n)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint64)[0] >> 1)


class _MicroBatches:
    """Map-style dataset whose item n is micro-batch n of one rank: pure index arithmetic.

    Epoch e = n // batches_per_epoch visits all rows in order (or a permutation seeded by
    (seed, e)); rank r takes every world_size-th row of that order, so ranks are disjoint; each
    epoch drops the remainder so every rank has the same number of full micro-batches.
    """

    def __init__(self, dataset: PackedDataset, micro_batch_size: int, masker: Any, shuffle: bool, seed: int,
                 rank: int, world_size: int) -> None:
        self.dataset, self.bsz, self.masker = dataset, micro_batch_size, masker
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.rows_per_rank = len(dataset) // world_size
        self.batches_per_epoch = self.rows_per_rank // micro_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{dataset.folder} split {dataset.split} has {len(dataset)} rows: too few for one micro-batch of "
                f"{micro_batch_size} on each of {world_size} rank(s); prepare more data or lower the micro-batch size"
            )
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def row_indices(self, n: int) -> np.ndarray:
        epoch, j = divmod(n, self.batches_per_epoch)
        local = np.arange(j * self.bsz, (j + 1) * self.bsz, dtype=np.int64)
        positions = local * self.world_size + self.rank  # rank r: order[r], order[r + W], ...
        if not self.shuffle:
            return positions
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm[positions]

    def __getitem__(self, n: int) -> dict[str, Any]:
        batch = self._batch(n)
        if self.dataset.packing == "doc-bounded":
            # Taken after masking: [MASK] and random replacements never land on padding (pads are
            # special tokens, and random tokens come from non-special ones), so pads are still pads.
            batch["attention_mask"] = (batch["input_ids"] != self.dataset.pad_id).long()
        return batch

    def _batch(self, n: int) -> dict[str, Any]:
        import torch

        idx = self.row_indices(n)
        ids = torch.from_numpy(self.dataset.rows(idx).astype(np.int64))
        if self.dataset.static_masking:
            labels = torch.from_numpy(self.dataset.labels(idx).astype(np.int64))
            batch = {"input_ids": ids, "labels": labels}
            if self.dataset.static_masking.get("fixed_count"):
                k = max(1, round(self.dataset.static_masking["mask_rate"] * ids.shape[1]))
                # Targets first (stable keeps them in position order), then sort the K positions.
                order = torch.argsort((labels == -100).to(torch.int8), dim=1, stable=True)[:, :k]
                batch["masked_positions"] = order.sort(dim=1).values
                batch["masked_labels"] = labels.gather(1, batch["masked_positions"])
            return batch
        if self.masker is None:
            return {"input_ids": ids}
        gen = torch.Generator().manual_seed(mix_seed(self.seed, n, self.rank))
        return self.masker(ids, generator=gen)


class _CountFrom:
    """An endless sampler: start, start + 1, ..."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def build_loader(dataset: PackedDataset, micro_batch_size: int, masker: Any, *, shuffle: bool, seed: int,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1, start_batch: int = 0,
                 pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """An endless stream of masked micro-batches (`input_ids`, `labels`, ...) for one rank.

    `start_batch` resumes at micro-batch index n by arithmetic (nothing is replayed); the masks of
    micro-batch n are seeded from (seed, n, rank), so a resumed run draws the same masks as an
    uninterrupted one. With a statically masked dataset the stored masks are used and `masker`
    may be None. With doc-bounded (padded) data every batch also has `attention_mask` [B, L]
    (int64, 1 = real token, 0 = [PAD]).
    """
    import torch

    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    batches = _MicroBatches(dataset, micro_batch_size, masker, shuffle, seed, rank, world_size)
    # Its own generator: a loader would otherwise draw its workers' base seed from the global RNG,
    # shifting the training's random stream (dropout, random-LTD) by whether a loader was opened,
    # which a resumed run does at other moments than an uninterrupted one.
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=_CountFrom(start_batch), num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)
