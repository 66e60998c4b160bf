# `make test` on a fresh machine: a virtual environment (unless one is active), the CPU torch wheel
# only when no torch is installed, triton, packtune in editable mode with its C++ extension and
# the test extra, then pytest. Stamps inside the environment make a second run install nothing.
PYTHON ?= python3
VENV := $(or $(VIRTUAL_ENV),$(CURDIR)/.venv)
PY := $(VENV)/bin/python
STAMPS := $(VENV)/.packtune-stamps
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: test install lint env clean demo gpu-check gpu-wheels

test: $(STAMPS)/install
	$(PY) -P -m pytest $(PYTEST_ARGS)

install: $(STAMPS)/install

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/torch: | $(PY)
	@mkdir -p $(STAMPS)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@touch $@

# The package folders are listed too: an editable install maps only the packages it saw.
$(STAMPS)/install: $(STAMPS)/torch pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h */__init__.py)
	$(PY) -m pip install -q setuptools wheel ninja  # ninja: compile csrc/*.cpp in parallel
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	@touch $@

# vermin: no syntax or stdlib use newer than the declared floor (pyproject's requires-python).
# mkdocs: the docs build with --strict into site/ (git-ignored): a broken link or anchor, or a page
# missing from mkdocs.yml's nav, fails the lint.
lint: $(STAMPS)/install $(STAMPS)/docs
	$(PY) -m ruff check .
	$(VENV)/bin/vermin -q --no-tips --eval-annotations --target=3.11- --violations engine kernels bench examples
	$(PY) -m mkdocs build --strict --quiet

# mkdocs is in the test extra (so `make test` installs it); an environment installed without it (an
# active virtual environment, a stamp from before) gets the `docs` extra's mkdocs here, once.
$(STAMPS)/docs: $(STAMPS)/install
	$(PY) -c "import mkdocs" 2>/dev/null || $(PY) -m pip install -q "mkdocs>=1.6,<2"
	@touch $@

# The README's first command: generate data, train a tiny Llama from scratch, report accuracy
# (docs/demo.md).
# matplotlib is the `demo` extra (the loss curve PNG), installed once beside the package.
demo: $(STAMPS)/demo
	$(VENV)/bin/packtune demo

$(STAMPS)/demo: $(STAMPS)/install
	$(PY) -m pip install -q matplotlib
	@touch $@

env: $(STAMPS)/install
	$(VENV)/bin/packtune env

# `make gpu-check`: the GPU suites (pytest -m gpu), the loss, NF4 and LoRA benchmarks, a 1B-shaped
# `packtune train` and the 1B longest-row search, within 9 minutes (GPU_CHECK_QUICK=1: the 5-minute
# second pass), everything written to $OUT (else gpu_check_out/); docs/gpu-check.md says what runs and how long each part may.
# It runs on GPU_PYTHON, the machine's own CUDA torch (python3 unless a virtual environment is
# active), never the CPU wheel: packtune is installed into it editable, without dependencies or the
# C++ extension, when it does not import there. GPU_CHECK_SMOKE=1 runs it on the CPU (tiny shapes,
# the Triton interpreter, GPU-only parts reported as skipped) to check the command itself.
GPU_PYTHON ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV)/bin/python,python3)

gpu-check:
	$(GPU_PYTHON) -c "import packtune.kernels" 2>/dev/null || \
		PACKTUNE_NO_EXT=1 $(GPU_PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	$(GPU_PYTHON) -P -m packtune.bench.gpu_check

# `make gpu-wheels` (here, where pip reaches the index): the optional packages gpu-check installs on a
# GPU machine that has no network, as wheels for its Python 3.12 on x86-64, into .gpu-wheels/ (git-
# ignored; name it in the device run's `carry`). Their own requirements are all in the CUDA image.
GPU_WHEEL_SPECS ?= torchao==0.18.0 liger-kernel==0.8.5 peft==0.21.2 accelerate==1.16.0
GPU_WHEELS_DIR ?= .gpu-wheels
GPU_WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
	manylinux1_x86_64

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_WHEEL_PLATFORMS)) -d $(GPU_WHEELS_DIR) $(GPU_WHEEL_SPECS)

clean:
	rm -rf build engine/*.so *.egg-info site $(STAMPS)
