#!/usr/bin/env bash
# One call on a lent GPU machine (no network): install, versions, GPU test subset, full benchmark suite
# (pytest-benchmark tests under benchmarks/, through python -m benchmarks.run).
#
#   OUT=/folder/that/comes/back bash benchmarks/gpu_check.sh        (from the repository root)
#
# Writes at most 8 files under $OUT: gpu_check.log (everything printed), and the suite's
# <device>_<date>.json (pytest-benchmark's JSON) / .csv / .md plus up to 4 PNGs. Sized for < 8 minutes on an H100.
# Environment (all optional):
#   BENCH_GIT_SHA      commit to record (the device copy of the tree has no .git); default: git, else "unknown"
#   GPU_TESTS          pytest targets (default: the CUDA, Triton, Philox, XLNet-patch and ElectraObjective tests)
#   CUTLASS_WHEEL_DIR  folder holding the carried nvidia-cutlass wheel (default .whl; the machine has no network):
#                        here: python3 -m pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl
#                        and name ".whl" in the device tool's carry
#   TORCH_CUDA_ARCH_LIST, MAX_JOBS   of the extension build (default 9.0 and 16: under 3 minutes there)
#   GPU_TEST_K         pytest -k expression (default: none)
#   GPU_TEST_TIMEOUT   seconds for the test step (default 120)
#   BENCH_MAX_MINUTES  soft limit of the suite: providers not started by then are skipped, with that reason (4)
#   BENCH_PROFILE      suite profile (default gpu; "tiny" rehearses this script on a CPU machine)
#   BENCH_ARGS         extra arguments for python -m benchmarks.run (e.g. "--ops attention rtd"; others go to
#                      pytest, e.g. "-k reference")
#   PYTHON             interpreter (default python3)
set -u -o pipefail
: "${OUT:?set OUT to the folder whose files come back}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${BENCH_GIT_SHA:-}" ]; then
  BENCH_GIT_SHA=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
fi
export BENCH_GIT_SHA
GPU_TESTS=${GPU_TESTS:-"tests/test_cuda.py tests/test_triton_attention.py tests/test_triton_electra.py tests/test_philox.py tests/test_xlnet_patch.py tests/test_electra_objective.py"}

main() {
  local t0 status=0
  t0=$(date +%s)
  step() { echo; echo "=== $* [$(( $(date +%s) - t0 )) s]"; }

  step "build the extension with its CUDA kernels (no network): pip install --no-build-isolation --no-deps -e ."
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  if [ -z "${CUTLASS_INCLUDE:-}" ] && ! $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)"; then
    # the headers only: unpack them from the carried wheel
    local whl
    whl=$(ls "${CUTLASS_WHEEL_DIR:-.whl}"/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)
    if [ -n "$whl" ]; then
      $PY -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
z.extractall('/tmp/cutlass', [n for n in z.namelist() if n.startswith('cutlass_library/source/include/')])" "$whl"
      export CUTLASS_INCLUDE=/tmp/cutlass/cutlass_library/source/include
    else
      echo "no CUTLASS headers (no nvidia_cutlass wheel in ${CUTLASS_WHEEL_DIR:-.whl}): the attention kernels are left out"
    fi
  fi
  local b0=$(date +%s)
  $PY -m pip install -v --no-build-isolation --no-deps --no-cache-dir -e . 2>&1 | tail -n 30 \
    || { echo "install FAILED; continuing from the source tree (PYTHONPATH)"; status=1; }
  echo "build: $(( $(date +%s) - b0 )) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
  $PY -c "import pyobjectives._C as C; print('pyobjectives._C: cuda_built', C.cuda_built(), \
'cuda_attention_built', C.cuda_attention_built())" || status=1

  step "machine and versions"
  nvidia-smi || status=1
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, \
'CUDA', torch.version.cuda); print('triton', triton.__version__); \
print('device', torch.cuda.get_device_properties(0) if torch.cuda.is_available() else 'no CUDA device')"
  $PY -c "import pytest_benchmark; print('pytest-benchmark', pytest_benchmark.__version__)" \
    || { echo "pytest-benchmark is not installed: the suite cannot run (pip install pytest-benchmark)"; status=1; }
  $PY -m pyobjectives info || status=1

  step "GPU tests (TRITON_INTERPRET=0, timeout ${GPU_TEST_TIMEOUT:-120} s): $GPU_TESTS"
  # shellcheck disable=SC2086
  timeout "${GPU_TEST_TIMEOUT:-120}" $PY -m pytest $GPU_TESTS -q -x -p no:cacheprovider \
    ${GPU_TEST_K:+-k "$GPU_TEST_K"} 2>&1 | tail -n 60
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "GPU tests stopped at the ${GPU_TEST_TIMEOUT:-120} s limit"
  [ "$rc" = 0 ] || status=1

  step "benchmark suite (profile ${BENCH_PROFILE:-gpu}, soft limit ${BENCH_MAX_MINUTES:-4} min)"
  # shellcheck disable=SC2086
  $PY -m benchmarks.run --profile "${BENCH_PROFILE:-gpu}" --out "$OUT" --max-minutes "${BENCH_MAX_MINUTES:-4}" ${BENCH_ARGS:-} \
    || status=1

  step "done (status $status); files in \$OUT:"
  ls -la "$OUT"
  return $status
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
