# Every target builds its own environment in .venv/ on demand (a fresh clone needs nothing else):
# `make run` and `make bench` the runtime requirements with the JAX build of this machine's
# accelerator, `make test` and `make lint` the test and lint tools on top.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# cpu, cuda (NVIDIA GPU, CUDA 13) or tpu; detected (nvidia-smi, TPU devices) unless given.
ACCEL ?= $(shell $(PYTHON) sjc_jax/devices.py)
ifeq ($(filter $(ACCEL),cpu cuda tpu),)
$(error ACCEL must be cpu, cuda or tpu, got '$(ACCEL)')
endif
JAX_VERSION := $(shell sed -n 's/^jax==//p' requirements.txt)
JAX_cpu := jax==$(JAX_VERSION)
JAX_cuda := jax[cuda13]==$(JAX_VERSION)
JAX_tpu := jax[tpu]==$(JAX_VERSION)
RUN_STAMP := $(VENV)/.run-$(ACCEL)

PROMPT ?=
MODEL ?= $(if $(PROMPT),stable-diffusion-v1-5/stable-diffusion-v1-5,testbed)
STEPS ?=
SEED ?= 0
# A fresh directory per run, so repeating `make run` never collides with an earlier run.
OUT ?= runs/$(if $(PROMPT),$(shell echo '$(PROMPT)' | tr -c 'a-zA-Z0-9\n' '_' | cut -c1-40),testbed)-$(shell date +%Y%m%d-%H%M%S)
SCENE ?=
ARGS ?=

.PHONY: test test-slow lint format bench run sweep learned-model clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Runtime only: requirements.txt and the JAX build of ACCEL (one stamp per build).
$(RUN_STAMP): requirements.txt | $(PY)
	rm -f $(VENV)/.run-*
	$(PY) -m pip install -q -r requirements.txt '$(JAX_$(ACCEL))'
	touch $@

# Tests and lint tools (requirements-dev.txt, which includes requirements.txt).
$(STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check sjc_jax tests experiments
	$(VENV)/bin/ruff format --check sjc_jax tests experiments

format: $(STAMP)
	$(VENV)/bin/ruff format sjc_jax tests experiments
	$(VENV)/bin/ruff check --fix sjc_jax tests experiments

bench: $(RUN_STAMP)
	$(PY) -m sjc_jax bench $(ARGS)

run: $(RUN_STAMP)
	$(PY) -m sjc_jax run --model '$(MODEL)' $(if $(PROMPT),--prompt '$(PROMPT)') \
		$(if $(STEPS),--steps $(STEPS)) --seed $(SEED) --out '$(OUT)' \
		$(if $(SCENE),--scene '$(SCENE)') $(ARGS)

# Many lifts at once (python -m sjc_jax sweep): by default 4 seeds of the testbed duck as one
# batched run; SEEDS, SWEEP_OUT and ARGS (e.g. ARGS='--scenes duck,mug --set lr=0.1,0.2').
SEEDS ?= 0-3
SWEEP_OUT ?= runs/sweep-$(shell date +%Y%m%d-%H%M%S)
sweep: $(RUN_STAMP)
	$(PY) -m sjc_jax sweep --seeds '$(SEEDS)' --out '$(SWEEP_OUT)' $(if $(STEPS),--steps $(STEPS)) \
		$(ARGS)

# Retrain the committed learned model (sjc_jax/learned/default_model) with the command that made
# it (about 26 minutes on a 2-core CPU); the training directory is runs/learned-model-DATE.
LEARNED_OUT ?= runs/learned-model-$(shell date +%Y%m%d-%H%M%S)
learned-model: $(RUN_STAMP)
	$(PY) -m sjc_jax train-model --out '$(LEARNED_OUT)' --model-out sjc_jax/learned/default_model \
		--seed 0 $(ARGS)

clean-venv:
	rm -rf $(VENV)
