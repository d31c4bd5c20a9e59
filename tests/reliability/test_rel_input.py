"""Bad input and hostile input: fuzzed budgets and overrides, crafted pickles, config values as code."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import pickle
import shutil
import typing
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_ARCH
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cramming.config import parse_budget, to_dataclass
from cramming.errors import CheckpointError, ConfigError, CrammingError
from cramming.gpu import GpuProfile


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=12), st.from_regex(r"\s*-?[0-9.eE+]{0,6}\s*[smhdSMHDx]?\s*", fullmatch=True),
                 st.from_regex(r"\s*-?[0-9.eE+-]{0,8}\s*[kKmMgGx]?\s*(tokens?|steps?|Steps)?\s*", fullmatch=True),
                 st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.booleans()))
def test_fuzz_budget_strings(value) -> None:
    try:
        spec = parse_budget(value)
    except ConfigError:
        return
    assert spec.kind in ("time", "tokens", "steps")
    assert isinstance(spec.amount, float) and math.isfinite(spec.amount) and spec.amount > 0


def _dataclasses() -> list[tuple[str, type]]:
    from cramming.data.prepare import DataConfig
    from cramming.glue import GlueConfig
    from cramming.model.bert import ModelConfig
    from cramming.train.config import TrainConfig

    return [("train", TrainConfig), ("data", DataConfig), ("arch", ModelConfig), ("glue", GlueConfig), ("gpu", GpuProfile)]


scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12), st.floats(allow_nan=True),
                   st.text(max_size=10), st.just("__import__('os').system('touch PWNED')"))
value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=2), max_leaves=5)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(group=st.sampled_from(range(5)), data=st.data())
def test_fuzz_overrides_only_raise_config_error(group, data, tmp_path_factory) -> None:
    import warnings

    where, cls = _dataclasses()[group]
    names = [f.name for f in dataclasses.fields(cls)]
    keys = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    overrides = {k: data.draw(value) for k in keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            to_dataclass(cls, overrides, where)
        except ConfigError:
            pass
        except Exception as err:  # noqa: BLE001 - exactly what this test hunts
            pytest.fail(f"{where} overrides {overrides!r} raised {type(err).__name__}: {err}")


def test_override_fuzz_summary(outcome) -> None:
    """One row for the two fuzz tests above (hypothesis counts are fixed by their settings)."""
    outcome.add("Fuzzed budget strings and override values", "hypothesis: 300 budget values (text, numbers, "
                "NaN/inf, bools); 250 random override sets (None, bools, huge ints, NaN, text, code strings, nested "
                "lists/dicts) into the train/data/arch/glue/gpu dataclasses", "parse_budget returns a time, token "
                "or step budget of a positive finite amount or raises ConfigError; to_dataclass type-checks each field and raises ConfigError "
                "naming the key (printed by the CLI without a traceback)", True)


# --- security ----------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "executed"))


def _tiny_checkpoint(run_dir: Path) -> Path:
    from cramming.model.bert import CrammedBertForMLM, ModelConfig
    from cramming.train.checkpoint import save_checkpoint

    model = CrammedBertForMLM(ModelConfig(**{**TINY_ARCH, "vocab_size": 100}))
    return save_checkpoint(run_dir, model, {"counters": {"step": 1}}, "train: {}\n", 1), model


def _rehash(ckpt: Path) -> None:
    """An attacker controls the whole folder, so meta.json's sha256s match the crafted files."""
    from cramming.fileio import sha256_file as _sha256

    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {name: _sha256(ckpt / name) for name in meta["files"]}
    (ckpt / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("target", ["state.pt", "model.safetensors"])
def test_crafted_pickle_checkpoint_is_refused_and_not_executed(target, tmp_path, outcome) -> None:
    from cramming.train.checkpoint import load_checkpoint

    ckpt, model = _tiny_checkpoint(tmp_path / "run")
    marker = tmp_path / "PWNED"
    if target == "state.pt":
        torch.save({"counters": _Payload(marker)}, ckpt / target)  # a real torch zip with a code-running pickle
    else:
        (ckpt / target).write_bytes(pickle.dumps(_Payload(marker)))
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))  # the payload does run when unpickled
    assert (tmp_path / "control").exists()
    _rehash(ckpt)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt, model)
    assert target in str(err.value) and not marker.exists()
    outcome.add("Crafted pickle given as a checkpoint", f"{target} replaced by a pickle whose unpickling writes a "
                "file (meta.json re-hashed to match)", "refused with CheckpointError naming the file (safetensors "
                "parser / torch.load(weights_only=True)); the payload's file is never created", True, detail=target)


