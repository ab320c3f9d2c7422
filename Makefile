# Two commands: `make dev` runs the server on its embedded default; `make test` runs the
# tests. Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,jupyter]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/uws dev

# The sign-in tests run panva's oidc-provider with Node, installed from the committed lock
# file into the test's folder (without npm those tests skip, saying so).
PROVIDER := tests/identity/oidc_provider
$(PROVIDER)/node_modules/.installed: $(PROVIDER)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  npm ci --prefix $(PROVIDER) --no-audit --no-fund --silent && touch $@; \
	else echo "npm not found: the real OpenID provider tests will be skipped"; fi

# Lint, the layers' import rules (tools/import_map.py), the type checker, then the tests.
test: $(STAMP) $(PROVIDER)/node_modules/.installed
	$(BIN)/ruff check .
	$(BIN)/python tools/import_map.py
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python tools/import_map.py
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
