"""``python -m benchmarks.run``: the benchmark suite through pytest-benchmark, then the report.

Examples::

    python -m benchmarks.run                          # profile by device: full suite on CUDA, CPU subset otherwise
    python -m benchmarks.run --ops attention rtd      # some ops only
    python -m benchmarks.run --profile tiny --out /tmp/b
    python -m benchmarks.run -k "reference or cpu"    # other arguments go to pytest

It runs ``pytest benchmarks/test_*.py --benchmark-json=<out>/<name>.json`` (``<name>``: device slug and
date), then ``python -m benchmarks.report`` on that JSON (``<name>.md``, ``<name>.csv``, ``<name>_*.png``) and
prints the markdown summary. Before/after: ``pytest-benchmark compare A.json B.json`` (pytest-benchmark's
own), or ``--benchmark-compare`` on a later run. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import time

from . import common, report

FILES = {"attention": "test_attention.py", "rtd": "test_rtd.py", "lce": "test_lce.py", "t5": "test_t5.py",
         "xlnet": "test_e2e.py", "electra": "test_e2e.py", "t5_step": "test_e2e.py"}
STEP_K = {"xlnet": "xlnet_step", "electra": "electra_step", "t5_step": "t5_step"}


def pytest_command(args, json_path: str, extra: list) -> list:
    files = list(dict.fromkeys(os.path.join("benchmarks", FILES[op]) for op in args.ops))
    cmd = [sys.executable, "-m", "pytest", *files, "-p", "no:cacheprovider", "-q", "-rsf",
           f"--benchmark-json={json_path}", "--benchmark-group-by=group", "--benchmark-sort=name",
           "--benchmark-columns=median,iqr,min,rounds", f"--bench-profile={args.profile}"]
    left_out = [STEP_K[op] for op in STEP_K if op not in args.ops]
    if left_out and any(op in STEP_K for op in args.ops):   # test_e2e.py holds every step
        cmd += ["-k", " and ".join(f"not {step}" for step in left_out)]
    if args.threads:
        cmd.append(f"--bench-threads={args.threads}")
    if args.budget is not None:
        cmd.append(f"--bench-budget={args.budget}")
    if args.max_minutes:
        cmd.append(f"--bench-max-minutes={args.max_minutes}")
    if args.no_memory:
        cmd.append("--bench-memory=off")
    if args.no_interpreter:
        cmd.append("--bench-no-interpreter")
    return cmd + extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--profile", choices=("auto", "tiny", "cpu", "gpu"),
                        default=os.environ.get("PYOBJECTIVES_BENCH_PROFILE", "auto"),
                        help="sizes: gpu (full suite), cpu (the CPU targets), tiny (smoke test); auto = by device")
    parser.add_argument("--ops", nargs="+", choices=list(FILES), default=list(FILES), help="which ops / steps")
    parser.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results"), help="output folder")
    parser.add_argument("--name", default=None, help="file name stem (default: <device-slug>_<date>)")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed calls per benchmark")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="soft limit: benchmarks not started by then are skipped with that reason")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: every core, see docs/benchmarks.md)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--no-plots", action="store_true", help="skip PNGs")
    parser.add_argument("--no-interpreter", action="store_true",
                        help="skip the Triton CPU-interpreter correctness checks (never timed anyway)")
    args, extra = parser.parse_known_args(argv)

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = args.name or f"{common.device_slug(device)}_{_dt.date.today().isoformat()}"
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.abspath(os.path.join(args.out, name + ".json"))
    if os.path.exists(json_path):
        os.remove(json_path)   # a stale file must not be reported as this run's
    cmd = pytest_command(args, json_path, extra)
    env = dict(os.environ, PYTHONPATH=common.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("$ python " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    code = subprocess.call(cmd, cwd=common.REPO, env=env)
    elapsed = time.perf_counter() - t0
    if not os.path.exists(json_path):
        print(f"pytest exited {code} without writing {json_path}")
        return code or 1
    paths = report.write(json_path, args.out, name, plots=not args.no_plots)
    print()
    print(open(paths["md"]).read())
    print(f"wrote {json_path}, {paths['csv']}, {paths['md']}" + "".join(f", {p}" for p in paths["png"])
          + f"; the suite took {elapsed:.0f} s")
    if code:
        print(f"pytest exited {code}: a provider failed its check or errored (see FAILED above)")
    return code


if __name__ == "__main__":
    sys.exit(main())