def test_exported_model_loader_ignores_pickles(tmp_path, outcome) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from cramming.model import ModelConfig, build_model, load_model, save_pretrained

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(["a small text"] * 10, trainers.WordPieceTrainer(
        vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tokfile = tmp_path / "tokenizer.json"
    tok.save(str(tokfile))

    cfg = ModelConfig(vocab_size=Tokenizer.from_file(str(tokfile)).get_vocab_size(), hidden_size=32, num_layers=2,
                      num_heads=2, intermediate_size=64)
    folder = save_pretrained(build_model(cfg, "mlm"), tmp_path / "final", tokfile)
    marker = tmp_path / "PWNED"
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CrammingError):
        load_model(folder)
    assert not marker.exists()
    outcome.add("Pickle weights in an exported model folder", "model.safetensors replaced by pytorch_model.bin "
                "holding a code-running pickle", "load_model reads safetensors only: CheckpointError, payload never "
                "runs", True)


def test_no_unsafe_torch_load_in_the_package(outcome) -> None:
    calls = []
    for path in (REPO / "cramming").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", safe))
    assert calls and all(safe for _, safe in calls), calls
    assert not any("pickle.load" in p.read_text() for p in (REPO / "cramming").rglob("*.py"))
    outcome.add("No pickle loading anywhere in the package", "AST scan of cramming/ for torch.load / pickle.load",
                f"every torch.load ({len(calls)}) passes weights_only=True; no pickle.load", True)


def test_config_values_are_never_evaluated(tmp_path, monkeypatch, outcome) -> None:
    """Code-like strings in overrides stay strings, through Hydra, the dataclasses and a real `cram data`."""
    from omegaconf import OmegaConf

    import cramming.cli  # noqa: F401 - registers whatever resolvers the app registers
    from cramming.cli import main as cram_main

    marker = tmp_path / "PWNED"
    code = f"__import__('os').system('touch {marker}')"
    for name in ("eval", "python", "exec"):
        assert not OmegaConf.has_resolver(name), name
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"paragraph {i} about whales and the sea and ships" for i in range(400)))
    monkeypatch.setattr("sys.argv", ["cram"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CRAMMING_NO_PROGRESS", "1")
    overrides = ["data", "data=local", f"data.local_paths=[{corpus}]", "data.vocab_size=64", "data.seq_len=16",
                 "data.compression_threshold=1.0", f"paths.data_root={tmp_path}/d", f"paths.out_root={tmp_path}/o",
                 f"run_name=\"{code}\"", f"data.text_field=\"{code}\""]
    try:
        cram_main(overrides)
    except SystemExit as stop:
        assert not stop.code, stop.code
    assert not marker.exists()
    from cramming.corpus.shards import load_manifest

    (folder,) = [p for p in (tmp_path / "d").iterdir() if p.is_dir()]
    assert load_manifest(folder)["data_config"]["text_field"] == code  # kept verbatim, as text
    for where, cls in _dataclasses():
        strs = [f.name for f in dataclasses.fields(cls) if typing.get_type_hints(cls)[f.name] in (str, str | None)]
        for key in strs:
            try:
                obj = to_dataclass(cls, {key: code}, where)
            except ConfigError:
                continue
            assert getattr(obj, key) == code
    assert not marker.exists()
    outcome.add("Config values that look like code", "`run_name` and `data.text_field` set to "
                "\"__import__('os').system('touch …')\" through a real `cram data`, and into every str field",
                "values are plain strings (stored verbatim); no eval/python resolver is registered; the marker file "
                "is never created", True)
    shutil.rmtree(tmp_path / "d", ignore_errors=True)
