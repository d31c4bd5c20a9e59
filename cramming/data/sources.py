"""Document sources: iterators of raw text documents, streamed (never the whole corpus in RAM).

- `embedded`: the corpus shipped in `cramming/data/embedded/*.txt.xz` (one document per
  blank-line-separated unit); needs no network.
- `local`: text / jsonl / parquet files or folders; one document per file, line, or blank-line
  block (text), or per record (jsonl/parquet, configurable field).
- `hub`: one or more `datasets` hub datasets, streamed (C4, The Pile, Wikipedia + BookCorpus),
  interleaved round-robin. A `HubSource` with `path: json` and `data_files` runs the very same code
  on local files, which is how the tests exercise it offline.

Unreadable input (undecodable bytes, broken JSON, a missing field, an unreadable file) is skipped
and counted in `SourceStats`, or raises DataError naming the file when `strict`.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cramming.checks import validate
from cramming.data.workdir import BuildInterrupted
from cramming.errors import DataError

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
# `datasets` builders that read local files and never need the network.
PACKAGED_BUILDERS = ("json", "parquet", "text", "csv", "arrow")


@dataclass
class HubSource:
    """One dataset streamed with `datasets.load_dataset(path, name, split=split, streaming=True)`."""

    path: str = "allenai/c4"
    """Hub id (e.g. allenai/c4) or a packaged builder (json, parquet, text) used with `data_files`."""
    name: str | None = None
    """Dataset config name (e.g. `en` for C4, `20231101.en` for wikimedia/wikipedia)."""
    split: str = "train"
    """Split to stream."""
    data_files: list[str] | None = None
    """Files (or hub-relative patterns) to read; required for the packaged builders."""
    text_field: str = "text"
    """Field holding the document text; dots reach into nested records (e.g. `content.body`)."""
    subset_field: str | None = None
    """Field naming a record's subset (The Pile: `meta.pile_set_name`); with `subsets`, filters records."""
    subsets: list[str] = field(default_factory=list)
    """Keep only records whose `subset_field` is one of these (empty: keep all)."""
    max_documents: int | None = None
    """Stop this source after this many documents (the global `data.max_documents` also applies)."""

    def __post_init__(self) -> None:
        validate(self, f"data.hub_sources[{self.path}]", [
            (self.path not in PACKAGED_BUILDERS or bool(self.data_files),
             f"data_files is empty: the packaged builder {self.path!r} reads local files; list them, "
             "e.g. data_files=[/data/part-0.jsonl]"),
            (not self.subsets or bool(self.subset_field),
             f"subsets={self.subsets} needs a subset_field to filter on (The Pile: meta.pile_set_name)"),
        ])


@dataclass
class SourceStats:
    """What the readers saw; ends up in the manifest's `counts`."""

    documents_read: int = 0
    documents_skipped_unreadable: int = 0
    files_read: int = 0
    files_skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, what: str, strict: bool, *, file: bool = False) -> None:
        if strict:
            raise DataError(f"unreadable input: {what} (set data.strict=false to skip and count such input)")
        if file:
            self.files_skipped += 1
        else:
            self.documents_skipped_unreadable += 1
        if len(self.skipped_examples) < 10:
            self.skipped_examples.append(what)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _open_binary(path: Path) -> IO[bytes]:
    """Open a file, transparently decompressing .xz/.lzma/.gz/.bz2/.zst."""
    suffix = path.suffix.lower()
    if suffix in (".xz", ".lzma"):
        return lzma.open(path, "rb")
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(
                f"{path} is zstandard-compressed but the `zstandard` package is not installed; "
                "`pip install zstandard` or decompress the file"
            ) from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))  # noqa: SIM115
    return open(path, "rb")  # noqa: SIM115


