# The two commands a new user needs: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# Exact versions of every library (scripts/lock.sh writes it): CI, the docs and a new user run the same
# ones. pyproject.toml keeps loose ranges for users who install the package into their own environment.
LOCK ?= requirements/lock.txt
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo lint lock clean gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) torch torchvision
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev,notebooks]'
	touch $@

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

demo: setup
	$(PY) scripts/demo.py

# On a lent GPU: its own python3 (no venv, no network), 8 minutes; QUICK=1: the same flow on this CPU.
# RESULTS=DIR and BUDGET=SECONDS pass --out and --budget (scripts/gpu_check.py --help).
gpu-check: $(if $(QUICK),setup)
	$(if $(QUICK),$(PY),$(if $(wildcard $(PY)),$(PY),python3)) scripts/gpu_check.py $(if $(QUICK),--quick) \
		$(if $(RESULTS),--out $(RESULTS)) $(if $(BUDGET),--budget $(BUDGET))

lock:
	bash scripts/lock.sh

lint: setup
	$(PY) -m ruff check training probes analysis tests

clean:
	rm -rf runs/demo .pytest_cache
