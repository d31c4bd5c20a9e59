"""The model `cram glue` finetunes, its tokenizer, and the records the results file keeps of both.

`ckpt=` names one of three kinds of source, each resolved into one `Source`:

- a crammed export (`cram pretrain`'s <run>/final: config.json's model_type is crammed-bert), loaded
  by `cramming.model.export` and encoded [CLS] a [SEP] b [SEP] by hand (its tokenizer has no
  template); glue.dropout applies, as pretraining ran without dropout;
- any other checkpoint that transformers' AutoModelForSequenceClassification loads, a local folder
  or a hub id (`ckpt=bert-base-uncased`, fetched through the hub's cache and read from there): its
  own tokenizer (AutoTokenizer), special tokens, pair format, segment ids, dropout and length limit.
  Its modelling code runs only with glue.trust_remote_code=true; weights are read from safetensors
  files only, never from pickles;
- `random-init`: the `arch` group's crammed model with random weights (the paper's lower bound), with
  the vocabulary of `glue.tokenizer`.

Every check happens here, before any data is read: a folder that is not a model, a model without
a sequence-classification head, a tokenizer that does not fit the model's embeddings, a length
beyond the model's limit. Each classifier is built once for that (and to count its parameters).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from cramming.config import to_dataclass
from cramming.errors import CheckpointError, ConfigError
from cramming.fileio import sha256_file
from cramming.glue import GlueConfig
from cramming.glue.encoding import (
    Encoded,
    Encoder,
    encode_with_cls_sep,
    encode_with_template,
    example_formats,
)
from cramming.glue.tasks import Split, TaskSpec
from cramming.runs import FinetunedModel, TokenizerRecord

log = logging.getLogger(__name__)

RANDOM_INIT = "random-init"
CRAMMED = "crammed-bert"
# A hub model id: `name` or `owner/name` (a path that does not exist, e.g. /x/y or a/b/c, is not one).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# What a hub checkpoint needs: config, safetensors weights, tokenizer files (vocabularies, merges,
# sentencepiece models); pickled weights and other frameworks' files stay on the hub.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]
# A folder without any of these has no tokenizer of its own (AutoTokenizer would make an empty one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")

ExportFn = Callable[[nn.Module, Path, dict[str, Any]], None]


@dataclass
class Source:
    """The model to finetune with its tokenizer, and the records the results file keeps of them."""

    record: FinetunedModel
    tokenizer: Any
    """A transformers tokenizer."""
    tokenizer_record: TokenizerRecord
    encoder: Encoder
    make_model: Callable[[int, float], nn.Module]
    """(num_labels, dropout) -> a fresh classifier (glue.dropout applies to crammed models only)."""
    export_fn: ExportFn
    """(finetuned classifier, folder, task's config keys) -> an exported folder its loader reads back."""

    @property
    def path(self) -> str:
        return self.record.path

    @property
    def sha256(self) -> str:
        return self.record.sha256

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def encode(self, split: Split, max_len: int) -> Encoded:
        return self.encoder(split, max_len)

    def export(self, model: nn.Module, spec: TaskSpec, out: Path, seed: int) -> None:
        """Write the finetuned classifier of `spec` to `out`, with the labels it predicts."""
        extra = {
            "finetuned_task": spec.name, "problem_type": "regression" if spec.kind == "regression" else "single_label_classification",
            "num_labels": spec.num_labels, "id2label": {str(i): v for i, v in enumerate(spec.labels)},
            "label2id": {v: i for i, v in enumerate(spec.labels)}, "finetune_seed": seed, "base_checkpoint": self.path,
        }
        self.export_fn(model.cpu(), out, extra)
        log.info("exported the finetuned %s classifier to %s", spec.name, out)


def resolve_source(cfg: DictConfig, gcfg: GlueConfig) -> Source:
    """Find, load and check the model and its tokenizer (or build the random-init recipe) before any
    data is read or trained on."""
    ckpt = cfg.get("ckpt")
    if ckpt in (None, ""):
        raise ConfigError(
            "ckpt is required: cram glue ckpt=outputs/pretrain/<run>/final, a transformers checkpoint (a folder "
            "or a hub id such as ckpt=bert-base-uncased), or ckpt=random-init glue.tokenizer=<tokenizer.json> "
            "for the untrained baseline"
        )
    ckpt = str(ckpt)
    if ckpt == RANDOM_INIT:
        return _random_init_source(cfg, gcfg)
    if gcfg.tokenizer is not None:
        raise ConfigError("glue.tokenizer is only for ckpt=random-init; a checkpoint is always finetuned with its own tokenizer")
    folder, origin, revision = _locate(ckpt, gcfg)
    if _model_type(ckpt, folder) == CRAMMED:
        return _crammed_source(ckpt, folder, gcfg)
    return _transformers_source(ckpt, folder, gcfg, origin, revision)


# ---------------------------------------------------------------------------------------------
# Where the files are
# ---------------------------------------------------------------------------------------------


def _locate(ckpt: str, gcfg: GlueConfig) -> tuple[Path, str, str | None]:
    """(folder holding the files, 'local' or 'hub', hub commit) of `ckpt`."""
    folder = Path(ckpt).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise CheckpointError(f"ckpt={ckpt} is not a folder; give an exported model folder (e.g. "
                                  "outputs/pretrain/<run>/final) or a transformers checkpoint's folder")
        if gcfg.revision is not None:
            raise ConfigError(f"glue.revision is for a hub id; ckpt={ckpt} is a local folder")
        return folder, "local", None
    if not HUB_ID.fullmatch(ckpt):
        raise CheckpointError(f"ckpt={ckpt} is not a folder; give an exported model folder (e.g. "
                              "outputs/pretrain/<run>/final) or a hub model id (e.g. bert-base-uncased)")
    snapshot = _hub_snapshot(ckpt, gcfg)
    return snapshot, "hub", snapshot.name  # the cache names a snapshot folder by its commit


def _hub_snapshot(repo_id: str, gcfg: GlueConfig) -> Path:
    """The hub checkpoint's files in the hub cache (downloaded there first unless they are cached)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = constants.HF_HUB_OFFLINE
    patterns = HUB_FILES + (["*.py"] if gcfg.trust_remote_code else [])
    try:
        return Path(snapshot_download(repo_id, revision=gcfg.revision, allow_patterns=patterns, local_files_only=offline))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1 is set" if offline else "the hub cannot be reached"
        raise CheckpointError(
            f"ckpt={repo_id}: no local folder of that name, and the hub model {repo_id}"
            f"{'@' + gcfg.revision if gcfg.revision else ''} is not in the hub cache ({constants.HF_HUB_CACHE}) "
            f"while {why}. Fetch it once with the network on (unset HF_HUB_OFFLINE; e.g. `hf download {repo_id}`), "
            "point HF_HOME or HF_HUB_CACHE at a cache that holds it, or pass a local folder"
        ) from None
    except RepositoryNotFoundError as err:
        raise CheckpointError(f"ckpt={repo_id}: no such model on the hub, or it is gated or private "
                              f"(log in with `hf auth login`): {str(err).splitlines()[0]}") from None
    except HfHubHTTPError as err:  # e.g. an unknown glue.revision
        raise CheckpointError(f"ckpt={repo_id}: the hub refused it: {str(err).splitlines()[0]}") from None


def _model_type(ckpt: str, folder: Path) -> str | None:
    """config.json's model_type; a folder without a readable config.json is not a model."""
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"ckpt={ckpt} is not a model folder: it has no config.json (an export of cram "
                              "pretrain and a transformers checkpoint both have one)")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"ckpt={ckpt}: config.json is unreadable ({err})") from None
    return config.get("model_type") if isinstance(config, dict) else None


