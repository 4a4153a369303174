# The README's two commands: `make demo` and `make test`. Both install first (idempotent, quick when unchanged).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-learning lint bench gpu-check clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bench,lightning]'
	touch $(STAMP)

# The demo writes into its own directory, emptied first, so that it never mixes with (or is resumed by) a real
# run, which uses checkpoints_improved.
DEMO_DIR := checkpoints_demo

demo: install
	rm -rf $(DEMO_DIR)
	$(PY) -m craft_train --demo --save-dir $(DEMO_DIR)
	$(PY) -m ckptio list $(DEMO_DIR)
	$(PY) -m ckptio verify $(DEMO_DIR)
	@echo
	@echo "Next, in this shell (python -m needs the project's environment):"
	@echo "  . .venv/bin/activate"
	@$(PY) -c "from craft_train.cli import next_step; print('  ' + next_step())"
	@echo "  python -m craft_train --resume auto                  # continue it after a stop"
	@echo "  python -m ckptio list checkpoints_improved"
	@echo "  python -m craft_train.detect --checkpoint $(DEMO_DIR)/best_model.pth --images DIR --out results"

# Two pytest-xdist workers (TEST_WORKERS=0 runs the suite in one process, e.g. to debug a test);
# each worker takes whole files, longest first (tests/conftest.py).
TEST_WORKERS ?= 2
# PYTEST_ARGS=--learning adds the learning tier (what .ci/run does): about 2 minutes more on 2 cores.
test: install
	$(PY) -m ruff check ckptio craft_train benchmarks tests *.py
	$(PY) -m pytest -q --timeout=600 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The tests that need a CRAFT model trained for 200 steps alone (~2.5 minutes on 2 cores; tests/conftest.py).
test-learning: install
	$(PY) -m pytest -q --timeout=900 --learning -m learning

bench: install
	$(PY) benchmarks/save_latency.py
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/load_latency.py
	$(PY) benchmarks/learning_curve.py

# On a GPU machine: CUDA ordering, save latency (CRAFT, 2 GB) and training overhead in one call (~5 min).
# No install step: a GPU image brings its own torch (the venv is used when there is one).
# One call on a lent GPU, within 5 minutes: the ordering check, pytest -m cuda, save latency, training overhead;
# one summary table first, then each section's (bench_out/gpu_check/gpu_check.md). Needs no install.
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/gpu_check.py --with-tests --budget 280

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench_out
