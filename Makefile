# make test   - venv (unless one is active), torch if missing, the package with [test], pytest
# make bench  - the main job: every op on every available backend against the float64 reference
#               (python -m pyobjectives compare), then the benchmark suite (python -m benchmarks.run: the
#               pytest-benchmark tests in benchmarks/, their JSON and the report in benchmarks/results/;
#               CPU: the CPU-meaningful subset, Triton checked under the interpreter, never timed)
# make cuda-check        - compile every csrc/cuda/*.cu for sm_80 and sm_90 with -Xptxas -v: registers /
#                          shared memory / spills per kernel; fails on a compile error or a spill store (no GPU needed)
# make cuda-build-check  - build + link the whole extension against the CUDA torch wheel in .venv-cu (slow; no GPU needed)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# CuTe headers of the CUDA attention kernels (setup.py's CUTLASS_WHEEL)
CUTLASS_SPEC ?= nvidia-cutlass==4.2.0.0
CUDA_ARCHS ?= 80 90

ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif

.PHONY: test bench install info clean cuda-check cuda-build-check

$(VENV)/bin/python:
	@if [ -z "$$VIRTUAL_ENV" ]; then $(PYTHON) -m venv $(VENV); fi

install: $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@# ninja compiles the extension's C++ files in parallel (setup.py falls back to serial without it)
	@$(PY) -c "import ninja" 2>/dev/null || $(PY) -m pip install -q ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"

test: install
	@# Triton kernels run on the CPU interpreter by default; on a GPU machine `TRITON_INTERPRET=0 make test` tests the compiled kernels.
	TRITON_INTERPRET=$${TRITON_INTERPRET-1} $(PY) -m pytest tests -q

bench: install
	@# Equivalence first, then speed. Without a GPU, Triton runs on the CPU interpreter (checked, not timed).
	@interp=$${TRITON_INTERPRET-$$($(PY) -c "import torch; print(int(not torch.cuda.is_available()))")}; \
	TRITON_INTERPRET=$$interp $(PY) -m pyobjectives compare; cmp=$$?; \
	TRITON_INTERPRET=$$interp $(PY) -m benchmarks.run $(BENCH_ARGS); suite=$$?; \
	exit $$(( cmp || suite ))

info: install
	$(PY) -m pyobjectives info

cuda-check: $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)
	@# headers only: --no-deps keeps the CUTLASS Python tools' dependencies out
	@$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)" \
		|| $(PY) -m pip install -q --no-deps "$(CUTLASS_SPEC)"
	$(PY) csrc/cuda/ptxas_report.py --arch $(CUDA_ARCHS)

cuda-build-check:
	CUTLASS_SPEC="$(CUTLASS_SPEC)" PYTHON=$(PYTHON) bash tools/cuda_build_check.sh

clean:
	rm -rf build build-cu *.egg-info pyobjectives/_C*.so .pytest_cache
