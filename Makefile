# Everything a fresh machine needs: `make demo` or `make test` creates .venv and installs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned to its CPU build: unpinned, pip pulls several GB of CUDA wheels.
PIPFLAGS := --disable-pip-version-check -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIPFLAGS) -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/addnorm info
	$(PY) examples/quickstart.py

test: install
	$(PY) -m pytest -n 2 -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
