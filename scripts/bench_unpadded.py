#!/usr/bin/env python
"""Unpadded vs padded finetuning steps on the CPU, on the recipe's batches of the shipped GLUE subsets.

One optimizer step (forward, backward, clipping, AdamW) of CrammedBertForSequenceClassification in
training mode, with configs/glue/cramming.yaml's batch 16, dropout 0.1 and AdamW, each batch padded to its longest example as eager finetuning pads
it today; the same step with `use_unpadding()`. Both models start from the same weights and take the
same batches, one step each per batch (or the fastest of --rounds), the order alternating (padded first,
then unpadded first) after untimed warm-up steps; the ratio is the median of the per-batch ratios, with
quartiles.

The batches come from the recipe's shuffled loader over cramming/assets/glue_demo/<task>/train.tsv,
encoded as finetuning encodes them, with a WordPiece tokenizer (up to the model's vocabulary size)
trained on the four tasks' text: no pretrained tokenizer ships with the repository.

    python scripts/bench_unpadded.py --arch crammed-bert --repeats 12
    python scripts/bench_unpadded.py --arch demo --repeats 30 --profile sst2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerFast

from cramming.benchtools import cpu_name
from cramming.config import CONFIG_DIR, to_dataclass
from cramming.data.tokenizer import train_tokenizer
from cramming.glue.batching import Collate, make_loader
from cramming.glue.encoding import encode_with_cls_sep
from cramming.glue.tasks import TaskData, load_task
from cramming.model import ModelConfig
from cramming.model.bert import CrammedBertForSequenceClassification
from cramming.optim.groups import build_optimizer

GLUE_DEMO = Path(__file__).resolve().parents[1] / "cramming" / "assets" / "glue_demo"
TASKS = ("cola", "sst2", "mrpc", "stsb")
RECIPE = yaml.safe_load((CONFIG_DIR / "glue" / "cramming.yaml").read_text())


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="crammed-bert", help="preset in configs/arch (crammed-bert, demo, ...)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--repeats", type=int, default=12, help="timed batches per task (each: one step of each model)")
    p.add_argument("--rounds", type=int, default=1,
                   help="steps of each model per batch, the fastest kept (other load on a shared machine only adds time)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per task first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", choices=TASKS, help="also profile a few steps of each model on this task")
    return p.parse_args(argv)


def make_tokenizer(tasks: dict[str, TaskData], vocab_size: int) -> PreTrainedTokenizerFast:
    """WordPiece over the tasks' texts (at most the model's vocabulary), wrapped as finetuning expects."""
    texts = [t for data in tasks.values() for split in (data.train, *data.dev.values())
             for t in split.texts_a + (split.texts_b or [])]
    tok = train_tokenizer(lambda: texts, "wordpiece", vocab_size, exact_vocab=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def task_batches(data: TaskData, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """The recipe's training batches of the task, padded to each batch's longest, epoch after epoch."""
    encoded = encode_with_cls_sep(tokenizer, data.train, RECIPE["max_seq_len"])
    collate = Collate(tokenizer.pad_token_id, regression=data.spec.num_labels == 1)
    loader = make_loader(encoded.input_ids, encoded.labels, RECIPE["batch_size"], collate, shuffle=True, seed=seed,
                         workers=0)
    while True:
        yield from loader


def model_pair(cfg: ModelConfig, num_labels: int) -> list[tuple[torch.nn.Module, torch.optim.Optimizer]]:
    """(padded, unpadded) classifiers with the same weights, each with the recipe's AdamW."""
    torch.manual_seed(0)
    padded = CrammedBertForSequenceClassification(cfg, num_labels).train()
    unpadded = copy.deepcopy(padded)
    unpadded.use_unpadding()
    return [(m, build_optimizer(m.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"],
                                betas=tuple(RECIPE["adam_betas"]), eps=RECIPE["adam_eps"], device=torch.device("cpu")))
            for m in (padded, unpadded)]


def timed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    model(batch["input_ids"], batch["attention_mask"], batch["labels"])["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_task(cfg: ModelConfig, data: TaskData, tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace) -> dict:
    pair = model_pair(cfg, data.spec.num_labels)
    batches = task_batches(data, tokenizer)
    times: list[list[float]] = [[], []]
    real = padded = 0
    for i in range(args.warmup + args.repeats):
        batch = next(batches)
        step = [float("inf")] * 2
        for r in range(args.rounds):
            for k in (0, 1) if (i + r) % 2 == 0 else (1, 0):  # alternate who goes first: drift hits both alike
                step[k] = min(step[k], timed_step(*pair[k], batch))
        if i >= args.warmup:
            for k in (0, 1):
                times[k].append(step[k])
            real += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
    ratios = sorted(p / u for p, u in zip(*times, strict=True))
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"task": data.spec.name, "padded_steps_s": 1 / statistics.median(times[0]),
            "unpadded_steps_s": 1 / statistics.median(times[1]), "ratio": median, "q1": q1, "q3": q3,
            "padding_share": 1 - real / padded}


def profile_task(cfg: ModelConfig, data: TaskData, tokenizer: PreTrainedTokenizerFast, steps: int = 4) -> None:
    """Where each model's step time goes: torch.profiler's top operators over a few steps."""
    from torch.profiler import ProfilerActivity, profile

    for name, (model, optimizer) in zip(("padded", "unpadded"), model_pair(cfg, data.spec.num_labels), strict=True):
        batches = task_batches(data, tokenizer)
        timed_step(model, optimizer, next(batches))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                timed_step(model, optimizer, next(batches))
        print(f"\n## {name}, {data.spec.name}, {steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = to_dataclass(ModelConfig, OmegaConf.load(CONFIG_DIR / "arch" / f"{args.arch}.yaml"), "arch")
    cfg = dataclasses.replace(cfg, dropout=RECIPE["dropout"])
    tasks = {name: load_task(name, GLUE_DEMO) for name in TASKS}
    tokenizer = make_tokenizer(tasks, cfg.vocab_size)
    print(f"{args.arch} ({cfg.num_layers} x {cfg.hidden_size}), batch {RECIPE['batch_size']}, dropout {cfg.dropout}, fp32, "
          f"{args.threads} threads, {args.repeats} batches x {args.rounds} rounds, torch {torch.__version__}, {cpu_name()}")
    print("| task | padding share | padded steps/s | unpadded steps/s | ratio [quartiles] |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.tasks:
        r = bench_task(cfg, tasks[name], tokenizer, args)
        print(f"| {r['task']} | {r['padding_share']:.0%} | {r['padded_steps_s']:.3f} | {r['unpadded_steps_s']:.3f} | "
              f"**{r['ratio']:.2f}x** [{r['q1']:.2f}, {r['q3']:.2f}] |", flush=True)
    if args.profile:
        profile_task(cfg, tasks[args.profile], tokenizer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
