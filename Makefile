# Two entry points, both doing their own set-up on a fresh machine:
#   make check   builds .venv and runs `routereplay check` on the built-in model
#   make test    builds .venv and runs the whole test suite (what .ci/run calls), then the verl
#                suite tests_verl/ in its own .venv-verl (verl pins transformers < 5.11)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; users of the package bring their own.
TORCH  ?= torch==2.13.0
VERL_VENV ?= .venv-verl
VERL_PY   := $(VERL_VENV)/bin/python

.PHONY: check test venv verl-venv test-verl lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# verl with --no-deps: its own dependency set pulls wandb, tensorboard, ray[default] and more that its
# FSDP engine never imports; the verl-test extra lists what that import needs.
$(VERL_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install -q --upgrade pip
	$(VERL_PY) -m pip install -q "$(TORCH)"
	$(VERL_PY) -m pip install -q -e ".[verl-test]"
	$(VERL_PY) -m pip install -q --no-deps "verl==0.9.1"
	touch $@

verl-venv: $(VERL_VENV)/.installed

test-verl: verl-venv
	$(VERL_PY) -m pytest -q -p no:cacheprovider tests_verl

check: venv
	$(VENV)/bin/routereplay check

test: venv verl-venv
	$(PY) -m pytest -q -n 2 tests
	$(VERL_PY) -m pytest -q -p no:cacheprovider tests_verl

lint: venv
	$(VENV)/bin/ruff check src tests tests_verl benchmarks examples scripts

clean:
	rm -rf $(VENV) $(VERL_VENV) build *.egg-info src/*.egg-info
