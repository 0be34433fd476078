"""pytest-benchmark glue: profile, parametrization, check-then-time, extra_info, the JSON's extra fields.

``pytest benchmarks`` runs every op x configuration x provider as one test (ids such as
``attention-B2-L512-H8-D64-P85-fp32-cpu``), grouped per (op, configuration). Each test builds (or reuses)
the configuration's inputs, checks the provider against the oracle on them (a wrong provider fails and is
never timed), then times it with ``benchmark.pedantic`` (warm-up rounds, input sets rotated through the
untimed ``setup``; on CUDA the setup also flushes the L2 cache and the timed function ends with
``torch.cuda.synchronize()``). Unavailable providers are skipped with their reason (``-rs``).

Options (or environment variables): ``--bench-profile tiny|cpu|gpu`` (``PYOBJECTIVES_BENCH_PROFILE``,
default by device), ``--bench-threads N`` (``PYOBJECTIVES_BENCH_THREADS``; CPU default 1),
``--bench-budget SECONDS``, ``--bench-max-minutes M``, ``--bench-memory auto|on|off``,
``--bench-no-interpreter``. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import gc
import itertools
import os
import time

import pytest
import torch

from benchmarks import common, memory, suite
from pyobjectives.backends import triton_interpreter_enabled

STATE_KEY = pytest.StashKey()
_STATE = []   #: the session's State, for hooks that get no config (pytest_runtest_logreport)


def pytest_addoption(parser):
    group = parser.getgroup("pyobjectives benchmarks")
    group.addoption("--bench-profile", choices=("auto", "tiny", "cpu", "gpu"),
                    default=os.environ.get("PYOBJECTIVES_BENCH_PROFILE", "auto"),
                    help="sizes: gpu (full suite), cpu (the CPU targets), tiny (smoke test); auto = by device")
    group.addoption("--bench-threads", type=int, default=int(os.environ.get("PYOBJECTIVES_BENCH_THREADS", 0)) or None,
                    help="torch CPU threads (default: every core, see docs/benchmarks.md)")
    group.addoption("--bench-budget", type=float, default=None,
                    help="seconds of timed calls per benchmark (rounds fit it within the profile's limits)")
    group.addoption("--bench-max-minutes", type=float, default=None,
                    help="soft limit: benchmarks not started by then are skipped with that reason")
    group.addoption("--bench-memory", choices=("auto", "on", "off"), default="auto",
                    help="peak memory: CUDA inline; CPU in one process per (op, provider) when JSON is written "
                         "(auto/on), off: not measured")
    group.addoption("--bench-no-interpreter", action="store_true",
                    help="skip the Triton CPU-interpreter correctness checks (never timed anyway)")


class State:
    """Per-session: options, the roofline, the current configuration's inputs, what was not timed and why."""

    def __init__(self, config):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        profile = config.getoption("bench_profile")
        self.profile = profile if profile != "auto" else ("gpu" if self.device == "cuda" else "cpu")
        if self.profile == "gpu" and self.device != "cuda":
            raise pytest.UsageError("--bench-profile gpu needs a CUDA device")
        threads = config.getoption("bench_threads")
        if self.device == "cpu":
            # Every core by default: the CPU profile's sizes (the native backend's targets) need them to finish in
            # minutes; --bench-threads 1 gives steadier ratios on a busy shared machine (docs/benchmarks.md).
            torch.set_num_threads(threads or os.cpu_count() or 1)
        elif threads:
            torch.set_num_threads(threads)
        self.timing = dict(suite.TIMING[self.profile])
        if config.getoption("bench_budget") is not None:
            self.timing["budget_s"] = config.getoption("bench_budget")
        self.max_minutes = config.getoption("bench_max_minutes")
        self.deadline = time.perf_counter() + 60 * self.max_minutes if self.max_minutes else None
        self.memory = config.getoption("bench_memory")
        self.interpreter = triton_interpreter_enabled() and self.device == "cpu" \
            and not config.getoption("bench_no_interpreter")
        self.env = common.environment(self.device, self.profile)
        self.dtypes = {"float32"}
        self.roofline = None
        self.case_key, self.case, self.oracle = None, None, None
        self.params = {}            #: nodeid -> suite.Param
        self.not_timed = []         #: Triton interpreter checks (checked, never timed)
        self.not_run = []           #: skipped benchmarks with their reasons
        self.failed = []            #: benchmarks whose check (or run) failed: never timed
        self.t0 = time.perf_counter()

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def get_roofline(self) -> dict:
        if self.roofline is None:
            self.roofline = common.measure_roofline(self.device, sorted(self.dtypes), self.profile)
        return self.roofline

    def case_for(self, mod, cfg):
        """The configuration's case and oracle result, built once and shared by its providers (the same inputs
        for every provider); the previous configuration's inputs are dropped first."""
        key = (mod.OP, repr(sorted(cfg.items())))
        if key != self.case_key:
            self.case_key, self.case, self.oracle = None, None, None
            _cleanup(self.device)
            case = mod.make_case(cfg, self.device, self.profile)
            oracle = None if case.step else case.oracle(case.sets[0], case.gouts[0], case.grad_names)
            self.case_key, self.case, self.oracle = key, case, oracle
        return self.case, self.oracle


