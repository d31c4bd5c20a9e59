"""Side-by-side GLUE trials (cramming.glue.parallel), bucketed padding and `cram bench glue`'s modes.

The equivalence tests run a task's trials one after another and side by side on a tiny model and
the shipped task subsets (cramming/assets/glue_demo): RTE (classification) and STS-B (regression).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from wordpiece import tiny_glue_export

from cramming import runs
from cramming.glue import GlueConfig
from cramming.glue import finetune as F
from cramming.glue import parallel as P
from cramming.glue.batching import Collate, bucket_widths, make_loader, padded_width, padding_waste
from cramming.glue.sources import resolve_source
from cramming.glue.training import model_inputs
from cramming.gpu import GpuProfile

ASSETS = Path(F.__file__).resolve().parents[1] / "assets" / "glue_demo"
CPU = GpuProfile()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny pretraining export (random weights) with a WordPiece tokenizer trained on the shipped RTE/STS-B text."""
    return tiny_glue_export(tmp_path_factory.mktemp("ckpt"), [ASSETS / "RTE/train.tsv", ASSETS / "STS-B/train.tsv"],
                            rows=600, vocab_size=300)


def _setup(ckpt: Path, task: str, **overrides):
    settings = {"max_train_examples": 40, "max_eval_examples": 32, "epochs": 2, "trials": 3, **overrides}
    gcfg = GlueConfig(tasks=[task], data_dir=str(ASSETS), **settings)
    source = resolve_source(OmegaConf.create({"ckpt": str(ckpt)}), gcfg)
    (data, _), = F.load_all_tasks(gcfg)
    return gcfg, source, data, F.encode_task(source, data, gcfg)


def _sequential(source, spec, train, dev, gcfg, seed, profile, label):
    """A sequential trial's record as results.json holds it, and its model."""
    trial, model = F.finetune_trial(source, spec, train, dev, gcfg, seed, profile, label)
    return trial.to_json(), model


