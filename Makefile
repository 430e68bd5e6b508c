# The two commands of the README: `make demo` and `make test`. Both install what they need
# into .venv first (once, and again whenever pyproject.toml changes).
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/newsletter demo

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy newsletter worker

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) outbox preview newsletter.db newsletter.db-wal newsletter.db-shm .pytest_cache
