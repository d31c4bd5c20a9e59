#!/usr/bin/env python3
"""Cut the small GLUE subsets that ship in `cramming/assets/glue_demo/` for `make demo`.

`make demo` has to run offline on a fresh clone, so the package ships a few MB of real GLUE data in
the official download layout (`<TASK>/train.tsv`, `<TASK>/dev.tsv`): the same reader parses it as it
parses a full `glue_data/` folder. The source is `../shared/data/glue/` (see its SOURCES.md); every
source file is checked against its recorded sha256 before anything is written.

Rows are copied byte for byte, so each task's quirks stay (CoLA: no header and a dev file without a
final newline; MRPC: a UTF-8 BOM before the header; quote characters left as they are). A subset
keeps the header and a deterministic sample of data rows in their original order: the rows whose
`sha256("<TASK>/<split>/<row index>")` are the N smallest, i.e. a pseudo-random sample that is the
same on every machine and Python version (the first N rows would be biased: CoLA and STS-B are
sorted by source).

    python scripts/make_glue_demo.py                 # writes cramming/assets/glue_demo/
    python scripts/make_glue_demo.py --check         # verify the shipped files, write nothing
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "glue"
DEFAULT_OUT = REPO / "cramming" / "assets" / "glue_demo"


@dataclass(frozen=True)
class Split:
    """One output file and where it comes from."""

    task: str
    """Folder name in the official layout (CoLA, SST-2, ...)."""
    split: str
    """train or dev."""
    rows: int | None
    """Data rows to keep (None = all of them)."""
    source_rows: int
    """Data rows of the source file (header excluded)."""
    source_sha256: str
    """sha256 of the source file, as recorded in ../shared/data/glue/SOURCES.md."""
    header: bool
    """Whether the first line is a header (every task but CoLA)."""

    @property
    def name(self) -> str:
        return f"{self.task}/{self.split}.tsv"


SPLITS = [
    Split("CoLA", "train", 2000, 8551, "cb368ebeb9f27d7ad03720d27ddc95687a311bdb100781a2fe59a5f5b1bc0624", False),
    Split("CoLA", "dev", None, 1043, "8c013e21dc39957cac37378d87bebe225b694a0d5fe13eded66c2856628833fd", False),
    Split("SST-2", "train", 2000, 67349, "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1", True),
    Split("SST-2", "dev", None, 872, "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0", True),
    Split("MRPC", "train", 2000, 3668, "69abcedee3cf738c6ce58d772e43e1b7cdf5b4edee4aceda459c0d9f4e5599f3", True),
    Split("MRPC", "dev", None, 408, "9e8f284788040f7c9ecde2e1b3c07237c756f926bd9ef8548ef5d34b56f69f17", True),
    Split("STS-B", "train", 2000, 5749, "41c4d978b6162abdcada7e49a982211954cca5459c228db478af333124b257a2", True),
    Split("STS-B", "dev", None, 1500, "fe7dc0632a5033562f3cadff991f6e8d9b9b6311861660e78c3c82eb7db67f59", True),
    Split("RTE", "train", None, 2490, "41e3a9b063433392343fad9e962cf2f58b681c78d8f71592f4186f0837246c5c", True),
    Split("RTE", "dev", None, 277, "80230dfa1347282e7b532b06a1004a76a710087541189bf874223ddf0e3819fb", True),
]

# Licence notes, in our words, from the facts in ../shared/data/glue/SOURCES.md.
LICENCES = {
    "CoLA": "Corpus of Linguistic Acceptability (Warstadt et al., 2018): example sentences from published "
            "linguistics literature. No explicit licence; research use.",
    "SST-2": "Stanford Sentiment Treebank (Socher et al., 2013), built on Pang & Lee's Rotten Tomatoes "
             "snippets. No explicit licence; research use.",
    "MRPC": "Microsoft Research Paraphrase Corpus: use falls under Microsoft Research's licence terms "
            "for the corpus.",
    "STS-B": "Similarity scores CC BY-SA 4.0; the sentences keep their sources' licences (MSRpar/MSRvid: "
             "Microsoft Research terms; headlines: European Media Monitor notice; image captions and the "
             "SNLI part: CC BY-SA; answers-forums/answers-answers: Stack Exchange, CC BY-SA 3.0).",
    "RTE": "PASCAL RTE 1-3 and TAC RTE 5 challenge data. No explicit licence; research use.",
}


def split_rows(data: bytes, header: bool) -> tuple[bytes, list[bytes]]:
    """(header line, data lines), each line with its own line end (the last may have none)."""
    lines = data.split(b"\n")
    lines = [line + b"\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    return (lines[0], lines[1:]) if header else (b"", lines)


def pick(split: Split, count: int) -> list[int]:
    """Indices of the data rows to keep, in source order."""
    if split.rows is None or split.rows >= count:
        return list(range(count))

    def key(i: int) -> bytes:
        return hashlib.sha256(f"{split.task}/{split.split}/{i}".encode()).digest()

    return sorted(sorted(range(count), key=key)[: split.rows])


def subset(split: Split, data: bytes) -> bytes:
    """The shipped file for `split`, cut from the source file's bytes."""
    head, rows = split_rows(data, split.header)
    if len(rows) != split.source_rows:
        raise ValueError(f"{split.name}: {len(rows)} data rows, expected {split.source_rows}")
    keep = pick(split, len(rows))
    chosen = [rows[i] for i in keep]
    # Inner rows always end in LF; only the very last row may lack one, and only if the source's did.
    chosen = [r if r.endswith(b"\n") else r + b"\n" for r in chosen[:-1]] + chosen[-1:]
    return head + b"".join(chosen)


