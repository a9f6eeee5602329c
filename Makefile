# One command to set up and run the main job (`make demo`), one to run the tests (`make test`).
# Both create .venv with Python 3.12 and install the pinned requirements when missing.
SHELL := /bin/bash
PYTHON_VERSION ?= 3.12.1
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)

.PHONY: env demo test bench clean

env: $(STAMP)

$(STAMP): requirements.txt
	@bash scripts/make_env.sh "$(VENV)" "$(PYTHON_VERSION)"
	@touch $@

demo: env
	$(PY) scripts/bench_routers.py --quick

bench: env
	$(PY) scripts/bench_routers.py

test: env
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
