"""`cram data`: raw text -> normalised, deduplicated, filtered, tokenized, packed, ordered shards.

`prepare(data_cfg, data_root)` is cached by the hash of the resolved data config: the output folder
`<data_root>/<name>-<hash>/` is built in `<name>-<hash>.partial/` and renamed into place only once
its manifest is written, so no folder looks finished before it is. The build runs in phases
(spool, tokenizer, encode, order, shards; see `workdir.py`), each committing its progress after
every unit of work: a killed build is continued by the same command from its last committed unit,
and the result equals an uninterrupted build row for row. Concurrent builds of one config wait for
each other (`workdir.BuildLock`), so several runs of a sweep that start together prepare it once.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cramming.checks import validate
from cramming.config import config_hash, resolve_paths, to_dataclass
from cramming.data.order import Sorting
from cramming.data.parallel import resolve_num_proc
from cramming.data.sources import HubSource
from cramming.data.tokenizer import TokenizerKind
from cramming.errors import CrammingError, DataError
from cramming.faults import fault_point

if TYPE_CHECKING:
    from cramming.data.workdir import WorkDir

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """What `cram data` builds. Every field is part of the cache key (the folder name's hash)."""

    name: str = "embedded"
    """Dataset name; the first part of the output folder name `<name>-<hash>`."""

    # --- source -------------------------------------------------------------------------------
    source: Literal["embedded", "local", "hub"] = "embedded"
    """Where documents come from: the shipped corpus, local files, or hub datasets (streamed)."""
    embedded_files: list[str] = field(default_factory=list)
    """source=embedded: file stems to use (e.g. [austen, kjv]); empty = all shipped files."""
    local_paths: list[str] = field(default_factory=list)
    """source=local: files, folders (recursive) or glob patterns."""
    local_unit: Literal["file", "line", "block"] = "block"
    """source=local, text files: one document per file, per line, or per blank-line-separated block."""
    local_format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    """source=local: file format; auto picks by suffix (.jsonl/.json[.zst|.gz|.xz], .parquet, else text)."""
    text_field: str = "text"
    """source=local, jsonl/parquet: the field holding the text (dots reach into nested records)."""
    strict: bool = False
    """Fail on the first unreadable file/line/record instead of skipping and counting it."""
    hub_sources: list[HubSource] = field(default_factory=list)
    """source=hub: datasets streamed with `datasets.load_dataset(..., streaming=True)`, interleaved."""
    hub_timeout_s: float = 20.0
    """source=hub: seconds to wait for the hub before failing with advice to use data=local."""

    # --- sampling -----------------------------------------------------------------------------
    max_documents: int | None = None
    """Read at most this many documents (C4 in the paper: the first 20e6); None = all."""
    max_chars: int | None = None
    """Stop reading once this many raw characters were read; None = no limit."""

    # --- normalisation and dedup --------------------------------------------------------------
    lowercase: bool = True
    """Lowercase all text (also inside the saved tokenizer)."""
    strip_accents: bool = True
    """NFD-decompose and drop combining marks ("é" -> "e")."""
    ascii_only: bool = True
    """Delete every remaining non-ASCII character."""
    dedup: bool = False
    """Drop exact duplicate documents (after normalisation); the paper found no gain."""

    # --- tokenizer ----------------------------------------------------------------------------
    tokenizer: TokenizerKind = "wordpiece"
    """Tokenizer model: wordpiece (paper), bpe, bytelevel-bpe (RoBERTa), unigram (SentencePiece-like)."""
    vocab_size: int = 32768
    """Vocabulary size including the 5 special tokens (paper: 2^15)."""
    min_frequency: int = 2
    """Minimum count of a pair/word for the wordpiece/bpe trainers to use it."""
    tokenizer_sample_chars: int | None = 500_000_000
    """Train the tokenizer on a random sample of about this many characters of documents; None = all."""
    tokenizer_file: str | None = None
    """Use this existing tokenizer.json instead of training one (it must have the 5 special tokens)."""

    # --- filtering, packing, ordering ---------------------------------------------------------
    compression_filter: bool = True
    """Drop documents the tokenizer compresses badly (tokens > threshold * characters)."""
    compression_threshold: float = 0.3
    """t of the compression filter (paper: 0.3)."""
    seq_len: int = 128
    """Tokens per row; documents are packed across row boundaries, each followed by [SEP]."""
    packing: Literal["full-sentences", "doc-bounded"] = "full-sentences"
    """full-sentences: rows run across documents, filled to seq_len (RoBERTa's FULL-SENTENCES;
    paper). doc-bounded: a row never crosses a document boundary; a document's last row is filled
    with [PAD] and longer documents continue on rows of their own (like RoBERTa's DOC-SENTENCES).
    The loader then adds an attention_mask (pads unattended) and pads are never masked."""
    sorting: Sorting = "prevalence"
    """Row order of the train split: by descending mean unigram prevalence (paper), shuffled, or as read."""
    val_fraction: float = 0.01
    """Fraction of rows held out for validation (drawn at random before ordering)."""
    val_max_sequences: int = 2048
    """Upper bound on held-out validation rows."""
    shard_sequences: int = 1 << 20
    """Rows per shard file (2^20 rows of 128 uint16 = 256 MiB)."""

    # --- static masking (RoBERTa's baseline, for ablations) -----------------------------------
    static_masking_copies: int = 0
    """0 = dynamic masking at load time (default). k > 0: store k copies of every train row, each
    masked once at preprocessing, plus int32 labels; the loader then uses these fixed masks."""
    static_mask_rate: float = 0.15
    """Masking rate of the static masks."""
    static_fixed_count: bool = False
    """Static masks with exactly round(rate * seq_len) targets per row."""

    # --- execution ----------------------------------------------------------------------------
    num_proc: int = 0
    """Worker processes for normalising and encoding; 0 = the cores available to this process. With 1,
    the tokenizers thread pool still encodes on all cores; tokenizer training always does."""
    batch_docs: int = 1000
    """Documents per encode_batch call / per task sent to a worker."""
    seed: int = 0
    """Seed of the tokenizer sample, the validation split, shuffling and static masks."""

    def __post_init__(self) -> None:
        self.hub_sources = [s if isinstance(s, HubSource) else HubSource(**s) for s in self.hub_sources]
        limits = {k: getattr(self, k) for k in ("max_documents", "max_chars", "tokenizer_sample_chars")}
        validate(self, "data", [
            (bool(self.name) and "/" not in self.name and not self.name.startswith("."),
             f"name={self.name!r} must be a plain folder name"),
            (self.source != "local" or bool(self.local_paths),
             "local_paths is empty: give files or folders, e.g. data.local_paths=[/data/books]"),
            (self.source != "hub" or bool(self.hub_sources), "hub_sources is empty for source=hub"),
            *((v is None or v >= 1, f"{k}={v} must be >= 1 or null") for k, v in limits.items()),
            (16 <= self.vocab_size <= 2**32, f"vocab_size={self.vocab_size} must be between 16 and 2^32"),
            (self.min_frequency >= 1, f"min_frequency={self.min_frequency} must be >= 1"),
            (self.compression_threshold > 0, f"compression_threshold={self.compression_threshold} must be > 0"),
            (self.seq_len >= 2, f"seq_len={self.seq_len} must be >= 2"),
            (0 <= self.val_fraction < 1, f"val_fraction={self.val_fraction} must be in [0, 1)"),
            (self.val_max_sequences >= 0, f"val_max_sequences={self.val_max_sequences} must be >= 0"),
            (self.shard_sequences >= 1, f"shard_sequences={self.shard_sequences} must be >= 1"),
            (self.static_masking_copies >= 0, f"static_masking_copies={self.static_masking_copies} must be >= 0"),
            (0 < self.static_mask_rate < 1, f"static_mask_rate={self.static_mask_rate} must be in (0, 1)"),
            (self.num_proc >= 0, f"num_proc={self.num_proc} must be >= 1, or 0 for the cores available"),
            (self.batch_docs >= 1, f"batch_docs={self.batch_docs} must be >= 1"),
            (self.hub_timeout_s > 0, f"hub_timeout_s={self.hub_timeout_s} must be > 0"),
        ])


# Fields that change how fast the data is built, not what is built: left out of the cache key so
# that e.g. `data.num_proc=8` on a big machine finds the folder a 2-core run prepared.
EXECUTION_ONLY_FIELDS = ("num_proc", "batch_docs", "hub_timeout_s")


def data_hash(data_cfg: DataConfig) -> str:
    """Hash of the fields of `data_cfg` that determine the prepared output."""
    fields = {k: v for k, v in asdict(data_cfg).items() if k not in EXECUTION_ONLY_FIELDS}
    return config_hash(fields)


def prepared_dir(data_cfg: DataConfig, data_root: str | Path) -> Path:
    """`<data_root>/<name>-<data_hash(data_cfg)>`: where `prepare` puts (or finds) this dataset."""
    return Path(data_root) / f"{data_cfg.name}-{data_hash(data_cfg)}"


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
# Phase -> its name in the manifest's `timings_s`.
PHASE_TIMINGS = {"spool": "read_normalize_dedup", "tokenizer": "tokenizer", "encode": "tokenize_filter_pack",
                 "order": "split_order", "shards": "write_shards"}
ROWS = "rows.bin"


def _progress() -> bool:
    return os.environ.get("CRAMMING_NO_PROGRESS", "") in ("", "0")


def prepare(data_cfg: DataConfig, data_root: str | Path) -> Path:
    """Build (or reuse) the prepared dataset of `data_cfg` under `data_root`; returns its folder.

    Concurrent calls for one config build it once: the others wait for the lock, then reuse it.
    An interrupted build (killed, disk full, a dropped connection) leaves `<folder>.partial/`,
    and the next call continues it; a build that fails on its input (an empty corpus, a vocabulary
    too large for it) leaves nothing.
    """
    from cramming.corpus.shards import MANIFEST, load_manifest
    from cramming.data.workdir import BuildLock

    final = prepared_dir(data_cfg, data_root)
    if (final / MANIFEST).is_file():
        load_manifest(final)
        log.info("cache hit: %s", final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with BuildLock(final.with_name(final.name + ".lock")):
        if (final / MANIFEST).is_file():  # built by the run we waited for
            load_manifest(final)
            log.info("cache hit: %s (prepared by another process meanwhile)", final)
            return final
        _remove_leftovers(final)
        partial = final.with_name(final.name + ".partial")
        _build_keeping_progress(data_cfg, partial)
        fault_point("data.rename")  # complete inside the partial folder, not yet renamed
        os.rename(partial, final)
    log.info("prepared %s", final)
    return final


def _remove_leftovers(final: Path) -> None:
    """Folders no build will finish (called with the lock held, so no other build is running):
    `final` without a manifest, and the `.tmp-<pid>` folders of versions that did not resume."""
    for old in [final, *final.parent.glob(final.name + ".tmp-*")]:
        if old.exists():
            log.info("removing %s: an incomplete build", old)
            shutil.rmtree(old)


def _build_keeping_progress(cfg: DataConfig, partial: Path) -> None:
    """Build in `partial`, continuing its committed work; on failure keep what can be continued."""
    from cramming.corpus.shards import MANIFEST, load_manifest
    from cramming.data.sources import fingerprint
    from cramming.data.workdir import BuildInterrupted, StaleWork, WorkDir

    if (partial / MANIFEST).is_file():  # killed after writing the manifest, before the rename
        try:
            _keep_only_outputs(partial, load_manifest(partial))
            return
        except DataError as err:
            log.warning("starting %s over: %s", partial, err)
            shutil.rmtree(partial)
    key = {"config_hash": data_hash(cfg), "source": fingerprint(cfg)}
    work = WorkDir(partial, key)
    try:
        try:
            _build(cfg, work)
        except StaleWork as err:
            log.warning("%s: starting %s over", err, partial)
            work.remove()
            work = WorkDir(partial, key)
            _build(cfg, work)
    except BuildInterrupted as err:
        raise type(err)(f"{str(err).rstrip('.')}. The build's progress is kept in {partial}: run the same command "
                        "again to continue from there") from None
    except CrammingError:
        work.remove()  # the input or config is at fault: its partial results are of no use
        raise
    except OSError as err:
        if err.errno not in _DISK_ERRNOS:
            raise
        raise DataError(
            f"writing {partial} failed: {err.strerror or err} (errno {err.errno}). The finished part of the build "
            f"({work.size_bytes() / 1e6:.1f} MB) is kept in {partial}: free space under {partial.parent} and run the "
            "same command again to continue, or delete the folder to start over"
        ) from None
    except BaseException:
        log.warning("build interrupted: its progress is kept in %s; the same command continues it", partial)
        raise


def _build(cfg: DataConfig, work: WorkDir) -> None:
    """All phases in `work` (each skipped when done, or continued), then its manifest."""
    from cramming.corpus.shards import token_dtype
    from cramming.data.order import FileArray
    from cramming.data.spool import spool_corpus
    from cramming.data.tokenizer import special_token_ids

    if work.resumed:
        log.info("continuing the build in %s: %s", work.path, _progress_summary(work))
    progress, workers = _progress(), resolve_num_proc(cfg.num_proc)
    spooled = spool_corpus(cfg, work, workers, progress)
    _check_spooled(cfg, spooled)
    tok = _tokenizer_phase(cfg, work, spooled["docs"], spooled["chars"], progress)
    _return_freed_memory()
    specials = special_token_ids(tok)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    packed = _encode_phase(cfg, work, tok.to_str(), specials, dtype, workers, progress)
    _check_packed(cfg, packed)
    rows = FileArray(work.path / ROWS, (packed["sequences"], cfg.seq_len), dtype)
    val, order = _order_phase(cfg, work, rows, vocab_size, specials["pad"], progress)
    splits, static = _shards_phase(cfg, work, rows, val, order, vocab_size, specials, progress)
    manifest = _manifest(cfg, work, spooled, packed, splits, static, specials, vocab_size, dtype)
    _write_manifest(work.path, manifest)
    _keep_only_outputs(work.path, manifest)


def _progress_summary(work: WorkDir) -> str:
    """What a partial build has done so far, e.g. "spool done, tokenizer done, encode 1200 of 5000 documents"."""
    parts = []
    for phase in PHASE_TIMINGS:
        state = work.progress["phases"].get(phase)
        if state is None:
            break
        if state["done"]:
            parts.append(f"{phase} done")
        elif phase == "spool":
            parts.append(f"spool {state['documents_read']} documents read")
        elif phase == "encode":
            parts.append(f"encode {state['docs_encoded']} of {work.state('spool')['docs']} documents")
        elif phase == "shards":
            parts.append(f"shards {len(state.get('train', []))} train shards written")
    return ", ".join(parts)


def _return_freed_memory() -> None:
    """Hand the heap the tokenizer trainer freed (~80 MB at vocab 32768) back to the OS; glibc keeps
    it mapped otherwise, and every later phase would carry it. A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _check_spooled(cfg: DataConfig, c: dict[str, Any]) -> None:
    what = f"data.source={cfg.source}" + (f" ({', '.join(cfg.local_paths)})" if cfg.source == "local" else "")
    if c["documents_read"] == 0:
        skipped = c["documents_skipped_unreadable"] + c["files_skipped"]
        raise DataError(f"empty corpus: {what} yielded no documents"
                        + (f" ({skipped} unreadable files/documents skipped, e.g. {c['skipped_examples'][0]})" if skipped else ""))
    if c["docs"] == 0:
        raise DataError(f"empty corpus: all {c['documents_read']} documents of {what} are empty after normalisation "
                        "(e.g. non-ASCII text with data.ascii_only=true)")
    log.info("read %d documents (%d kept after normalisation/dedup)", c["documents_read"], c["docs"])


def _check_packed(cfg: DataConfig, packed: dict[str, Any]) -> None:
    if packed["documents_packed"] == 0:
        raise DataError(
            f"filtering removed the whole corpus: all {packed['documents_filtered']} documents have more than "
            f"{cfg.compression_threshold} tokens per character. Raise data.compression_threshold or set "
            "data.compression_filter=false"
        )
    if packed["sequences"] < 2:
        raise DataError(
            f"the corpus yields {packed['sequences']} full row(s) of {cfg.seq_len} tokens ({packed['tokens'] + packed['tokens_dropped_tail']} "
            "tokens in all); at least 2 are needed (one for training, one held out). Use more text"
        )


def _tokenizer_phase(cfg: DataConfig, work: WorkDir, docs: int, chars: int, progress: bool) -> Any:
    """Step 3: train the tokenizer on a random sample of the spool (or load data.tokenizer_file)."""
    from cramming.data.tokenizer import load_tokenizer, train_tokenizer
    from cramming.fileio import write_atomic

    path = work.path / "tokenizer.json"
    if work.begin("tokenizer").get("done"):
        return load_tokenizer(path)
    if cfg.tokenizer_file:
        tok = load_tokenizer(cfg.tokenizer_file)
    else:
        frac = 1.0 if cfg.tokenizer_sample_chars is None else min(1.0, cfg.tokenizer_sample_chars / max(1, chars))
        tok = train_tokenizer(
            _tokenizer_sample(work.path, docs, frac, cfg.seed, cfg.batch_docs, progress), cfg.tokenizer,
            cfg.vocab_size, lowercase=cfg.lowercase, strip_accents=cfg.strip_accents, ascii_only=cfg.ascii_only,
            min_frequency=cfg.min_frequency, normalized=True,
        )
    write_atomic(path, tok.to_str(pretty=True))
    work.commit("tokenizer", {}, done=True)
    return tok


def _tokenizer_sample(folder: Path, docs: int, frac: float, seed: int, batch_docs: int,
                      progress: bool) -> Callable[[], Iterator[list[str]]]:
    """The training corpus: each spooled document with probability `frac` (seeded), batch by batch.

    The random draws are made one batch at a time (never one float per document of the corpus at
    once) and equal a single draw of `docs` floats, so the sample does not depend on batching.
    """
    from tqdm.auto import tqdm

    from cramming.data.spool import BATCH_CHARS, SpoolReader

    def sample() -> Iterator[list[str]]:
        reader = SpoolReader(folder, docs)
        rng = np.random.default_rng([seed, 3])
        bar = tqdm(total=docs, desc="train tokenizer", unit="doc", disable=not progress, mininterval=1.0)
        for a, b in reader.ranges(0, batch_docs, BATCH_CHARS):
            fault_point("data.tokenizer")
            bar.update(b - a)
            if frac >= 1:
                yield reader.texts(a, b)
                continue
            picked = np.flatnonzero(rng.random(b - a) < frac)
            if len(picked):  # one contiguous read covering the picked documents
                texts = reader.texts(a + int(picked[0]), a + int(picked[-1]) + 1)
                yield [texts[i] for i in picked - picked[0]]
        bar.close()

    return sample


def _encode_phase(cfg: DataConfig, work: WorkDir, tokenizer_json: str, specials: dict[str, int], dtype: np.dtype,
                  workers: int, progress: bool) -> dict[str, Any]:
    """Steps 4-5: encode, filter and pack the spool into rows.bin; the spool is deleted after."""
    from cramming.data import pack
    from cramming.data.spool import DOCS, INDEX, SpoolReader

    state = work.begin("encode")
    if state.get("done"):
        return state
    counts = pack.encode_and_pack(
        SpoolReader(work.path, work.state("spool")["docs"]), tokenizer_json, specials["sep"],
        cfg.compression_threshold if cfg.compression_filter else None, work.path / ROWS, cfg.seq_len, dtype,
        state=state, commit=lambda s: work.commit("encode", s), num_proc=workers, batch_docs=cfg.batch_docs,
        progress=progress, packing=cfg.packing, pad_id=specials["pad"],
    )
    work.commit("encode", counts, done=True)
    for name in (DOCS, INDEX):  # only the rows are read from here on: free the disk space
        (work.path / name).unlink(missing_ok=True)
    return work.state("encode")


def _order_phase(cfg: DataConfig, work: WorkDir, rows: Any, vocab_size: int, pad_id: int,
                 progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Step 6: the held-out rows (val.npy) and the order of the train rows (order.bin)."""
    from cramming.data.order import FileArray, order_train, split_validation
    from cramming.data.workdir import sync_file
    from cramming.fileio import write_atomic

    val_path, order_path = work.path / "val.json", work.path / "order.bin"
    if not work.begin("order").get("done"):
        val = split_validation(len(rows), cfg.val_fraction, cfg.val_max_sequences, cfg.seed, work.path)
        order_train(rows, val, cfg.sorting, vocab_size, cfg.seed, order_path, work.path,
                    pad_id=pad_id if cfg.packing == "doc-bounded" else None, progress=progress)
        sync_file(order_path)
        write_atomic(val_path, json.dumps(val.tolist()))
        fault_point("data.order")
        work.commit("order", {}, done=True)
    val = np.array(json.loads(val_path.read_text()), dtype=np.int64)
    return val, FileArray(order_path, (len(rows) - len(val),), np.int64)


def _shards_phase(cfg: DataConfig, work: WorkDir, rows: Any, val: np.ndarray, order: np.ndarray, vocab_size: int,
                  specials: dict[str, int], progress: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Step 7: checksummed train shards in order (resumed at the first unfinished shard), then val."""
    from cramming.corpus.shards import ShardWriter
    from cramming.data.order import write_in_order

    state = work.begin("shards")
    if state.get("done"):
        return state["splits"], state["static"]
    copies = cfg.static_masking_copies
    if state.get("train_split") is None:
        writer = ShardWriter(work.path, "train", cfg.seq_len, rows.dtype, cfg.shard_sequences, labels=copies > 0,
                             shards=state.get("train"), on_shard=lambda s: work.commit("shards", {"train": s}))
        _write_train(cfg, rows, order, writer, vocab_size, specials, progress)
        state = {"train_split": writer.finish()}
        work.commit("shards", state)
    vwriter = ShardWriter(work.path, "val", cfg.seq_len, rows.dtype, cfg.shard_sequences)
    write_in_order(rows, val, vwriter.write, desc="write val", progress=progress)
    splits = {"train": state["train_split"], "val": vwriter.finish()}
    static = None if not copies else dict(
        copies=copies, mask_rate=cfg.static_mask_rate, fixed_count=cfg.static_fixed_count, replace_mask=0.8,
        replace_random=0.1, base_sequences=len(order))
    work.commit("shards", {"splits": splits, "static": static}, done=True)
    return splits, static


def _write_train(cfg: DataConfig, rows: Any, order: np.ndarray, writer: Any, vocab_size: int,
                 specials: dict[str, int], progress: bool) -> None:
    """The train rows in `order` into `writer`, from the rows it already holds on; with static
    masking `static_masking_copies` passes, each masked with its own seeds."""
    from cramming.data.order import write_in_order

    start = writer.rows_written
    if not cfg.static_masking_copies:
        write_in_order(rows, order, writer.write, start=start, progress=progress)
        return
    import torch

    from cramming.corpus.masking import MLMMasker
    from cramming.corpus.shards import mix_seed

    masker = MLMMasker(vocab_size, specials["mask"], specials.values(), mask_rate=cfg.static_mask_rate,
                       fixed_count=cfg.static_fixed_count)
    n = len(order)
    for copy in range(start // n, cfg.static_masking_copies):
        def masked(chunk: np.ndarray, offset: int, copy: int = copy) -> tuple[np.ndarray, np.ndarray]:
            gen = torch.Generator().manual_seed(mix_seed(cfg.seed, copy, offset))
            batch = masker(torch.from_numpy(chunk.astype(np.int64)), generator=gen)
            return batch["input_ids"].numpy(), batch["labels"].numpy()

        write_in_order(rows, order, writer.write, start=max(0, start - copy * n), transform=masked,
                       desc=f"static masks {copy + 1}", progress=progress)


def _manifest(cfg: DataConfig, work: WorkDir, spooled: dict[str, Any], packed: dict[str, Any], splits: dict[str, Any],
              static: dict[str, Any] | None, specials: dict[str, int], vocab_size: int, dtype: np.dtype) -> dict[str, Any]:
    from cramming.corpus.shards import FORMAT_VERSION

    counts = {k: spooled[k] for k in ("documents_read", "documents_skipped_unreadable", "files_read", "files_skipped",
                                      "chars_read", "documents_empty_after_normalization", "documents_deduplicated")}
    counts.update({k: packed[k] for k in ("documents_filtered", "chars_filtered", "documents_packed", "chars_packed",
                                          "tokens_dropped_tail", "sequences", "tokens", "pad_tokens") if k in packed})
    counts.update(train_sequences=splits["train"]["num_sequences"], val_sequences=splits["val"]["num_sequences"])
    # Time spent in each phase, summed over the runs that built it (a killed run's uncommitted
    # work is not counted).
    timings = {name: work.state(phase)["elapsed_s"] for phase, name in PHASE_TIMINGS.items()}
    timings["total"] = round(sum(timings.values()), 3)
    return {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "seq_len": cfg.seq_len,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "tokenizer": "tokenizer.json",
        "special_tokens": specials,
        "sorting": cfg.sorting,
        # Readers (shards.build_loader) add an attention_mask for doc-bounded (padded) rows.
        "packing": cfg.packing,
        "static_masking": static,
        "splits": splits,
        "data_config": asdict(cfg),
        "config_hash": data_hash(cfg),
        "counts": counts,
        "skipped_examples": spooled["skipped_examples"],
        "timings_s": timings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    from cramming.corpus.shards import MANIFEST, manifest_digest, sha256_file, write_json_atomic

    manifest["tokenizer_sha256"] = sha256_file(folder / manifest["tokenizer"])
    manifest["manifest_sha256"] = manifest_digest(manifest)
    write_json_atomic(folder / MANIFEST, manifest)


def _keep_only_outputs(folder: Path, manifest: dict[str, Any]) -> None:
    """Delete the build's working files: what is left is the manifest and the files it lists."""
    from cramming.corpus.shards import MANIFEST

    keep = {MANIFEST, manifest["tokenizer"]}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            keep.update(shard[k] for k in ("path", "labels_path") if k in shard)
    for path in folder.iterdir():
        if path.name not in keep:
            path.unlink()


def run(cfg: Any) -> None:
    """The `cram data` entry point: prepare `cfg.data` under `cfg.paths.data_root` and summarise."""
    from cramming.corpus.shards import load_manifest

    data_cfg = to_dataclass(DataConfig, cfg.data, "data")
    data_root = resolve_paths(cfg).paths.data_root
    start = time.perf_counter()
    folder = prepare(data_cfg, data_root)
    manifest = load_manifest(folder)
    c = manifest["counts"]
    took = time.perf_counter() - start
    print(f"prepared data: {folder}")
    print(f"  documents: {c['documents_read']} read, {c['documents_skipped_unreadable']} unreadable skipped, "
          f"{c['documents_deduplicated']} deduplicated, {c['documents_filtered']} filtered "
          f"({c['chars_filtered']} chars), {c['documents_packed']} packed")
    print(f"  sequences: {c['train_sequences']} train + {c['val_sequences']} val of {manifest['seq_len']} tokens "
          f"({c['tokens']} tokens), vocab {manifest['vocab_size']}, sorting {manifest['sorting']}"
          + (f", doc-bounded packing ({c['pad_tokens']} pad tokens)" if "pad_tokens" in c else ""))
    print(f"  time: {took:.1f}s this run (build took {manifest['timings_s']['total']:.1f}s: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings_s"].items() if k != "total") + ")")