def _base_suffix(path: Path) -> str:
    """The format suffix under any compression suffix: data.jsonl.zst -> .jsonl."""
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in (".xz", ".lzma", ".gz", ".bz2", ".zst"):
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def get_field(record: Any, dotted: str) -> Any:
    """`record["a"]["b"]` for dotted="a.b"; None when any step is missing."""
    for key in dotted.split("."):
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def _units(lines: Iterable[tuple[int, bytes]], unit: str, where: str, stats: SourceStats, strict: bool) -> Iterator[str]:
    """Group decoded lines into documents: per line, per blank-line block, or the whole file.

    A unit containing undecodable bytes is skipped as a whole (never half a document).
    """
    parts: list[str] = []
    bad_at: int | None = None
    for lineno, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            if unit == "line":
                stats.skip(f"{where}:{lineno} is not valid UTF-8", strict)
                continue
            bad_at = lineno if bad_at is None else bad_at
            text = ""
        text = text.rstrip("\r\n")
        if unit == "line":
            if text.strip():
                yield text
            continue
        if unit == "block" and not text.strip():
            if bad_at is not None:
                stats.skip(f"{where}:{bad_at} is not valid UTF-8", strict)
            elif parts:
                yield "\n".join(parts)
            parts, bad_at = [], None
            continue
        parts.append(text)
    if bad_at is not None:
        stats.skip(f"{where}:{bad_at} is not valid UTF-8", strict)
    elif parts and any(p.strip() for p in parts):
        yield "\n".join(parts)


def _text_file(path: Path, unit: str, stats: SourceStats, strict: bool) -> Iterator[str]:
    try:
        with _open_binary(path) as fh:
            stats.files_read += 1
            yield from _units(enumerate(fh, start=1), unit, str(path), stats, strict)
    except (OSError, EOFError, lzma.LZMAError) as err:
        stats.skip(f"{path}: {err}", strict, file=True)


def _jsonl_file(path: Path, text_field: str, stats: SourceStats, strict: bool) -> Iterator[str]:
    try:
        with _open_binary(path) as fh:
            stats.files_read += 1
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    stats.skip(f"{path}:{lineno} is not valid UTF-8 JSON", strict)
                    continue
                text = get_field(record, text_field)
                if not isinstance(text, str):
                    stats.skip(f"{path}:{lineno} has no string field {text_field!r}", strict)
                    continue
                if text.strip():
                    yield text
    except (OSError, EOFError, lzma.LZMAError) as err:
        stats.skip(f"{path}: {err}", strict, file=True)


def _parquet_file(path: Path, text_field: str, stats: SourceStats, strict: bool) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError on a bad file
        stats.skip(f"{path}: not a readable parquet file ({err})", strict, file=True)
        return
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); set data.text_field")
    stats.files_read += 1
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


# ---------------------------------------------------------------------------------------------
# Embedded and local
# ---------------------------------------------------------------------------------------------


def embedded_files(select: list[str] | None = None) -> list[Path]:
    """The shipped corpus files, optionally only those whose stem (e.g. `austen`) is in `select`."""
    files = sorted(EMBEDDED_DIR.glob("*.txt.xz"))
    if not files:
        raise DataError(f"the embedded corpus is missing: no *.txt.xz in {EMBEDDED_DIR}")
    if select:
        stems = {f.name.removesuffix(".txt.xz"): f for f in files}
        unknown = sorted(set(select) - set(stems))
        if unknown:
            raise DataError(f"unknown embedded file(s) {', '.join(unknown)}; available: {', '.join(sorted(stems))}")
        files = [stems[s] for s in select]
    return files


def iter_embedded(select: list[str] | None, stats: SourceStats) -> Iterator[str]:
    """One document per blank-line-separated unit of each embedded file."""
    for path in embedded_files(select):
        yield from _text_file(path, "block", stats, strict=True)


def local_files(paths: list[str]) -> list[Path]:
    """Expand files, folders (recursively, hidden files skipped) and glob patterns, in sorted order."""
    if not paths:
        raise DataError("data.source=local needs data.local_paths (files, folders or glob patterns)")
    out: list[Path] = []
    for spec in paths:
        p = Path(os.path.expanduser(spec))
        if any(c in spec for c in "*?["):
            matches = sorted(Path(m) for m in __import__("glob").glob(os.path.expanduser(spec), recursive=True))
            if not matches:
                raise DataError(f"data.local_paths: pattern {spec!r} matches no file")
            out += [m for m in matches if m.is_file()]
        elif p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"data.local_paths: {spec} does not exist")
    if not out:
        raise DataError(f"data.local_paths {paths} contain no files")
    return out


def iter_local(paths: list[str], unit: str, fmt: str, text_field: str, stats: SourceStats, strict: bool) -> Iterator[str]:
    """Documents from local files; `fmt=auto` picks by suffix (.jsonl/.json, .parquet, else text)."""
    for path in local_files(paths):
        kind = fmt
        if kind == "auto":
            base = _base_suffix(path)
            kind = "jsonl" if base in (".jsonl", ".json", ".ndjson") else "parquet" if base == ".parquet" else "text"
        if kind == "jsonl":
            yield from _jsonl_file(path, text_field, stats, strict)
        elif kind == "parquet":
            yield from _parquet_file(path, text_field, stats, strict)
        else:
            yield from _text_file(path, unit, stats, strict)


