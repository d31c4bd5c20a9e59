# cramming: common tasks. Every target sets itself up (virtual environment + install) first.
#   make demo       cramming vs original-BERT recipe, same budget, on the embedded corpus (CPU is fine)
#   make test       the test suite (fast tests; `make test-slow`, `make test-gpu` for the rest)
#   make reproduce  the paper's pipeline: C4, 24h budget, crammed-bert, GLUE (needs a GPU and network)

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Use the active virtual environment if there is one, else create .venv here.
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
CRAM := $(VENV)/bin/cram
STAMP := $(VENV)/.cramming-installed
# torch is installed before the project so that the project's `torch>=2.4` never pulls a second,
# multi-GB build. Override for a specific CUDA build, e.g. TORCH_SPEC="torch --index-url ...".
TORCH_SPEC ?= torch==2.13.0

.PHONY: help install test test-slow test-gpu lint demo reproduce experiment bench clean

help:
	@echo "targets: install test test-slow test-gpu lint demo reproduce experiment bench clean"

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

test-gpu: install
	$(PY) -m pytest -q -m gpu

lint: install
	$(VENV)/bin/ruff check cramming tests scripts

# `make demo`: the paper's point in miniature, offline, CPU is fine. Two pretraining runs with the
# same budget, data, size class, device profile and held-out scoring, differing only in recipe:
# the cramming recipe (arch=demo train=cramming) and the original BERT recipe (arch=demo-bert-original
# train=bert-original: BERT's architecture at arch=demo's size); crammed-bert and bert-original when a
# GPU is visible. Then fill-mask through `transformers.pipeline` on both exports, GLUE on two of
# the task subsets shipped in cramming/assets/glue_demo (a pipeline check: one trial, one epoch, a few
# hundred rows; minutes of pretraining leave any model near chance there) and one report with the
# held-out loss of both runs against time. The budget is wall-clock, so the two runs take
# 2 x DEMO_BUDGET on any machine; the rest scales with the machine's speed (README).
DEMO_OUT ?= outputs/demo
DEMO_BUDGET ?= 2m
DEMO_VOCAB ?= 8192
# Held-out MLM loss every this many minutes (it counts against the budget, the same for both runs).
DEMO_EVAL_MINUTES ?= 0.5
DEMO_SENTENCE ?= and he went into [MASK] house of the lord.
DEMO_GLUE_TASKS ?= sst2,stsb
DEMO_TRIALS ?= 1
DEMO_EPOCHS ?= 1
# Rows per GLUE task (the shipped subsets hold 2000-2490 train and 277-1500 dev rows).
DEMO_TRAIN_EXAMPLES ?= 500
DEMO_EVAL_EXAMPLES ?= 400
# The paper's finetuning LR (4e-5) suits BERT-base; a 4.7M-parameter model barely moves with it in
# one short epoch.
DEMO_GLUE_LR ?= 1e-3
# Whether torch sees a GPU, asked once (the first use replaces this variable by the answer).
DEMO_GPU = $(eval DEMO_GPU := $$(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0))$(DEMO_GPU)
DEMO_ARCH ?= $(if $(filter 1,$(DEMO_GPU)),crammed-bert,demo)
DEMO_BASELINE_ARCH ?= $(if $(filter 1,$(DEMO_GPU)),bert-original,demo-bert-original)
# On a CPU the first 8M characters of the embedded corpus (about 14k rows of 128 tokens), more than
# either run reads in a few minutes there, so prepared in seconds and never revisited; all of it on a GPU.
DEMO_MAX_CHARS ?= $(if $(filter 1,$(DEMO_GPU)),null,8000000)
DEMO_DATA = data=embedded data.vocab_size=$(DEMO_VOCAB) data.max_chars=$(DEMO_MAX_CHARS)
# On a CPU both runs step with 256 sequences (bert-original's own batch; the cramming run ramps to
# it in micro-batches of 32), so a few minutes give enough optimizer steps; on a GPU each recipe
# keeps its own (cramming 4096, 4032 on a 2080 Ti; bert-original 256).
DEMO_TARGET_BATCH ?= $(if $(filter 1,$(DEMO_GPU)),,train.target_batch_size=256)
# Everything both runs share; both held-out losses use the same rows and masks at 15% (the
# cramming recipe trains at 25%, BERT's at 15%, and the loss depends on the rate).
DEMO_PRETRAIN = $(DEMO_DATA) budget=$(DEMO_BUDGET) $(DEMO_TARGET_BATCH) train.eval_mask_rate=0.15 \
	train.eval_interval_minutes=$(DEMO_EVAL_MINUTES) train.log_interval=5 paths.out_root=$(DEMO_OUT)
