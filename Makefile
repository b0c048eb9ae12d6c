# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast test-threads demo bench lint clean

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

# CI's threads mode: the tests of numerics across shapes (MoE, models, adding tasks, training) again at exactly 1
# and 2 torch threads (tests/conftest.py reads MODSQUAD_TEST_THREADS), so a test that passes only at some thread
# count fails here instead of on a user's machine.
THREAD_TESTS := tests/moe tests/models tests/test_add_tasks.py
test-threads: venv
	MODSQUAD_TEST_THREADS=1 $(BIN)/python -m pytest -q $(THREAD_TESTS)
	MODSQUAD_TEST_THREADS=2 $(BIN)/python -m pytest -q $(THREAD_TESTS) tests/train tests/evaluate

demo: venv
	$(BIN)/modsquad demo --out demo_out

# MoE layers vs timm, then the paper-scale model rows (modsquad_vit_s vs dense ViT-S); CUDA: tools/bench_cuda.sh
bench: venv
	$(BIN)/python tools/bench_moe.py --out bench_out/moe.json
	$(BIN)/python tools/bench_model.py --out bench_out/model.json

lint: venv
	$(BIN)/ruff check modsquad tests tools

clean:
	rm -rf $(VENV) demo_out bench_out .pytest_cache
