"""The model card in every export: Hub metadata that huggingface_hub's ModelCard parses, the facts of the
run, usage code that runs, and the GLUE table added by `cram report --card`."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_report import make_glue_run, make_pretrain_run
from test_train_loop import tiny_run

from cramming import card, report
from cramming.errors import CrammingError

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny pretraining run (Python API), with its export in final/."""
    root = tmp_path_factory.mktemp("card")
    return tiny_run(root)


def test_export_card_parses_and_states_the_run(run) -> None:
    final = run / "final"
    text = (final / card.CARD_NAME).read_text()
    parsed = ModelCard(text)
    assert parsed.data.library_name == "transformers" and parsed.data.pipeline_tag == "fill-mask"
    assert {"cramming", "crammed-bert", "masked-lm"} <= set(parsed.data.tags)
    assert parsed.data.license is None and card.LICENSE_HINT in text  # the licence is the user's to set
    config = json.loads((final / "config.json").read_text())
    training, summary = config["cramming_training"], json.loads((run / "summary.json").read_text())
    from cramming.model import load_model

    parameters = sum(p.numel() for p in load_model(final).parameters())
    for fact in (f"| parameters | {parameters / 1e3:.2f}k |", "2 layers, hidden 32, 2 heads", "| budget | 3 optimizer steps |",
                 "gpu=cpu, fp32, eager", f"{summary['final_loss']:.4f}", f"{summary['val_loss']:.4f}",
                 f"{summary['epochs']:.2f} passes over the data", "micro-batch 16, target 64",
                 f"`{training['data']['config_hash']}`", "Python API"):
        assert fact in parsed.text, fact
    assert training["data"]["train_tokens"] > 0 and training["data"]["source"] == "embedded"
    assert parsed.data.to_dict().get("datasets") is None  # the embedded books are no Hub dataset


def test_usage_code_in_the_card_runs(run) -> None:
    text = (run / "final" / card.CARD_NAME).read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert f'model_id = "{run / "final"}"' in code
    scope: dict = {}
    exec(code, scope)  # fill-mask on the export, then a classifier on its encoder
    assert type(scope["model"]).__name__ == "CrammedBertHFForSequenceClassification"


def test_card_of_hub_data_names_the_datasets_and_the_command(tmp_path) -> None:
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- budget=24h\n- gpu=rtx2080ti\n- run_name=my run\n")
    manifest = {"name": "c4-filtered", "seq_len": 128, "vocab_size": 32768, "config_hash": "abc", "sorting": "prevalence",
                "counts": {"train_sequences": 1000}, "data_config": {"source": "hub", "hub_sources": [
                    {"path": "allenai/c4", "name": "en"}, {"path": "json", "data_files": ["x.json"]}]}}
    facts = card.provenance(manifest, tmp_path, 96, 4032, 3600.0)
    assert facts["command"] == "cram pretrain budget=24h gpu=rtx2080ti 'run_name=my run'"
    config = {"name": "crammed-bert", "architectures": ["CrammedBertHFForMaskedLM"],
              "cramming_training": {"budget_kind": "time", "budget_amount": 86400.0, **facts}}
    parsed = ModelCard(card.render_card(config, 110_000_000, model_id="me/crammed"))
    assert parsed.data.datasets == ["allenai/c4"]
    assert "```bash\ncram pretrain budget=24h gpu=rtx2080ti 'run_name=my run'\n```" in parsed.text
    assert "24h00m00s of wall-clock time" in parsed.text and "| parameters | 110.00M |" in parsed.text
    assert "128.00k in 128-token rows" in parsed.text


def test_classifier_export_card(tmp_path) -> None:
    config = {"name": "crammed-bert", "architectures": ["CrammedBertHFForSequenceClassification"],
              "finetuned_task": "rte", "id2label": {"0": "entailment", "1": "not_entailment"},
              "base_checkpoint": "outputs/pretrain/r/final", "finetune_seed": 0}
    parsed = ModelCard(card.render_card(config, 1000))
    assert parsed.data.pipeline_tag == "text-classification"
    assert "finetuned on rte" in parsed.text and "entailment, not_entailment" in parsed.text
    assert "## Training" not in parsed.text and 'pipeline("text-classification"' in parsed.text


def _glue_run_of(export: Path, path: Path, rte: float) -> Path:
    glue = make_glue_run(path, export, rte=rte)
    results = json.loads((glue / "results.json").read_text())
    results["checkpoint"].update(format="crammed-bert", origin="local", files=str(export))
    (glue / "results.json").write_text(json.dumps(results))
    return glue


def test_report_card_adds_the_glue_table_once_and_keeps_the_owners_edits(run, tmp_path, capsys) -> None:
    export = tmp_path / "final"
    shutil.copytree(run / "final", export)
    edited = (export / card.CARD_NAME).read_text().replace(card.LICENSE_HINT, "license: apache-2.0")
    (export / card.CARD_NAME).write_text(edited + "\nMy own notes.\n")
    assert report.main([str(_glue_run_of(export, tmp_path / "g1", rte=55.2)), "--card", "--out", str(tmp_path / "r")]) == 0
    assert f"model card: {export / card.CARD_NAME}" in capsys.readouterr().out
    assert report.main([str(_glue_run_of(export, tmp_path / "g2", rte=61.4)), "--card", "--out", str(tmp_path / "r")]) == 0
    parsed = ModelCard((export / card.CARD_NAME).read_text())
    assert parsed.data.license == "apache-2.0" and "My own notes." in parsed.text
    assert parsed.text.count("## GLUE (dev)") == 1 and "61.4" in parsed.text and "55.2" not in parsed.text
    assert "| measured: this model |" in parsed.text
    assert parsed.text.index("## GLUE (dev)") < parsed.text.index("## Licence")


def test_report_card_refuses_a_model_without_a_local_export(tmp_path) -> None:
    glue = make_glue_run(tmp_path / "g")  # finetuned random-init
    with pytest.raises(CrammingError, match="only a local export of `cram pretrain` has a card"):
        report.main([str(glue), "--card", "--out", str(tmp_path / "r")])
    with pytest.raises(CrammingError, match="needs a GLUE run"):
        report.main([str(make_pretrain_run(tmp_path / "p")), "--card", "--out", str(tmp_path / "r2")])


def test_cli_pretrain_card_holds_the_command(tmp_path) -> None:
    args = ["pretrain", "budget=2steps", "gpu=cpu", "gpu.micro_batch_size=16", "train.target_batch_size=32", "arch=tiny",
            "data.embedded_files=[moby_dick]", "data.max_chars=100000", "data.vocab_size=300", "data.seq_len=32",
            "data.compression_threshold=1.0", f"paths.data_root={tmp_path}/data", f"paths.out_root={tmp_path}/out",
            "run_name=r"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "CRAMMING_NO_PROGRESS": "1"}
    out = subprocess.run([sys.executable, "-m", "cramming.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = (tmp_path / "out" / "pretrain" / "r" / "final" / card.CARD_NAME).read_text()
    assert f"```bash\n{shlex.join(['cram', *args])}\n```" in text  # quoted for the shell: [ ] are glob characters
