"""The training stack both stages share (cramming.optim): weight-decay groups and precision."""

from __future__ import annotations

import contextlib

import pytest
import torch

from cramming.optim.groups import build_optimizer
from cramming.optim.precision import autocast, effective_precision, grad_scaler

CPU = torch.device("cpu")


def _tiny_bert():
    from cramming.model.bert import CrammedBertForMLM, ModelConfig

    return CrammedBertForMLM(ModelConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2,
                                         intermediate_size=64, max_seq_len=16))


def _opt(params, **kw) -> torch.optim.AdamW:
    return build_optimizer(params, **{"lr": 1e-3, "weight_decay": 0.01, "betas": (0.9, 0.98), "eps": 1e-12,
                                      "device": CPU, **kw})


def test_pretraining_groups_exempt_vectors_and_embeddings() -> None:
    model = _tiny_bert()
    opt = _opt(model, decay_vectors=False, decay_embeddings=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    emb = model.bert.embeddings.word_embeddings.weight
    assert any(p is emb for p in no_decay["params"]) and all(p.ndim == 2 for p in decay["params"])
    assert all(p.ndim < 2 or p is emb for p in no_decay["params"])
    assert opt.defaults["eps"] == 1e-12 and opt.defaults["betas"] == (0.9, 0.98)
    assert opt.defaults["fused"]  # CPU has a fused kernel: the default uses it
    everything = _opt(model, decay_vectors=True, decay_embeddings=True)
    assert len(everything.param_groups[1]["params"]) == 0
    assert not _opt(model, fused=False).defaults["fused"]


def test_the_recipes_decay_the_embedding_table(monkeypatch, tmp_path) -> None:
    # The recipe's AdamW decays every matrix, the (tied) word embeddings included; only biases and
    # norm weights are exempt, as in the paper's implementation and original BERT.
    from cramming.config import parse_budget
    from cramming.gpu import GpuProfile
    from cramming.model.bert import ModelConfig
    from cramming.train import loop
    from cramming.train.config import TrainConfig
    from tests.test_train_loop import tiny_data

    built = []
    monkeypatch.setattr(loop, "build_optimizer", lambda *a, **kw: built.append(build_optimizer(*a, **kw)) or built[-1])
    arch = ModelConfig(name="t", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=32)
    loop.pretrain(TrainConfig(target_batch_size=16, eval_batches=1, checkpoint_interval_minutes=0.0), arch,
                  GpuProfile(micro_batch_size=16, num_workers=0), tiny_data(tmp_path / "data"), tmp_path / "run",
                  budget=parse_budget("1steps"))
    decay, no_decay = built[0].param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for p in decay["params"]) == sum(p.numel() for p in no_decay["params"] + decay["params"]
                                                          if p.ndim >= 2)
    assert all(p.ndim < 2 for p in no_decay["params"])  # norm weights, biases, the position scale


def test_glue_groups_decay_embeddings_and_see_through_stacked_dimensions() -> None:
    model = _tiny_bert()
    opt = _opt(model.parameters())  # tensors only: matrices (embeddings too) decay, vectors do not
    decay, no_decay = opt.param_groups
    assert any(p is model.bert.embeddings.word_embeddings.weight for p in decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    # Side-by-side trials: [N, ...] tensors, grouped by the shape after the leading N.
    stacked = [torch.nn.Parameter(torch.zeros(3, 4, 4)), torch.nn.Parameter(torch.zeros(3, 4))]
    decay, no_decay = _opt(stacked, stacked=1).param_groups
    assert decay["params"] == [stacked[0]] and no_decay["params"] == [stacked[1]]
    frozen = torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    assert all(frozen is not p for g in _opt([frozen, *stacked]).param_groups for p in g["params"])
    with pytest.raises(ValueError, match="needs the model"):
        _opt(model.parameters(), decay_embeddings=False)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cpu_runs_fp32_without_autocast_or_scaling(precision: str) -> None:
    assert effective_precision(CPU, precision) == "fp32"
    assert isinstance(autocast(CPU, precision), contextlib.nullcontext)
    assert not grad_scaler(CPU, precision).is_enabled()


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # autocast objects are built, not entered
def test_cuda_precisions_and_unknown_names() -> None:
    cuda = torch.device("cuda")
    assert isinstance(autocast(cuda, "fp32"), contextlib.nullcontext)
    assert autocast(cuda, "bf16").fast_dtype == torch.bfloat16
    assert autocast(cuda, "fp16").fast_dtype == torch.float16
    assert effective_precision(cuda, "fp16") == "fp16"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        autocast(CPU, "fp8")
