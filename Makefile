# fastattn — the two commands: `make demo` and `make test`. Everything else builds on them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2
# Several pytest/benchmark processes on 2 cores: keep torch from oversubscribing.
export OMP_NUM_THREADS ?= 2

.PHONY: help venv build rebuild test test-fast bench demo gpu-check gpu-train-check clean

help:
	@echo "make demo       pretrain -> SFT -> DPO -> GRPO on the tiny GPT, CPU, ~12 min, torch vs fastattn side by side (DEMO_PPO=1: + reward model, PPO)"
	@echo "make test       venv + torch + triton + build both extensions + the CPU test suite"
	@echo "make bench      CPU benchmarks against PyTorch (CSV + PNG under benchmarks/out/)"
	@echo "make gpu-check  on a GPU machine: build CUDA, GPU tests, GPU op benchmarks, < 8 min (OUT=dir)"
	@echo "make gpu-train-check  on a GPU machine: gpt2-124m training, DPO and GRPO steps, ~5 min"

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

test: build
	$(PY) -m pytest tests -m "not gpu" -q -p no:cacheprovider

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

clean:
	rm -rf build *.egg-info fastattn/*.so benchmarks/out $(BUILT)
