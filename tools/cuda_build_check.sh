#!/usr/bin/env bash
# `make cuda-build-check`: build and link the whole extension (CPU + CUDA sources) against the CUDA torch
# wheel on a machine without a GPU, in its own venv and build folder (the worktree's CPU build stays),
# then check that the module loads, says it was built with CUDA, and registers CUDA kernels.
#
# Environment (all optional): VENV_CU (.venv-cu), CUDA_TORCH_SPEC (torch==2.14.1), CUTLASS_SPEC
# (nvidia-cutlass==4.2.0.0), CUDA_HOME (default: the toolkit of `nvcc` on PATH), TORCH_CUDA_ARCH_LIST
# ("8.0;9.0"), MAX_JOBS (2), PYTHON (python3, to create the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_CU=${VENV_CU:-.venv-cu}
CUDA_TORCH_SPEC=${CUDA_TORCH_SPEC:-torch==2.14.1}
CUTLASS_SPEC=${CUTLASS_SPEC:-nvidia-cutlass==4.2.0.0}
NVCC=${NVCC:-nvcc}
OUT_DIR=build-cu
command -v "$NVCC" >/dev/null || { echo "cuda-build-check: no $NVCC on PATH"; exit 1; }
[ -x "$VENV_CU/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV_CU"
PY="$VENV_CU/bin/python"
want=${CUDA_TORCH_SPEC#torch==}
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$want' or not torch.version.cuda)" \
    2>/dev/null; then
  "$PY" -m pip install -q "$CUDA_TORCH_SPEC"
fi
have='import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("cutlass_library", "ninja", "setuptools")))'
"$PY" -c "$have" 2>/dev/null || "$PY" -m pip install -q --no-deps "$CUTLASS_SPEC" ninja setuptools

if [ -z "${CUDA_HOME:-}" ]; then  # nvcc on PATH may be a wrapper script: ask it where its toolkit is
  CUDA_HOME=$("$NVCC" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's|^#\$ TOP=\(.*\)/bin/\.\.$|\1|p' | head -n 1)
fi
export CUDA_HOME
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# the CUDA torch wheel's headers of cuBLAS / cuSPARSE / cuSOLVER (ATen/cuda includes them)
if [ -d "$site/nvidia/cu13/include" ]; then export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"; fi
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} MAX_JOBS=${MAX_JOBS:-2}
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
rm -rf "$OUT_DIR/lib"
start=$(date +%s)
"$PY" setup.py -q build_ext --build-lib "$OUT_DIR/lib" --build-temp "$OUT_DIR/temp"
so=$(ls "$OUT_DIR"/lib/pyobjectives/_C*.so 2>/dev/null | head -n 1)
[ -n "$so" ] || { echo "cuda-build-check FAILED: no extension was built (see the compiler output above)"; exit 1; }
echo "built $so in $(( $(date +%s) - start )) s"

echo "--- linked CUDA libraries (ldd; torch's own libraries are found once torch is imported)"
ldd "$so" | grep -E "cudart|c10_cuda|torch_cuda" || { echo "cuda-build-check FAILED: not linked against CUDA"; exit 1; }
echo "--- CUDA launchers defined in the extension (nm -D)"
symbols=$(nm -D --defined-only -C "$so")
grep -E " T pyobjectives::cuda::[a-z_]+\(" <<<"$symbols" | sed "s/^[0-9a-f]* T /  /"
for sym in rtd_loss_forward rtd_loss_head_backward linear_cross_entropy_chunk philox_uniform t5_bucket; do
  grep -qF "pyobjectives::cuda::$sym(" <<<"$symbols" \
    || { echo "cuda-build-check FAILED: pyobjectives::cuda::$sym missing"; exit 1; }
done
echo "--- load the module (no GPU needed) and list the ops with a CUDA kernel"
"$PY" - "$so" <<'PY'
import importlib.util
import sys

import torch

spec = importlib.util.spec_from_file_location("pyobjectives._C", sys.argv[1])
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
print("cuda_built", C.cuda_built(), "cuda_attention_built", C.cuda_attention_built())
assert C.cuda_built(), "the extension says it was built without CUDA"
ops = ["two_stream_attention_fwd", "two_stream_attention_bwd", "rtd_loss_fwd", "rtd_loss_head_bwd",
       "linear_cross_entropy_fwd", "linear_cross_entropy_bwd", "t5_bucket", "philox_uniform", "philox_uniform_run"]
for op in ops:
    keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"pyobjectives::{op}", k)]
    print(f"  {op}: {', '.join(keys)}")
    assert keys == ["CPU", "CUDA"], f"{op} lacks a kernel: {keys}"
print("cuda-build-check passed: the whole extension builds, links and loads")
PY
