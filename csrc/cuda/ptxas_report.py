"""Compile every csrc/cuda/*.cu for each architecture with ``-Xptxas -v`` and tabulate the kernels.

    python csrc/cuda/ptxas_report.py [--arch 80 90] [--cutlass DIR] [--nvcc nvcc] [--jobs N] [files...]

Prints one row per kernel and architecture: registers, static shared memory, stack frame, spill
stores / loads. Exits 1 on any compile error or any spill store (the `make cuda-check` gate).
Object files go to a temporary folder; the nvcc flags are those of the extension build (setup.py's
NVCC_FLAGS and torch's defaults).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["-O3", "-std=c++17", "-lineinfo",  # setup.py's NVCC_FLAGS
         # what torch.utils.cpp_extension adds to every nvcc call of the extension build
         "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def default_cutlass():
    """CUTLASS_INCLUDE, else the include folder of an installed nvidia-cutlass wheel (found, not imported)."""
    if os.environ.get("CUTLASS_INCLUDE"):
        return os.environ["CUTLASS_INCLUDE"]
    import importlib.util
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    return path if os.path.isdir(path) else None


def compile_one(nvcc: str, source: str, arch: str, includes: list, out_dir: str):
    obj = os.path.join(out_dir, f"{os.path.basename(source)}.sm{arch}.o")
    cmd = [nvcc, *FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-c", source, "-o", obj]
    for inc in includes:
        cmd += ["-I", inc]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, arch, proc.returncode, proc.stdout + proc.stderr


def parse(log: str):
    """[(kernel, arch, registers, smem, stack, spill_stores, spill_loads)] from ptxas' -v output."""
    rows, current = [], None
    for line in log.splitlines():
        m = ENTRY.search(line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2)}
            continue
        if current is None:
            continue
        m = STACK.search(line)
        if m:
            current["stack"], current["spill_st"], current["spill_ld"] = map(int, m.groups())
        m = USED.search(line)
        if m:
            current["regs"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
            rows.append(current)
            current = None
    return rows


def demangle(names: list) -> dict:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {n: (short_name(d) if d else n) for n, d in zip(names, out)}


def short_name(name: str) -> str:
    """``void ns::(anonymous namespace)::kernel<T, 3>(Params, bool)`` -> ``kernel<T, 3>``."""
    name = re.sub(r"^void |pyobjectives::cuda::|\(anonymous namespace\)::|_GLOBAL__N__\w+::", "", name)
    name = name.split("(", 1)[0]
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def arch_number(text: str) -> str:
    if not re.fullmatch(r"\d{2,3}a?", text):
        raise argparse.ArgumentTypeError(f"an architecture like 80 or 90a, got {text!r}")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="default: every csrc/cuda/*.cu")
    ap.add_argument("--arch", nargs="+", default=["80", "90"], type=arch_number,
                    help="compute capabilities without the dot (give files before --arch)")
    ap.add_argument("--cutlass", default=default_cutlass(), help="CUTLASS include folder (default: "
                    "CUTLASS_INCLUDE, else the installed nvidia-cutlass wheel's)")
    ap.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    args = ap.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not files:
        print("no .cu files under csrc/cuda")
        return 0
    includes = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    if args.cutlass:
        includes.append(args.cutlass)
    print(f"nvcc {' '.join(FLAGS[:3])} (+ torch's defines) -Xptxas -v, sm_{', sm_'.join(args.arch)}; "
          f"CUTLASS: {args.cutlass or 'none found'}")
    failed, rows = [], []
    with tempfile.TemporaryDirectory() as out_dir, concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        jobs = [pool.submit(compile_one, args.nvcc, f, a, includes, out_dir) for f in files for a in args.arch]
        for job in jobs:
            source, arch, rc, log = job.result()
            name = os.path.relpath(source, ROOT)
            if rc != 0:
                failed.append(name)
                print(f"=== {name} sm_{arch}: nvcc failed (exit {rc})\n{log}", file=sys.stderr)
                continue
            for r in parse(log):
                r["file"] = os.path.basename(source)
                rows.append(r)
    names = demangle(sorted({r["kernel"] for r in rows}))
    header = ("file", "kernel", "arch", "regs", "smem B", "stack B", "spill st B", "spill ld B")
    table = [(r["file"], names[r["kernel"]], r["arch"], r["regs"], r["smem"], r.get("stack", 0), r.get("spill_st", 0),
              r.get("spill_ld", 0)) for r in sorted(rows, key=lambda r: (r["file"], names[r["kernel"]], r["arch"]))]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)] if table else [len(h) for h in header]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in table:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")
    spills = [row for row in table if row[6] > 0]
    print(f"\n{len(table)} kernel builds from {len(files)} files x {len(args.arch)} architectures; "
          f"{len(failed)} failed compiles, {len(spills)} with spill stores")
    for row in spills:
        print(f"spill stores: {row[1]} ({row[0]}, {row[2]}): {row[6]} bytes", file=sys.stderr)
    return 1 if failed or spills else 0


if __name__ == "__main__":
    sys.exit(main())