def _weights_identity(weights: dict[str, str]) -> str:
    """One file: its sha256 (what `sha256sum` prints); several shards: sha256 of their names and checksums."""
    if len(weights) == 1:
        return next(iter(weights.values()))
    return hashlib.sha256("".join(f"{n} {h}\n" for n, h in sorted(weights.items())).encode()).hexdigest()


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tokenizer_record(tokenizer: Any, encoder: Encoder, name: str, file: Path | None, gcfg: GlueConfig,
                      where: str) -> TokenizerRecord:
    """The tokenizer's record, after checking that it marks the texts of a pair with special tokens."""
    single, pair = example_formats(encoder, tokenizer)
    if pair.split() == ["A"]:  # nothing but text: no template to build the model's inputs with
        raise CheckpointError(f"{where}: the tokenizer adds no special tokens around a sentence pair (it has no "
                              "post-processor template), so the model could not tell the two texts apart")
    return TokenizerRecord(name, type(tokenizer).__name__, len(tokenizer), pair, single, gcfg.max_seq_len,
                           "token_type_ids" in tokenizer.model_input_names,
                           sha256_file(file) if file is not None and file.is_file() else None)


def _check_length(model_max_len: int | None, gcfg: GlueConfig, where: str) -> None:
    if model_max_len is not None and gcfg.max_seq_len > model_max_len:
        raise ConfigError(
            f"glue.max_seq_len={gcfg.max_seq_len} exceeds the model's max_seq_len={model_max_len} ({where}); "
            f"pass glue.max_seq_len={model_max_len}"
        )