DEMO_RUNS = $(DEMO_OUT)/pretrain
demo: install
	rm -rf $(DEMO_OUT)
	$(CRAM) data $(DEMO_DATA)
	$(CRAM) pretrain arch=$(DEMO_ARCH) train=cramming run_name=cramming $(DEMO_PRETRAIN)
	$(CRAM) pretrain arch=$(DEMO_BASELINE_ARCH) train=bert-original run_name=bert-original $(DEMO_PRETRAIN)
	$(PY) scripts/demo_fill_mask.py cramming=$(DEMO_RUNS)/cramming/final \
		bert-original=$(DEMO_RUNS)/bert-original/final --sentence "$(DEMO_SENTENCE)" --out $(DEMO_OUT)/fill_mask.md
	$(CRAM) glue ckpt=$(DEMO_RUNS)/cramming/final glue.data_dir=cramming/assets/glue_demo \
		"glue.tasks=[$(DEMO_GLUE_TASKS)]" glue.trials=$(DEMO_TRIALS) glue.epochs=$(DEMO_EPOCHS) \
		glue.max_train_examples=$(DEMO_TRAIN_EXAMPLES) glue.max_eval_examples=$(DEMO_EVAL_EXAMPLES) \
		glue.lr=$(DEMO_GLUE_LR) paths.out_root=$(DEMO_OUT) run_name=pipeline-check
	@printf '%s\n' '## How to read this demo' '' \
		'- Both runs had the same budget ($(DEMO_BUDGET)), data ($(DEMO_DATA)) and device profile; they differ in arch ($(DEMO_ARCH) vs $(DEMO_BASELINE_ARCH), the same size class) and train recipe (the table of config keys that differ lists every difference).' \
		'- Compare the held-out losses (dashed lines with markers): both are scored on the same held-out rows with the same masks at 15%. The training losses are at the masking rate of each recipe (25% vs 15%), so they do not compare across runs. A model that has learned nothing scores ln(vocabulary size), 9.01 at 8192.' \
		'- GLUE ran on $(DEMO_GLUE_TASKS) only, with $(DEMO_TRAIN_EXAMPLES) training and at most $(DEMO_EVAL_EXAMPLES) dev rows per task, $(DEMO_EPOCHS) epoch(s), $(DEMO_TRIALS) trial(s), on the cramming export: a pipeline check that the export finetunes and scores end to end, not a score of either recipe.' \
		> $(DEMO_OUT)/notes.md
	$(CRAM) report $(DEMO_RUNS)/cramming $(DEMO_RUNS)/bert-original $(DEMO_OUT)/glue/pipeline-check \
		--include $(DEMO_OUT)/notes.md --include $(DEMO_OUT)/fill_mask.md --out $(DEMO_OUT)/report \
		--name "make demo: the cramming recipe vs the original BERT recipe, $(DEMO_BUDGET) each"
	@echo "demo finished: report at $(DEMO_OUT)/report/report.md"

# The paper's pipeline. Variables: BUDGET, GPU, DATA, SEED; DRY_RUN=1 prints the commands only;
# SKIP_CHECKS=1 runs even when the GPU/disk/network checks fail. Re-running continues a stopped run.
BUDGET ?= 24h
GPU ?= auto
DATA ?= c4-filtered
SEED ?= 0
reproduce: install
	PATH="$(VENV)/bin:$$PATH" $(PY) scripts/reproduce.py --budget $(BUDGET) --gpu $(GPU) --data $(DATA) --seed $(SEED) \
		$(if $(DRY_RUN),--dry-run) $(if $(SKIP_CHECKS),--skip-checks)

# A paper's ablation or sweep, e.g. `make experiment NAME=random-ltd SCALE=tiny` (docs/experiments.md).
NAME ?= cramming-ablation
SCALE ?= tiny
experiment: install
	$(CRAM) experiment $(NAME) --scale $(SCALE)

# Training-step throughput against transformers' BertForMaskedLM on this machine (docs/benchmarks.md).
bench: install
	$(CRAM) bench model

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
