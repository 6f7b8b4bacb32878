# make demo : pretrain DINO on Fashion-MNIST (CPU, ~10 min), kNN-evaluate, export, load through pipeline
# make test : the test suite
# Each target first creates .venv and installs hf-ssl into it. On a machine without CUDA, torch is the CPU
# build (torch==2.13.0); a user who already has a CUDA torch in .venv keeps it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: demo test install clean fashion-mnist

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install --quiet torch; \
	  else $(BIN)/pip install --quiet $(TORCH_CPU); fi; \
	fi
	$(BIN)/pip install --quiet -e ".[dev]"

DEMO_RECIPE := recipes/dino/fashion-mnist-demo.yaml
DEMO_DIR := runs/demo

demo: install fashion-mnist
	$(BIN)/hf-ssl train $(DEMO_RECIPE) --output_dir $(DEMO_DIR)
	@echo "--- loading $(DEMO_DIR)/encoder with plain transformers (no hf_ssl import) ---"
	$(BIN)/python -c "from transformers import pipeline; from PIL import Image; \
	  extractor = pipeline('image-feature-extraction', model='$(DEMO_DIR)/encoder'); \
	  import numpy as np; feature = np.asarray(extractor(Image.new('RGB', (28, 28)), pool=True)); \
	  print('pipeline feature shape:', feature.shape)"

# Debian's copy of Fashion-MNIST, used when the Hub is unreachable (installed as root, else say how).
fashion-mnist:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "$$HF_SSL_FASHION_MNIST_DIR" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST: run 'sudo apt-get install dataset-fashion-mnist' if the Hub is unreachable"; fi; \
	fi

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
