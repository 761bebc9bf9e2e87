# Everything a fresh machine needs: `make demo` or `make test` creates .venv and installs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned to its CPU build: unpinned, pip pulls several GB of CUDA wheels.
PIPFLAGS := --disable-pip-version-check -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: install build demo test bench clean

install: $(STAMP)

# the C++ eager path of small calls (a C++ compiler; ~1-2 min once, then a no-op);
# without it every call takes the Python path, and the test that says so fails
build: install
	$(VENV)/bin/addnorm build || echo "addnorm: going on without the C++ eager path"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIPFLAGS) -e '.[test]'
	touch $(STAMP)

# the main job: every claim of the seed articles measured (~3 minutes on 2 cores)
demo: build
	$(VENV)/bin/addnorm info
	$(VENV)/bin/addnorm lab --quick --out lab-out
	@echo "open lab-out/report.html in a browser; claims.json, runs.jsonl and the plots lie beside it"

test: build
	$(PY) -m pytest -n 2 --dist loadgroup -q

bench: build
	$(VENV)/bin/addnorm bench --out bench-out

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis src/addnorm/_build
