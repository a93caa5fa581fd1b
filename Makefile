# The two commands: `make demo` and `make test`. Both build .venv on first use, and with it the
# native core (native/, a Rust crate compiled by maturin into mesh_native/_core*.so).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
CARGO := cargo
CRATE := native
NATIVE_SRC := $(CRATE)/Cargo.toml $(CRATE)/Cargo.lock $(shell find $(CRATE)/src -name '*.rs')

.PHONY: demo test test-native test-tools perf lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# An editable install: the Python packages are used in place, the extension is compiled
# (release profile) into mesh_native/. A change to the crate rebuilds it.
$(STAMP): pyproject.toml $(NATIVE_SRC) | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml $(NATIVE_SRC) | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(STAMP)

demo: $(STAMP)
	$(BIN)/mesh demo

# Debian tools the tests drive: dig (dnsutils) and ip (iproute2), installed when missing and root.
test-tools:
	@if [ "$$(id -u)" = 0 ] && { ! command -v dig >/dev/null || ! command -v ip >/dev/null || ! command -v curl >/dev/null; }; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsutils iproute2 curl >/dev/null; \
	fi

# The crate on its own: formatting, lints as errors, its unit and fixture tests.
test-native:
	cd $(CRATE) && $(CARGO) fmt --check
	cd $(CRATE) && $(CARGO) clippy --locked --all-targets --features python -- -D warnings
	cd $(CRATE) && $(CARGO) test --locked --quiet

test: $(TEST_STAMP) test-tools test-native
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

perf: $(TEST_STAMP)
	$(BIN)/python -m perf

clean:
	rm -rf $(VENV) .pytest_cache $(CRATE)/target mesh_native/_core*.so
