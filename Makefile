# Syncline developer entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Esri's `arcgis` package drives the ArcGIS simulator in the conformance suite. Installed without its declared
# dependencies (pandas, pyarrow, dask, ...: ~560 MB the tests never import); what it does import is the
# `arcgis-conformance` extra. Not a runtime dependency: requirements.txt (the deployed app) does not have it.
ARCGIS := arcgis==2.4.4

.PHONY: venv demo test lint typecheck bench chaos clean

$(STAMP): pyproject.toml requirements.txt Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,arcgis-conformance]'
	$(PY) -m pip install --quiet --no-deps '$(ARCGIS)'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m sandbox.demo

test: $(STAMP)
	$(PY) -m ruff check shared sandbox tests function_app.py
	$(PY) -m mypy shared
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check shared sandbox tests function_app.py

typecheck: $(STAMP)
	$(PY) -m mypy shared

# The Azure-runtime bench defaults to a few minutes' work; BENCH_AZURE_ARGS=--full runs the issue's sizes
# (10,000 changes over 10,000 and over 100 records, 20 ms per operation).
BENCH_AZURE_ARGS ?=
bench: $(STAMP)
	$(PY) -m sandbox.bench && $(PY) -m sandbox.bench_sf && $(PY) -m sandbox.bench_sap && $(PY) -m sandbox.bench_azure $(BENCH_AZURE_ARGS)

# Crash-and-fault proof: 20% of API calls faulted, the controller killed mid-drain; prints lost, duplicates,
# drift, dead letters vs expected and the highest delivery count of a good message. Fails on any finding.
CHAOS_ARGS ?=
chaos: $(STAMP)
	$(PY) -m sandbox.chaos --runtime embedded --signs 8000 --work-orders 2000 --changes 4000 --rounds 2 \
		--customers 200 --opportunities 120 --sap-orders 30 --kills 10 --report reports/chaos-embedded.json $(CHAOS_ARGS)
	$(PY) -m sandbox.chaos --runtime azure --signs 400 --work-orders 100 --changes 400 --rounds 2 \
		--customers 30 --opportunities 20 --sap-orders 8 --kills 6 --report reports/chaos-azure.json $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .syncline reports .pytest_cache .mypy_cache .ruff_cache
