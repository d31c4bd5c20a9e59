"""`cram glue` on any transformers checkpoint: a BERT (WordPiece, segment ids) and a RoBERTa (byte-level
BPE, <s> a </s></s> b </s>) built and saved here, each with its own tokenizer trained offline on the
shipped task subsets; hub ids through the hub's cache; the errors a user meets before training."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cramming import runs
from cramming.cli import main as cram_main
from cramming.errors import CrammingError
from cramming.fileio import sha256_file
from cramming.glue import GlueConfig
from cramming.glue import finetune as F
from cramming.glue import parallel as P
from cramming.glue.batching import Collate
from cramming.glue.encoding import encode_with_template
from cramming.glue.sources import resolve_source
from cramming.glue.tasks import Split
from cramming.gpu import GpuProfile
from cramming.report import write_glue_tables

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = REPO / "cramming" / "assets" / "glue_demo"
CPU = GpuProfile()
QUICK = ["glue.epochs=1", "glue.max_train_examples=32", "glue.max_eval_examples=16", "glue.max_seq_len=64"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _texts() -> list[str]:
    lines = []
    for name in ("RTE/train.tsv", "STS-B/train.tsv"):
        rows = (GLUE_DIR / name).read_text(encoding="utf-8").splitlines()[1:400]
        lines += [text for row in rows for text in row.split("\t")[-3:-1]]
    return lines


def _bert_tokenizer(lines: list[str], vocab_size: int):
    """A lowercasing WordPiece tokenizer with BERT's template: [CLS] a [SEP] b [SEP], segment ids 0/1."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(lines, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return transformers.BertTokenizer(tokenizer_object=tok, model_max_length=128)


def _roberta_tokenizer(lines: list[str], vocab_size: int):
    """A byte-level BPE with RoBERTa's template: <s> a </s></s> b </s>, no segment ids, limit 64 tokens."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer, processors

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = processors.RobertaProcessing(("</s>", bpe.token_to_id("</s>")),
                                                                 ("<s>", bpe.token_to_id("<s>")))
    return transformers.RobertaTokenizer(tokenizer_object=bpe._tokenizer, model_max_length=64, bos_token="<s>",
                                         eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                         pad_token="<pad>", mask_token="<mask>")


def save_checkpoint(folder: Path, family: str, **config: object) -> Path:
    """A tiny pretrained-style checkpoint (masked-LM weights, random, seed 0) and its own tokenizer, saved
    with save_pretrained as a user's checkpoint is."""
    import transformers

    lines = _texts()
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, **config}
    torch.manual_seed(0)
    if family == "bert":
        tokenizer = _bert_tokenizer(lines, 300)
        model = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=len(tokenizer), max_position_embeddings=128,
                                                                     **shape))
    else:  # RoBERTa's positions start after the padding index: 64 tokens take 66 rows
        tokenizer = _roberta_tokenizer(lines, 400)
        model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
            vocab_size=len(tokenizer), max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {family: save_checkpoint(root / family, family) for family in ("bert", "roberta")}


