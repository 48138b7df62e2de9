# cedana-ray: `make demo` and `make test` install what they need, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NSINIT := plugins/process/nsinit

.PHONY: setup cc criu containers cri slurm qemu demo test lint bench image clean

setup: $(STAMP) $(NSINIT) criu containers cri slurm qemu

# the package builds a small C program, the process plugin's namespace init (setup.py)
cc:
	@command -v cc >/dev/null && test -e /usr/include/stdio.h || { apt-get update -qq && \
	  apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null; }

$(STAMP): pyproject.toml setup.py | cc
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,all]'  # every extra: the suite tests them all
	@# PyTorch (CPU) for jobs/train.py's torch backend; where no wheel can be had, its test skips and says so
	$(BIN)/pip install -q 'torch==2.13.0+cpu' || echo "PyTorch not installed: the torch training test will skip"
	touch $(STAMP)

$(NSINIT): $(NSINIT).c setup.py | $(STAMP)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .

criu:
	@bash scripts/install-criu.sh

containers:
	@bash scripts/install-containers.sh

cri: criu
	@bash scripts/install-cri.sh

slurm:
	@bash scripts/install-slurm.sh

qemu:
	@bash scripts/install-qemu.sh

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -ra

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/dump_restore.py

# the OCI image (Containerfile) with buildah; its base: BASE=IMAGE, else a local debootstrap Debian
image: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/build-image.sh

clean:
	rm -rf $(VENV) build dist *.egg-info $(NSINIT)
