# Two entry points on a fresh machine: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= outputs/demo

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt -e ".[test]"
	touch $@

demo: setup
	$(BIN)/python dataset/prepare.py --input data/ct --output $(DEMO)/cache --config config/demo_data.yaml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO)
