# The README's two commands: `make demo` and `make test`. Both install first (idempotent, quick when unchanged).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

demo: install
	$(PY) -m craft_train --demo --save-dir checkpoints_improved
	$(PY) -m ckptio list checkpoints_improved
	$(PY) -m ckptio verify checkpoints_improved

test: install
	$(PY) -m ruff check ckptio craft_train benchmarks tests
	$(PY) -m pytest -q --timeout=600

bench: install
	$(PY) benchmarks/save_latency.py
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/learning_curve.py

clean:
	rm -rf $(VENV) checkpoints_improved bench_out
