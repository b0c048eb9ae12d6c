# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo bench lint clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q || [ $$? -eq 5 ]

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

demo: venv
	$(BIN)/modsquad demo --out demo_out

bench: venv
	$(BIN)/python tools/bench_moe.py --out bench_out/moe.json

lint: venv
	$(BIN)/ruff check modsquad tests tools

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache
