"""The crammed BERT: shapes, backends, sparse prediction, ablation options, random-LTD, parameter counts."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from cramming.config import CONFIG_DIR, to_dataclass
from cramming.errors import ConfigError
from cramming.model import random_ltd
from cramming.model.attention import BACKENDS, get_backend
from cramming.model.bert import (
    CrammedBertForMLM,
    CrammedBertForSequenceClassification,
    ModelConfig,
    count_parameters,
    training_flops_per_sequence,
)

TINY = dict(name="test", vocab_size=100, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, max_seq_len=32)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def batch(cfg: ModelConfig, b: int = 3, length: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (b, length), generator=g)
    labels = torch.full_like(ids, -100)
    positions = torch.stack([torch.randperm(length, generator=g)[:4].sort().values for _ in range(b)])  # [B, 4]
    labels.scatter_(1, positions, ids.gather(1, positions))
    masked = ids.scatter(1, positions, 4)
    return masked, labels, positions


def arch_preset(name: str) -> ModelConfig:
    return to_dataclass(ModelConfig, OmegaConf.load(CONFIG_DIR / "arch" / f"{name}.yaml"), "arch")


def test_every_arch_preset_builds_a_config():
    names = sorted(p.stem for p in (CONFIG_DIR / "arch").glob("*.yaml"))
    assert {"crammed-bert", "bert-original", "tiny", "demo"} <= set(names)
    assert any(n.startswith("deep-narrow-") for n in names)
    for name in names:
        assert arch_preset(name).name == name


def test_crammed_bert_parameter_count_within_3_percent_of_120m():
    with torch.device("meta"):
        model = CrammedBertForMLM(arch_preset("crammed-bert"))
    assert abs(count_parameters(model) - 120e6) / 120e6 < 0.03


def test_deep_narrow_presets_at_or_below_crammed_budget():
    with torch.device("meta"):
        budget = count_parameters(CrammedBertForMLM(arch_preset("crammed-bert")))
        for path in (CONFIG_DIR / "arch").glob("deep-narrow-*.yaml"):
            cfg = arch_preset(path.stem)
            assert cfg.num_layers > 16 and cfg.hidden_size < 768
            assert count_parameters(CrammedBertForMLM(cfg)) <= budget


def test_bert_original_matches_transformers_parameter_count():
    from transformers import BertConfig, BertForMaskedLM

    cfg = arch_preset("bert-original")
    hf = BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.token_types,
    )
    with torch.device("meta"):
        ours, theirs = CrammedBertForMLM(cfg), BertForMaskedLM(hf)
    assert count_parameters(ours) == sum(p.numel() for p in theirs.parameters())


def test_no_linear_in_crammed_bert_has_a_bias():
    model = CrammedBertForMLM(dataclasses.replace(arch_preset("crammed-bert"), **TINY))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.bias is None for m in linears)
    assert model.head.bias is None


def test_head_shapes():
    cfg = tiny()
    ids, labels, positions = batch(cfg)
    model = CrammedBertForMLM(cfg)
    assert model(ids)["logits"].shape == (3, 16, 100)
    assert model(ids)["loss"] is None
    out = model(ids, labels=labels)  # sparse: only the 12 masked tokens of the batch
    assert out["logits"].shape == (12, 100) and out["loss"].ndim == 0
    assert model(ids, labels=labels, masked_positions=positions)["logits"].shape == (3, 4, 100)
    dense = CrammedBertForMLM(dataclasses.replace(cfg, sparse_prediction=False))
    assert dense(ids, labels=labels)["logits"].shape == (3, 16, 100)
    for num_labels in (1, 3):
        clf = CrammedBertForSequenceClassification(cfg, num_labels)
        target = torch.randn(3) if num_labels == 1 else torch.tensor([0, 2, 1])
        out = clf(ids, attention_mask=torch.ones_like(ids), labels=target)
        assert out["logits"].shape == (3, num_labels) and torch.isfinite(out["loss"])


def test_sparse_and_dense_losses_agree():
    cfg = tiny()
    ids, labels, positions = batch(cfg)
    sparse = CrammedBertForMLM(cfg)
    dense = CrammedBertForMLM(dataclasses.replace(cfg, sparse_prediction=False))
    dense.load_state_dict(sparse.state_dict())
    reference = dense(ids, labels=labels)["loss"]
    torch.testing.assert_close(sparse(ids, labels=labels)["loss"], reference)
    torch.testing.assert_close(sparse(ids, labels=labels, masked_positions=positions)["loss"], reference)
    # Gradients agree too (the head sees only masked rows either way).
    sparse(ids, labels=labels, masked_positions=positions)["loss"].backward()
    reference.backward()
    for (name, a), b in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("options", [
    {}, {"norm_position": "post", "final_norm": False}, {"position": "rotary"}, {"bias": True, "decoder_bias": True},
    {"ffn": "gelu", "head": "nonlinear", "norm": "rmsnorm"}, {"attention_backend": "eager", "tie_embeddings": False},
    {"num_layers": 1},
], ids=["default", "post-ln", "rotary", "bias", "gelu-nonlinear-rms", "eager-untied", "one-layer"])
def test_last_block_on_masked_rows_only_matches_full_computation(options):
    # Given masked_positions, the last block computes only those rows; loss and every gradient must
    # equal the dense model's (all rows computed, head over every position), padding mask included.
    cfg = tiny(**options)
    ids, labels, positions = batch(cfg)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    sparse = CrammedBertForMLM(cfg)
    dense = CrammedBertForMLM(dataclasses.replace(cfg, sparse_prediction=False))
    dense.load_state_dict(sparse.state_dict())
    loss = sparse(ids, labels=labels, masked_positions=positions, attention_mask=mask)["loss"]
    reference = dense(ids, labels=labels, attention_mask=mask)["loss"]
    torch.testing.assert_close(loss, reference)
    loss.backward()
    reference.backward()
    for (name, a), b in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-6, rtol=1e-4)


def test_sparse_embedding_grad_gives_the_same_dense_gradient():
    cfg = tiny()
    ids, labels, positions = batch(cfg)
    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = CrammedBertForMLM(cfg)
        assert model.use_sparse_embedding_grad(sparse) is sparse
        for _ in range(2):  # two micro-batches: accumulation into an existing gradient too
            model(ids, labels=labels, masked_positions=positions)["loss"].backward()
        grad = model.bert.embeddings.word_embeddings.weight.grad
        assert grad.layout == torch.strided  # fused AdamW and clipping need a dense gradient
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0])
    # Untied: the lookup's gradient would be the table's only one, and sparse; the option stays off.
    assert CrammedBertForMLM(tiny(tie_embeddings=False)).use_sparse_embedding_grad() is False


def test_dense_prediction_ignores_masked_positions():
    # sparse_prediction=false (the original BERT ablation) must pay for the full head even when the
    # loader hands over fixed masked positions, or the ablation would not measure what it claims.
    cfg = tiny(sparse_prediction=False)
    ids, labels, positions = batch(cfg)
    out = CrammedBertForMLM(cfg)(ids, labels=labels, masked_positions=positions)
    assert out["logits"].shape == (3, 16, 100)


def test_eager_and_sdpa_agree_fp32():
    cfg = tiny(attention_backend="eager")
    ids, labels, _ = batch(cfg)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    eager = CrammedBertForSequenceClassification(cfg, 2)
    sdpa = CrammedBertForSequenceClassification(dataclasses.replace(cfg, attention_backend="sdpa"), 2)
    sdpa.load_state_dict(eager.state_dict())
    for m in (None, mask):
        torch.testing.assert_close(sdpa.bert(ids, m), eager.bert(ids, m), atol=1e-5, rtol=1e-5)
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    torch.testing.assert_close(BACKENDS["sdpa"](q, k, v, None, 0.0, False), BACKENDS["eager"](q, k, v, None, 0.0, False))


def test_cpu_attention_matches_torch_fused_kernel():
    # On CPU the sdpa backend runs plain matmuls (faster at BERT lengths); they must give torch's
    # fused kernel's values and gradients, with fewer queries than keys and with a key mask.
    import torch.nn.functional as F

    q = torch.randn(2, 3, 5, 8, requires_grad=True)
    k, v = (torch.randn(2, 3, 9, 8, requires_grad=True) for _ in range(2))
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False
    for m in (None, mask):
        ours = BACKENDS["sdpa"](q, k, v, m, 0.0, True)
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        torch.testing.assert_close(ours, fused)
        grads = [torch.autograd.grad(out.sum(), (q, k, v)) for out in (ours, fused)]
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b)
    torch.manual_seed(0)  # dropout in training only
    assert not torch.equal(BACKENDS["sdpa"](q, k, v, None, 0.5, True), BACKENDS["sdpa"](q, k, v, None, 0.5, False))


def test_unknown_and_missing_backends_raise():
    with pytest.raises(ConfigError, match="eager, sdpa, flash"):
        get_backend("nope")
    with pytest.raises(ConfigError, match="attention_backend"):
        tiny(attention_backend="nope")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="flash-attn"):
            CrammedBertForMLM(tiny(attention_backend="flash"))


@pytest.mark.parametrize(
    "bad",
    [dict(hidden_size=30), dict(position="alibi"), dict(norm="batchnorm"), dict(ffn="swiglu", intermediate_size=64),
     dict(intermediate_size=63), dict(dropout=1.0), dict(num_layers=0), dict(head="deep"), dict(norm_position="mid")],
)
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        tiny(**bad)


ABLATIONS = [
    dict(position="learned"), dict(position="sinusoidal"), dict(position="rotary"), dict(norm_position="post", final_norm=False),
    dict(bias=True), dict(ffn="gelu"), dict(head="nonlinear"), dict(decoder_bias=True), dict(tie_embeddings=False),
    dict(norm="rmsnorm"), dict(embedding_norm=False), dict(token_types=2), dict(dropout=0.1), dict(attention_backend="eager"),
]


@pytest.mark.parametrize("option", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_each_ablation_option_runs_forward_and_backward(option):
    torch.manual_seed(0)
    cfg = tiny(**option)
    ids, labels, positions = batch(cfg)
    model = CrammedBertForMLM(cfg)
    loss = model(ids, labels=labels, masked_positions=positions)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if option.get("bias"):
        assert all(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear))
    if option.get("tie_embeddings") is False:
        assert model.head.decoder.weight is not model.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("option", [dict(), dict(position="learned"), dict(position="rotary"), dict(norm_position="post")])
def test_padding_does_not_change_real_tokens(option):
    cfg = tiny(**option)
    model = CrammedBertForSequenceClassification(cfg, 2).eval()
    ids, _, _ = batch(cfg, b=2, length=10)
    padded = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 6)], dim=1).long()
    with torch.no_grad():
        short, long = model.bert(ids), model.bert(padded, mask)
        torch.testing.assert_close(long[:, :10], short, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(padded, mask)["logits"], model(ids)["logits"], atol=1e-5, rtol=1e-5)
        # Without the mask the padding leaks into the real tokens, so the test can tell.
        assert not torch.allclose(model.bert(padded)[:, :10], short, atol=1e-5)


def test_random_ltd_full_length_equals_plain_model():
    cfg = tiny(num_layers=4)
    ids, labels, positions = batch(cfg)
    model = CrammedBertForMLM(cfg).train()
    plain = model(ids, labels=labels, masked_positions=positions)["loss"]
    assert torch.equal(model(ids, labels=labels, masked_positions=positions, keep_tokens=16)["loss"], plain)
    # The gather/combine path itself is exact at k = L (sorted indices are the identity).
    layer, x = model.bert.layers[1], torch.randn(3, 16, 32)
    assert torch.equal(random_ltd.apply_layer(layer, x, keep=16), layer(x))


def test_random_ltd_drops_tokens_in_middle_layers_only():
    cfg = tiny(num_layers=4, position="rotary")
    ids, labels, positions = batch(cfg)
    model = CrammedBertForMLM(cfg).train()
    torch.manual_seed(0)
    dropped = model(ids, labels=labels, masked_positions=positions, keep_tokens=8)["loss"]
    plain = model(ids, labels=labels, masked_positions=positions)["loss"]
    assert torch.isfinite(dropped) and not torch.equal(dropped, plain)
    dropped.backward()
    # Off in eval: keep_tokens is ignored.
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, keep_tokens=8)["logits"], model(ids)["logits"])
    # Untouched tokens pass through a dropped layer unchanged.
    layer, x = model.bert.layers[1], torch.randn(2, 16, 32)
    idx = torch.tensor([[0, 3, 5, 9], [1, 2, 14, 15]])
    out = random_ltd.apply_layer(layer, x, keep=4, idx=idx)
    keep = torch.zeros(2, 16, dtype=torch.bool).scatter(1, idx, True)
    assert torch.equal(out[~keep], x[~keep]) and not torch.equal(out[keep], x[keep])
    idx = random_ltd.sample_indices(4, 16, 5, "cpu")
    assert idx.shape == (4, 5) and all(len(set(row.tolist())) == 5 for row in idx)


def test_random_ltd_keeps_real_tokens_before_padding():
    # A padded row (doc-bounded packing) must never keep a subset of padding alone.
    real = torch.arange(16)[None, :] < torch.tensor([[3], [16], [9]])  # 3, 16 and 9 real tokens
    for seed in range(20):
        torch.manual_seed(seed)
        idx = random_ltd.sample_indices(3, 16, 5, "cpu", real)
        kept_real = real.gather(1, idx).sum(dim=1)
        assert kept_real.tolist() == [3, 5, 5]  # all 3 real tokens, then padding; else real only
    torch.manual_seed(0)
    seen = torch.zeros(16)
    for _ in range(200):
        seen[random_ltd.sample_indices(1, 16, 5, "cpu", real[2:3])[0]] += 1
    assert (seen[:9] > 0).all() and (seen[9:] == 0).all()  # uniform among the 9 real tokens


def test_training_flops_counts_matmuls():
    cfg = tiny(sparse_prediction=True)
    h, i, v, layers, length, k = 32, 64, 100, 3, 16, 4
    per_layer = length * (4 * h * h + h * i + (i // 2) * h + 2 * length * h)
    assert training_flops_per_sequence(cfg, length, k) == 6 * (layers * per_layer + k * h * v)
    dense = dataclasses.replace(cfg, sparse_prediction=False, ffn="gelu", head="nonlinear")
    per_layer = length * (4 * h * h + 2 * h * i + 2 * length * h)
    assert training_flops_per_sequence(dense, length, k) == 6 * (layers * per_layer + length * (h * h + h * v))
    assert training_flops_per_sequence(dense, length, k, fixed_positions=True) == training_flops_per_sequence(dense, length, k)
    # Fixed positions: the last block's K/V projections run on every token, the rest on k rows.
    per_query = 2 * h * h + h * i + (i // 2) * h + 2 * length * h
    last = length * 2 * h * h + k * per_query
    per_layer = length * (4 * h * h + h * i + (i // 2) * h + 2 * length * h)
    expected = 6 * ((layers - 1) * per_layer + last + k * h * v)
    assert training_flops_per_sequence(cfg, length, k, fixed_positions=True) == expected


def test_autocast_bf16_cpu_runs():
    cfg = tiny()
    ids, labels, positions = batch(cfg)
    model = CrammedBertForMLM(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=labels, masked_positions=positions)
    assert out["logits"].dtype == torch.bfloat16 and out["loss"].dtype == torch.float32
    out["loss"].backward()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler")
def test_compile_fullgraph_static_shapes_matches_eager():
    torch.manual_seed(0)
    cfg = tiny()
    ids, labels, positions = batch(cfg)
    model = CrammedBertForMLM(cfg)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    eager_loss = model(ids, labels=labels, masked_positions=positions)["loss"]
    loss = compiled(ids, labels=labels, masked_positions=positions)["loss"]
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
