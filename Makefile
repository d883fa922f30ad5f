# Every target builds its own environment in .venv/ on demand (a fresh clone needs nothing else).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

PROMPT ?=
MODEL ?= $(if $(PROMPT),runwayml/stable-diffusion-v1-5,testbed)
STEPS ?=
SEED ?= 0
# A fresh directory per run, so repeating `make run` never collides with an earlier run.
OUT ?= runs/$(if $(PROMPT),$(shell echo '$(PROMPT)' | tr -c 'a-zA-Z0-9\n' '_' | cut -c1-40),testbed)-$(shell date +%Y%m%d-%H%M%S)
SCENE ?=
ARGS ?=

.PHONY: test test-slow lint format bench run clean-venv

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

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

bench: $(STAMP)
	$(PY) -m sjc_jax bench $(ARGS)

run: $(STAMP)
	$(PY) -m sjc_jax run --model '$(MODEL)' $(if $(PROMPT),--prompt '$(PROMPT)') \
		$(if $(STEPS),--steps $(STEPS)) --seed $(SEED) --out '$(OUT)' \
		$(if $(SCENE),--scene '$(SCENE)') $(ARGS)

clean-venv:
	rm -rf $(VENV)
