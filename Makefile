# The two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test perf lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(STAMP)

demo: $(STAMP)
	$(BIN)/mesh demo

# Debian tools the tests drive: dig (dnsutils) and ip (iproute2), installed when missing and root.
test-tools:
	@if [ "$$(id -u)" = 0 ] && { ! command -v dig >/dev/null || ! command -v ip >/dev/null || ! command -v curl >/dev/null; }; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsutils iproute2 curl >/dev/null; \
	fi

test: $(TEST_STAMP) test-tools
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

perf: $(TEST_STAMP)
	$(BIN)/python -m perf

clean:
	rm -rf $(VENV) .pytest_cache
