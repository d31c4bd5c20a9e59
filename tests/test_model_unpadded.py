"""Unpadding: the classifier and encoder on the real tokens only give the padded path's values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from cramming.model import attention
from cramming.model.bert import CrammedBertForMLM, CrammedBertForSequenceClassification, ModelConfig
from cramming.model.unpadding import unpad

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(name="test", vocab_size=100, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, max_seq_len=32)
ARCHS = {
    "default": {}, "post-ln": {"norm_position": "post", "final_norm": False}, "rotary": {"position": "rotary"},
    "learned": {"position": "learned"}, "sinusoidal": {"position": "sinusoidal"},
    "bias": {"bias": True}, "gelu-rms": {"ffn": "gelu", "norm": "rmsnorm"}, "eager": {"attention_backend": "eager"},
    "token-types-no-embedding-norm": {"token_types": 2, "embedding_norm": False}, "one-layer": {"num_layers": 1},
}


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def padded_batch(lengths: list[int], width: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, W] of sequences of these lengths, padded on the right with id 0."""
    width = width or max(lengths)
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return torch.randint(5, 100, (len(lengths), width), generator=g) * mask, mask


def pair(cfg: ModelConfig, num_labels: int) -> tuple[CrammedBertForSequenceClassification, ...]:
    """A classifier and its unpadded twin with the same weights."""
    torch.manual_seed(0)
    padded = CrammedBertForSequenceClassification(cfg, num_labels)
    unpadded = copy.deepcopy(padded)
    unpadded.use_unpadding()
    return padded, unpadded


def labels_for(num_labels: int, batch: int) -> torch.Tensor:
    return torch.randn(batch) if num_labels == 1 else torch.arange(batch) % num_labels


