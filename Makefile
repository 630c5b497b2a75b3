# The two README commands. Each does its own set-up on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.condnoise-installed
TORCH   := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test setup data lint

$(STAMP): pyproject.toml requirements/dev.lock requirements/nodeps.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c requirements/dev.lock -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps -r requirements/nodeps.txt
	@touch $(STAMP)

setup: $(STAMP) data

# Fashion-MNIST comes from the Debian package dataset-fashion-mnist.
data: $(STAMP)
	@$(BIN)/python -m condnoise data check >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing dataset-fashion-mnist with apt-get"; \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	  fi; \
	  $(BIN)/python -m condnoise data check; }

demo: setup
	$(BIN)/python -m condnoise demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
