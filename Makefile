# Two entry points, both doing their own set-up on a fresh machine:
#   make check   builds .venv and runs `routereplay check` on the built-in model
#   make test    builds .venv and runs the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; users of the package bring their own.
TORCH  ?= torch==2.13.0

.PHONY: check test venv lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

check: venv
	$(VENV)/bin/routereplay check

test: venv
	$(PY) -m pytest -q -n 2 tests

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