# ---------------------------------------------------------------------------------------------
# Crammed exports and the random-init baseline (cramming.model)
# ---------------------------------------------------------------------------------------------


def _check_crammed_tokenizer(tokenizer: Any, where: str) -> None:
    vocab = tokenizer.get_vocab()
    missing = [t for t in ("[PAD]", "[CLS]", "[SEP]") if t not in vocab]
    if missing:
        raise CheckpointError(f"{where}: the tokenizer lacks the special token(s) {missing} needed to encode GLUE inputs")


def _crammed_source(ckpt: str, folder: Path, gcfg: GlueConfig) -> Source:
    """An export of `cram pretrain`: cramming's own loader, the tokenizer.json saved with it."""
    needed = ("model.safetensors", "config.json", "tokenizer.json")
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(
            f"ckpt={ckpt} lacks {', '.join(missing)}; an exported model folder holds {', '.join(needed)} "
            "(written by cram pretrain into <run>/final)"
        )
    from cramming.model import export

    tokenizer = export.load_tokenizer(folder)
    where = f"ckpt={ckpt}"
    _check_crammed_tokenizer(tokenizer, where)
    config = json.loads((folder / "config.json").read_text())
    if "vocab_size" in config and len(tokenizer) != int(config["vocab_size"]):
        raise CheckpointError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {config['vocab_size']}; "
            "the tokenizer does not belong to this checkpoint (re-export it with its own tokenizer.json)"
        )
    _check_length(config.get("max_seq_len"), gcfg, where)

    def make_model(num_labels: int, dropout: float) -> nn.Module:
        return export.load_model(folder, head="classification", num_labels=num_labels, dropout=dropout)

    probe = make_model(2, gcfg.dropout)
    weights = {"model.safetensors": sha256_file(folder / "model.safetensors")}
    record = FinetunedModel(ckpt, "checkpoint", _weights_identity(weights), CRAMMED, "local", None, str(folder), weights,
                            CRAMMED, type(probe).__name__, _parameters(probe), config.get("max_seq_len"))
    return _crammed(record, tokenizer, folder / "tokenizer.json", make_model, gcfg, where)


def _crammed(record: FinetunedModel, tokenizer: Any, tokenizer_file: Path, make_model: Callable[[int, float], nn.Module],
             gcfg: GlueConfig, where: str) -> Source:
    """A source of the crammed model: encoded by hand, exported by cramming.model.export."""
    from cramming.model import export

    encoder = functools.partial(encode_with_cls_sep, tokenizer)

    def export_fn(model: nn.Module, out: Path, extra: dict[str, Any]) -> None:
        export.save_pretrained(model, out, tokenizer_file, extra_config=extra)

    tokenizer_record = _tokenizer_record(tokenizer, encoder, str(tokenizer_file), tokenizer_file, gcfg, where)
    return Source(record, tokenizer, tokenizer_record, encoder, make_model, export_fn)


def _locate_tokenizer_file(path: str) -> Path:
    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"glue.tokenizer={path}: no tokenizer.json there (give the file or a folder holding it)")
    return file


def _random_init_source(cfg: DictConfig, gcfg: GlueConfig) -> Source:
    if gcfg.tokenizer is None:
        raise ConfigError(
            "ckpt=random-init needs glue.tokenizer=<tokenizer.json, or a folder holding one such as a prepared "
            "data folder or an exported checkpoint>: the untrained model still needs a vocabulary"
        )
    from cramming.model import bert, export

    file = _locate_tokenizer_file(gcfg.tokenizer)
    tokenizer = export.load_tokenizer(file)
    where = f"glue.tokenizer={gcfg.tokenizer}"
    _check_crammed_tokenizer(tokenizer, where)
    arch = to_dataclass(bert.ModelConfig, cfg.arch, "arch")
    # The baseline's embedding table is sized to the tokenizer it will read.
    arch = dataclasses.replace(arch, vocab_size=len(tokenizer), pad_token_id=int(tokenizer.convert_tokens_to_ids("[PAD]")))
    _check_length(arch.max_seq_len, gcfg, "arch")
    identity = {"arch": dataclasses.asdict(arch), "tokenizer": sha256_file(file)}

    def make_model(num_labels: int, dropout: float) -> nn.Module:
        return export.build_model(dataclasses.replace(arch, dropout=dropout), head="classification", num_labels=num_labels)

    sha = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    probe = make_model(2, gcfg.dropout)
    record = FinetunedModel(RANDOM_INIT, RANDOM_INIT, sha, RANDOM_INIT, model_type=CRAMMED,
                            architecture=type(probe).__name__, parameters=_parameters(probe), max_length=arch.max_seq_len)
    return _crammed(record, tokenizer, file, make_model, gcfg, where)