def _cleanup(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_tier(n): run order of a benchmark (lower first)")
    config.stash[STATE_KEY] = State(config)
    _STATE[:] = [config.stash[STATE_KEY]]


def pytest_report_header(config):
    st = config.stash[STATE_KEY]
    env = st.env
    return (f"pyobjectives benchmarks: {env['device']} | profile {st.profile} | torch {env['torch']} | "
            f"{torch.get_num_threads()} thread(s) | triton {env['triton']}"
            + (" | TRITON_INTERPRET=1: Triton checked, never timed" if env["triton_interpret"] else ""))


def pytest_generate_tests(metafunc):
    if "bench_param" not in metafunc.fixturenames:
        return
    st = metafunc.config.stash[STATE_KEY]
    mods = getattr(metafunc.module, "OPS")
    found = [p for mod in mods for p in suite.params(mod, st.profile, st.interpreter)]
    for p in found:
        st.dtypes.add(p.cfg.get("dtype") or "float32")
    metafunc.parametrize("bench_param", [pytest.param(p, id=p.id, marks=pytest.mark.bench_tier(p.tier))
                                         for p in found])


def pytest_collection_modifyitems(config, items):
    """The first (plotted) sweep of every op, then the training steps, then the other sweeps: a run cut short
    by ``--bench-max-minutes`` still has the main curves and the end-to-end steps."""
    st = config.stash[STATE_KEY]

    def tier(item):
        marker = item.get_closest_marker("bench_tier")
        return marker.args[0] if marker else 0
    items.sort(key=tier)
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "bench_param" in callspec.params:
            st.params[item.nodeid] = callspec.params["bench_param"]


@pytest.fixture
def bench(request, benchmark):
    return Runner(request.config.stash[STATE_KEY], benchmark)


class Runner:
    def __init__(self, state: State, benchmark):
        self.st, self.benchmark = state, benchmark

    def run(self, p: suite.Param) -> None:
        st, mod = self.st, p.mod
        if st.out_of_time():
            pytest.skip(f"suite time limit ({st.max_minutes} min) reached")
        if p.interpreter_check:
            return self.interpreter_check(p)
        case, oracle = st.case_for(mod, p.cfg)
        prov = next((x for x in mod.providers(case) if x.name == p.provider), None)
        assert prov is not None, f"{mod.OP} has no provider {p.provider!r} (benchmarks.suite.provider_names)"
        if prov.reason:
            pytest.skip(prov.reason)
        if prov.interpreted:
            check = mod.label(mod.interpreter_config(st.profile))
            pytest.skip(f"Triton CPU interpreter: correctness checked on {check} (the -interpreter-check test), "
                        "never timed" if st.interpreter else
                        "Triton CPU interpreter: not timed (interpreter checks disabled)")
        bm = self.benchmark
        bm.group = p.group
        info = bm.extra_info
        info.update(op=mod.OP, label=case.label, config=p.cfg, sweeps=p.sweeps, provider=prov.name,
                    kind=prov.kind, note=prov.note, dtype=case.dtype, device=st.device,
                    flops=prov.flops if prov.flops is not None else case.flops,
                    bytes=prov.bytes if prov.bytes is not None else case.bytes, tokens=case.tokens,
                    n_sets=len(case.sets))
        try:
            if prov.setup is not None:
                prov.fn = prov.setup()
            t0 = time.perf_counter()
            err, int_err, ok, what = common.check_provider(case, prov, oracle)
            check_s = time.perf_counter() - t0
            tol = None if case.step else common.TOLERANCE[case.dtype]
            info.update(check_err=err, check_int_err=int_err, check_tol=tol, check_what=what, check_ok=ok)
            assert ok, (f"{prov.name} on {case.label}: error {err:.3g}"
                        + (f", {int_err:.2%} of sampled ids differ" if int_err else "")
                        + f" vs the oracle ({what}), above the tolerance: not timed")
            call = common.timed_call(case, prov)
            if case.step:        # the check ran another batch in eval mode: time one step instead
                t0 = time.perf_counter()
                call(0)
                common.synchronize(st.device)
                check_s = time.perf_counter() - t0
            self.time(call, check_s)
            self.derive(info)
            if st.device == "cuda" and st.memory != "off":
                info["peak_mb"] = common.cuda_peak_mb(call)
        except Exception as exc:  # a provider that cannot run here is skipped with the reason; others fail
            if type(exc).__name__ == "BackendUnavailableError":
                pytest.skip(str(exc))
            if _is_oom(exc):
                pytest.skip(f"out of memory on this device ({str(exc).splitlines()[0][:120]})")
            raise
        finally:
            if prov.setup is not None:
                prov.fn = None
            if prov.release is not None:
                prov.release()
            _cleanup(st.device)

    def time(self, call, estimate_s: float) -> None:
        """``benchmark.pedantic``: rounds from the time budget, warm-up rounds untimed, input sets rotated."""
        t = self.st.timing
        rounds = int(max(t["min_rounds"], min(t["max_rounds"], t["budget_s"] / max(estimate_s, 1e-6))))
        warmup = t["warmup_rounds"]
        if self.st.device == "cpu" and estimate_s > t["budget_s"] / 3:
            # A CPU call this slow was just warmed up by the check (same code, same first input set; nothing is
            # compiled or autotuned on the CPU): no second untimed call.
            warmup = 0
        self.benchmark.extra_info["warmup_rounds"] = warmup
        counter = itertools.count(1)
        cuda = self.st.device == "cuda"

        def setup():
            i = next(counter)
            if cuda:
                common.flush_l2()
                torch.cuda.synchronize()
            return (i,), {}

        def timed(i):
            out = call(i)
            if cuda:
                torch.cuda.synchronize()
            return out
        self.benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)

    def derive(self, info: dict) -> None:
        """Throughput and the roofline fraction from the median time (speedups come in the JSON hook)."""
        stats = getattr(getattr(self.benchmark, "stats", None), "stats", None)
        if stats is None or not stats.data:   # --benchmark-disable
            return
        secs = stats.median
        roof = self.st.get_roofline()
        flops, nbytes = info.get("flops"), info.get("bytes")
        info["tokens_per_s"] = info["tokens"] / secs if info.get("tokens") else None
        info["tflops"] = flops / secs / 1e12 if flops else None
        info["gbps"] = nbytes / secs / 1e9 if nbytes else None
        peak = (roof.get("matmul_TFLOPs") or {}).get(info.get("dtype"))
        bw = roof.get("copy_GBps")
        t_compute = flops / (peak * 1e12) if flops and peak else 0.0
        t_memory = nbytes / (bw * 1e9) if nbytes and bw else 0.0
        if t_compute or t_memory:
            info["bound"] = "compute" if t_compute >= t_memory else "memory"
            info["roofline_pct"] = 100 * max(t_compute, t_memory) / secs

    def interpreter_check(self, p: suite.Param) -> None:
        """Triton under TRITON_INTERPRET=1: the check on a tiny configuration, then a skip (never timed)."""
        st, mod = self.st, p.mod
        case = mod.make_case(p.cfg, st.device, st.profile)
        oracle = case.oracle(case.sets[0], case.gouts[0], case.grad_names)
        prov = next(x for x in mod.providers(case) if x.name == "triton")
        if prov.reason:
            pytest.skip(prov.reason)
        err, int_err, ok, what = common.check_provider(case, prov, oracle)
        record = dict(op=mod.OP, label=case.label, config=p.cfg, provider="triton", check_err=err,
                      check_int_err=int_err, check_tol=common.TOLERANCE[case.dtype], check_what=what, check_ok=ok,
                      reason="Triton CPU interpreter: correctness only, never timed")
        st.not_timed.append(record)
        assert ok, f"triton (interpreter) on {case.label}: error {err:.3g} vs the oracle ({what}) above tolerance"
        pytest.skip(f"Triton CPU interpreter: checked, error {err:.1e} <= {common.TOLERANCE[case.dtype]:.0e}; "
                    "never timed")