def describe(split: Split) -> str:
    if split.rows is None or split.rows >= split.source_rows:
        return f"all {split.source_rows} rows (byte-identical copy)"
    return f"{split.rows} of {split.source_rows} rows: hash-ranked sample, source order"


def provenance(outputs: dict[str, bytes]) -> str:
    """PROVENANCE.md for the written files."""
    lines = [
        "# GLUE demo subsets: provenance and licences",
        "",
        "Small subsets of real GLUE tasks in the official GLUE download layout, shipped so that `make demo`",
        "finetunes and scores on real labelled data offline (`glue.data_dir` pointed at this folder). "
        "They are",
        "**subsets**: scores measured on them are not comparable with full-GLUE numbers (smaller training",
        "sets; the dev sets are the full official GLUE dev sets).",
        "",
        "Written by `scripts/make_glue_demo.py` from `../shared/data/glue/` (its SOURCES.md: files taken from",
        "F0restL1n/BERT@0d0288be08079531c7b3a85af3d532f9adb0f13a, `glue_data/<TASK>/<file>`; MRPC train rebuilt",
        "there with the GLUE split rule). Each source file was checked against the sha256 below first.",
        "",
        "Row selection: a file marked \"all rows\" is a byte-identical copy. A subset keeps the header (if any)",
        "and the N data rows whose `sha256(\"<TASK>/<split>/<row index>\")` are smallest, in their original",
        "order: a fixed pseudo-random sample, the same on every machine (the first N rows would be biased,",
        "CoLA and STS-B being sorted by source). Rows are copied byte for byte, so each task's quirks stay:",
        "CoLA has no header and its dev file no final newline; MRPC's header starts with a UTF-8 BOM;",
        "quote characters are left as they are (read with quoting disabled).",
        "",
        "Parsed by `tests/test_glue_demo_assets.py`: keep the columns.",
        "",
        "| file | data rows | sha256 of the file | source file | source sha256 | rows kept |",
        "| --- | ---: | --- | --- | --- | --- |",
    ]
    for split in SPLITS:
        data = outputs[split.name]
        rows = len(split_rows(data, split.header)[1])
        lines.append(f"| {split.name} | {rows} | {hashlib.sha256(data).hexdigest()} | "
                     f"shared/data/glue/{split.name} | {split.source_sha256} | {describe(split)} |")
    total = sum(len(d) for d in outputs.values())
    lines += ["", f"Total: {total} bytes.", "", "## Licences", "",
              "GLUE is built from existing datasets and adds no licence of its own; each task keeps its "
              "dataset's terms.", "Treat all of them as research-use data.", ""]
    lines += [f"- **{task}**: {text}" for task, text in LICENCES.items()]
    lines += ["", "QNLI, QQP and MNLI are not included (no training split small enough is available "
              "in the source folder).", ""]
    return "\n".join(lines)


def build(source: Path) -> dict[str, bytes]:
    """Every output file's bytes, keyed by `<TASK>/<split>.tsv`; raises if a source file is wrong."""
    outputs = {}
    for split in SPLITS:
        path = source / split.name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (expected the GLUE files of ../shared/data/glue/)")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != split.source_sha256:
            raise ValueError(f"{path}: sha256 {digest} differs from the recorded {split.source_sha256}")
        outputs[split.name] = subset(split, data)
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="GLUE folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare --out with a fresh cut; write nothing")
    args = parser.parse_args(argv)
    try:
        outputs = build(args.source)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    files = {**outputs, "PROVENANCE.md": provenance(outputs).encode()}
    if args.check:
        stale = [n for n, d in files.items() if not (args.out / n).is_file() or (args.out / n).read_bytes() != d]
        for name in stale:
            print(f"differs: {args.out / name}", file=sys.stderr)
        return 1 if stale else 0
    for name, data in files.items():
        path = args.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    print(f"wrote {len(files)} files ({sum(map(len, files.values()))} bytes) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
