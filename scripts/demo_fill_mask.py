#!/usr/bin/env python3
"""Fill-mask predictions of exported models, side by side, as a markdown section (for `make demo`).

Each export is loaded the way a transformers user would load it,
`transformers.pipeline("fill-mask", model=<export>, trust_remote_code=True)`, and asked for the
top-k tokens at the `[MASK]` of one sentence. The table is printed and written to `--out`, which
`cram report --include` places in the report.

    python scripts/demo_fill_mask.py cramming=outputs/demo/pretrain/cramming/final \\
        bert-original=outputs/demo/pretrain/bert-original/final --out outputs/demo/fill_mask.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cramming.errors import CheckpointError, ConfigError, CrammingError

DEFAULT_SENTENCE = "the president [MASK] the united states."


def parse_export(spec: str) -> tuple[str, Path]:
    """`LABEL=DIR` or `DIR` (labelled with the run folder's name, i.e. DIR's parent for `.../<run>/final`)."""
    label, sep, path = spec.partition("=")
    folder = Path(path if sep else spec).expanduser()
    if not sep:
        label = (folder.parent.name if folder.name == "final" else folder.name) or str(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not an exported model (no config.json); pass a run's `final/` folder "
                              "written by `cram pretrain`")
    return label, folder


def predict(folder: Path, sentence: str, top_k: int) -> tuple[list[dict[str, Any]], int]:
    """The pipeline's top-k predictions at the sentence's single mask token, and the vocabulary size."""
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(folder), trust_remote_code=True)
    mask = fill.tokenizer.mask_token
    if sentence.count(mask) != 1:
        raise ConfigError(f"the sentence must contain the mask token {mask} exactly once: {sentence!r}")
    return fill(sentence, top_k=top_k), int(fill.model.config.vocab_size)


def _code(token: str) -> str:
    """A token as inline code in a table cell (pipes escaped; a backtick token gets double fences)."""
    token = token.replace("|", "\\|")
    return f"`` {token} ``" if "`" in token else f"`{token}`"


def fill_mask_section(exports: list[tuple[str, Path]], sentence: str, top_k: int = 5) -> str:
    """Markdown: one column per export, one row per rank, `token` (probability) in each cell."""
    columns, vocab = [], set()
    for _, folder in exports:
        preds, size = predict(folder, sentence, top_k)
        columns.append([f"{_code(p['token_str'])} ({p['score']:.3g})" for p in preds])
        vocab.add(size)
    header = "| rank | " + " | ".join(label for label, _ in exports) + " |"
    rows = [f"| {i + 1} | " + " | ".join(col[i] if i < len(col) else "" for col in columns) + " |"
            for i in range(top_k)]
    # A model that learned nothing spreads its probability evenly: the reader's yardstick.
    uniform = " or ".join(f"1/{v} = {1 / v:.3g}" for v in sorted(vocab))
    return "\n".join([
        "## Fill-mask", "",
        f"`transformers.pipeline(\"fill-mask\", model=<export>, trust_remote_code=True)` on `{sentence}`: "
        f"the top {top_k} tokens and their probabilities. An untrained model gives every token {uniform}.", "",
        header, "| ---: |" + " --- |" * len(exports), *rows, "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", metavar="[LABEL=]DIR", help="exported model folders (a run's final/)")
    parser.add_argument("--sentence", default=DEFAULT_SENTENCE, help="text with one [MASK] (default: %(default)r)")
    parser.add_argument("--top-k", type=int, default=5, help="predictions per model (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown section to this file")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    try:
        section = fill_mask_section([parse_export(s) for s in args.exports], args.sentence, args.top_k)
    except CrammingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(section)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(section, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
