# Syncline developer entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint typecheck bench clean

$(STAMP): pyproject.toml requirements.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/syncline demo

test: $(STAMP)
	$(PY) -m ruff check shared sandbox tests function_app.py
	$(PY) -m mypy shared
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check shared sandbox tests function_app.py

typecheck: $(STAMP)
	$(PY) -m mypy shared

bench: $(STAMP)
	$(PY) -m sandbox.bench && $(PY) -m sandbox.bench_sf && $(PY) -m sandbox.bench_sap

clean:
	rm -rf $(VENV) .syncline reports .pytest_cache .mypy_cache .ruff_cache
