# Two commands for a fresh machine (see README): `make serve` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STORE ?= model_store/tiny
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install test serve demo-store lint bench

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Tests need a real Redis on 127.0.0.1:6379; start one (in-memory, nothing on disk) if none answers.
test: install
	./scripts/ensure-redis.sh
	$(BIN)/ruff check app offline tests bench client
	$(BIN)/python -m pytest

demo-store: install
	test -f $(STORE)/manifest.json || $(BIN)/python -m offline build --tiny --out $(STORE)

serve: demo-store
	SGLORA_STORE_PATH=$(STORE) $(BIN)/python -m app --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/ruff check app offline tests bench client

bench: install
	$(BIN)/python -m bench
