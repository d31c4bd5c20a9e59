"""`cram data`: raw text -> normalised, deduplicated, filtered, tokenized, packed, ordered shards.

`prepare(data_cfg, data_root)` is cached by the hash of the resolved data config: the output folder
`<data_root>/<name>-<hash>/` is built under a temporary name (`...tmp-<pid>`) and renamed into
place only once its manifest is written, so an interrupted run leaves no folder that looks
finished; the next run removes stale temporary folders and starts again.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cramming.config import config_hash, fault_point, to_dataclass
from cramming.data.sources import HubSource
from cramming.data.tokenizer import TOKENIZER_KINDS
from cramming.errors import ConfigError, DataError

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
    tokenizer: str = "wordpiece"
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
    sorting: Literal["prevalence", "shuffle", "none"] = "prevalence"
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
    num_proc: int = 1
    """Tokenizer processes. 1 already uses all cores through the tokenizers thread pool."""
    batch_docs: int = 1000
    """Documents per encode_batch call / per task sent to a worker."""
    seed: int = 0
    """Seed of the tokenizer sample, the validation split, shuffling and static masks."""

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"data.{msg}")

        if not self.name or "/" in self.name or self.name.startswith("."):
            raise bad(f"name={self.name!r} must be a plain folder name")
        if self.source not in ("embedded", "local", "hub"):
            raise bad(f"source={self.source!r} must be one of embedded, local, hub")
        if self.source == "local" and not self.local_paths:
            raise bad("local_paths is empty: give files or folders, e.g. data.local_paths=[/data/books]")
        if self.source == "hub" and not self.hub_sources:
            raise bad("hub_sources is empty for source=hub")
        if self.local_unit not in ("file", "line", "block"):
            raise bad(f"local_unit={self.local_unit!r} must be file, line or block")
        if self.local_format not in ("auto", "text", "jsonl", "parquet"):
            raise bad(f"local_format={self.local_format!r} must be auto, text, jsonl or parquet")
        self.hub_sources = [s if isinstance(s, HubSource) else HubSource(**s) for s in self.hub_sources]
        for key in ("max_documents", "max_chars", "tokenizer_sample_chars"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise bad(f"{key}={v} must be >= 1 or null")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise bad(f"tokenizer={self.tokenizer!r} must be one of {', '.join(TOKENIZER_KINDS)}")
        if not 16 <= self.vocab_size <= 2**32:
            raise bad(f"vocab_size={self.vocab_size} must be between 16 and 2^32")
        if self.min_frequency < 1:
            raise bad(f"min_frequency={self.min_frequency} must be >= 1")
        if self.compression_threshold <= 0:
            raise bad(f"compression_threshold={self.compression_threshold} must be > 0")
        if self.seq_len < 2:
            raise bad(f"seq_len={self.seq_len} must be >= 2")
        if self.packing not in ("full-sentences", "doc-bounded"):
            raise bad(f"packing={self.packing!r} must be full-sentences or doc-bounded")
        if self.sorting not in ("prevalence", "shuffle", "none"):
            raise bad(f"sorting={self.sorting!r} must be prevalence, shuffle or none")
        if not 0 <= self.val_fraction < 1:
            raise bad(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.val_max_sequences < 0:
            raise bad(f"val_max_sequences={self.val_max_sequences} must be >= 0")
        if self.shard_sequences < 1:
            raise bad(f"shard_sequences={self.shard_sequences} must be >= 1")
        if self.static_masking_copies < 0:
            raise bad(f"static_masking_copies={self.static_masking_copies} must be >= 0")
        if not 0 < self.static_mask_rate < 1:
            raise bad(f"static_mask_rate={self.static_mask_rate} must be in (0, 1)")
        if self.num_proc < 1:
            self.num_proc = os.cpu_count() or 1  # num_proc <= 0 means "all cores"
        if self.batch_docs < 1:
            raise bad(f"batch_docs={self.batch_docs} must be >= 1")
        if self.hub_timeout_s <= 0:
            raise bad(f"hub_timeout_s={self.hub_timeout_s} must be > 0")


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


@contextmanager
def _timed(timings: dict[str, float], step: str):
    start = time.perf_counter()
    yield
    timings[step] = round(time.perf_counter() - start, 3)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(final: Path) -> None:
    """Remove temporary folders of earlier runs of the same config whose process is gone."""
    for tmp in final.parent.glob(final.name + ".tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            log.info("removing %s left by an interrupted run", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


def _progress() -> bool:
    return os.environ.get("CRAMMING_NO_PROGRESS", "") in ("", "0")


def prepare(data_cfg: DataConfig, data_root: str | Path) -> Path:
    """Build (or reuse) the prepared dataset of `data_cfg` under `data_root`; returns its folder."""
    from cramming.data.shards import MANIFEST, load_manifest

    final = prepared_dir(data_cfg, data_root)
    if (final / MANIFEST).is_file():
        load_manifest(final)
        log.info("cache hit: %s", final)
        return final
    if final.exists():
        log.info("removing %s: it has no manifest (incomplete)", final)
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        from cramming.data.shards import manifest_digest, sha256_file, write_json_atomic

        try:
            manifest = _build(data_cfg, tmp)
            manifest["tokenizer_sha256"] = sha256_file(tmp / manifest["tokenizer"])
            manifest["manifest_sha256"] = manifest_digest(manifest)
            write_json_atomic(tmp / MANIFEST, manifest)
        except OSError as err:
            if err.errno not in _DISK_ERRNOS:
                raise
            # Disk full / quota / I/O error while writing shards or the manifest: the temporary
            # folder is removed below and no earlier output is touched; say so without a traceback.
            raise DataError(
                f"writing {tmp} failed: {err.strerror or err} (errno {err.errno}); nothing was kept "
                f"(the partial folder is removed). Free space under {final.parent} and run `cram data` again"
            ) from None
        fault_point("data.rename")  # complete inside the temporary folder, not yet renamed
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / MANIFEST).is_file():  # a concurrent run of the same config finished first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s", final)
    return final


def _build(cfg: DataConfig, out: Path) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from cramming.data import pack, shards, sources
    from cramming.data.filters import ExactDeduplicator
    from cramming.data.normalize import build_normalizer, normalize_text
    from cramming.data.tokenizer import load_tokenizer, special_token_ids, train_tokenizer

    progress = _progress()
    timings: dict[str, float] = {}
    counts: dict[str, int] = {}
    t_start = time.perf_counter()

    # 1-2. read, normalise, dedup; spool to disk ---------------------------------------------
    stats = sources.SourceStats()
    normalizer = build_normalizer(cfg.lowercase, cfg.strip_accents, cfg.ascii_only)
    dedup = ExactDeduplicator() if cfg.dedup else None
    spool = pack.DocSpool(out)
    chars_read = empty = 0
    with _timed(timings, "read_normalize_dedup"):
        bar = tqdm(total=cfg.max_documents, desc="read+normalise", unit="doc", disable=not progress, mininterval=1.0)
        for raw in sources.iter_documents(cfg, stats):
            stats.documents_read += 1
            chars_read += len(raw)
            bar.update(1)
            text = normalize_text(normalizer, raw)
            if not text:
                empty += 1
            elif dedup is None or dedup.is_new(text):
                spool.add(text)
            if cfg.max_documents is not None and stats.documents_read >= cfg.max_documents:
                break
            if cfg.max_chars is not None and chars_read >= cfg.max_chars:
                break
        bar.close()
        offsets = spool.close()
    counts.update(
        documents_read=stats.documents_read,
        documents_skipped_unreadable=stats.documents_skipped_unreadable,
        files_read=stats.files_read,
        files_skipped=stats.files_skipped,
        chars_read=chars_read,
        documents_empty_after_normalization=empty,
        documents_deduplicated=dedup.duplicates if dedup else 0,
    )
    what = f"data.source={cfg.source}" + (f" ({', '.join(cfg.local_paths)})" if cfg.source == "local" else "")
    if stats.documents_read == 0:
        skipped = stats.documents_skipped_unreadable + stats.files_skipped
        raise DataError(f"empty corpus: {what} yielded no documents"
                        + (f" ({skipped} unreadable files/documents skipped, e.g. {stats.skipped_examples[0]})" if skipped else ""))
    if len(spool) == 0:
        raise DataError(f"empty corpus: all {stats.documents_read} documents of {what} are empty after normalisation "
                        "(e.g. non-ASCII text with data.ascii_only=true)")
    log.info("read %d documents (%d kept after normalisation/dedup)", stats.documents_read, len(spool))

    # 3. tokenizer ----------------------------------------------------------------------------
    with _timed(timings, "tokenizer"):
        if cfg.tokenizer_file:
            tok = load_tokenizer(cfg.tokenizer_file)
        else:
            rng = np.random.default_rng([cfg.seed, 3])
            frac = 1.0 if cfg.tokenizer_sample_chars is None else min(1.0, cfg.tokenizer_sample_chars / max(1, spool.chars))
            chosen = np.flatnonzero(rng.random(len(spool)) < frac) if frac < 1 else np.arange(len(spool))

            def sample() -> Any:
                for s in tqdm(range(0, len(chosen), cfg.batch_docs), desc="train tokenizer", disable=not progress):
                    idx = chosen[s:s + cfg.batch_docs]
                    # Contiguous reads where possible: fetch the covering range, then pick.
                    docs = pack.read_docs(spool.path, offsets[idx[0]:idx[-1] + 2])
                    yield [docs[i - idx[0]] for i in idx]

            tok = train_tokenizer(
                sample(), cfg.tokenizer, cfg.vocab_size, lowercase=cfg.lowercase, strip_accents=cfg.strip_accents,
                ascii_only=cfg.ascii_only, min_frequency=cfg.min_frequency,
            )
        tok.save(str(out / "tokenizer.json"))
    specials = special_token_ids(tok)
    vocab_size = tok.get_vocab_size()
    dtype = shards.token_dtype(vocab_size)

    # 4-5. filter + tokenize + pack ------------------------------------------------------------
    rows_path = out / "rows.tmp"
    with _timed(timings, "tokenize_filter_pack"):
        packed = pack.encode_and_pack(
            spool.path, offsets, tok.to_str(), specials["sep"],
            cfg.compression_threshold if cfg.compression_filter else None,
            rows_path, cfg.seq_len, dtype, num_proc=cfg.num_proc, batch_docs=cfg.batch_docs, progress=progress,
            packing=cfg.packing, pad_id=specials["pad"],
        )
    counts.update(packed)
    spool.path.unlink()
    if packed["documents_packed"] == 0:
        raise DataError(
            f"filtering removed the whole corpus: all {packed['documents_filtered']} documents have more than "
            f"{cfg.compression_threshold} tokens per character. Raise data.compression_threshold or set "
            "data.compression_filter=false"
        )
    n_rows = packed["sequences"]
    if n_rows < 2:
        raise DataError(
            f"the corpus yields {n_rows} full row(s) of {cfg.seq_len} tokens ({packed['tokens'] + packed['tokens_dropped_tail']} "
            "tokens in all); at least 2 are needed (one for training, one held out). Use more text"
        )

    # 6. split + order --------------------------------------------------------------------------
    rows = np.memmap(rows_path, dtype=dtype, mode="r", shape=(n_rows, cfg.seq_len))
    with _timed(timings, "split_order"):
        n_val = min(math.ceil(cfg.val_fraction * n_rows), cfg.val_max_sequences, n_rows - 1)
        perm = np.random.default_rng([cfg.seed, 5]).permutation(n_rows)
        val_idx = np.sort(perm[:n_val])
        train_idx = np.sort(perm[n_val:])
        del perm
        train_order = pack.order_rows(rows, train_idx, cfg.sorting, vocab_size, cfg.seed, progress=progress,
                                      pad_id=specials["pad"] if cfg.packing == "doc-bounded" else None)

    # 7. shards --------------------------------------------------------------------------------
    with _timed(timings, "write_shards"):
        splits: dict[str, Any] = {}
        static = None
        if cfg.static_masking_copies:
            import torch

            from cramming.data.masking import MLMMasker

            masker = MLMMasker(vocab_size, specials["mask"], specials.values(), mask_rate=cfg.static_mask_rate,
                               fixed_count=cfg.static_fixed_count)
            writer = shards.ShardWriter(out, "train", cfg.seq_len, dtype, cfg.shard_sequences, labels=True)
            for copy in range(cfg.static_masking_copies):
                def write_masked(chunk: np.ndarray, offset: int, copy: int = copy) -> None:
                    gen = torch.Generator().manual_seed(shards._mix(cfg.seed, copy, offset))
                    batch = masker(torch.from_numpy(chunk.astype(np.int64)), generator=gen)
                    writer.write(batch["input_ids"].numpy(), batch["labels"].numpy())

                pack.write_in_order(rows, train_order, write_masked, desc=f"static masks {copy + 1}", progress=progress)
            splits["train"] = writer.finish()
            static = dict(copies=cfg.static_masking_copies, mask_rate=cfg.static_mask_rate,
                          fixed_count=cfg.static_fixed_count, replace_mask=0.8, replace_random=0.1,
                          base_sequences=len(train_order))
        else:
            writer = shards.ShardWriter(out, "train", cfg.seq_len, dtype, cfg.shard_sequences)
            pack.write_in_order(rows, train_order, lambda chunk, _: writer.write(chunk), progress=progress)
            splits["train"] = writer.finish()
        vwriter = shards.ShardWriter(out, "val", cfg.seq_len, dtype, cfg.shard_sequences)
        pack.write_in_order(rows, val_idx, lambda chunk, _: vwriter.write(chunk), desc="write val", progress=progress)
        splits["val"] = vwriter.finish()
    del rows
    rows_path.unlink()
    counts.update(train_sequences=splits["train"]["num_sequences"], val_sequences=splits["val"]["num_sequences"])
    timings["total"] = round(time.perf_counter() - t_start, 3)

    return {
        "format_version": shards.FORMAT_VERSION,
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
        "skipped_examples": stats.skipped_examples,
        "timings_s": timings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run(cfg: Any) -> None:
    """The `cram data` entry point: prepare `cfg.data` under `cfg.paths.data_root` and summarise."""
    from cramming.data.shards import load_manifest

    data_cfg = to_dataclass(DataConfig, cfg.data, "data")
    data_root = Path(str(cfg.paths.data_root)).expanduser()
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
