# Two entry points (README quick start): `make demo` and `make test`. Both set up .venv first.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/emphy demo -o demo-out

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

.PHONY: setup demo test
