# tfkernels: the README's commands. On a fresh machine they set everything up.
#
#   make test         pick or make the environment, build if needed, run the tests
#   make bench        the same, then run the benchmarks (BENCH_ARGS=--quick: a trimmed grid)
#   make env          only pick or make the environment (tools/dev_env.py)
#   make build        ... and build (an editable install) if needed
#   make emu          build the emulated CUDA device (csrc/emu/), which make test runs the CUDA kernels on
#   make test-emu-full   every CUDA test case on the emulated device (tens of minutes)
#   make test-emu-asan   the emulated grid with AddressSanitizer (global out-of-bounds)
#   make cmake-test   build the C++ library with CMake and run its ctest
#   make cmake-configure   only configure it (CI: CMakeLists.txt finds torch and every source)
#   make clean        remove build outputs (the .venv stays)
#
# The environment (tools/dev_env.py says how it is chosen): PYTHON=path uses that
# interpreter, PYTHON=venv the checkout's .venv; unset, an active virtualenv or
# conda environment with torch, else .venv (made and filled from requirements/
# when needed), else a python3 on PATH that already has everything.
# MAX_JOBS limits parallel compiles; TFKERNELS_CUDA / TORCH_CUDA_ARCH_LIST choose
# the CUDA build (see setup.py).

PYTHON ?=
BOOTSTRAP_PYTHON ?= python3
PYTEST_ARGS ?= -q
# pytest-xdist workers for `make test`: the emulated device runs a kernel on one
# thread, so its grid (three quarters of the suite's time) splits across cores.
# Each worker keeps torch's threads (the CPU kernels' parallel paths stay tested);
# OMP_WAIT_POLICY=PASSIVE makes idle OpenMP threads sleep rather than spin against
# the other worker's (the CPU tests on 2 cores: 171 s spinning, 64 s passive, 95 s
# without workers).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
BENCH_ARGS ?=
CMAKE ?= cmake
CMAKE_BUILD_DIR ?= build/cmake
CMAKE_ARGS ?=
CMAKE_GENERATOR ?= $(shell command -v ninja >/dev/null 2>&1 && echo Ninja || echo "Unix Makefiles")

# The interpreter `make env` chose; read when a recipe runs, after `env` has.
ENV_RECORD := build/.python
PY = $(shell cat $(ENV_RECORD))

# Everything that changes the compiled extension.
SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \)) \
           setup.py pyproject.toml
STAMP := build/.tfkernels-installed
PIP_FLAGS ?= -q
# The environment's bin/ first on PATH: its ninja (requirements/dev.txt) drives the build.
IN_ENV = PATH="$(dir $(PY)):$$PATH"
PIP_INSTALL = $(IN_ENV) $(PY) -m pip install --no-build-isolation $(PIP_FLAGS) -e .
# Loads tfkernels._C and checks it was built against the torch imported now.
LOADS_OK = $(PY) -c "import sys, torch, tfkernels; sys.exit(tfkernels.build_info()['torch_version'] != torch.__version__)"
SAY_BUILD = echo "==> building tfkernels._C against $$($(PY) -c 'import torch; print("torch", torch.__version__)') and installing it (editable) into $$($(PY) -c 'import sys; print(sys.prefix)') (a few minutes the first time)"

.PHONY: all env build emu emu-asan test test-emu-full test-emu-asan bench cmake-configure cmake-test clean

all: build

env:
	@$(BOOTSTRAP_PYTHON) tools/dev_env.py --python "$(PYTHON)" --record $(ENV_RECORD)

# The first build is an editable pip install; later ones, after a source changed,
# rebuild in place with setup.py so ninja recompiles only what changed (pip -e
# starts from an empty build folder every time). A _C that does not load (never
# built, removed, or built against another torch) forces the pip install.
$(STAMP): $(SOURCES) | env
	@if $(LOADS_OK) 2>/dev/null; then echo "==> rebuilding tfkernels._C (sources changed)"; \
	  $(IN_ENV) $(PY) setup.py -q build_ext --inplace; else $(SAY_BUILD) && $(PIP_INSTALL); fi
	@mkdir -p $(dir $@) && touch $@

build: $(STAMP)
	@$(LOADS_OK) 2>/dev/null || { echo "==> tfkernels._C is missing or was built for another torch"; \
	  $(SAY_BUILD) && $(PIP_INSTALL) && touch $(STAMP); }

# The emulated CUDA device: the CUDA kernels compiled by the host compiler and run
# on the CPU (tests/emu_device.py). Incremental, like the extension.
EMU_BUILD = @echo "==> building the emulated CUDA device ($(1); incremental, a few minutes the first time)" && \
	$(IN_ENV) $(PY) csrc/emu/build.py --variant $(1)
emu: env
	$(call EMU_BUILD,race)

emu-asan: env
	$(call EMU_BUILD,asan)

# The CPU tests, and the CUDA kernels' quick grid on the emulated device (a real
# GPU's too, when there is one).
test: build emu
	TFKERNELS_EMU_REQUIRED=1 OMP_WAIT_POLICY=PASSIVE $(IN_ENV) $(PY) -m pytest tests -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-emu-full: build emu
	TFKERNELS_EMU_REQUIRED=1 TFKERNELS_EMU_GRID=full $(IN_ENV) $(PY) -m pytest tests -m emu $(PYTEST_ARGS)

# AddressSanitizer must be loaded first into the process that loads the library;
# libstdc++ with it, for the __cxa_throw it intercepts; --capture=sys leaves
# stderr alone so that its report (it ends the process) shows.
test-emu-asan: build emu-asan
	TFKERNELS_EMU_REQUIRED=1 TFKERNELS_EMU_VARIANT=asan ASAN_OPTIONS=detect_leaks=0 \
	  LD_PRELOAD="$$($${CXX:-c++} -print-file-name=libasan.so) $$($${CXX:-c++} -print-file-name=libstdc++.so)" \
	  $(IN_ENV) $(PY) -m pytest tests -m emu --capture=sys $(PYTEST_ARGS)

bench: build
	$(IN_ENV) $(PY) -m tfkernels.bench $(BENCH_ARGS)

cmake-configure: env
	$(CMAKE) -S . -B $(CMAKE_BUILD_DIR) -G "$(CMAKE_GENERATOR)" -DPython3_EXECUTABLE="$(PY)" \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" $(CMAKE_ARGS)

cmake-test: cmake-configure
	$(CMAKE) --build $(CMAKE_BUILD_DIR) $(if $(MAX_JOBS),-j $(MAX_JOBS))
	cd $(CMAKE_BUILD_DIR) && ctest --output-on-failure

clean:
	rm -rf build dist *.egg-info tfkernels/*.egg-info
	rm -f tfkernels/_C*.so