def _side_by_side(source, spec, train, dev, gcfg, seeds, profile, labels):
    """A side-by-side group (its records as results.json holds them), or None."""
    group = P.finetune_side_by_side(lambda: source.make_model(spec.num_labels, gcfg.dropout), source.pad_id, spec,
                                    train, dev, gcfg, seeds, profile, labels)
    return group and P.Group([t.to_json() for t in group.trials], group.stack)


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_side_by_side_trials_equal_sequential_ones(ckpt, task):
    """Without dropout each stacked trial is its sequential run: same init, batches, AdamW, schedule."""
    gcfg, source, data, (train, dev) = _setup(ckpt, task, dropout=0.0)
    seeds = [0, 1, 2]  # 40 examples: two batches of 16 and one of 8 per epoch, 2 epochs
    sequential = [_sequential(source, data.spec, train, dev, gcfg, s, CPU, f"seq {s}") for s in seeds]
    group = _side_by_side(source, data.spec, train, dev, gcfg, seeds, CPU, [f"sbs {s}" for s in seeds])
    assert group is not None
    for i, ((trial, model), stacked) in enumerate(zip(sequential, group.trials, strict=True)):
        assert stacked["mode"] == "side-by-side" and trial["mode"] == "sequential"
        assert stacked["seed"] == trial["seed"] and stacked["train_steps"] == trial["train_steps"] == 6
        assert [e["train_loss"] for e in stacked["epochs"]] == pytest.approx([e["train_loss"] for e in trial["epochs"]], rel=1e-5)
        assert [e["lr"] for e in stacked["epochs"]] == pytest.approx([e["lr"] for e in trial["epochs"]], rel=1e-12)
        assert set(stacked["final"]) == set(trial["final"])
        for key, value in trial["final"].items():
            assert stacked["final"][key] == pytest.approx(value, abs=0.05), key  # percent
        mine = group.stack.module(i).state_dict()
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(mine[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # Different seeds are different trials (a stack that mixed them up would pass the loop above only by luck).
    assert group.trials[0]["epochs"][0]["train_loss"] != group.trials[1]["epochs"][0]["train_loss"]


def test_dropout_masks_differ_across_trials_and_repeat_per_group(ckpt):
    gcfg, source, data, (train, _) = _setup(ckpt, "rte")  # the recipe's dropout 0.1

    def same_weights():
        torch.manual_seed(0)  # every trial the same model, so only dropout can tell them apart
        return source.make_model(data.spec.num_labels, gcfg.dropout)

    stack = P.build_stack(same_weights, [0, 1, 2], torch.device("cpu"))
    collate = Collate(source.pad_id, False)
    one = next(iter(make_loader(train.input_ids, train.labels, 16, list, True, 0, 0)))
    batch = collate.stack([one] * 3)  # the same batch for every trial
    step = P.stacked_loss(stack.base, regression=False)

    def losses(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return step(stack.tensors(), model_inputs(batch), batch["labels"])

    stack.base.train()
    first = losses(P.group_seed([0, 1, 2]))
    assert len(set(first.tolist())) == 3, "the trials drew the same dropout masks"
    assert torch.equal(first, losses(P.group_seed([0, 1, 2]))), "a rerun of the group drew other masks"
    assert P.group_seed([0, 1, 2]) != P.group_seed([0, 1, 3])
    stack.base.eval()
    assert len(set(losses(0).tolist())) == 1  # no dropout: identical trials give identical losses


def test_clip_per_trial_matches_clip_grad_norm():
    torch.manual_seed(0)
    shapes = [(5, 4), (4,), ()]
    scales = [0.01, 1.0, 10.0]  # trial 0 under the limit, the others clipped
    models = [[torch.randn(s, requires_grad=True) for s in shapes] for _ in scales]
    for params, scale in zip(models, scales, strict=True):
        for p in params:
            p.grad = torch.randn(p.shape) * scale
    stacked = [torch.stack([m[j].detach() for m in models]).requires_grad_() for j in range(len(shapes))]
    for j, p in enumerate(stacked):
        p.grad = torch.stack([m[j].grad for m in models])
    norms = P.clip_per_trial_(stacked, 1.0)
    for i, params in enumerate(models):
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        assert norms[i].item() == pytest.approx(norm.item(), rel=1e-6)
        for j, p in enumerate(params):
            torch.testing.assert_close(stacked[j].grad[i], p.grad)


def test_bucket_padding_keeps_batch_membership():
    rng = random.Random(0)
    lengths = [rng.randint(3, 128) for _ in range(70)]
    ids = [[i + 5] * n for i, n in enumerate(lengths)]  # each example's ids identify it
    labels = list(range(70))
    buckets = bucket_widths(128, 4)
    assert buckets == (32, 64, 96, 128) and bucket_widths(128, 1) == (128,) and bucket_widths(100, 3) == (40, 72, 100)
    plain = make_loader(ids, labels, 16, Collate(0, False), True, 7, 0)
    bucketed = make_loader(ids, labels, 16, Collate(0, False, buckets), True, 7, 0)
    for a, b in zip(plain, bucketed, strict=True):
        assert torch.equal(a["labels"], b["labels"])  # same examples in the same order
        assert b["input_ids"].shape[1] == padded_width(a["input_ids"].shape[1], buckets) >= a["input_ids"].shape[1]
        width = a["input_ids"].shape[1]
        assert torch.equal(b["input_ids"][:, :width], a["input_ids"]) and not b["attention_mask"][:, width:].any()
    raw = [make_loader(ids, labels, 16, list, True, s, 0) for s in (0, 1)]
    for group in zip(*raw, strict=True):
        stacked = Collate(0, False, buckets).stack(group)
        for i, batch in enumerate(group):
            alone = Collate(0, False).pad(batch, stacked["input_ids"].shape[2])
            assert all(torch.equal(stacked[k][i], alone[k]) for k in alone)
    waste = padding_waste(lengths, 16, [0, 1], buckets)
    assert len({w.real for w in waste.values()}) == 1  # every way pads the same examples
    assert waste["longest"].waste <= waste["buckets"].waste <= waste["max_seq_len"].waste
    assert waste["longest"].waste <= waste["side-by-side longest"].waste <= waste["side-by-side buckets"].waste


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rate_schedule_is_transformers_one(schedule):
    import transformers

    from cramming.glue.training import make_scheduler

    make = {"cosine": transformers.get_cosine_schedule_with_warmup, "linear": transformers.get_linear_schedule_with_warmup,
            "constant": lambda opt, warmup, total: transformers.get_constant_schedule_with_warmup(opt, warmup)}[schedule]
    gcfg = GlueConfig(schedule=schedule)
    ours, theirs = (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=4e-5) for _ in range(2))
    a, b = make_scheduler(ours, gcfg, 37), make(theirs, 4, 37)  # warmup round(0.1 x 37) = 4 steps
    for _ in range(37):
        assert a.get_last_lr()[0] == pytest.approx(b.get_last_lr()[0], rel=1e-9, abs=1e-15)
        for stepped in (ours, theirs, a, b):
            stepped.step()


def test_when_trials_run_side_by_side():
    cuda = GpuProfile(name="h100", device="cuda", precision="bf16")
    turing = GpuProfile(name="rtx2080ti", device="cuda", precision="fp16")
    cases = [(None, CPU, 5, False), (None, cuda, 5, True), (None, turing, 5, False), (True, CPU, 5, True),
             (False, cuda, 5, False), (None, cuda, 1, False), (True, turing, 5, False)]
    for setting, profile, trials, expected in cases:
        assert P.wanted(GlueConfig(parallel_trials=setting), profile, trials) is expected, (setting, profile.name, trials)


def test_cram_glue_side_by_side_then_resume_and_fallback(ckpt, tmp_path, monkeypatch, caplog):
    """glue.parallel_trials=true on the CPU: trials recorded side by side, exported, resumed with more
    trials; a group that does not fit runs its trials one after another. A bf16 profile runs fp32 on the CPU."""
    gcfg = GlueConfig(tasks=["rte"], data_dir=str(ASSETS), max_train_examples=32, max_eval_examples=16, epochs=1,
                      trials=2, parallel_trials=True, export_finetuned=True)
    source = resolve_source(OmegaConf.create({"ckpt": str(ckpt)}), gcfg)
    bf16 = GpuProfile(device="cpu", precision="bf16")
    results = F.run_glue(gcfg, source, tmp_path, bf16).to_json()
    assert results["run"]["precision"] == "fp32"
    first = results["tasks"]["rte"]["trials"]
    assert [(t["seed"], t["mode"], t["trials_together"]) for t in first] == [(0, "side-by-side", 2), (1, "side-by-side", 2)]
    from cramming.model import load_model

    assert load_model(tmp_path / "finetuned" / "rte", head="classification").num_labels == 2
    # More trials in the same folder, memory too small for a group: the new ones run one after another.
    monkeypatch.setattr(P, "_available_ram", lambda: 1)
    more = dataclasses.replace(gcfg, trials=4)
    with caplog.at_level(logging.WARNING, logger="cramming.glue.parallel"):
        trials = F.run_glue(more, source, tmp_path, bf16).to_json()["tasks"]["rte"]["trials"]
    assert "do not fit in CPU memory" in caplog.text and "running them one after another" in caplog.text
    assert trials[:2] == first and [t["mode"] for t in trials[2:]] == ["sequential", "sequential"]
    saved = runs.read_results(tmp_path)
    assert [t["seed"] for t in saved["tasks"]["rte"]["trials"]] == [0, 1, 2, 3]


def test_cuda_out_of_memory_gives_the_group_up(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(P, "_train_group", oom)
    spec = F.load_all_tasks(GlueConfig(tasks=["rte"], data_dir=str(ASSETS), max_train_examples=16))[0][0].spec

    def side_by_side(profile: GpuProfile):
        return P.finetune_side_by_side(lambda: None, 0, spec, None, {}, GlueConfig(), [0, 1], profile, ["a", "b"])

    assert side_by_side(GpuProfile(name="gpu", device="cuda")) is None
    with pytest.raises(torch.OutOfMemoryError):  # on the CPU only the memory estimate decides; a failure is raised
        side_by_side(CPU)


def test_cram_bench_glue_reports_every_mode_and_a_projection(tmp_path, capsys):
    from cramming.bench import main as bench_main

    out = tmp_path / "glue.json"
    code = bench_main(["glue", "--arch", "tiny", "--tasks", "rte", "--trials", "2", "--steps", "1", "--repeats", "3",
                       "--warmup", "0", "--threads", "1", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| rte | 2490 |" in text and "| mnli (proxy) | 392,702 | 245,440 |" in text
    assert "unpadded speed-up" in text and "side-by-side speed-up" in text
    report = json.loads(out.read_text())
    rte = report["tasks"]["rte"]
    assert report["modes"] == ["sequential", "unpadded", "side-by-side"] == list(rte["modes"])
    assert rte["modes"]["side-by-side"]["trials_per_step"] == 2 and rte["modes"]["unpadded"]["trials_per_step"] == 1
    base = rte["modes"]["sequential"]["blocks"]
    assert rte["modes"]["sequential"]["speedup"] is None
    for mode in ("unpadded", "side-by-side"):
        blocks = rte["modes"][mode]["blocks"]
        assert rte["modes"][mode]["speedups"] == pytest.approx([b / a for a, b in zip(base, blocks, strict=True)])
        assert len(blocks) == 3
    for mode in report["modes"]:
        rate = rte["modes"][mode]["optimizer_steps_per_s"]
        assert rte["modes"][mode]["sequences_per_s"] == pytest.approx(16 * rate)
        # 2 trials x 5 epochs x ceil(2490 / 16) steps at the measured rate
        assert report["projection"]["tasks"]["rte"][f"{mode}_h"] == pytest.approx(2 * 5 * 156 / rate / 3600)
    assert report["projection"]["trial_steps"] == sum(2 * 5 * -(-n // 16) for n in
                                                      (8551, 67349, 3668, 5749, 363846, 392702, 104743, 2490))


def test_cram_bench_glue_times_only_the_modes_asked_for(tmp_path):
    from cramming.bench import main as bench_main

    out = tmp_path / "glue.json"
    assert bench_main(["glue", "--arch", "tiny", "--tasks", "rte", "--modes", "unpadded", "sequential", "--steps", "1",
                       "--repeats", "2", "--warmup", "0", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["modes"] == ["sequential", "unpadded"] == list(report["tasks"]["rte"]["modes"])
    assert set(report["projection"]["total_h"]) == {"sequential", "unpadded"}


@pytest.mark.slow
def test_compiled_steps_equal_eager_ones(ckpt, monkeypatch):
    """The CUDA path's torch.compile of both steps (bucketed static shapes, eager last batch), on the
    CPU's inductor backend: the same losses as the eager steps. Minutes of compilation."""
    from cramming.glue import training

    gcfg, source, data, (train, dev) = _setup(ckpt, "rte", dropout=0.0, epochs=1)
    eager = [_sequential(source, data.spec, train, dev, gcfg, s, CPU, "eager")[0] for s in (0, 1)]
    monkeypatch.setattr(training, "compiles", lambda profile: True)  # TrialTrainer and the bucketed collate
    monkeypatch.setattr(P, "compiles", lambda profile: True)  # GroupTrainer
    seq = _sequential(source, data.spec, train, dev, gcfg, 0, CPU, "compiled")[0]
    group = _side_by_side(source, data.spec, train, dev, gcfg, [0, 1], CPU, ["c0", "c1"])
    torch._dynamo.reset()
    assert seq["epochs"][0]["train_loss"] == pytest.approx(eager[0]["epochs"][0]["train_loss"], rel=1e-4)
    for stacked, ref in zip(group.trials, eager, strict=True):
        assert stacked["epochs"][0]["train_loss"] == pytest.approx(ref["epochs"][0]["train_loss"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_side_by_side_equals_sequential_then_compiled_bf16(ckpt):
    """On CUDA: fp32 eager stacked trials equal sequential ones; bf16 + compile (bucketed shapes) trains."""
    gcfg, source, data, (train, dev) = _setup(ckpt, "rte", dropout=0.0)
    fp32 = GpuProfile(name="gpu", device="cuda", precision="fp32")
    sequential = [_sequential(source, data.spec, train, dev, gcfg, s, fp32, "seq")[0] for s in (0, 1)]
    group = _side_by_side(source, data.spec, train, dev, gcfg, [0, 1], fp32, ["a", "b"])
    for stacked, trial in zip(group.trials, sequential, strict=True):
        assert [e["train_loss"] for e in stacked["epochs"]] == pytest.approx([e["train_loss"] for e in trial["epochs"]], rel=1e-4)
    bf16 = GpuProfile(name="gpu", device="cuda", precision="bf16", compile=True)
    recipe = dataclasses.replace(gcfg, dropout=0.1)
    group = _side_by_side(source, data.spec, train, dev, recipe, [0, 1, 2], bf16, ["a", "b", "c"])
    torch._dynamo.reset()
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for t in group.trials for e in t["epochs"])
    assert len({t["epochs"][-1]["train_loss"] for t in group.trials}) == 3