def assert_same_step(models, ids, mask, labels, seed: int = 1) -> None:
    """Loss, logits and every gradient of one forward/backward agree (each run from the same RNG state)."""
    outs = []
    for model in models:
        torch.manual_seed(seed)
        out = model(ids, mask, labels)
        out["loss"].backward()
        outs.append(out)
    torch.testing.assert_close(outs[1]["loss"], outs[0]["loss"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(outs[1]["logits"], outs[0]["logits"], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("num_labels", [1, 3])
@pytest.mark.parametrize("options", ARCHS.values(), ids=ARCHS.keys())
def test_unpadded_classifier_matches_padded_outputs_and_gradients(options, num_labels):
    padded, unpadded = pair(tiny(**options), num_labels)
    ids, mask = padded_batch([12, 5, 9, 1, 12])
    assert_same_step([padded, unpadded], ids, mask, labels_for(num_labels, 5))
    with torch.no_grad():
        for model in (padded, unpadded):
            model.eval()
        torch.testing.assert_close(unpadded(ids, mask)["logits"], padded(ids, mask)["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"position": "rotary", "norm_position": "post"}], ids=["pre-ln", "rotary-post-ln"])
def test_dropout_draws_the_padded_paths_masks(options):
    # Finetuning trains with dropout 0.1: the unpadded path draws each mask in the padded shape and
    # keeps the real tokens' entries, so the same units are dropped and the RNG ends where it would.
    padded, unpadded = pair(tiny(dropout=0.1, **options), 2)
    ids, mask = padded_batch([12, 5, 9, 1])
    assert_same_step([padded, unpadded], ids, mask, torch.tensor([0, 1, 1, 0]))
    after = []
    for model in (padded, unpadded):
        torch.manual_seed(1)
        model(ids, mask)
        after.append(torch.rand(3))
    torch.testing.assert_close(after[1], after[0], rtol=0, atol=0)


def test_training_steps_stay_equal():
    # A few AdamW steps with dropout on, different padding widths per batch: the trials' losses agree.
    models = pair(tiny(dropout=0.1), 2)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    batches = [padded_batch(lens, seed=i) for i, lens in enumerate([[7, 3, 7], [2, 2, 4, 9], [16, 1]])]
    torch.manual_seed(3)
    losses: list[list[float]] = [[], []]
    for ids, mask in batches:
        state = torch.get_rng_state()
        for k, (model, opt) in enumerate(zip(models, optimizers, strict=True)):
            torch.set_rng_state(state)
            loss = model(ids, mask, torch.arange(len(ids)) % 2)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[k].append(loss.item())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)


def test_encoder_hidden_states_and_output_positions():
    # The full hidden states: the padded path's at real tokens, zeros at padding. With output
    # positions (the MLM head's fixed masked positions), only those rows, as the padded encoder gives.
    cfg = tiny(position="rotary")
    torch.manual_seed(0)
    padded = CrammedBertForMLM(cfg).eval()
    unpadded = copy.deepcopy(padded)
    unpadded.bert.use_unpadding()
    ids, mask = padded_batch([6, 10, 3], width=12)  # wider than the longest, as a bucketed batch
    real = mask.bool()
    with torch.no_grad():
        full = unpadded.bert(ids, mask)
        torch.testing.assert_close(full[real], padded.bert(ids, mask)[real], rtol=1e-5, atol=1e-6)
        assert not full[~real].any()
        positions = torch.tensor([[0, 5], [9, 2], [1, 2]])
        torch.testing.assert_close(unpadded.bert(ids, mask, output_positions=positions),
                                   padded.bert(ids, mask, output_positions=positions), rtol=1e-5, atol=1e-6)
        labels = torch.full_like(ids, -100).scatter(1, positions, 7)
        torch.testing.assert_close(unpadded(ids, labels, positions, mask)["loss"], padded(ids, labels, positions, mask)["loss"])


def test_padding_anywhere_keeps_column_positions():
    # Positions are columns of the padded batch, as in the padded path, wherever the padding sits.
    padded, unpadded = pair(tiny(position="learned"), 2)
    ids, mask = padded_batch([8, 8, 8])
    mask[0, 3:5] = 0
    mask[2, 1] = 0
    assert_same_step([padded, unpadded], ids, mask, torch.tensor([0, 1, 0]))


def test_unpadded_needs_a_real_cls_token_and_no_random_ltd():
    _, unpadded = pair(tiny(), 2)
    ids, mask = padded_batch([4, 4])
    mask[1, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        unpadded(ids, mask)
    model = CrammedBertForMLM(tiny()).train()
    model.bert.use_unpadding()
    with pytest.raises(ValueError, match="random-LTD"):
        model(ids, attention_mask=torch.ones_like(ids), keep_tokens=2)


def test_without_a_mask_unpadding_changes_nothing():
    padded, unpadded = pair(tiny(), 2)
    ids, _ = padded_batch([6, 6])
    assert torch.equal(unpadded(ids)["logits"], padded(ids)["logits"])
    unpadded.use_unpadding(False)
    assert not unpadded.bert.unpadded


def test_layout_of_a_padded_batch():
    batch = unpad(torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 1]]))
    assert batch.tokens.index.tolist() == [0, 1, 2, 4, 8, 9, 11]
    assert batch.tokens.cu_seqlens.tolist() == [0, 3, 4, 7] and batch.tokens.cu_seqlens.dtype == torch.int32
    assert batch.tokens.max_len == 3 and batch.positions.tolist() == [0, 1, 2, 0, 0, 1, 3]
    x = torch.arange(12.0).view(3, 4, 1)
    assert torch.equal(batch.pad(batch.pack(x)), x * batch.mask.view(3, 4, 1))
    rows = batch.rows(torch.tensor([[0], [0], [3]]))
    assert rows.packed.tolist() == [0, 3, 6] and rows.cu_seqlens.tolist() == [0, 1, 2, 3] and rows.max_len == 1


def test_flash_varlen_gets_each_sequences_rows(monkeypatch):
    # flash-attn needs CUDA; a stand-in with its signature checks what the model hands it.
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p):
        assert cu_q.dtype == cu_k.dtype == torch.int32 and dropout_p == 0.0
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
        outs = []
        for b in range(len(cu_q) - 1):
            qs, ks, vs = (t[s:e].transpose(0, 1) for t, s, e in ((q, cu_q[b], cu_q[b + 1]), (k, cu_k[b], cu_k[b + 1]),
                                                                  (v, cu_k[b], cu_k[b + 1])))
            outs.append(attention.eager_attention(qs, ks, vs, None, 0.0, False).transpose(0, 1))
        return torch.cat(outs)

    padded, unpadded = pair(tiny(), 2)
    monkeypatch.setattr(attention, "_flash_varlen", lambda q, backend: varlen)
    ids, mask = padded_batch([12, 5, 9, 1])
    padded.eval()
    unpadded.eval()
    with torch.no_grad():
        torch.testing.assert_close(unpadded(ids, mask)["logits"], padded(ids, mask)["logits"], rtol=1e-5, atol=1e-6)


def test_compiled_unpadded_classifier_runs_with_graph_breaks():
    # The token count is a data-dependent shape: dynamo breaks the graph where the layout is built
    # (nonzero, host reads) and traces the rest; outputs and gradients stay the eager ones.
    padded, unpadded = pair(tiny(num_layers=1), 2)
    compiled = torch.compile(unpadded, backend="eager")
    for lengths in ([5, 3], [7, 2, 7]):
        ids, mask = padded_batch(lengths)
        assert_same_step([padded, compiled], ids, mask, torch.arange(len(lengths)) % 2)
        padded.zero_grad()
        unpadded.zero_grad()
