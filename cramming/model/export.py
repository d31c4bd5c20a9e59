"""Exported model folders: safetensors weights + transformers-style config + tokenizer.

A folder written by `save_pretrained` holds `model.safetensors`, `config.json`
(`model_type: crammed-bert`), `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`,
its model card `README.md` (cramming.card) and a two-line `modeling_crammed_bert.py` that re-exports
the classes below from the installed `cramming` package, so
`AutoModelForMaskedLM.from_pretrained(dir, trust_remote_code=True)` works.
Importing `cramming.model` also registers the classes with transformers' Auto* factories, so
`pipeline("fill-mask", model=dir)` works without remote code. Weights are read with safetensors
only, never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers import initialization as hf_init
from transformers.modeling_outputs import MaskedLMOutput, SequenceClassifierOutput

from cramming.card import CARD_NAME, render_card
from cramming.errors import CheckpointError, ConfigError
from cramming.model.bert import (
    CrammedBertForMLM,
    CrammedBertForSequenceClassification,
    Embeddings,
    MLMHead,
    ModelConfig,
    Rotary,
    sinusoid_table,
    target_rows,
)

MODEL_TYPE = "crammed-bert"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
MODELING_NAME = "modeling_crammed_bert.py"
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
HEADS = ("mlm", "classification")
# Parameters that belong to one head only; a checkpoint of the other head may carry them.
HEAD_PREFIXES = ("head.", "pooler.", "classifier.")
MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]

_MODELING_SHIM = '''"""Remote-code entry for transformers' Auto* classes; the model lives in the `cramming` package."""
from cramming.model.export import CrammedBertConfig, CrammedBertHFForMaskedLM, CrammedBertHFForSequenceClassification  # noqa: F401
'''


# ---------------------------------------------------------------------------------------------
# transformers integration
# ---------------------------------------------------------------------------------------------

# The transformers config mirrors ModelConfig field by field (v5 configs are dataclasses), so the
# two can never drift apart.
CrammedBertConfig = type(
    "CrammedBertConfig",
    (PreTrainedConfig,),
    {
        "__module__": __name__,
        "__doc__": "transformers view of `ModelConfig` (same fields and defaults).",
        "model_type": MODEL_TYPE,
        "__annotations__": {f.name: Any for f in dataclasses.fields(ModelConfig)},
        **{f.name: f.default for f in dataclasses.fields(ModelConfig)},
    },
)


def model_config_from(hf_config: Any) -> ModelConfig:
    return ModelConfig(**{k: getattr(hf_config, k) for k in MODEL_FIELDS if hasattr(hf_config, k)})


class CrammedBertPreTrainedModel(PreTrainedModel):
    """Shared plumbing: config class, weight init for parameters a checkpoint lacks."""

    config_class = CrammedBertConfig
    base_model_prefix = "bert"
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            hf_init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            hf_init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            hf_init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                hf_init.zeros_(module.bias)
        elif isinstance(module, MLMHead) and module.bias is not None:
            hf_init.zeros_(module.bias)
        elif isinstance(module, Embeddings) and hasattr(module, "sinusoid"):
            hf_init.copy_(module.sinusoid, sinusoid_table(*module.sinusoid.shape))
            if hasattr(module, "position_scale"):
                hf_init.constant_(module.position_scale, module.word_embeddings.embedding_dim**-0.5)
        elif isinstance(module, Rotary):
            fresh = Rotary(model_config_from(self.config))
            hf_init.copy_(module.cos, fresh.cos)
            hf_init.copy_(module.sin, fresh.sin)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions [B, K] holding each row's targets (labels != -100) first, in order; K = most targets in a row.

    Collators such as transformers' DataCollatorForLanguageModeling mask a varying number of
    tokens per row; rows with fewer targets are filled up with other positions, whose -100
    labels `target_rows` drops again.
    """
    is_target = (labels != -100).to(torch.int8)
    most = int(is_target.sum(dim=1).max())  # a host sync, as the boolean gather after it needs anyway
    return is_target.sort(dim=1, descending=True, stable=True).indices[:, :most]


class CrammedBertHFForMaskedLM(CrammedBertPreTrainedModel):
    """`CrammedBertForMLM` with transformers' loading, saving, pipelines and `Trainer`.

    `config.sparse_prediction` (on in the crammed recipe; configs exported before the field load
    with it on) follows transformers' ModernBERT: in training mode with labels, only the target
    positions (labels != -100) are computed by the last block and reach the head, and `logits` are
    [N, V] for the N targets of the batch, in row-major order, the same values as the dense logits
    at those positions. Without labels or in eval mode the logits are dense [B, L, V], so
    `fill-mask` and evaluation with `compute_metrics` (logits aligned with labels) see what they
    expect; the loss is the same either way.
    """

    # `Trainer` passes `num_items_in_batch` (the accumulated step's target count) only to models
    # that declare they take loss kwargs; this one divides by it, so Trainer must not divide again.
    # Declared here rather than through a catch-all `**kwargs`, which would hide mistyped inputs.
    accepts_loss_kwargs = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        core = CrammedBertForMLM(model_config_from(config))
        self.bert, self.head = core.bert, core.head  # same parameter names as the plain module
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.bert.embeddings.word_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> MaskedLMOutput:
        """input_ids [B, L]; labels [B, L] (-100 = not a target). Logits [N, V] (sparse) or [B, L, V].

        `num_items_in_batch` (passed by `Trainer` under gradient accumulation) turns the loss into
        the sum over this batch's targets divided by it, as transformers' own masked-LM loss does.
        """
        if labels is not None and self.training and self.config.sparse_prediction:
            # The plain model's fixed-positions path: the last block computes only these rows.
            positions = target_positions(labels)  # [B, K]
            hidden = self.bert(input_ids, attention_mask, output_positions=positions)  # [B, K, H]
            hidden, labels = target_rows(hidden, labels.gather(1, positions))  # [N, H], [N]
        else:
            hidden = self.bert(input_ids, attention_mask)  # [B, L, H]
        logits = self.head(hidden, self.bert.embeddings.word_embeddings.weight)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch)
        return MaskedLMOutput(loss=loss, logits=logits)


class CrammedBertHFForSequenceClassification(CrammedBertPreTrainedModel):
    """`CrammedBertForSequenceClassification` for transformers; `config.num_labels` outputs.

    The loss is a mean over the batch's rows (cross-entropy, or MSE for one label). `forward` has
    no `**kwargs` on purpose: `Trainer` reads a catch-all as "takes loss kwargs", then passes
    `num_items_in_batch` and skips its own division by the gradient accumulation steps, which
    this loss needs (transformers' regression and multi-label losses take no item count either).
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        core = CrammedBertForSequenceClassification(model_config_from(config), config.num_labels)
        self.bert, self.pooler, self.dropout, self.classifier = core.bert, core.pooler, core.dropout, core.classifier
        self.num_labels = config.num_labels
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        # The plain module's forward reads only bert/pooler/dropout/classifier/num_labels.
        out = CrammedBertForSequenceClassification.forward(self, input_ids, attention_mask, labels)  # type: ignore[arg-type]
        return SequenceClassifierOutput(loss=out["loss"], logits=out["logits"])


def register_with_transformers() -> None:
    """Make `AutoConfig`/`AutoModelForMaskedLM`/`AutoModelForSequenceClassification` know crammed-bert."""
    AutoConfig.register(MODEL_TYPE, CrammedBertConfig, exist_ok=True)
    AutoModelForMaskedLM.register(CrammedBertConfig, CrammedBertHFForMaskedLM, exist_ok=True)
    AutoModelForSequenceClassification.register(CrammedBertConfig, CrammedBertHFForSequenceClassification, exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _tokenizer_files(out: Path, tokenizer_file: Path, max_len: int) -> None:
    shutil.copyfile(tokenizer_file, out / TOKENIZER_NAME)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        # Packed pretraining used no token types; keep them out of the model inputs.
        "model_input_names": ["input_ids", "attention_mask"],
        **SPECIAL_TOKENS,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")


def save_pretrained(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer_file: str | os.PathLike, extra_config: dict | None = None
) -> Path:
    """Write an exported folder atomically (a temporary sibling folder, then a rename); returns it.

    `model` may be compiled or DDP-wrapped: the plain module's state dict is written, without
    `_orig_mod.` prefixes. `extra_config` adds keys to config.json (e.g. training summary), which the
    model card (README.md) renders.
    """
    module = unwrap(model)
    if not isinstance(module, (CrammedBertForMLM, CrammedBertForSequenceClassification)):
        raise TypeError(f"save_pretrained expects a crammed-bert model, got {type(module).__name__}")
    tokenizer_file = Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise CheckpointError(f"tokenizer file {tokenizer_file} does not exist; pass the prepared data's tokenizer.json")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k.replace("_orig_mod.", ""): v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}

    config: dict[str, Any] = {"model_type": MODEL_TYPE, **dataclasses.asdict(module.config)}
    if isinstance(module, CrammedBertForSequenceClassification):
        config["architectures"] = ["CrammedBertHFForSequenceClassification"]
        config["num_labels"] = module.num_labels
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(module.num_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(module.num_labels)}
    else:
        config["architectures"] = ["CrammedBertHFForMaskedLM"]
    config["auto_map"] = {
        "AutoConfig": "modeling_crammed_bert.CrammedBertConfig",
        "AutoModelForMaskedLM": "modeling_crammed_bert.CrammedBertHFForMaskedLM",
        "AutoModelForSequenceClassification": "modeling_crammed_bert.CrammedBertHFForSequenceClassification",
    }
    config["dtype"] = "float32"
    config.update(extra_config or {})

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
        _tokenizer_files(tmp, tokenizer_file, module.config.max_seq_len)
        (tmp / MODELING_NAME).write_text(_MODELING_SHIM)
        parameters = sum(p.numel() for p in module.parameters())
        (tmp / CARD_NAME).write_text(render_card(config, parameters, model_id=str(out)), encoding="utf-8")
        if out.exists():  # replace an older export: move it aside first so a crash leaves one intact
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of an exported folder, with a CheckpointError for a missing or corrupt one."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist; pass an exported folder (e.g. outputs/pretrain/<run>/final)")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {CONFIG_NAME}; it is not an exported crammed-bert folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / CONFIG_NAME} is corrupt ({err}); re-export the model") from None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{path / CONFIG_NAME} is not a {MODEL_TYPE} config (model_type={config.get('model_type')!r})")
    return config


def build_model(config: ModelConfig, head: str = "mlm", num_labels: int | None = None) -> nn.Module:
    """A randomly initialised model with the given head (`mlm` or `classification`)."""
    if head == "mlm":
        return CrammedBertForMLM(config)
    if head == "classification":
        if num_labels is None:
            raise ConfigError("head=classification needs num_labels (1 for regression)")
        return CrammedBertForSequenceClassification(config, num_labels)
    raise ConfigError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")


def load_model(
    model_dir: str | os.PathLike, head: str = "mlm", num_labels: int | None = None, **config_overrides: Any
) -> nn.Module:
    """Build the model described by `model_dir/config.json` and load its safetensors weights.

    With head=classification on a pretraining export, the encoder is loaded and the classifier is
    fresh; on a finetuned export, its classifier is loaded too (num_labels defaults to the saved
    one). `config_overrides` replace ModelConfig fields that do not change shapes (e.g. dropout=0.1,
    attention_backend). The model is returned in eval mode.
    """
    path = Path(model_dir)
    saved = read_config(path)
    unknown = sorted(set(config_overrides) - set(MODEL_FIELDS))
    if unknown:
        raise ConfigError(f"unknown model config override(s) {', '.join(unknown)}; valid: {', '.join(MODEL_FIELDS)}")
    try:
        config = ModelConfig(**{**{k: saved[k] for k in MODEL_FIELDS if k in saved}, **config_overrides})
    except TypeError as err:
        raise CheckpointError(f"{path / CONFIG_NAME} does not describe a crammed-bert model: {err}") from None
    if head == "classification" and num_labels is None:
        num_labels = saved.get("num_labels")
    _check_tokenizer_vocab(path, config.vocab_size)
    model = build_model(config, head, num_labels)

    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}; the export is incomplete")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is corrupt or unreadable ({err}); re-export the model") from None
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}

    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not (head == "classification" and k.startswith(HEAD_PREFIXES))]
    unexpected = [k for k in state if k not in expected and not k.startswith(HEAD_PREFIXES)]
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match config.json: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if mismatched:
        raise CheckpointError(f"{weights} has tensors of the wrong shape: {'; '.join(mismatched[:5])}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model.eval()


def _check_tokenizer_vocab(path: Path, vocab_size: int) -> None:
    file = path / TOKENIZER_NAME
    if not file.is_file():
        return
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(file)).get_vocab_size()
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise CheckpointError(f"{file} is corrupt ({err}); re-export the model") from None
    if size != vocab_size:
        raise CheckpointError(f"{file} has {size} tokens but config.json says vocab_size={vocab_size}; they must match")


def load_tokenizer(model_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The folder's tokenizer as a transformers fast tokenizer with [PAD] [UNK] [CLS] [SEP] [MASK]."""
    path = Path(model_dir)
    file = path / TOKENIZER_NAME if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{path} has no {TOKENIZER_NAME}")
    max_len = 128
    try:
        max_len = int(read_config(path).get("max_seq_len", max_len)) if path.is_dir() else max_len
    except CheckpointError:
        pass
    try:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(file), model_max_length=max_len, model_input_names=["input_ids", "attention_mask"],
            **SPECIAL_TOKENS,
        )
    except Exception as err:
        raise CheckpointError(f"{file} is not a readable tokenizer ({err})") from None
    vocab = tokenizer.get_vocab()
    absent = [t for t in SPECIAL_TOKENS.values() if t not in vocab]
    if absent:
        raise CheckpointError(f"{file} lacks the special tokens {absent}")
    return tokenizer
