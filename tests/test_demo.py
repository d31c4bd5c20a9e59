"""`make demo`: its two recipes compare on equal terms, its fill-mask script, and the report's `--include`."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from script_loader import load_script
from test_model_export import CFG, make_tokenizer
from test_report import make_pretrain_run

from cramming import report
from cramming.config import CONFIG_DIR
from cramming.errors import CheckpointError, ConfigError
from cramming.model import CrammedBertForMLM, load_model, load_tokenizer, save_pretrained

REPO = Path(__file__).resolve().parents[1]
fill_mask = load_script("demo_fill_mask")
SENTENCE = "the cat [MASK] on the mat"
# The fields that set a model's size; everything else is the architecture's own choice.
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len")


@pytest.fixture
def exports(tmp_path: Path) -> list[tuple[str, Path]]:
    tokenizer = make_tokenizer(tmp_path / "tok.json", CFG.vocab_size)
    out = []
    for seed, label in enumerate(("first", "second")):
        torch.manual_seed(seed)
        out.append((label, save_pretrained(CrammedBertForMLM(CFG), tmp_path / label / "final", tokenizer)))
    return out


def _expected_column(folder: Path, top_k: int) -> list[str]:
    """The cells the table must show, from the model's own logits at the mask (not the pipeline)."""
    tok = load_tokenizer(folder)
    enc = tok(SENTENCE, return_tensors="pt")
    position = (enc["input_ids"][0] == tok.mask_token_id).nonzero().item()
    with torch.no_grad():
        probs = load_model(folder)(enc["input_ids"])["logits"][0, position].softmax(-1)
    top = probs.topk(top_k)
    return [f"{fill_mask._code(tok.decode([i]))} ({p:.3g})" for p, i in zip(top.values.tolist(), top.indices.tolist(),
                                                                           strict=True)]


def test_fill_mask_section_shows_each_models_top_tokens(exports):
    section = fill_mask.fill_mask_section(exports, SENTENCE, top_k=3)
    rows = [line for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    assert "| rank | first | second |" in section and len(rows) == 3
    cells = [[c.strip() for c in row.strip("|").split(" | ")][1:] for row in rows]
    for column, (_, folder) in enumerate(exports):
        assert [row[column] for row in cells] == _expected_column(folder, 3)
    assert cells[0][0] != cells[0][1] or cells[1][0] != cells[1][1]  # two different models, two columns
    assert f"1/{CFG.vocab_size} = {1 / CFG.vocab_size:.3g}" in section


def test_fill_mask_main_prints_and_writes(exports, tmp_path, capsys):
    out = tmp_path / "section" / "fill_mask.md"
    assert fill_mask.main([f"{exports[0][1]}", "--sentence", SENTENCE, "--top-k", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    assert "| rank | first |" in text and "| 2 |" in text and "| 3 |" not in text


def test_fill_mask_errors_are_clear(exports, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="not an exported model"):
        fill_mask.parse_export(f"x={tmp_path}")
    assert fill_mask.main([str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    for sentence in ("no mask here", "[MASK] and [MASK]"):
        with pytest.raises(ConfigError, match="exactly once"):
            fill_mask.fill_mask_section(exports[:1], sentence)
    assert fill_mask.parse_export(f"mine={exports[0][1]}") == ("mine", exports[0][1])
    assert fill_mask._code("a|b") == "`a\\|b`" and fill_mask._code("`") == "`` ` ``"


def _arch(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "arch" / f"{name}.yaml"))


def test_demo_baseline_is_bert_original_at_the_demo_size():
    demo, original, baseline = _arch("demo"), _arch("bert-original"), _arch("demo-bert-original")
    assert baseline.keys() == original.keys()
    for key, value in baseline.items():
        if key in SIZE_FIELDS:
            assert value == demo[key], key
        elif key != "name":
            assert value == original[key], key
    from cramming.model.bert import ModelConfig

    with torch.device("meta"):
        sizes = [sum(p.numel() for p in CrammedBertForMLM(ModelConfig(**_arch(n))).parameters())
                 for n in ("demo", "demo-bert-original")]
    assert 4.5e6 < sizes[0] < sizes[1] < 1.2 * sizes[0]  # the same size class: 4.7M and 5.4M


def _demo_commands(tmp_path: Path) -> list[list[str]]:
    """The demo's commands as `make -n` prints them (continuation lines joined), split into words."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # Fixed arch and data sizes, so that make does not ask torch about a GPU.
    out = subprocess.run(["make", "-n", "-s", "-o", "install", "demo", f"DEMO_OUT={tmp_path}", "DEMO_ARCH=demo",
                          "DEMO_BASELINE_ARCH=demo-bert-original", "DEMO_MAX_CHARS=8000000"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    return [shlex.split(line) for line in out.replace("\\\n", " ").splitlines() if line.strip()]


def test_make_demo_runs_both_recipes_on_equal_terms(tmp_path):
    commands = _demo_commands(tmp_path)
    by_stage = {}
    for words in commands:
        if len(words) > 1 and words[0].endswith("/cram"):
            by_stage.setdefault(words[1], []).append(words[2:])
    (data,), (cramming, original) = by_stage["data"], by_stage["pretrain"]
    recipe = ("arch=", "train=", "run_name=")
    shared = [sorted(w for w in run if not w.startswith(recipe)) for run in (cramming, original)]
    assert shared[0] == shared[1], "the two pretraining runs must differ only in arch/train/run_name"
    assert set(data) <= set(shared[0])  # trained on the data just prepared
    assert {"train.eval_mask_rate=0.15", "budget=2m"} <= set(shared[0])
    assert {"arch=demo", "train=cramming"} <= set(cramming) and {"arch=demo-bert-original",
                                                                  "train=bert-original"} <= set(original)
    (glue,) = by_stage["glue"]
    assert f"ckpt={tmp_path}/pretrain/cramming/final" in glue and "glue.trials=1" in glue
    fill = next(w for w in commands if any(x.endswith("demo_fill_mask.py") for x in w))
    assert f"bert-original={tmp_path}/pretrain/bert-original/final" in fill
    (rep,) = by_stage["report"]
    assert rep.count("--include") == 2 and f"{tmp_path}/fill_mask.md" in rep


def test_report_include_goes_after_the_comparison(tmp_path):
    runs = [make_pretrain_run(tmp_path / name, final_loss=loss) for name, loss in (("a", 4.0), ("b", 5.0))]
    extra = tmp_path / "extra.md"
    extra.write_text("## Fill-mask\n\nsome table\n")
    md = report.build_report(runs, tmp_path / "rep", include=[extra]).read_text()
    assert md.index("## Comparison") < md.index("## Fill-mask") < md.index("## Runs")
    single = report.build_report([runs[0]], tmp_path / "one", include=[extra]).read_text()
    assert single.rstrip().endswith("some table")
    with pytest.raises(report.ReportError, match="--include"):
        report.build_report(runs, tmp_path / "rep", include=[tmp_path / "missing.md"])


def test_short_runs_are_plotted_in_seconds(tmp_path):
    short = report.read_pretrain(make_pretrain_run(tmp_path / "short", steps=8))  # 120 s
    long = report.read_pretrain(make_pretrain_run(tmp_path / "long", steps=80))  # 20 minutes
    assert report._time_axis([short]) == (1.0, "seconds")
    assert report._time_axis([short, long]) == (60.0, "minutes")
