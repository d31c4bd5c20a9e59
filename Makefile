# cramming: common tasks. Every target sets itself up (virtual environment + install) first.
#   make demo       the whole pipeline on the embedded corpus (CPU is fine, ~15 minutes on 2 cores)
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

# The whole pipeline on the embedded corpus, offline: a tokenizer trained on the shipped corpus, a
# few minutes of pretraining (a small model on CPU; crammed-bert when a GPU is visible), GLUE on the
# small real task subsets shipped in cramming/assets/glue_demo, and a report.
DEMO_OUT ?= outputs/demo
DEMO_BUDGET ?= 4m
DEMO_VOCAB ?= 8192
DEMO_TRIALS ?= 2
DEMO_EPOCHS ?= 2
# Training rows per GLUE task (the shipped subsets hold 2000-2490); keeps the demo within ~15 minutes.
DEMO_TRAIN_EXAMPLES ?= 1000
# The paper's finetuning LR (4e-5) suits BERT-base; the demo's 4.7M-parameter model learns nothing
# with it in 2 short epochs (SST-2 stays at 50.9%), while 1e-3 reaches 66% on the same checkpoint.
DEMO_GLUE_LR ?= 1e-3
DEMO_ARCH ?= $(shell $(PY) -c "import torch; print('crammed-bert' if torch.cuda.is_available() else 'demo')" 2>/dev/null || echo demo)
DEMO_DATA := data=embedded data.vocab_size=$(DEMO_VOCAB)
demo: install
	rm -rf $(DEMO_OUT)
	$(CRAM) data $(DEMO_DATA)
	$(CRAM) pretrain $(DEMO_DATA) arch=$(DEMO_ARCH) train=cramming budget=$(DEMO_BUDGET) \
		paths.out_root=$(DEMO_OUT) run_name=run
	$(CRAM) glue ckpt=$(DEMO_OUT)/pretrain/run/final glue.data_dir=cramming/assets/glue_demo \
		"glue.tasks=[cola,sst2,mrpc,stsb,rte]" glue.trials=$(DEMO_TRIALS) glue.epochs=$(DEMO_EPOCHS) \
		glue.max_train_examples=$(DEMO_TRAIN_EXAMPLES) glue.lr=$(DEMO_GLUE_LR) \
		paths.out_root=$(DEMO_OUT) run_name=run
	$(CRAM) report $(DEMO_OUT)/pretrain/run $(DEMO_OUT)/glue/run --out $(DEMO_OUT)/report
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
