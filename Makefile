# Two entry points on a fresh machine: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= outputs/demo
# glibc (2.35+) backs large allocations with transparent huge pages: whole-scan decoding spends a third of its
# time in the kernel faulting in fresh pages; this made a decode chunk 25 % faster at the same peak memory
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: setup demo demo-pretrained test test-all benchmark reproduce clean

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

# the shipped weights again, from a folder of CT (config/cpu.yaml: the shipped run's cases and sizes): prepare,
# autoencoder, latents, U-Net, export, then score the model card's test crop (the bundled LIDC-IDRI-0314 crop in
# data/ct) with the new weights and with the shipped ones, and write the learning curves and both scores to
# RUN/reproduction.json (benchmarks/reproduction.py). Every step resumes when rerun.
# TRAIN_ARGS (e.g. --max-steps 2) goes to both trainers: a quick check of the chain, not the weights.
DATA   ?=
RUN    ?= runs/reproduce
TRAIN_ARGS ?=
# a time stamp per step in RUN/stages.log (reruns append): how long the reproduction took, step by step
STAMP = @mkdir -p $(RUN) && echo "$$(date +%s) $(1)" >> $(RUN)/stages.log
reproduce: setup
	@test -n "$(DATA)" || { echo "usage: make reproduce DATA=FOLDER_OF_CT [RUN=runs/reproduce]"; exit 2; }
	$(call STAMP,prepare)
	$(BIN)/thinslice-prepare --input $(DATA) --output $(RUN)/cache --config config/cpu.yaml
	$(call STAMP,autoencoder)
	$(BIN)/thinslice-train-autoencoder --config config/cpu.yaml --cache $(RUN)/cache --output $(RUN)/ae $(TRAIN_ARGS)
	$(call STAMP,latents)
	$(BIN)/thinslice-latents --cache $(RUN)/cache --checkpoint $(RUN)/ae/checkpoints/best.pt --output $(RUN)/latents --config config/cpu.yaml --splits train val
	$(call STAMP,unet)
	$(BIN)/thinslice-train-unet --config config/cpu.yaml --latents $(RUN)/latents --output $(RUN)/unet $(TRAIN_ARGS)
	$(call STAMP,export)
	$(BIN)/python -m ddpm.export $(RUN)/unet/checkpoints/best.pt $(RUN)/weights/unet.pt --export-autoencoder $(RUN)/ae/checkpoints/best.pt $(RUN)/weights/autoencoder.pt
	$(call STAMP,score)
	$(BIN)/thinslice-prepare --input data/ct --output $(RUN)/test_cache --config config/cpu.yaml
	$(BIN)/thinslice-interpolate --split test --cache $(RUN)/test_cache --output $(RUN)/test --autoencoder $(RUN)/weights/autoencoder.pt --unet $(RUN)/weights/unet.pt
	$(call STAMP,score shipped)
	$(BIN)/thinslice-interpolate --split test --cache $(RUN)/test_cache --output $(RUN)/test_shipped
	$(call STAMP,done)
	$(BIN)/python benchmarks/reproduction.py $(RUN) --out $(RUN)/reproduction.json --plot $(RUN)/reproduction.png

benchmark: setup
	$(BIN)/python benchmarks/run.py --out benchmarks/results/cpu.json

# the quick loop: every test but the end-to-end runs marked slow
test: setup
	$(BIN)/python -m pytest -q -m "not slow"

# everything, the slow end-to-end runs included: what CI runs (.ci/run)
test-all: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO) $(DEMO)-pretrained
