# Two entry points on a fresh machine: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= outputs/demo

.PHONY: setup demo demo-pretrained test benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.txt -e ".[test]"
	touch $@

# the whole pipeline on the bundled CT: prepare, autoencoder stage 1 + 2, latents, U-Net, interpolate, report
demo: setup
	$(BIN)/python -m evaluation.demo --output $(DEMO)

# the same without training: interpolate the held-out chest with the shipped weights in pretrained/
demo-pretrained: setup
	$(BIN)/python -m evaluation.demo --output $(DEMO)-pretrained --pretrained

benchmark: setup
	$(BIN)/python benchmarks/run.py --out benchmarks/results/cpu.json

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO) $(DEMO)-pretrained
