# scicevpr: the user-facing commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# OpenMP threads sleep instead of spinning while they wait: with DataLoader workers or other
# processes on a small CPU, spinning threads slow torch down by an order of magnitude.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv test test-unit test-notebooks demo lab clean-data

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	# The official DINOv2 model code, used only by the parity tests (its pinned deps are not needed).
	$(PY) -m pip install --no-deps dinov2==0.0.1.dev2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests/ -q
	$(PY) -m pytest --nbval notebooks/ --nbval-sanitize-with notebooks/sanitize.cfg -q -p no:cacheprovider

test-unit: $(STAMP)
	$(PY) -m pytest tests/ -q

demo: $(STAMP)
	$(PY) -m scicevpr.cli demo

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean-data:
	rm -rf data/synthetic runs/
