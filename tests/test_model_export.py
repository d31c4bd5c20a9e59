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


pytestmark = pytest.mark.usefixtures("one_thread")


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


def _targets(ids: torch.Tensor, fraction: float = 0.3) -> torch.Tensor:
    """Labels [B, L]: the token id at about `fraction` of the positions (at least one per row), -100 elsewhere."""
    g = torch.Generator().manual_seed(1)
    chosen = torch.rand(ids.shape, generator=g) < fraction
    chosen[:, 1] = True
    return torch.where(chosen, ids, torch.full_like(ids, -100))


def test_sparse_training_matches_dense_loss_and_gradients(exported):
    from transformers import AutoModelForMaskedLM

    _, out = exported
    sparse = AutoModelForMaskedLM.from_pretrained(out).train()
    dense = AutoModelForMaskedLM.from_pretrained(out, sparse_prediction=False).train()
    assert sparse.config.sparse_prediction and not dense.config.sparse_prediction
    ids = torch.randint(5, CFG.vocab_size, (3, 16))
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0  # a padded row: pads are never targets
    labels = _targets(ids).masked_fill(mask == 0, -100)
    labels[1, 8:] = -100  # rows with different numbers of targets, as the collator makes them
    got, want = sparse(input_ids=ids, attention_mask=mask, labels=labels), dense(input_ids=ids, attention_mask=mask, labels=labels)
    targets = labels != -100
    assert got.logits.shape == (int(targets.sum()), CFG.vocab_size) and want.logits.shape == (3, 16, CFG.vocab_size)
    torch.testing.assert_close(got.logits, want.logits[targets])
    torch.testing.assert_close(got.loss, want.loss)
    got.loss.backward()
    want.loss.backward()
    grads = dict(dense.named_parameters())
    for name, param in sparse.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, msg=name)
    # Trainer's gradient accumulation passes the step's target count: sum over this batch / that count.
    halved = sparse(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=2 * int(targets.sum())).loss
    torch.testing.assert_close(halved, got.loss / 2)
    # Eval mode keeps dense logits (aligned with labels for compute_metrics) and the same loss.
    with torch.no_grad():
        evaluated = sparse.eval()(input_ids=ids, attention_mask=mask, labels=labels)
    assert evaluated.logits.shape == (3, 16, CFG.vocab_size)
    torch.testing.assert_close(evaluated.loss, want.loss.detach())


def test_config_without_sparse_field_loads_sparse_and_hf_save_round_trips(exported, tmp_path):
    from transformers import AutoModelForMaskedLM

    _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["sparse_prediction"] is True
    del config["sparse_prediction"]  # as written before the field existed
    (out / "config.json").write_text(json.dumps(config))
    hf = AutoModelForMaskedLM.from_pretrained(out).train()
    ids = torch.randint(5, CFG.vocab_size, (2, 12))
    labels = _targets(ids)
    assert hf.config.sparse_prediction and hf(input_ids=ids, labels=labels).logits.dim() == 2
    hf.save_pretrained(tmp_path / "hf")  # transformers' own save, as Trainer checkpoints use
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["sparse_prediction"] is True
    again = load_model(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(again(ids)["logits"], hf.eval()(input_ids=ids).logits)


SENTENCES = [
    "the cat sat on the mat and she was at the door",
    "he was in the garden with his dog as it rained",
    "she said that it was a good day for a walk",
    "the man and the woman went to the market by the sea",
    "it is the end of the day and he is at home",
    "her book was on the table with a cup of tea",
    "a bird sang in the tree by the house at dawn",
    "that is the way to the station on the left",
]


def test_trainer_continues_pretraining_on_the_sparse_path(exported, tmp_path):
    """`transformers.Trainer` + `DataCollatorForLanguageModeling` on an export: the loss falls, the
    head sees only the masked rows in training, and the result saves, reloads and fills masks."""
    from transformers import (
        AutoModelForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        pipeline,
    )

    _, out = exported
    tokenizer = load_tokenizer(out)
    model = AutoModelForMaskedLM.from_pretrained(out)
    head_inputs: list[int] = []
    model.head.register_forward_hook(lambda module, args, output: head_inputs.append(args[0].dim()))
    rows = [tokenizer(s, truncation=True, max_length=CFG.max_seq_len) for s in SENTENCES] * 8  # fewer epoch ends
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=20, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, losses  # the first steps are at chance, ln(120) = 4.79
    assert head_inputs and set(head_inputs) == {2}  # [N, H] rows only: the sparse path
    trainer.save_model(str(tmp_path / "continued"))
    reloaded = load_model(tmp_path / "continued")
    with torch.no_grad():
        ids = torch.tensor([tokenizer(SENTENCES[0])["input_ids"]])
        torch.testing.assert_close(reloaded(ids)["logits"], model.eval()(input_ids=ids).logits)
    fill = pipeline("fill-mask", model=str(tmp_path / "continued"))
    preds = fill("the cat sat on the [MASK]", top_k=2)
    assert len(preds) == 2 and all(0 <= p["score"] <= 1 for p in preds)


def _train_with_accumulation(
    out: Path, head: str, rows: list[dict], batch: int, accumulation: int, tmp_path: Path
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Two SGD steps of `transformers.Trainer` on an export; returns (logged losses, final parameters).

    Every optimizer step sees all 16 rows (one epoch), so the sampler's order cannot change the
    step's gradient; SGD without clipping keeps a wrong loss scale visible in the weights (Adam
    would normalise it away).
    """
    from transformers import (
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        Trainer,
        TrainingArguments,
    )

    auto = AutoModelForSequenceClassification if head == "classification" else AutoModelForMaskedLM
    model = auto.from_pretrained(out)
    args = TrainingArguments(
        output_dir=str(tmp_path / f"ga{accumulation}"), max_steps=2, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
        lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("head", ["classification", "mlm"])
def test_trainer_gradient_accumulation_matches_one_large_batch(head, tmp_path):
    """4 micro-batches of 4 accumulated = one batch of 16: same logged losses, same weights.

    The classifier's loss is a mean per batch, so Trainer must divide it by the accumulation steps
    itself; the MLM loss uses Trainer's target count (rows here hold different numbers of targets).
    """
    torch.manual_seed(0)
    model = build_model(CFG, head, num_labels=3)
    out = save_pretrained(model, tmp_path / head, make_tokenizer(tmp_path / "tok.json", CFG.vocab_size))
    ids = torch.randint(5, CFG.vocab_size, (16, 12))
    labels = torch.randint(0, 3, (16,)) if head == "classification" else _targets(ids)
    if head == "mlm":
        labels[::3, 4:] = -100  # fewer targets in some rows
    rows = [{"input_ids": row.tolist(), "attention_mask": [1] * 12, "labels": label.tolist()}
            for row, label in zip(ids, labels, strict=True)]
    accumulated = _train_with_accumulation(out, head, rows, batch=4, accumulation=4, tmp_path=tmp_path)
    single = _train_with_accumulation(out, head, rows, batch=16, accumulation=1, tmp_path=tmp_path)
    assert len(single[0]) == 2
    torch.testing.assert_close(torch.tensor(accumulated[0]), torch.tensor(single[0]), rtol=0, atol=1e-5)
    for name, param in single[1].items():
        torch.testing.assert_close(accumulated[1][name], param, rtol=0, atol=1e-5, msg=name)
