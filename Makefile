# make test   - venv (unless one is active), torch if missing, the package with [test], pytest
# make bench  - the main job: every op on every available backend against the float64 reference
#               (python -m pyobjectives compare), then the benchmark suite (python -m benchmarks.run: the
#               pytest-benchmark tests in benchmarks/, their JSON and the report in benchmarks/results/;
#               CPU: the CPU-meaningful subset, Triton checked under the interpreter, never timed)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0

ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif

.PHONY: test bench install info clean

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

clean:
	rm -rf build *.egg-info pyobjectives/_C*.so .pytest_cache