# ---------------------------------------------------------------------------------------------
# Hub
# ---------------------------------------------------------------------------------------------


class SourceInterrupted(BuildInterrupted):
    """A streamed source failed part-way (e.g. the connection dropped): what was read is still good."""


def _offline_help(src: HubSource, reason: str, cls: type[DataError] = DataError) -> DataError:
    return cls(
        f"could not stream hub dataset {src.path!r} (config {src.name!r}, split {src.split!r}): {reason}. "
        f"Tried to stream it with datasets.load_dataset({src.path!r}, {src.name!r}, streaming=True). Without network access, download the data "
        "elsewhere and use local files instead, e.g. `cram data data=local data.local_paths=[/path/to/files]` "
        "(text, .jsonl[.zst] or .parquet; data.text_field names the text column), or point the hub source at "
        "local files with path=json and data_files=[...]."
    )


def _is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _preflight(src: HubSource, timeout_s: float) -> None:
    """Fail in seconds, not after `datasets`' retries, when the hub cannot be reached."""
    if src.path in PACKAGED_BUILDERS or Path(src.path).exists():
        return
    if _is_offline():
        raise _offline_help(src, "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(src.path, timeout=timeout_s)
    except Exception as err:  # connection errors, timeouts, 401/404: all mean "cannot stream this"
        raise _offline_help(src, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def _iter_hub_source(src: HubSource, timeout_s: float, stats: SourceStats, strict: bool) -> Iterator[str]:
    _preflight(src, timeout_s)
    import datasets

    try:
        ds = datasets.load_dataset(src.path, src.name, split=src.split, streaming=True, data_files=src.data_files)
    except FileNotFoundError as err:
        raise DataError(f"hub source {src.path!r}: {err}") from None
    except Exception as err:
        raise _offline_help(src, f"{type(err).__name__}: {err}") from None
    count = 0
    iterator = iter(ds)
    while src.max_documents is None or count < src.max_documents:
        try:
            record = next(iterator)
        except StopIteration:
            return
        except Exception as err:  # network drop mid-stream, corrupt file
            raise _offline_help(src, f"reading failed after {count} documents: {type(err).__name__}: {err}",
                                SourceInterrupted) from None
        if src.subsets and get_field(record, src.subset_field or "") not in src.subsets:
            continue
        text = get_field(record, src.text_field)
        if not isinstance(text, str):
            stats.skip(f"{src.path} record {count} has no string field {src.text_field!r}", strict)
            continue
        count += 1
        if text.strip():
            yield text


def iter_hub(sources: list[HubSource], timeout_s: float, stats: SourceStats, strict: bool) -> Iterator[str]:
    """Round-robin over the sources, so a document limit samples all of them (e.g. wiki + books)."""
    if not sources:
        raise DataError("data.source=hub needs at least one entry in data.hub_sources")
    iterators = [_iter_hub_source(s, timeout_s, stats, strict) for s in sources]
    while iterators:
        alive = []
        for it in iterators:
            try:
                yield next(it)
            except StopIteration:
                continue
            alive.append(it)
        iterators = alive


def fingerprint(cfg: Any) -> list[list[Any]]:
    """Path, size and modification time of every local file `cfg` (a DataConfig) reads (none for
    hub datasets): a partial build is continued only while these are unchanged."""
    if cfg.source == "embedded":
        files = embedded_files(cfg.embedded_files)
    elif cfg.source == "local":
        files = local_files(cfg.local_paths)
    else:
        files = [Path(f) for src in cfg.hub_sources for f in src.data_files or [] if Path(f).is_file()]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def iter_documents(cfg: Any, stats: SourceStats) -> Iterator[str]:
    """The raw documents of `cfg` (a DataConfig), before normalisation and sampling limits."""
    if cfg.source == "embedded":
        return iter_embedded(cfg.embedded_files, stats)
    if cfg.source == "local":
        return iter_local(cfg.local_paths, cfg.local_unit, cfg.local_format, cfg.text_field, stats, cfg.strict)
    if cfg.source == "hub":
        return iter_hub(cfg.hub_sources, cfg.hub_timeout_s, stats, cfg.strict)
    raise DataError(f"unknown data.source {cfg.source!r}; choose embedded, local or hub")
