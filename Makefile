# The two commands a new user needs: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# The pin that works on these CPU machines (torchvision from the registry does not import beside torch 2.13).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo lint clean gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,notebooks]'
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

lint: setup
	$(PY) -m ruff check training probes analysis tests

clean:
	rm -rf runs/demo .pytest_cache
