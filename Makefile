# The two Quick start commands. Each makes the virtual environment on first use.
PYTHON ?= python3
VENV := .venv

.PHONY: train test
train: $(VENV)/installed
	$(VENV)/bin/python train.py

test: $(VENV)/installed
	$(VENV)/bin/python -m pytest -q tests

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@
