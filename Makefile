# Two entry points for a new user: `make demo` and `make test`. Both set up .venv on first use.
#   make demo                  installs satcli and what it needs to run (pip install -e .), then runs the demo
#   make test                  also installs the test tools (pip install -e '.[dev]'), then runs the test suite
#   make test PYTEST_ARGS=-x   passes arguments to pytest
#   make test-engines          the Ray Data and Spark tests (pip install -e '.[dev,ray,spark]'; Spark needs Java 17+)
#   PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"   CPU-only PyTorch wheels (see README)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_ARGS ?=
PYTEST_ARGS ?=
# The HTML report's browser tests drive this chromium (no browser download). As root with apt-get (CI),
# `make test` installs Debian's chromium when it is missing; otherwise they are skipped with one line saying so.
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test test-engines lint install install-dev browser clean

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(PIP_ARGS) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(PIP_ARGS) -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/satcli demo

browser:
	@if [ -x "$(CHROMIUM)" ]; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; \
	else \
		echo "browser tests skipped: no $(CHROMIUM). To run them, install chromium (Debian/Ubuntu: sudo apt-get install chromium; or run make test as root) or point to one: make test CHROMIUM=/path/to/chromium"; \
	fi

test: $(VENV)/.installed-dev browser
	SATCLI_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q $(PYTEST_ARGS)

$(VENV)/.installed-engines: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(PIP_ARGS) -e '.[dev,ray,spark]'
	touch $@ $(VENV)/.installed-dev $(VENV)/.installed

test-engines: $(VENV)/.installed-engines
	$(PY) -m pytest -q -m engines $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check satcli models tests bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
