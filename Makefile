# Two entry points, both doing their own set-up on a fresh machine:
#   make check   builds .venv and runs `routereplay check` on the built-in model
#   make test    builds .venv and runs the whole test suite (what .ci/run calls), then the verl
#                suite tests_verl/ in its own .venv-verl (verl pins transformers < 5.11)
# Both venvs install from the pins in constraints/ (an upstream release never changes CI);
# `make lock` regenerates them, `make test-latest` tries the newest transformers and `make
# test-torch-next` a newer torch (neither in CI).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; users of the package bring their own.
TORCH  ?= torch==2.13.0
VERL_VENV ?= .venv-verl
VERL_PY   := $(VERL_VENV)/bin/python
PINS      := constraints/test.txt
VERL_PINS := constraints/verl.txt

.PHONY: check test venv verl-venv test-verl lint bench clean lock test-latest test-torch-next

$(VENV)/.installed: pyproject.toml Makefile $(PINS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c $(PINS) -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# verl with --no-deps: its own dependency set pulls wandb, tensorboard, ray[default] and more that its
# FSDP engine never imports; the verl-test extra lists what that import needs.
$(VERL_VENV)/.installed: pyproject.toml Makefile $(VERL_PINS)
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install -q --upgrade pip
	$(VERL_PY) -m pip install -q "$(TORCH)"
	$(VERL_PY) -m pip install -q -c $(VERL_PINS) -e ".[verl-test]"
	$(VERL_PY) -m pip install -q -c $(VERL_PINS) --no-deps "verl==0.9.1"
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

# Regenerate the pins from the newest releases that pyproject.toml allows (a deliberate commit:
# review the diff of constraints/, then run `make test`).
lock:
	rm -rf .venv-lock .venv-lock-verl
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q "$(TORCH)"
	.venv-lock/bin/pip install -q -e ".[dev]"
	scripts/write_pins.sh .venv-lock $(PINS) "The test environment of .venv (make test, .ci/run)"
	$(PYTHON) -m venv .venv-lock-verl
	.venv-lock-verl/bin/pip install -q "$(TORCH)"
	.venv-lock-verl/bin/pip install -q -e ".[verl-test]"
	.venv-lock-verl/bin/pip install -q --no-deps "verl==0.9.1"
	scripts/write_pins.sh .venv-lock-verl $(VERL_PINS) "The environment of .venv-verl (tests_verl/, verl 0.9.1)"
	rm -rf .venv-lock .venv-lock-verl

# The pinned environment with the newest transformers: which MoE families are new, which work,
# which are refused and why (scripts/family_report.py). Not part of CI.
LATEST_VENV ?= .venv-latest
test-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q "$(TORCH)"
	grep -v '^transformers==' $(PINS) > $(LATEST_VENV)/pins.txt
	$(LATEST_VENV)/bin/pip install -q -c $(LATEST_VENV)/pins.txt -e ".[dev]"
	$(LATEST_VENV)/bin/pip install -q --upgrade transformers
	$(LATEST_VENV)/bin/python scripts/family_report.py

# The whole suite on a newer torch than the pinned one (not in CI): recompute identity reads torch's
# checkpoint internals, which move between releases (2.14 moved checkpoint()'s body). The newest
# torch on this machine's disk by default; any pip requirement works, e.g. TORCH_NEXT=torch==2.15.0
# where pip may download it.
TORCH_NEXT ?= torch==2.14.1
NEXT_VENV  ?= .venv-torch-next
test-torch-next:
	$(PYTHON) -m venv $(NEXT_VENV)
	$(NEXT_VENV)/bin/pip install -q "$(TORCH)"
	$(NEXT_VENV)/bin/pip install -q -c $(PINS) -e ".[dev]"
	$(NEXT_VENV)/bin/pip install -q "$(TORCH_NEXT)"
	$(NEXT_VENV)/bin/python -m pytest -q -n 2 -p no:cacheprovider tests

clean:
	rm -rf $(VENV) $(VERL_VENV) $(LATEST_VENV) $(NEXT_VENV) build *.egg-info src/*.egg-info