# ---------------------------------------------------------------------------------------------
# Any transformers checkpoint
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' loading report and progress bars off: the first load shows them, each trial's
    reload would repeat them."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _hf_config(ckpt: str, folder: Path, gcfg: GlueConfig) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=gcfg.trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise CheckpointError(f"ckpt={ckpt} needs its own modelling code (config.json's auto_map), which runs "
                                  "only when asked: pass glue.trust_remote_code=true if you trust it") from None
        raise CheckpointError(f"ckpt={ckpt}: transformers cannot read its config.json: {str(err).splitlines()[0]}") from None


def _hf_classifier(ckpt: str, folder: Path, gcfg: GlueConfig, num_labels: int) -> nn.Module:
    """The checkpoint with a fresh head of `num_labels` outputs (1: regression), in fp32 (autocast
    makes the low-precision copies), with the checkpoint's own dropout."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=num_labels, dtype=torch.float32, use_safetensors=True,
            ignore_mismatched_sizes=True,  # a finetuned checkpoint's head of another size is replaced
            # Hub kernels would swap layers for code fetched from the hub whenever the mode changes, and
            # cannot swap those of a stacked model's meta-device structure; the torch layers are the reference.
            use_kernels=False, trust_remote_code=gcfg.trust_remote_code)
    except ValueError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"ckpt={ckpt} has no sequence-classification model in transformers "
                              f"(AutoModelForSequenceClassification refuses it: {first})") from None
    except OSError as err:  # e.g. no safetensors weights
        raise CheckpointError(f"ckpt={ckpt}: the weights cannot be loaded: {str(err).splitlines()[0]} "
                              "(safetensors files only; pickled weights are not read)") from None


def _hf_tokenizer(ckpt: str, folder: Path, gcfg: GlueConfig) -> Any:
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"ckpt={ckpt} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); a checkpoint is "
                              "finetuned with its own: save it beside the model (tokenizer.save_pretrained(folder))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=gcfg.trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"ckpt={ckpt}: its tokenizer cannot be loaded: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        raise CheckpointError(f"ckpt={ckpt}: its tokenizer has no padding token, so examples of different lengths "
                              "cannot share a batch; give it one (tokenizer.pad_token = ...) and save it again")
    return tokenizer


def _hf_max_length(config: Any, tokenizer: Any) -> int | None:
    """The model's own limit: the tokenizer's model_max_length (transformers' 'no limit' is ~1e30) and
    the position table's size, whichever is smaller; None when neither says."""
    limits = [n for n in (getattr(tokenizer, "model_max_length", None), getattr(config, "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else None


def _transformers_source(ckpt: str, folder: Path, gcfg: GlueConfig, origin: str, revision: str | None) -> Source:
    where = f"ckpt={ckpt}"
    config = _hf_config(ckpt, folder, gcfg)
    probe = _hf_classifier(ckpt, folder, gcfg, 2)
    tokenizer = _hf_tokenizer(ckpt, folder, gcfg)
    rows = probe.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise CheckpointError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding table has "
                              f"{rows} rows; the tokenizer does not belong to this checkpoint")
    max_length = _hf_max_length(config, tokenizer)
    _check_length(max_length, gcfg, where)
    weights = {f.name: sha256_file(f) for f in sorted(folder.glob("*.safetensors"))}
    record = FinetunedModel(ckpt, "checkpoint", _weights_identity(weights), "transformers", origin, revision, str(folder),
                            weights, config.model_type, type(probe).__name__, _parameters(probe), max_length,
                            gcfg.trust_remote_code)
    encoder = functools.partial(encode_with_template, tokenizer)

    def make_model(num_labels: int, dropout: float) -> nn.Module:
        with _quiet_transformers():
            return _hf_classifier(ckpt, folder, gcfg, num_labels)

    def export_fn(model: nn.Module, out: Path, extra: dict[str, Any]) -> None:
        # transformers derives num_labels from id2label (keyed by int), so a regression task's empty
        # label maps stay out; written to a sibling and renamed, so `out` is whole or absent.
        labels = {"id2label": {int(i): v for i, v in extra["id2label"].items()}, "label2id": extra["label2id"]}
        model.config.update({k: v for k, v in extra.items() if k not in labels})
        if labels["id2label"]:
            model.config.update(labels)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)

    tokenizer_record = _tokenizer_record(tokenizer, encoder, ckpt, folder / "tokenizer.json", gcfg, where)
    return Source(record, tokenizer, tokenizer_record, encoder, make_model, export_fn)
