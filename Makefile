# The two commands: `make demo` and `make test`. Both build .venv on first use, and with it the
# native core (native/, a Rust crate compiled by maturin into mesh_native/_core*.so).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
CARGO := cargo
CRATE := native
NATIVE_SRC := $(CRATE)/Cargo.toml $(CRATE)/Cargo.lock $(shell find $(CRATE)/src -name '*.rs')

.PHONY: demo test test-native test-fuzz test-tools perf lint clean

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

# Debian tools the tests drive: dig (dnsutils), ip (iproute2), curl, libfaketime (a sidecar
# with its clock off) and Chromium (the LB's page, driven by Playwright), installed when missing
# and root.
test-tools:
	@if [ "$$(id -u)" = 0 ] && { ! command -v dig >/dev/null || ! command -v ip >/dev/null || ! command -v curl >/dev/null || ! command -v chromium >/dev/null || ! ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1; }; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsutils iproute2 curl faketime chromium >/dev/null; \
	fi

# The crate on its own: formatting, lints as errors, its unit and fixture tests.
test-native:
	cd $(CRATE) && $(CARGO) fmt --check
	cd $(CRATE) && $(CARGO) clippy --locked --all-targets --features python -- -D warnings
	cd $(CRATE) && $(CARGO) test --locked --quiet

# A bounded run of each fuzz target (native/fuzz): cargo-fuzz is installed when missing. It
# asks rustc for nightly-only flags (the sanitizer); RUSTC_BOOTSTRAP lets the stable toolchain,
# the only one here, take them. A crash fails the run and leaves its input in fuzz/artifacts.
FUZZ_TARGETS := request_stream response_stream chunked dns_query
FUZZ_SECONDS ?= 20
CARGO_FUZZ_VERSION := 0.13.2
test-fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --quiet --locked cargo-fuzz --version $(CARGO_FUZZ_VERSION)
	cd $(CRATE)/fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p corpus/$$t && \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t corpus/$$t seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 2>&1 | grep -E '^(Done|stat::number_of_executed_units)|panicked|ERROR|SUMMARY'; \
		test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

test: $(TEST_STAMP) test-tools test-native test-fuzz
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

perf: $(TEST_STAMP)
	$(BIN)/python -m perf

clean:
	rm -rf $(VENV) .pytest_cache $(CRATE)/target mesh_native/_core*.so