def pytest_runtest_logreport(report):
    """Skipped and failed benchmarks, with their reasons, for the JSON and the report."""
    if report.when == "call" and report.passed:
        return
    if not (report.skipped or report.failed):
        return
    if not _STATE:
        return
    st = _STATE[0]
    p = st.params.get(report.nodeid)
    if p is None:
        return
    row = dict(op=p.mod.OP, label=p.mod.label(p.cfg), config=p.cfg, provider=p.provider, test=p.id)
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
        if not p.interpreter_check:
            st.not_run.append(dict(row, reason=reason))
    else:
        message = getattr(report.longrepr, "reprcrash", None)
        st.failed.append(dict(row, when=report.when,
                              reason=(message.message if message is not None else str(report.longrepr))[:500]))


# --- what pytest-benchmark writes ---------------------------------------------------------------------

def pytest_benchmark_update_machine_info(config, machine_info):
    st = config.stash[STATE_KEY]
    env = dict(st.env, cpu_threads=torch.get_num_threads(), load_average_at_end=common._load_average(),
               elapsed_s=time.perf_counter() - st.t0)
    machine_info["pyobjectives"] = dict(env, roofline=st.roofline)


def pytest_benchmark_update_commit_info(config, commit_info):
    sha = os.environ.get("BENCH_GIT_SHA")
    if sha:   # the device copy of the tree has no .git
        commit_info.update(id=sha, source="BENCH_GIT_SHA")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """CPU peak memory (one process per (op, provider)), speedups against the reference and the eager
    baseline measured in this run, and the benchmarks that were not timed, with their reasons."""
    st = config.stash[STATE_KEY]
    rows = [b["extra_info"] for b in output_json["benchmarks"] if b.get("extra_info", {}).get("op")]
    for b in output_json["benchmarks"]:
        b["extra_info"]["median_ms"] = b["stats"]["median"] * 1e3
    if st.device == "cpu" and st.memory != "off" and rows:
        jobs = {}
        for r in rows:
            jobs.setdefault((suite.op_name(suite.module_of(r["op"])), r["provider"]), []).append(r["config"])
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        log = (lambda text: reporter.write_line(text)) if reporter else print
        log(f"\npeak RSS: {len(jobs)} processes, one per (op, provider)")
        found = memory.measure(jobs, st.profile, torch.get_num_threads(), log=log)
        for r in rows:
            res = found.get((r["op"], r["label"], r["provider"]))
            if res is not None:
                r["peak_mb"] = res.get("peak_mb")
                if res.get("error"):
                    r["memory_error"] = res["error"]
    timed = {(r["op"], r["label"], r["provider"]): r for r in rows}
    for r in rows:
        mod = suite.module_of(r["op"])
        for col, base_name in (("speedup_vs_ref", suite.REFERENCE.get(r["op"])), ("speedup_vs_eager", mod.EAGER)):
            base = timed.get((r["op"], r["label"], base_name))
            r[col] = base["median_ms"] / r["median_ms"] if base else None
        base = timed.get((r["op"], r["label"], suite.REFERENCE.get(r["op"])))
        r["mem_vs_ref"] = (r["peak_mb"] / base["peak_mb"]) if base and r.get("peak_mb") and base.get("peak_mb") \
            else None
    output_json["pyobjectives"] = dict(
        profile=st.profile, device=st.env["device"],
        memory_method=common.MEMORY_METHOD[st.device] if st.memory != "off" else "not measured (--bench-memory off)",
        not_timed=st.not_timed, not_run=st.not_run, failed=st.failed)
