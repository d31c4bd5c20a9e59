"""The model card (README.md) of an exported folder, in the Hugging Face Hub's format.

YAML metadata the Hub reads (library, pipeline tag, tags, the data's hub datasets; the licence is left
to the user, as a commented-out field), then what a reader needs: the architecture and its parameters,
and for a pretraining export the data, the budget, the device, tokens seen and passes, the final and
held-out MLM loss, the command that reproduces it and how to load it. `render_card` writes it from the
export's config.json (`save_pretrained` calls it; pretraining adds the facts of `provenance` to the
config's `cramming_training`). Later additions edit the card in place, keeping what its owner wrote:
`set_glue_section` (`cram report --card`) and `for_repo` / `for_checkpoint` (`cram push`).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cramming.config import format_duration
from cramming.errors import CrammingError
from cramming.fileio import write_atomic
from cramming.runs import RUN_CONFIG

CARD_NAME = "README.md"
GLUE_START, GLUE_END = "<!-- cramming:glue -->", "<!-- /cramming:glue -->"
PAPER = ("Geiping & Goldstein, [*Cramming: Training a Language Model on a Single GPU in One Day*]"
         "(https://arxiv.org/abs/2212.14034) (ICML 2023)")
LICENSE_HINT = "# license: set one before publishing (https://huggingface.co/docs/hub/repositories-licenses)"
MODEL_ID_LINE = re.compile(r'^model_id = ".*"', re.MULTILINE)
# Builders that `datasets` reads local or remote files with: their name is not a dataset on the Hub.
PACKAGED_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "webdataset"})


# ---------------------------------------------------------------------------------------------
# What pretraining records for its card (in config.json's cramming_training)
# ---------------------------------------------------------------------------------------------


def hydra_command(run_dir: Path, stage: str = "pretrain") -> str | None:
    """The `cram <stage> ...` command that started the run in `run_dir`, from the overrides Hydra saved
    beside its config (a resumed run keeps its folder, so this is the original command); None when the
    run was started from Python."""
    import yaml

    path = Path(run_dir) / Path(RUN_CONFIG).with_name("overrides.yaml")
    try:
        overrides = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return shlex.join(["cram", stage, *map(str, overrides or [])])


def _hub_datasets(data_config: Mapping[str, Any]) -> list[str]:
    if data_config.get("source") != "hub":
        return []
    sources = data_config.get("hub_sources") or []
    return list(dict.fromkeys(s["path"] for s in sources if s.get("path") not in PACKAGED_BUILDERS))


def provenance(manifest: Mapping[str, Any], run_dir: Path, micro_batch_size: int, target_batch_size: int,
               elapsed_s: float) -> dict[str, Any]:
    """The facts a pretraining card shows beyond the run's summary: its data, batch, time and command."""
    data_config = manifest.get("data_config") or {}
    counts = manifest.get("counts") or {}
    seq_len = int(manifest.get("seq_len", 0))
    return {
        "data": {"name": manifest.get("name"), "source": data_config.get("source"),
                 "hub_datasets": _hub_datasets(data_config), "config_hash": manifest.get("config_hash"),
                 "seq_len": seq_len, "vocab_size": manifest.get("vocab_size"), "sorting": manifest.get("sorting"),
                 "train_tokens": int(counts.get("train_sequences", 0)) * seq_len},
        "micro_batch_size": micro_batch_size, "target_batch_size": target_batch_size,
        "elapsed_at_export_s": round(elapsed_s, 1), "command": hydra_command(run_dir),
    }


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _count(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{suffix}{unit}"
    return f"{x:,.0f}{unit}"


def _number(x: Any, digits: int = 4) -> str:
    return "n/a" if not isinstance(x, (int, float)) else f"{x:.{digits}f}"


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _budget(training: Mapping[str, Any]) -> str:
    kind, amount = training.get("budget_kind"), training.get("budget_amount")
    if not isinstance(amount, (int, float)):
        return "n/a"
    return {"time": f"{format_duration(amount)} of wall-clock time", "steps": f"{amount:,.0f} optimizer steps",
            "tokens": f"{amount:,.0f} tokens"}.get(kind, str(amount))


def _metadata(config: Mapping[str, Any], classifier: bool) -> str:
    from huggingface_hub import ModelCardData

    training = config.get("cramming_training") or {}
    datasets = (training.get("data") or {}).get("hub_datasets") or None
    tags = ["cramming", "crammed-bert", "bert", "text-classification" if classifier else "masked-lm"]
    data = ModelCardData(library_name="transformers", pipeline_tag="text-classification" if classifier else "fill-mask",
                         tags=tags, datasets=datasets)
    return f"---\n{data.to_yaml()}\n{LICENSE_HINT}\n---\n"


def _architecture(config: Mapping[str, Any], parameters: int | None) -> list[str]:
    rows = [("architecture", f"{config.get('name', 'crammed-bert')}: {config.get('num_layers')} layers, hidden "
                             f"{config.get('hidden_size')}, {config.get('num_heads')} heads, feed-forward "
                             f"{config.get('intermediate_size')} ({config.get('ffn')}), {config.get('norm_position')}-"
                             f"{config.get('norm')}, {config.get('position')} positions"),
            ("parameters", _count(parameters)),
            ("vocabulary", f"{config.get('vocab_size', 0):,} tokens (WordPiece-style, tokenizer.json)"),
            ("sequence length", f"{config.get('max_seq_len')} tokens")]
    return ["## Model", "", *_table(rows)]


def _training(training: Mapping[str, Any]) -> list[str]:
    recipe = training.get("train") or {}
    rows = [
        ("budget", _budget(training)),
        ("training time", format_duration(training["elapsed_at_export_s"]) if training.get("elapsed_at_export_s")
         else "n/a"),
        ("device", f"{training.get('device')} (gpu={training.get('gpu_profile')}, {training.get('precision')}, "
                   f"{training.get('compile')}, {training.get('world_size', 1)} process(es))"),
        ("batch", f"micro-batch {training.get('micro_batch_size', 'n/a')}, target {training.get('target_batch_size', 'n/a')} "
                  "sequences per step" + (f" (ramped from one micro-batch over {recipe['ramp_fraction']:g} of the budget)"
                                          if recipe.get("ramp_fraction") else "")),
        ("recipe", f"train={training.get('train_recipe')}: AdamW, peak LR {recipe.get('lr')} ({recipe.get('lr_schedule')}), "
                   f"weight decay {recipe.get('weight_decay')}, {recipe.get('mask_rate')} of tokens masked"),
        ("optimizer steps", str(training.get("steps", "n/a"))),
        ("tokens seen", f"{_count(training.get('tokens_seen'))} ({_number(training.get('epochs'), 2)} passes over the data)"),
        ("final MLM loss (training)", _number(training.get("final_loss"))),
        ("held-out MLM loss", _number(training.get("val_loss"))),
        ("throughput", f"{_count(training.get('tokens_per_s'))} tokens/s"
                       + (f", MFU {100 * training['mfu']:.1f}%" if training.get("mfu") else "")),
    ]
    return ["## Training", "", *_table(rows)]


def _data(training: Mapping[str, Any]) -> list[str]:
    data = training.get("data") or {}
    where = {"hub": "the Hub: " + ", ".join(data.get("hub_datasets") or ["local files through `datasets`"]),
             "embedded": "the public-domain books shipped with cramming", "local": "local files"}
    rows = [("data", f"data={data.get('name')}, from {where.get(data.get('source'), data.get('source'))}"),
            ("config hash", f"`{data.get('config_hash')}` (the prepared folder `{data.get('name')}-{data.get('config_hash')}`)"),
            ("tokens available", f"{_count(data.get('train_tokens'))} in {data.get('seq_len')}-token rows "
                                 f"(sorted: {data.get('sorting')})")]
    return ["## Data", "", *_table(rows)]


def _reproduce(training: Mapping[str, Any]) -> list[str]:
    command = training.get("command")
    if not command:
        return ["## Reproduce", "", "Trained through the Python API (`cramming.train.loop.pretrain`); config.json's "
                "`cramming_training` holds its recipe.", ""]
    return ["## Reproduce", "", "The command that trained it (`cram data` with the same `data` options first, or "
            "let `cram pretrain` prepare the data):", "", "```bash", command, "```", ""]


def _usage(model_id: str, classifier: bool) -> list[str]:
    load = (['classify = pipeline("text-classification", model=model_id, trust_remote_code=True)',
             'print(classify("a gripping, well written story"))'] if classifier else
            ['fill = pipeline("fill-mask", model=model_id, trust_remote_code=True)',
             'print(fill("the capital of france is [MASK]."))', "",
             "# Sequence classification: a fresh head on the pretrained encoder, to finetune",
             "# (with transformers' Trainer, or `cram glue ckpt=<model_id>`).",
             "tokenizer = AutoTokenizer.from_pretrained(model_id)",
             "model = AutoModelForSequenceClassification.from_pretrained(model_id, num_labels=2, trust_remote_code=True)"])
    return ["## Use", "", "The modelling code is the `cramming` package: install it, then `trust_remote_code=True` "
            "loads its classes through this folder's `modeling_crammed_bert.py` (or `import cramming.model` registers "
            "them with transformers' Auto classes without remote code).", "", "```python",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline", "",
            f'model_id = "{model_id}"', "", *load, "```", ""]


def render_card(config: Mapping[str, Any], parameters: int | None = None, model_id: str = ".") -> str:
    """The card of an export whose config.json is `config`; `model_id` is what the usage code loads."""
    classifier = "CrammedBertHFForSequenceClassification" in (config.get("architectures") or [])
    training = config.get("cramming_training") or {}
    name = config.get("name", "crammed-bert")
    if classifier:
        title = f"# {name}, finetuned on {config.get('finetuned_task', 'a classification task')}"
        intro = (f"A crammed BERT classifier: `{config.get('base_checkpoint')}` finetuned by `cram glue` (seed "
                 f"{config.get('finetune_seed')}); labels: {', '.join((config.get('id2label') or {}).values())}.")
    else:
        title = f"# {name}: a BERT pretrained in a budget"
        intro = (f"A BERT-style masked language model pretrained from scratch with cramming in a fixed budget "
                 f"({_budget(training)}), following {PAPER}.")
    lines = [title, "", intro, "", *_architecture(config, parameters)]
    if training:
        lines += [*_training(training), *_data(training), *_reproduce(training)]
    lines += [*_usage(model_id, classifier), GLUE_START, GLUE_END, "", "## Licence", "",
              "Not set: add a `license:` to the metadata above before publishing; the weights were trained on the "
              "data named here, whose terms apply.", ""]
    return _metadata(config, classifier) + "\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Editing a card in place
# ---------------------------------------------------------------------------------------------


def card_text(export_dir: Path) -> str:
    """The export's card; rendered from its config.json (without a parameter count) when it has none."""
    path = Path(export_dir) / CARD_NAME
    if path.is_file():
        return path.read_text(encoding="utf-8")
    try:
        config = json.loads((Path(export_dir) / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CrammingError(f"{export_dir} has neither a {CARD_NAME} nor a readable config.json ({err})") from None
    return render_card(config, model_id=str(export_dir))


def with_glue(text: str, section: str) -> str:
    """`text` with its GLUE section (between the markers) replaced by `section`, or added before the licence."""
    block = f"{GLUE_START}\n{section.strip()}\n{GLUE_END}"
    if GLUE_START in text and GLUE_END in text:
        before, rest = text.split(GLUE_START, 1)
        return before + block + rest.split(GLUE_END, 1)[1]
    head, licence, tail = text.partition("\n## Licence")
    return f"{head.rstrip()}\n\n{block}\n{licence}{tail}" if licence else f"{text.rstrip()}\n\n{block}\n"


def finetuned_export(results: Mapping[str, Any]) -> Path:
    """The local `cram pretrain` export a GLUE run's results say it finetuned: where its card is."""
    ckpt = results.get("checkpoint") or {}
    if ckpt.get("format") != "crammed-bert" or ckpt.get("origin") != "local":
        raise CrammingError(f"the GLUE run finetuned {ckpt.get('path')!r} ({ckpt.get('format')}, {ckpt.get('origin')}): "
                            "only a local export of `cram pretrain` has a card to add its table to")
    folder = Path(ckpt.get("files") or ckpt["path"])
    if not folder.is_dir():
        raise CrammingError(f"the export {folder} that the GLUE run finetuned is gone; its card cannot be updated")
    return folder


def set_glue_section(export_dir: Path, section: str) -> Path:
    """Write `section` (markdown) as the GLUE section of the export's card, atomically; returns the card."""
    path = Path(export_dir) / CARD_NAME
    write_atomic(path, with_glue(card_text(export_dir), section))
    return path


def for_repo(text: str, repo_id: str) -> str:
    """The card as it goes to the Hub repository `repo_id`: its usage code loads that id."""
    return MODEL_ID_LINE.sub(f'model_id = "{repo_id}"', text, count=1)


def for_checkpoint(text: str, step: int, revision: str, elapsed_s: float | None) -> str:
    """The card of an intermediate checkpoint pushed as `revision`: the final model's card, headed by a note."""
    when = f", {format_duration(elapsed_s)} into the budget" if elapsed_s else ""
    note = (f"> **Intermediate checkpoint**: the weights after optimizer step {step:,}{when}; load them with "
            f'`revision="{revision}"`. The figures below describe the final model (the main revision).\n\n')
    meta, sep, body = text.partition("\n---\n")
    return f"{meta}{sep}\n{note}{body.lstrip()}" if sep else note + text
