# One command to set up and run the main job (`make demo`), one to run the tests (`make test`).
# Both create .venv with Python 3.12 and install the pinned requirements when missing.
SHELL := /bin/bash
PYTHON_VERSION ?= 3.12.1
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt constraints.txt | sha1sum | cut -c1-12)

ROUTER ?= expanded_drop
NPROC ?= 2

.PHONY: env demo test bench clean

env: $(STAMP)

$(STAMP): requirements.txt constraints.txt
	@bash scripts/make_env.sh "$(VENV)" "$(PYTHON_VERSION)"
	@touch $@

# The main job (run file moebalance/configs/runs/demo.yaml): expert-parallel inference (torchrun,
# gloo on CPU / NCCL on GPU), vanilla top-k then ROUTER on the trained tiny-moe.
demo: env
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) scripts/infer.py --run-config demo --router $(ROUTER) --overwrite

# Router benchmark on calibrated synthetic workloads -> results/routers_cpu.{json,md}
bench: env
	$(PY) scripts/bench_routers.py

test: env
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
