"""Export: safetensors round trip, transformers Auto* loading, fill-mask pipeline, checkpoint errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from cramming.errors import CheckpointError, ConfigError
from cramming.model import (
    CrammedBertForMLM,
    ModelConfig,
    build_model,
    load_model,
    load_tokenizer,
    save_pretrained,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "the a of and to in is was he she it that for on with as his her at by".split()


def make_tokenizer(path: Path, size: int) -> Path:
    letters = list("abcdefghijklmnopqrstuvwxyz.,")
    vocab = list(dict.fromkeys(SPECIALS + WORDS + letters + [f"##{c}" for c in letters]))
    vocab += [f"w{i}" for i in range(size - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab[:size])}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.save(str(path))
    return path


CFG = ModelConfig(name="tiny", vocab_size=120, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=32)


@pytest.fixture
def exported(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = CrammedBertForMLM(CFG)
    out = save_pretrained(model, tmp_path / "final", make_tokenizer(tmp_path / "tok.json", CFG.vocab_size), {"steps": 7})
    return model, out


def test_folder_contents_and_config(exported):
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "crammed-bert" and config["steps"] == 7 and config["hidden_size"] == 32
    assert "AutoModelForMaskedLM" in config["auto_map"]
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp folders left behind


def test_round_trip_identical_logits_and_compiled_prefix_stripped(exported, tmp_path):
    model, out = exported
    ids = torch.randint(5, CFG.vocab_size, (2, 12))
    loaded = load_model(out)
    assert not loaded.training
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids)["logits"], model(ids)["logits"])
    # A compiled module's state dict carries `_orig_mod.`; the export must not.
    wrapper = torch.nn.Module()
    wrapper._orig_mod = model
    again = save_pretrained(wrapper, tmp_path / "again", out / "tokenizer.json")
    from safetensors.torch import load_file

    assert not any("_orig_mod" in k for k in load_file(str(again / "model.safetensors")))
    # Overwriting an existing export replaces it atomically.
    save_pretrained(model, out, out / "tokenizer.json")
    assert (out / "model.safetensors").is_file()


def test_classification_head_loads_encoder_and_round_trips(exported, tmp_path):
    model, out = exported
    clf = load_model(out, head="classification", num_labels=3, dropout=0.1)
    assert clf.config.dropout == 0.1
    torch.testing.assert_close(clf.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    done = save_pretrained(clf, tmp_path / "clf", out / "tokenizer.json")
    again = load_model(done, head="classification")  # num_labels from config.json
    ids = torch.randint(5, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(again(ids)["logits"], clf.eval()(ids)["logits"])
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(done)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, again(ids)["logits"])


def test_transformers_auto_and_remote_code_loading(exported):
    from transformers import AutoModelForMaskedLM

    model, out = exported
    ids = torch.randint(5, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model.eval()(ids)["logits"]
        for kwargs in ({}, {"trust_remote_code": True}):
            hf = AutoModelForMaskedLM.from_pretrained(out, **kwargs)
            torch.testing.assert_close(hf(input_ids=ids).logits, expected)


def test_fill_mask_pipeline(exported):
    from transformers import pipeline

    _, out = exported
    fill = pipeline("fill-mask", model=str(out), tokenizer=str(out))
    preds = fill("the cat [MASK] on the mat", top_k=3)
    assert len(preds) == 3 and all("token_str" in p and 0 <= p["score"] <= 1 for p in preds)
    tok = load_tokenizer(out)
    assert tok.mask_token == "[MASK]" and tok.pad_token_id == 0 and "token_type_ids" not in tok("a b")


def test_missing_and_corrupt_checkpoints_raise(exported, tmp_path):
    _, out = exported
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (out / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(out)


def test_mismatched_shapes_and_vocab_raise(exported, tmp_path):
    _, out = exported
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_model(out, intermediate_size=128)
    with pytest.raises(CheckpointError, match="missing"):
        load_model(out, num_layers=3)
    with pytest.raises(ConfigError, match="unknown model config override"):
        load_model(out, hidden=3)
    make_tokenizer(out / "tokenizer.json", 110)
    with pytest.raises(CheckpointError, match="110 tokens"):
        load_model(out)


def test_build_model_heads():
    assert isinstance(build_model(CFG), CrammedBertForMLM)
    assert build_model(CFG, "classification", 2).classifier.out_features == 2
    with pytest.raises(ConfigError):
        build_model(CFG, "classification")
    with pytest.raises(ConfigError, match="mlm, classification"):
        build_model(CFG, "qa")
