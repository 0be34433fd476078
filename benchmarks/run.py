"""``python -m benchmarks.run``: every op and training step on every provider, checked, then timed.

Examples::

    python -m benchmarks.run                          # profile by device: full suite on CUDA, CPU subset otherwise
    python -m benchmarks.run --ops attention rtd      # some ops only
    python -m benchmarks.run --profile tiny --out /tmp/b
    python -m benchmarks.run --compare A.json B.json  # change between two runs
    python -m benchmarks.run --report A.json          # regenerate the markdown and plots of a run

Writes ``<name>.json``, ``<name>.csv``, ``<name>.md`` and ``<name>_<op>.png`` to
``--out`` (default ``benchmarks/results/``), ``<name>`` = device slug and date.
See ``benchmarks/README.md`` for the method and the honesty rules.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import os
import subprocess
import sys
import time
import traceback

import torch

from . import attention, common, e2e, lce, report, rtd
from .common import Progress

OPS = {"attention": attention, "rtd": rtd, "lce": lce, "xlnet": e2e.XLNetStep, "electra": e2e.ElectraStep}
#: Per op: the provider the "× ref" column divides by.
REFERENCE = {"two_stream_attention": "reference", "rtd_loss": "reference", "linear_cross_entropy": "reference",
             "xlnet_step": "patched[reference]", "electra_step": "ops[reference]"}
PLOTTED = ("attention", "rtd", "lce")
TIMING = {"tiny": dict(budget_s=0.05, min_reps=3, max_reps=10, warmup=1),
          "cpu": dict(budget_s=0.6, min_reps=3, max_reps=30, warmup=1),
          "gpu": dict(budget_s=0.4, min_reps=10, max_reps=200, warmup=3)}


def _config_key(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)


def plan(names: list, profile: str) -> list:
    """``[(name, module, config, [sweep names]), ...]``: each config once, with every sweep it belongs to.

    Order: the first (plotted) sweep of every op, then the training steps, then the other sweeps, so that
    a run cut short by ``--max-minutes`` still has the main curves and the end-to-end steps.
    """
    units = []
    for name in names:
        mod = OPS[name]
        configs = {}
        for index, (sweep, _x, cfgs) in enumerate(mod.sweeps(profile)):
            for cfg in cfgs:
                entry = configs.setdefault(_config_key(cfg), [cfg, [], 2])
                entry[1].append(sweep)
                tier = 1 if getattr(mod, "STEP", False) else (0 if index == 0 else 2)
                entry[2] = min(entry[2], tier)
        units += [(name, mod, cfg, sweeps, tier) for cfg, sweeps, tier in configs.values()]
    return [u[:4] for u in sorted(units, key=lambda u: u[4])]


def _base_row(case_or_cfg, mod, sweeps, prov) -> dict:
    cfg = case_or_cfg.config
    return dict(op=mod.OP, sweeps=sweeps, label=case_or_cfg.label, config=cfg, provider=prov.name, kind=prov.kind,
                status=None, reason=None, note=prov.note, dtype=case_or_cfg.dtype, tokens=case_or_cfg.tokens,
                flops=prov.flops if prov.flops is not None else case_or_cfg.flops,
                bytes=prov.bytes if prov.bytes is not None else case_or_cfg.bytes,
                n_sets=len(case_or_cfg.sets), ms=None, p20=None, p80=None, reps=None, peak_mb=None,
                check_err=None, check_int_err=None, check_tol=None, check_what=None)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _cleanup(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class Runner:
    def __init__(self, args, device: str, profile: str):
        self.args, self.device, self.profile = args, device, profile
        self.timing = dict(TIMING[profile])
        if args.budget is not None:
            self.timing["budget_s"] = args.budget
        self.deadline = time.perf_counter() + args.max_minutes * 60 if args.max_minutes else None
        self.rows = []
        self.failed_checks = []
        self.interpreter_ops = {}   #: ops whose Triton provider ran under the interpreter (checked at the end)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def wanted(self, name: str) -> bool:
        return not self.args.providers or any(p in name for p in self.args.providers)

    # --- one provider on one case -----------------------------------------------------------------
    def run_provider(self, case, mod, sweeps, prov, oracle, check_only=False) -> dict:
        row = _base_row(case, mod, sweeps, prov)
        if prov.reason:
            row.update(status="skipped", reason=prov.reason)
            return row
        if self.out_of_time():
            row.update(status="skipped", reason=f"suite time limit ({self.args.max_minutes} min) reached")
            return row
        try:
            if prov.setup is not None and prov.fn is None:
                prov.fn = prov.setup()
            if oracle is None and not case.step:
                raise RuntimeError("no oracle result for this case")
            err, int_err, ok, what = common.check_provider(case, prov, oracle)
            tol = common.TOLERANCE[case.dtype] if not case.step else None
            row.update(check_err=err, check_int_err=int_err, check_what=what,
                       check_tol=tol if tol is not None else None)
            if check_only or prov.interpreted:
                row.update(status="checked-only" if ok else "check-failed",
                           reason="Triton CPU interpreter: correctness only, never timed")
                if not ok:
                    self.failed_checks.append(row)
                return row
            row["status"] = "ok" if ok else "check-failed"
            if not ok:
                self.failed_checks.append(row)
            call = common.timed_call(case, prov)
            row.update(common.measure_time(call, self.device, **self.timing))
            if self.device == "cuda" and not self.args.no_memory:
                row["peak_mb"] = common.cuda_peak_mb(call)
        except Exception as exc:  # noqa: BLE001 - a provider failing must not stop the suite
            name = type(exc).__name__
            if name == "BackendUnavailableError":
                row.update(status="skipped", reason=str(exc))
            elif _is_oom(exc):
                row.update(status="skipped", reason=f"out of memory on this device ({_short(exc)[:120]})")
            else:
                row.update(status="error", reason=_short(exc))
                if self.args.verbose:
                    traceback.print_exc()
        finally:
            if prov.setup is not None:
                prov.fn = None
            if prov.release is not None:
                prov.release()
            _cleanup(self.device)
        return row

    # --- one op ----------------------------------------------------------------------------------
    def run_case(self, mod, cfg, sweeps, progress: Progress) -> None:
        progress.start(f"{mod.OP}: {mod.label(cfg)}")
        if self.out_of_time():
            progress.note(f"skipped: suite time limit ({self.args.max_minutes} min) reached")
            self._record_unbuilt(mod, cfg, sweeps, f"suite time limit ({self.args.max_minutes} min) reached",
                                 status="skipped")
            return
        try:
            case = mod.make_case(cfg, self.device, self.profile)
        except Exception as exc:  # noqa: BLE001
            reason = ("out of memory building the inputs" if _is_oom(exc) else _short(exc))
            progress.note(f"could not build the case: {reason}")
            self._record_unbuilt(mod, cfg, sweeps, reason)
            _cleanup(self.device)
            return
        providers = [p for p in mod.providers(case) if self.wanted(p.name)]
        oracle = None
        if not case.step:
            try:
                oracle = case.oracle(case.sets[0], case.gouts[0], case.grad_names)
            except Exception as exc:  # noqa: BLE001
                progress.note(f"oracle failed ({_short(exc)}); providers are not timed unchecked")
        interp_cfg = getattr(mod, "interpreter_config", None)
        for i, prov in enumerate(providers, 1):
            if prov.interpreted and self.args.no_interpreter:
                prov.reason = "Triton CPU interpreter checks disabled (--no-interpreter)"
            elif prov.interpreted and interp_cfg is not None:
                self.interpreter_ops.setdefault(mod.OP, mod)
                prov.reason = f"Triton CPU interpreter: checked on {mod.label(interp_cfg(self.profile))}, never timed"
            row = self.run_provider(case, mod, sweeps, prov, oracle)
            self.rows.append(row)
            progress.note(f"  {i}/{len(providers)} {prov.name:<24} {self._describe(row)}")
        del case, oracle, providers
        _cleanup(self.device)

    def run_interpreter_checks(self, mod, cfg, progress: Progress) -> None:
        progress.note(f"{mod.OP}: Triton interpreter correctness check on {mod.label(cfg)}")
        case = mod.make_case(cfg, self.device, self.profile)
        oracle = case.oracle(case.sets[0], case.gouts[0], case.grad_names)
        for prov in mod.providers(case):
            if prov.interpreted and not prov.reason and self.wanted(prov.name):
                row = self.run_provider(case, mod, ["interpreter check"], prov, oracle, check_only=True)
                self.rows.append(row)
                progress.note(f"  {prov.name:<24} {self._describe(row)}")

    def _record_unbuilt(self, mod, cfg, sweeps, reason, status="error") -> None:
        self.rows.append(dict(op=mod.OP, sweeps=sweeps, label=mod.label(cfg), config=cfg, provider="(all)",
                              kind="", status=status, reason=reason, note="", dtype=cfg.get("dtype"), ms=None))

    @staticmethod
    def _describe(row: dict) -> str:
        if row["status"] in ("skipped", "error"):
            return f"{row['status']}: {row['reason']}"
        text = f"{row['status']}, check err {row['check_err']:.1e}"
        if row.get("ms") is not None:
            text += f", {row['ms']:.3g} ms [{row['p20']:.3g}-{row['p80']:.3g}] x{row['reps']}"
        return text

    # --- CPU memory: one process per (op, provider) -----------------------------------------------
    def measure_cpu_memory(self, progress: Progress) -> None:
        jobs = {}
        for row in self.rows:
            if row.get("ms") is not None:
                name = next(n for n, m in OPS.items() if m.OP == row["op"])
                jobs.setdefault((name, row["provider"]), []).append(row["config"])
        if not jobs:
            return
        progress.note(f"peak RSS: {len(jobs)} processes, one per (op, provider)")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
                   PYTHONPATH=common.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        index = {(r["op"], r["label"], r["provider"]): r for r in self.rows}

        def work(item):
            (name, provider), configs = item
            spec = json.dumps(dict(op=name, provider=provider, configs=configs, profile=self.profile,
                                   threads=torch.get_num_threads()))
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--memory-worker", spec], env=env,
                                  cwd=common.REPO, capture_output=True, text=True, timeout=900)
            return name, provider, proc, time.perf_counter() - t0

        workers = max(1, min(2, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for name, provider, proc, secs in pool.map(work, jobs.items()):
                results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
                if proc.returncode != 0 and not results:
                    progress.note(f"  memory {name}/{provider}: worker failed: {proc.stderr.strip()[-300:]}")
                for res in results:
                    row = index.get((OPS[name].OP, res["label"], provider))
                    if row is not None:
                        row["peak_mb"] = res.get("peak_mb")
                        if res.get("error"):
                            row["note"] = (row.get("note") or "") + f" [memory: {res['error']}]"
                progress.note(f"  memory {OPS[name].OP:<22} {provider:<24} "
                              + ", ".join(_fmt_mb(r.get("peak_mb")) for r in results) + f"  ({secs:.1f} s)")


def _fmt_mb(v) -> str:
    return "–" if v is None else f"{v:.1f} MB"


def memory_worker(spec_json: str) -> int:
    """Child process: peak RSS of one provider over some configs (prints one JSON line per config)."""
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
        except Exception as exc:  # noqa: BLE001
            result["error"] = _short(exc)
        print(json.dumps(result), flush=True)
    return 0


# --- outputs --------------------------------------------------------------------------------------

def titles() -> dict:
    return {m.OP: m.TITLE for m in OPS.values()}


def finish(meta: dict, rows: list, out_dir: str, name: str, plots: bool = True) -> dict:
    """Derived columns, then JSON, CSV, markdown and PNGs; returns the written paths."""
    report.add_roofline(rows, meta.get("roofline") or {})
    report.add_ratios(rows, REFERENCE, {m.OP: m.EAGER for m in OPS.values()})
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    paths = dict(json=base + ".json", csv=base + ".csv", md=base + ".md")
    report.write_json(paths["json"], meta, rows)
    report.write_csv(paths["csv"], meta, rows)
    md = report.markdown(meta, rows, titles())
    pngs = []
    if plots:
        for op_name in PLOTTED:
            mod = OPS[op_name]
            sweep, x_key, _ = mod.sweeps(meta["profile"])[0]
            png = f"{base}_{mod.OP}.png"
            if report.plot_op(png, meta, rows, mod.OP, mod.TITLE, sweep, x_key):
                pngs.append(png)
        png = f"{base}_steps.png"
        if report.plot_steps(png, meta, rows, [e2e.XLNetStep.OP, e2e.ElectraStep.OP]):
            pngs.append(png)
    if pngs:
        md += "\nPlots: " + ", ".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs) + "\n"
    with open(paths["md"], "w") as f:
        f.write(md)
    paths["png"] = pngs
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--profile", choices=("auto",) + common.PROFILES, default="auto",
                        help="sizes: gpu (full suite, B*L = 16k), cpu (small), tiny (tests); auto = by device")
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS), help="which ops / steps")
    parser.add_argument("--providers", nargs="+", default=None,
                        help="only providers whose name contains one of these strings")
    parser.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results"), help="output folder")
    parser.add_argument("--name", default=None, help="file name stem (default: <device-slug>_<date>)")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed calls per measurement")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="soft limit: providers not started by then are skipped with that reason")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default on a CPU run: 1, see benchmarks/README.md)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--no-plots", action="store_true", help="skip PNGs")
    parser.add_argument("--no-interpreter", action="store_true",
                        help="skip the Triton CPU-interpreter correctness checks (never timed anyway)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of provider errors")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print the change between two runs")
    parser.add_argument("--report", metavar="RUN.json", help="regenerate markdown and plots from a results JSON")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_worker:
        return memory_worker(args.memory_worker)
    if args.compare:
        report.compare(*args.compare)
        return 0
    if args.report:
        meta, rows = report.load_json(args.report)
        stem = os.path.splitext(os.path.basename(args.report))[0]
        out_dir = args.out if "--out" in (argv or sys.argv) else os.path.dirname(os.path.abspath(args.report))
        paths = finish(meta, rows, out_dir, stem, plots=not args.no_plots)
        print(open(paths["md"]).read())
        return 0

    device = "cuda" if torch.cuda.is_available() else "cpu"
    profile = args.profile if args.profile != "auto" else ("gpu" if device == "cuda" else "cpu")
    if profile == "gpu" and device != "cuda":
        parser.error("--profile gpu needs a CUDA device")
    if device == "cpu":
        # One thread by default: the CPU numbers are for ratios between providers, and on a shared machine
        # multi-threaded ops stall whenever another process holds a core (seen here: 1 s stalls of 40 ms ops).
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    meta = common.environment(device, profile)
    name = args.name or f"{meta['device_slug']}_{meta['timestamp'][:10]}"
    print(f"benchmarks on {meta['device']} | profile {profile} | torch {meta['torch']} | triton {meta['triton']} | "
          f"git {meta['git_sha']}" + (" | TRITON_INTERPRET=1 (Triton checked only)" if meta["triton_interpret"]
                                      else ""), flush=True)

    work = plan(args.ops, profile)
    dtypes = sorted({cfg.get("dtype", "float32") for _, _, cfg, _ in work} | {"float32"})
    t0 = time.perf_counter()
    print(f"roofline: copy bandwidth and {', '.join(dtypes)} matmul ...", flush=True)
    meta["roofline"] = common.measure_roofline(device, dtypes, profile)
    roof = meta["roofline"]
    print(f"roofline: copy {roof['copy_GBps']:.4g} GB/s; matmul " +
          ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in roof["matmul_TFLOPs"].items()), flush=True)

    runner = Runner(args, device, profile)
    progress = Progress(len(work))
    for _name, mod, cfg, sweeps in work:
        runner.run_case(mod, cfg, sweeps, progress)
    for mod in runner.interpreter_ops.values():
        runner.run_interpreter_checks(mod, mod.interpreter_config(profile), progress)
    if device == "cpu" and not args.no_memory:
        runner.measure_cpu_memory(progress)
    meta["elapsed_s"] = time.perf_counter() - t0
    meta["load_average_at_end"] = common._load_average()
    paths = finish(meta, runner.rows, args.out, name, plots=not args.no_plots)
    print()
    print(open(paths["md"]).read())
    print(f"wrote {paths['json']}, {paths['csv']}, {paths['md']}" +
          "".join(f", {p}" for p in paths["png"]) + f" in {meta['elapsed_s']:.0f} s")
    failed = [r for r in runner.failed_checks if r["kind"] == "pyobjectives"]
    if failed:
        print(f"{len(failed)} pyobjectives provider(s) FAILED their correctness check: "
              + ", ".join(f"{r['op']}/{r['provider']} ({r['label']})" for r in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