def cram_glue(tmp: Path, *overrides: str, monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    try:
        cram_main(["glue", f"paths.out_root={tmp}", "gpu=cpu", *overrides])
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def _source(ckpt: str | Path, **glue: object):
    gcfg = GlueConfig(tasks=["rte"], data_dir=str(GLUE_DIR), max_seq_len=glue.pop("max_seq_len", 64), **glue)
    return resolve_source(OmegaConf.create({"ckpt": str(ckpt)}), gcfg)


# ---------------------------------------------------------------------------------------------
# Finetuning
# ---------------------------------------------------------------------------------------------

FAMILIES = {
    # family: (classifier, pair format, single format, segment ids, the protocol it runs under)
    "bert": ("BertForSequenceClassification", "[CLS] A [SEP] B [SEP]", "[CLS] A [SEP]", True, "bert-original"),
    "roberta": ("RobertaForSequenceClassification", "<s> A </s> </s> B </s>", "<s> A </s>", False, "cramming"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_checkpoint_end_to_end(checkpoints, tmp_path, monkeypatch, family):
    """RTE (classification) and STS-B (a regression head) on a checkpoint saved with save_pretrained,
    with its own tokenizer; results.json records what was finetuned; the classifiers export."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    architecture, pair, single, segments, protocol = FAMILIES[family]
    ckpt = checkpoints[family]
    args = [f"ckpt={ckpt}", f"glue={protocol}", "glue.tasks=[rte,stsb]", f"glue.data_dir={GLUE_DIR}", "glue.trials=2",
            "glue.export_finetuned=true", f"run_name={family}", *QUICK]
    assert cram_glue(tmp_path, *args, monkeypatch=monkeypatch) == 0
    run = tmp_path / "glue" / family
    res = runs.read_glue_results(run)
    assert res.status == "complete" and res.config["name"] == protocol
    model = res.checkpoint
    assert (model.path, model.kind, model.format, model.origin, model.revision) == (str(ckpt), "checkpoint", "transformers",
                                                                                 "local", None)
    assert model.sha256 == sha256_file(ckpt / "model.safetensors") == model.weights["model.safetensors"]
    assert (model.model_type, model.architecture, model.remote_code) == (family, architecture, False)
    probe = AutoModelForSequenceClassification.from_pretrained(ckpt, num_labels=2)
    assert model.parameters == sum(p.numel() for p in probe.parameters())
    assert model.max_length == (128 if family == "bert" else 64)
    tok = res.tokenizer
    assert (tok.pair_format, tok.single_format, tok.token_type_ids, tok.max_length) == (pair, single, segments, 64)
    assert tok.vocab_size == len(AutoTokenizer.from_pretrained(ckpt)) and tok.sha256 == sha256_file(ckpt / "tokenizer.json")
    assert res.run.transformers and [t.seed for t in res.tasks["stsb"].trials] == [0, 1]
    assert set(res.tasks["stsb"].median) == {"pearson", "spearman"} and set(res.tasks["rte"].median) == {"accuracy"}
    assert all(math.isfinite(e.train_loss) for task in res.tasks.values() for t in task.trials for e in t.epochs)
    for task, labels in (("rte", {0: "entailment", 1: "not_entailment"}), ("stsb", None)):
        exported = AutoModelForSequenceClassification.from_pretrained(run / "finetuned" / task)
        assert type(exported).__name__ == architecture and exported.config.finetuned_task == task
        assert exported.config.num_labels == (1 if labels is None else 2)
        assert labels is None or exported.config.id2label == labels
        assert AutoTokenizer.from_pretrained(run / "finetuned" / task)("a", "b")["input_ids"] == \
            AutoTokenizer.from_pretrained(ckpt)("a", "b")["input_ids"]
    md = write_glue_tables(run).read_text()
    assert f"- model: transformers {family} ({architecture}), {model.parameters:,} parameters" in md
    assert f"a pair reads `{pair}`" in md


@pytest.mark.parametrize("family", FAMILIES)
def test_side_by_side_trials_of_a_transformers_model_equal_sequential_ones(tmp_path, family):
    """The stacked step (vmap) runs transformers models too; without dropout each stacked trial is its
    sequential run, segment ids included, and its exported copy has the model's own attention back."""
    zero = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    source = _source(save_checkpoint(tmp_path / family, family, **zero))
    gcfg = GlueConfig(tasks=["rte"], data_dir=str(GLUE_DIR), max_train_examples=40, max_eval_examples=32, epochs=2,
                      max_seq_len=64)
    (data, _), = F.load_all_tasks(gcfg)
    train, dev = F.encode_task(source, data, gcfg)
    assert (train.token_type_ids is not None) == (family == "bert")
    seeds = [0, 1]
    sequential = [F.finetune_trial(source, data.spec, train, dev, gcfg, s, CPU, f"seq {s}") for s in seeds]
    group = P.finetune_side_by_side(lambda: source.make_model(2, 0.0), source.pad_id, data.spec, train, dev, gcfg, seeds,
                                    CPU, ["a", "b"])
    assert group is not None
    for i, ((trial, model), stacked) in enumerate(zip(sequential, group.trials, strict=True)):
        assert stacked.mode == "side-by-side" and stacked.train_steps == trial.train_steps == 6
        assert [e.train_loss for e in stacked.epochs] == pytest.approx([e.train_loss for e in trial.epochs], rel=1e-5)
        for key, value in trial.final.items():
            assert stacked.final[key] == pytest.approx(value, abs=0.05), key
        alone = group.stack.module(i)
        assert alone.config._attn_implementation == "sdpa"
        mine = alone.state_dict()
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(mine[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_examples_are_encoded_in_the_model_own_format(checkpoints):
    bert, roberta = _source(checkpoints["bert"]), _source(checkpoints["roberta"])
    a, b = "the man said it", "a woman walks " * 40
    tok = roberta.tokenizer
    enc = roberta.encode(Split([a], [b], [0], "x"), 24)
    ids = enc.input_ids[0]
    a_ids = tok(a, add_special_tokens=False)["input_ids"]
    # <s> a </s></s> b </s>: the short text whole, the long one cut (longest first), 24 tokens in all.
    assert len(ids) == 24 and ids[: len(a_ids) + 3] == [tok.cls_token_id, *a_ids, tok.sep_token_id, tok.sep_token_id]
    assert ids[-1] == tok.sep_token_id and enc.token_type_ids is None
    assert roberta.encode(Split([a], ["b"], [0], "x"), 64).input_ids[0] == tok(a, "b")["input_ids"]
    types = bert.encode(Split([a], ["a dog"], [1], "x"), 64).token_type_ids[0]
    assert types == bert.tokenizer(a, "a dog")["token_type_ids"] and types[0] == 0 and types[-1] == 1
    # Segment ids reach the model's inputs (padded with 0) only for models that read them.
    for source, keys in ((bert, {"input_ids", "attention_mask", "token_type_ids", "labels"}),
                         (roberta, {"input_ids", "attention_mask", "labels"})):
        enc = source.encode(Split([a, "x"], ["y", b], [0, 1], "x"), 32)
        batch = next(iter(enc.loader(2, Collate(source.pad_id, False), False, 0, 0)))
        assert set(batch) == keys and batch["input_ids"][0, -1] == source.pad_id
    assert encode_with_template(roberta.tokenizer, Split([a], None, [0], "x"), 5).input_ids[0] == \
        [tok.cls_token_id, *a_ids[:3], tok.sep_token_id]


# ---------------------------------------------------------------------------------------------
# Errors before any training
# ---------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_errors_name_what_is_wrong_before_training(checkpoints, tmp_path):
    import transformers

    bert = checkpoints["bert"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    with pytest.raises(CrammingError, match="is not a model folder: it has no config.json"):
        _source(tmp_path / "notes")

    # A causal LM whose family has no sequence-classification head in transformers (CodeGen).
    torch.manual_seed(0)
    transformers.CodeGenForCausalLM(transformers.CodeGenConfig(
        vocab_size=300, n_embd=32, n_layer=1, n_head=2, rotary_dim=8, n_positions=64)).save_pretrained(tmp_path / "lm")
    with pytest.raises(CrammingError, match="has no sequence-classification model in transformers.*CodeGenConfig"):
        _source(tmp_path / "lm")

    bigger = _copy(bert, tmp_path / "bigger_vocab")
    _bert_tokenizer(_texts(), 500).save_pretrained(bigger)
    with pytest.raises(CrammingError, match=r"tokenizer has \d+ tokens but the model's embedding table has \d+ rows"):
        _source(bigger)

    no_tokenizer = _copy(bert, tmp_path / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(CrammingError, match="has no tokenizer"):
        _source(no_tokenizer)

    remote = _copy(bert, tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="my-bert", auto_map={"AutoConfig": "modeling_my.MyConfig"})
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(CrammingError, match="glue.trust_remote_code=true"):
        _source(remote)

    with pytest.raises(CrammingError, match=r"glue.max_seq_len=128 exceeds the model's max_seq_len=64.*glue.max_seq_len=64"):
        _source(checkpoints["roberta"], max_seq_len=128)
    with pytest.raises(CrammingError, match="glue.revision is for a hub id"):
        _source(bert, revision="main")
    unpadded = GlueConfig(tasks=["rte"], data_dir=str(GLUE_DIR), max_seq_len=64, unpadded=True)
    with pytest.raises(CrammingError, match="only crammed models have an unpadded path.*leave glue.unpadded at null"):
        F.run_glue(unpadded, _source(bert), tmp_path, GpuProfile())


def test_cli_refuses_a_folder_that_is_not_a_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    code = cram_glue(tmp_path, f"ckpt={tmp_path / 'empty'}", "glue.tasks=[rte]", f"glue.data_dir={GLUE_DIR}", *QUICK,
                     monkeypatch=monkeypatch)
    assert code == 2 and "is not a model folder" in capsys.readouterr().err
    assert not list(tmp_path.glob(f"glue/*/{runs.RESULTS_FILE}"))


# ---------------------------------------------------------------------------------------------
# Hub ids, through the hub's cache
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache of this test, with the network switched off as HF_HUB_OFFLINE=1 does."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_offline_and_not_cached_names_the_cache(offline_hub):
    with pytest.raises(CrammingError) as err:
        _source("tiny-org/not-cached")
    message = str(err.value)
    assert "not in the hub cache" in message and str(offline_hub) in message and "HF_HUB_OFFLINE" in message


def test_hub_id_is_read_from_the_hub_cache(checkpoints, offline_hub):
    """A hub id whose files are in the cache (as a download left them) loads offline; results record
    the id and the commit the cache resolved `main` to."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--tiny-org--roberta"
    shutil.copytree(checkpoints["roberta"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    source = _source("tiny-org/roberta")
    record = source.record
    assert (record.path, record.origin, record.revision, record.format) == ("tiny-org/roberta", "hub", commit, "transformers")
    assert record.files == str(repo / "snapshots" / commit)
    assert record.sha256 == sha256_file(checkpoints["roberta"] / "model.safetensors")
    assert source.tokenizer_record.pair_format == "<s> A </s> </s> B </s>"
