# Two entry points for a new user: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/satcli demo

test: $(STAMP)
	@# The HTML report is tested in Debian's headless chromium (driven by playwright, no browser download).
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check satcli models tests bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
