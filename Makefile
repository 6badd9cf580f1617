# The Quick start commands. Each makes the virtual environment on first use.
PYTHON ?= python3
VENV := .venv

.PHONY: train test lint
train: $(VENV)/installed
	$(VENV)/bin/python train.py

test: $(VENV)/installed
	$(VENV)/bin/python -m pytest -q tests

lint: $(VENV)/installed
	$(VENV)/bin/ruff check .

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@
