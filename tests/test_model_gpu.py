"""GPU paths of the model: compiled bf16/fp16 training agrees with fp32 eager; sdpa's flash kernel runs.

Run on a CUDA machine with `pytest -m gpu tests/test_model_gpu.py`; skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from cramming.model.bert import CrammedBertForMLM, ModelConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CFG = ModelConfig(name="gpu-test", vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)


def batches(n: int, b: int = 32, length: int = 128, k: int = 32):
    g = torch.Generator().manual_seed(0)
    # Zipf-distributed token ids: the model lowers its loss within a few steps by learning the
    # unigram frequencies, so "it trains" is checkable (uniform random ids leave nothing to learn).
    zipf = 1.0 / torch.arange(1, CFG.vocab_size - 4, dtype=torch.float)
    for _ in range(n):
        ids = torch.multinomial(zipf, b * length, replacement=True, generator=g).view(b, length) + 5
        pos = torch.rand(b, length, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values
        labels = torch.full_like(ids, -100).scatter(1, pos, ids.gather(1, pos))
        yield ids.scatter(1, pos, 4).cuda(), labels.cuda(), pos.cuda()


def train_losses(precision: str, compile: bool, steps: int = 8) -> list[float]:
    torch.manual_seed(0)
    model = CrammedBertForMLM(CFG).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-12, fused=True)
    forward = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # A modest initial scale so that no step is skipped while the scaler calibrates, which would
    # shift the fp16 trajectory against the reference by whole steps.
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if precision == "fp16" else None
    losses = []
    for ids, labels, pos in batches(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = forward(ids, labels=labels, masked_positions=pos)["loss"]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # as the trainer does
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_compiled_mixed_precision_training_matches_fp32_eager(precision):
    reference = train_losses("fp32", compile=False)
    got = train_losses(precision, compile=True)
    assert all(torch.isfinite(torch.tensor(got))), got
    assert reference[-1] < reference[0] - 0.1, f"fp32 eager did not train: {reference}"
    assert got[-1] < got[0] - 0.1, f"{precision} compiled did not train: {got}"
    # Same weights and batches: the first loss differs only by rounding; later ones drift apart
    # by a few percent at most as rounding differences compound through the updates.
    assert abs(got[0] - reference[0]) <= 0.01 * reference[0], f"{got[0]} vs {reference[0]}"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(reference), rtol=5e-2, atol=0.0,
                               msg=f"{precision} compiled {got} vs fp32 eager {reference}")


def test_sdpa_flash_kernel_matches_eager():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = CrammedBertForMLM(CFG).cuda().eval()
    eager = CrammedBertForMLM(ModelConfig(**{**CFG.__dict__, "attention_backend": "eager"})).cuda().eval()
    eager.load_state_dict(model.state_dict())
    ids = next(batches(1))[0]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot serve these inputs
            flash = model(ids)["logits"].float()
        reference = eager(ids)["logits"].float()
    torch.testing.assert_close(flash, reference, atol=5e-2, rtol=5e-2)


def test_compiled_random_ltd_step_runs():
    model = CrammedBertForMLM(CFG).cuda().train()
    forward = torch.compile(model, dynamic=False)
    ids, labels, pos = next(batches(1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = forward(ids, labels=labels, masked_positions=pos, keep_tokens=64)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
