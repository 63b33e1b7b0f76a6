# tfkernels: the README's commands.
#
#   make test         build if needed, then run the test suite
#   make bench        build if needed, then run the benchmarks
#   make build        build and install (editable) if needed
#   make cmake-test   build the C++ library with CMake and run its ctest
#   make clean        remove build outputs
#
# PYTHON picks the interpreter whose torch is built against, e.g.
# `make test PYTHON=.venv/bin/python`. MAX_JOBS limits parallel compiles and
# TFKERNELS_CUDA / TORCH_CUDA_ARCH_LIST choose the CUDA build (see setup.py).

PYTHON ?= python
PYTEST_ARGS ?= -q
CMAKE ?= cmake
CMAKE_BUILD_DIR ?= build/cmake
CMAKE_ARGS ?=
CMAKE_GENERATOR ?= $(shell command -v ninja >/dev/null 2>&1 && echo Ninja || echo "Unix Makefiles")

# Everything that changes the compiled extension.
SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \)) \
           setup.py pyproject.toml
STAMP := build/.tfkernels-installed
PIP_FLAGS ?=
PIP_INSTALL = $(PYTHON) -m pip install --no-build-isolation $(PIP_FLAGS) -e .
# Loads tfkernels._C and checks it was built against the torch imported now.
LOADS_OK = $(PYTHON) -c "import sys, torch, tfkernels; sys.exit(tfkernels.build_info()['torch_version'] != torch.__version__)"

.PHONY: all build test bench cmake-test clean

all: build

# The first build is an editable pip install; later ones, after a source changed,
# rebuild in place with setup.py so ninja recompiles only what changed (pip -e
# starts from an empty build folder every time). A _C that does not load (never
# built, removed, or built against another torch) forces the pip install.
$(STAMP): $(SOURCES)
	@if $(LOADS_OK) 2>/dev/null; then $(PYTHON) setup.py -q build_ext --inplace; else $(PIP_INSTALL); fi
	@mkdir -p $(dir $@) && touch $@

build: $(STAMP)
	@$(LOADS_OK) 2>/dev/null || { echo "tfkernels._C is missing or was built for another torch: rebuilding"; \
	  $(PIP_INSTALL) && touch $(STAMP); }

test: build
	$(PYTHON) -m pytest tests bench/test_report.py $(PYTEST_ARGS)

bench: build
	$(PYTHON) -m tfkernels.bench

cmake-test:
	$(CMAKE) -S . -B $(CMAKE_BUILD_DIR) -G "$(CMAKE_GENERATOR)" -DPython3_EXECUTABLE="$$($(PYTHON) -c 'import sys; print(sys.executable)')" \
	  -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')" $(CMAKE_ARGS)
	$(CMAKE) --build $(CMAKE_BUILD_DIR) $(if $(MAX_JOBS),-j $(MAX_JOBS))
	cd $(CMAKE_BUILD_DIR) && ctest --output-on-failure

clean:
	rm -rf build dist *.egg-info tfkernels/*.egg-info
	rm -f tfkernels/_C*.so
