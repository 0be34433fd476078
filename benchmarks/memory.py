"""CPU peak memory, one process per (op, provider): what pytest-benchmark does not measure.

``measure(jobs)`` starts ``python -m benchmarks.memory SPEC`` for each (op, provider) with the configs it
was timed on (two processes at a time) and returns ``{(op, label, provider): {"peak_mb": ..., "error": ...}}``.
The child builds one input set per config, makes one warm-up call (process-wide lazy initialisation and
optimizer state are not the op's memory), then reads the peak RSS growth of one call
(:func:`benchmarks.common.rss_peak_mb`), with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed so that freed large
blocks leave the process. ``benchmarks/conftest.py`` runs it before pytest-benchmark writes its JSON.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import subprocess
import sys
import time

import torch

from . import common

ENV = dict(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def measure(jobs: dict, profile: str, threads: int, log=print) -> dict:
    """``jobs``: ``{(short op name, provider): [config, ...]}``."""
    from .suite import OPS
    env = dict(os.environ, **ENV, PYTHONPATH=common.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = {}

    def work(item):
        (name, provider), configs = item
        spec = json.dumps(dict(op=name, provider=provider, configs=configs, profile=profile, threads=threads))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", spec], env=env, cwd=common.REPO,
                              capture_output=True, text=True, timeout=900)
        return name, provider, proc, time.perf_counter() - t0

    workers = max(1, min(2, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for name, provider, proc, secs in pool.map(work, jobs.items()):
            got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 and not got:
                log(f"memory {name}/{provider}: worker failed: {proc.stderr.strip()[-300:]}")
            for res in got:
                results[(OPS[name].OP, res["label"], provider)] = res
            log(f"memory {OPS[name].OP:<22} {provider:<28} "
                + ", ".join("–" if r.get("peak_mb") is None else f"{r['peak_mb']:.1f} MB" for r in got)
                + f"  ({secs:.1f} s)")
    return results


def worker(spec_json: str) -> int:
    """Child process: peak RSS of one provider over some configs (prints one JSON line per config)."""
    from .suite import OPS
    spec = json.loads(spec_json)
    mod = OPS[spec["op"]]
    fixed_threshold = "MALLOC_MMAP_THRESHOLD_" in os.environ
    common.MAX_SETS = 1
    torch.set_num_threads(spec.get("threads") or 1)
    for index, cfg in enumerate(spec["configs"]):
        result = dict(label=mod.label(cfg), peak_mb=None)
        try:
            case = mod.make_case(cfg, "cpu", spec["profile"])
            case.sets = case.sets[:1]
            prov = next(p for p in mod.providers(case) if p.name == spec["provider"])
            if prov.setup is not None:
                prov.fn = prov.setup()
            call = common.timed_call(case, prov)
            if index == 0 or case.step:
                call(0)  # warm-up: process-wide lazy initialisation (and optimizer state) is not the op's memory
            result["peak_mb"] = common.rss_peak_mb(call)
            if result["peak_mb"] is None:
                result["error"] = "cannot reset VmHWM (/proc/self/clear_refs)"
            elif not fixed_threshold:
                result["error"] = "MALLOC_MMAP_THRESHOLD_ not set: freed blocks may stay resident (undercount)"
            del case, prov, call
            gc.collect()
        except Exception as exc:  # noqa: BLE001 - reported in the row, the other configs still run
            result["error"] = _short(exc)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
