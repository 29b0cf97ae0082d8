# Two entry points (README quick start): `make demo` and `make test`. Both set up .venv first;
# `make test` also installs the Debian packages of .ci/system-packages.txt (root + apt-get) or says
# which are missing. `make docs` builds the documentation site (docs/) as CI does.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	@touch $(STAMP)

system-packages:
	@bash .ci/install-system-packages.sh

setup: system-packages $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/emphy demo -o demo-out

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir site

.PHONY: system-packages setup demo test docs
