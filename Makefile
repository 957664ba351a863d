# Two commands: `make demo` and `make test`. Both create .venv and install the package into
# it the first time (and again only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m tvlars_ray.run grid --overwrite

test: $(STAMP)
	$(VENV)/bin/ruff check .
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q

# Every bench/*.py, then one table of figures against targets (bench/summary.py).
bench: $(STAMP)
	$(PY) bench/summary.py

clean:
	rm -rf results reports runs .pytest_cache .ruff_cache
