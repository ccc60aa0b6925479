# The README's two commands: `make main` (the default richness sweep) and `make test`.
VENV ?= .venv
OUT ?= results
export VENV

.PHONY: setup main test test-fast lint bench docs

setup:
	@bash scripts/setup_env.sh

main: setup
	$(VENV)/bin/rdiag sweep --config default --out $(OUT)

test: setup
	$(VENV)/bin/python -m pytest -q -n 2 --durations=15 tests

# The edit-test loop: no trainers, no Ray, nothing marked slow (under 2 minutes).
test-fast: setup
	$(VENV)/bin/python -m pytest -q -n 2 -m "not slow and not trainers and not ray" tests

lint: setup
	$(VENV)/bin/ruff check rdiag kernels tests bench

bench: setup
	$(VENV)/bin/python -m pip install -q -e ".[bench]"
	mkdir -p $(OUT)
	$(VENV)/bin/python -m pytest bench --benchmark-only --benchmark-json=$(OUT)/bench.json

# The documentation site: docs/_build/html (the gallery executed; warnings are errors).
docs: setup
	$(VENV)/bin/python -m pip install -q -c $(VENV)/constraints.txt -e ".[docs]"
	PYTHONPATH=$(CURDIR) $(VENV)/bin/python -m sphinx -b html -W --keep-going -j 1 docs docs/_build/html
