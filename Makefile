# calm-jax: `make test`, `make demo`, `make bench` each set themselves up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-all demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

venv: $(STAMP)

# `make test`: everything but the few end-to-end tests marked slow (minutes on 2 cores);
# `make test-all` runs those too.
test: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	bash scripts/demo.sh

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) runs bench/results
