"""Shared machinery: cases, providers, correctness checks, memory, roofline, environment facts.

Timing, statistics, the JSON file and comparisons belong to pytest-benchmark (``benchmarks/conftest.py``
feeds it); this module keeps what it does not do.

Honesty rules implemented here (``benchmarks/README.md`` lists them):

* every provider of a case gets the *same* input sets (built once per case);
* warm-up calls are excluded from the timings (``benchmark.pedantic(warmup_rounds=...)``);
* inputs are rotated over several sets when one set would sit in the cache,
  and on CUDA the L2 cache is flushed before every timed call;
* inputs are random, never zeros;
* each provider is checked against a high-precision oracle on the benchmark
  inputs before it is timed; a failed check is shown, never hidden;
* ratios come from rows measured in the same run;
* Triton under the CPU interpreter is checked, never timed.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from pyobjectives.backends import BACKENDS, PRIORITY, triton_interpreter_enabled
from pyobjectives.cli import device_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILES = ("tiny", "cpu", "gpu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
#: Relative error (max |x - oracle| / max |oracle|, per tensor) a provider may show, by compute dtype.
TOLERANCE = {"float64": 1e-9, "float32": 2e-4, "bfloat16": 6e-2, "float16": 3e-2}
#: Fraction of differing integer outputs (sampled ids) allowed, by compute dtype: argmax ties can flip.
INT_TOLERANCE = {"float64": 0.0, "float32": 2e-3, "bfloat16": 5e-2, "float16": 5e-2}


# --- cases and providers --------------------------------------------------------------------------

@dataclass
class Case:
    """One op at one configuration: rotated input sets and the formulas for its work."""

    op: str
    config: dict
    label: str                               #: short human description, e.g. "L=512 B=32 H=16 D=64 P=85 bf16"
    sets: list                               #: input sets (dicts name -> tensor / value), identical for every provider
    grad_names: list                         #: float leaves that receive gradients
    dtype: str                               #: compute dtype name (key of DTYPES)
    device: str
    flops: float | None = None               #: useful FLOPs of one timed call (formula in the op module)
    bytes: float | None = None               #: minimum bytes one timed call must move
    oracle: Callable | None = None           #: (inputs, gouts) -> (outputs, grads dict) in high precision
    gouts: list = field(default_factory=list)  #: per set: grad of each differentiable output (random)
    tokens: int | None = None                #: tokens per call (for tokens/s of training steps)
    step: bool = False                       #: True: providers' fn is a whole training step (no harness autograd)
    extra: dict = field(default_factory=dict)  #: op-specific state (models, cached check results)


@dataclass
class Provider:
    """One way to compute a case. ``fn(inputs)`` returns the outputs (forward only; the
    harness adds the backward) or, for step cases, runs one whole training step."""

    name: str
    kind: str                                 #: pyobjectives | eager | lower-bound | compiled | third-party
    fn: Callable | None = None
    reason: str | None = None                 #: why it is skipped (None = runs)
    grad_names: list | None = None            #: leaves it differentiates (default: the case's)
    compare: Sequence[int] | None = None      #: output indices checked against the oracle (None = all)
    oracle: Callable | None = None            #: provider-specific oracle (a different function, e.g. plain SDPA)
    flops: float | None = None                #: overrides the case's FLOPs when it computes other work
    bytes: float | None = None
    interpreted: bool = False                 #: Triton under TRITON_INTERPRET=1: checked, never timed
    check: Callable | None = None             #: step cases: () -> (error, tolerance, what was checked)
    setup: Callable | None = None             #: called once before first use (builds models); returns fn
    release: Callable | None = None           #: called after the provider is done (frees models)
    note: str = ""


def backend_names() -> list:
    """Every registered pyobjectives backend: PRIORITY order first, then any others registered later."""
    return list(PRIORITY) + [name for name in BACKENDS if name not in PRIORITY]


def backend_providers(op: str, call_inputs: dict, make_fn: Callable[[str], Callable], device: str) -> list:
    """A provider per registered backend; skipped with the registry's reasons when it cannot run."""
    out = []
    for name in backend_names():
        reasons = BACKENDS[name].not_supported_reasons(op, call_inputs)
        if name not in PRIORITY and not reasons:
            reasons = [f"backend {name!r} is registered but not in pyobjectives.backends.PRIORITY, "
                       "so the public functions cannot be asked for it"]
        interpreted = name == "triton" and triton_interpreter_enabled() and device == "cpu"
        out.append(Provider(name, "pyobjectives", fn=None if reasons else make_fn(name),
                            reason="; ".join(reasons) if reasons else None, interpreted=interpreted,
                            note="Triton CPU interpreter: correctness only" if interpreted else ""))
    return out


# --- randomness -----------------------------------------------------------------------------------

def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, gen, dtype, device, scale=1.0) -> torch.Tensor:
    """Random normal values (never zeros), reproducible from ``gen`` (a CPU generator). On CUDA they are drawn
    on the device by a generator seeded from ``gen`` (fast at the suite's sizes), on the CPU directly."""
    if torch.device(device).type == "cuda":
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        dev_gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(*shape, generator=dev_gen, dtype=torch.float32, device=device)
    else:
        x = torch.randn(*shape, generator=gen, dtype=torch.float32)
    return (x * scale).to(dtype)


#: Upper bound on rotated input sets (the CPU memory worker sets 1: it measures one call).
MAX_SETS = 4


def n_rotations(set_bytes: float, device: str, max_sets: int | None = None) -> int:
    """How many input sets to rotate so that one set does not sit in the last-level cache."""
    max_sets = MAX_SETS if max_sets is None else max_sets
    cache = last_level_cache_bytes(device)
    n = max(1, min(max_sets, math.ceil(2 * cache / max(set_bytes, 1))))
    budget = 0.15 * total_memory_bytes(device)
    return max(1, min(n, int(budget // max(set_bytes, 1))))


def rotated_input_sets(make_set, cfg: dict, device: str, seed: int, set_bytes=None) -> list:
    """Input sets ``make_set(cfg, device, seed=seed + i)``, as many as :func:`n_rotations` asks for;
    ``set_bytes(first_set)`` sizes one set (default: all tensors of a flat dict)."""
    first = make_set(cfg, device, seed=seed)
    size = set_bytes(first) if set_bytes else tensor_bytes(first.values())
    return [first] + [make_set(cfg, device, seed=seed + i) for i in range(1, n_rotations(size, device))]


def last_level_cache_bytes(device: str) -> int:
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    best = 0
    for index in range(8):
        path = f"/sys/devices/system/cpu/cpu0/cache/index{index}/size"
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG")) * mult)
    return best or (32 << 20)


def total_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def tensor_bytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor))


# --- forward + backward harness -------------------------------------------------------------------

def make_gouts(outputs: Sequence, gen: torch.Generator, dtype: torch.dtype) -> list:
    """A random upstream gradient (in ``dtype``) for each floating-point output; None for integer outputs."""
    gouts = []
    for o in outputs:
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            gouts.append(torch.randn(o.shape, generator=gen, dtype=torch.float32).to(dtype).to(o.device))
        else:
            gouts.append(None)
    return gouts


def fwd_bwd(fn: Callable, inputs: dict, grad_names: Sequence[str], gouts: Sequence) -> tuple:
    """One forward and backward: outputs and gradients of ``grad_names`` (dict)."""
    outs = fn(inputs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, gouts)
             if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
    leaves = [inputs[n] for n in grad_names]
    grads = {}
    if pairs and leaves:
        got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
        grads = {n: g for n, g in zip(grad_names, got)}
    return outs, grads


def autograd_oracle(forward: Callable, dtype: torch.dtype) -> Callable:
    """An oracle from a forward function: inputs upcast to ``dtype`` (fresh leaves), autograd for the grads."""
    def oracle(inputs: dict, gouts: Sequence, grad_names: Sequence[str]):
        hp = {n: (t.detach().to(dtype).requires_grad_(n in grad_names)
                  if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in inputs.items()}
        gouts_hp = [None if g is None else g.to(dtype) for g in gouts]
        return fwd_bwd(forward, hp, grad_names, gouts_hp)
    return oracle


def rel_err(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    """max |got - want| / max |want| (inf on NaN/Inf or a missing tensor); mismatch fraction for integers."""
    if want is None:
        return 0.0
    if got is None:
        return 0.0 if not want.abs().max().item() else math.inf
    if got.shape != want.shape:
        return math.inf
    if not want.is_floating_point():
        return (got.to(want.device) != want).float().mean().item() if want.numel() else 0.0
    got, want = got.detach().double().to(want.device), want.detach().double()
    if not torch.isfinite(got).all():
        return math.inf
    scale = want.abs().max().item() if want.numel() else 0.0
    return (got - want).abs().max().item() / max(scale, 1e-30) if want.numel() else 0.0


def check_provider(case: Case, prov: Provider, oracle_result: tuple | None) -> tuple:
    """Run ``prov`` on the first input set and compare with the oracle.

    Returns ``(float error, int-output mismatch, ok, what)``.
    """
    if case.step:
        err, tol, what = prov.check()
        return err, 0.0, err <= tol, what
    inputs, gouts = case.sets[0], case.gouts[0]
    grad_names = prov.grad_names if prov.grad_names is not None else case.grad_names
    if prov.oracle is not None:
        want_outs, want_grads = prov.oracle(inputs, gouts, grad_names)
        what = "own oracle"
    else:
        want_outs, want_grads = oracle_result
        what = "oracle"
    got_outs, got_grads = fwd_bwd(prov.fn, inputs, grad_names, gouts)
    idx = range(len(want_outs)) if prov.compare is None else prov.compare
    float_err, int_err = 0.0, 0.0
    for i in idx:
        if i >= len(got_outs):
            float_err = math.inf
            continue
        want = want_outs[i]
        if isinstance(want, torch.Tensor) and not want.is_floating_point():
            int_err = max(int_err, rel_err(got_outs[i], want))
        else:
            float_err = max(float_err, rel_err(got_outs[i], want))
    for n in grad_names:
        float_err = max(float_err, rel_err(got_grads.get(n), want_grads.get(n)))
    ok = float_err <= TOLERANCE[case.dtype] and int_err <= INT_TOLERANCE[case.dtype]
    outputs = "outputs" if prov.compare is None else f"outputs {list(idx)}"
    return float_err, int_err, ok, f"{outputs} + grads of {len(grad_names)} inputs vs {what}"


def timed_call(case: Case, prov: Provider) -> Callable[[int], Any]:
    """call(i): one timed unit on input set i (fwd+bwd for ops, the whole step for step cases)."""
    if case.step:
        return lambda i: prov.fn(case.sets[i % len(case.sets)])
    grad_names = prov.grad_names if prov.grad_names is not None else case.grad_names

    def call(i):
        j = i % len(case.sets)
        return fwd_bwd(prov.fn, case.sets[j], grad_names, case.gouts[j])
    return call


# --- timing ---------------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


_FLUSH: dict = {}


def flush_l2() -> None:
    """Overwrite a buffer larger than the L2 cache (what triton.testing.do_bench does between calls)."""
    buf = _FLUSH.get("buf")
    if buf is None:
        size = max(256 << 20, 4 * last_level_cache_bytes("cuda"))
        buf = _FLUSH["buf"] = torch.empty(size // 4, dtype=torch.int32, device="cuda")
    buf.zero_()


def best_time_s(fn: Callable[[], Any], device: str, *, budget_s: float, min_reps: int, max_reps: int) -> float:
    """Fastest of repeated ``fn()`` calls, in seconds (the roofline's ceilings; not a benchmark timing)."""
    fn()
    synchronize(device)
    best, spent, reps = math.inf, 0.0, 0
    while reps < min_reps or (reps < max_reps and spent < budget_s):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


# --- memory ---------------------------------------------------------------------------------------

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() during one timed call minus memory_allocated() before it "
            "(inputs, weights and optimizer state already resident), in MB",
    "cpu": "peak RSS (VmHWM, reset through /proc/self/clear_refs) during one timed call minus RSS before it, "
           "measured in a separate process per (op, provider) after a warm-up call, glibc "
           "MALLOC_MMAP_THRESHOLD_ fixed so that freed large blocks return to the OS; in MB",
}


def cuda_peak_mb(call: Callable[[int], Any]) -> float:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = call(0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / 2**20


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1)) if match else -1


def rss_peak_mb(call: Callable[[int], Any]) -> float | None:
    """Peak RSS growth during ``call(0)`` in this process (Linux); None where it cannot be reset."""
    gc.collect()
    base = _proc_status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    result = call(0)
    peak = _proc_status_kb("VmHWM")
    del result
    return max(peak - base, 0) / 1024


# --- roofline -------------------------------------------------------------------------------------

def measure_roofline(device: str, dtypes: Sequence[str], profile: str) -> dict:
    """Copy bandwidth and matmul throughput measured now, on this device, with the same timer.

    copy: ``y.copy_(x)`` of a buffer 8x the last-level cache (at least 256 MB on
    CUDA), counting bytes read + written. matmul: ``a @ b`` square, random
    inputs, ``2 n^3`` FLOPs, per dtype used by the run. Both take the fastest
    repetition (a ceiling, not a typical time).
    """
    out = {"copy_GBps": None, "matmul_TFLOPs": {}, "matmul_n": None, "copy_MB": None}
    n_bytes = max(8 * last_level_cache_bytes(device), (256 << 20) if device == "cuda" else (64 << 20))
    if profile == "tiny":
        n_bytes = 16 << 20
    x = torch.randn(n_bytes // 4, device=device)
    y = torch.empty_like(x)
    t = best_time_s(lambda: y.copy_(x), device, budget_s=0.3, min_reps=5, max_reps=50)
    out["copy_GBps"] = 2 * n_bytes / t / 1e9
    out["copy_MB"] = n_bytes / 2**20
    del x, y
    n = {"tiny": 256, "cpu": 2048, "gpu": 8192}[profile]
    out["matmul_n"] = n
    for name in dtypes:
        dt = DTYPES[name]
        if device == "cpu" and dt in (torch.float16,):
            continue
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        t = best_time_s(lambda: a @ b, device, budget_s=0.5, min_reps=3, max_reps=50)
        out["matmul_TFLOPs"][name] = 2 * n**3 / t / 1e12
        del a, b
    return out


# --- environment ----------------------------------------------------------------------------------

def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception:  # optional dependency broken or missing
        return None


def git_sha() -> str:
    if os.environ.get("BENCH_GIT_SHA"):
        return os.environ["BENCH_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _load_average() -> list | None:
    """1/5/15-minute load averages: on a shared machine, other processes' load perturbs CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: str) -> str:
    """``cpu-xeon-2c``, ``nvidia-h100-80gb-hbm3``: the device part of result file names."""
    if device == "cuda":
        text = torch.cuda.get_device_name()
    else:
        model = re.sub(r"\((r|tm)\)|\bprocessor\b|\bintel\b|\bcpu\b|@.*$", " ", cpu_model().lower())
        text = f"cpu {model} {os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def environment(device: str, profile: str) -> dict:
    """What pytest-benchmark's ``machine_info`` lacks: the device, library versions, profile and method."""
    import pyobjectives
    return {
        "device": device_name() if device == "cuda" else f"cpu: {cpu_model()}, {os.cpu_count()} cores",
        "device_type": device,
        "device_slug": device_slug(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "pyobjectives": pyobjectives.__version__,
        "git_sha": git_sha(),
        "profile": profile,
        "triton_interpret": triton_interpreter_enabled(),
        "load_average_at_start": _load_average(),
        "memory_method": MEMORY_METHOD[device],
        "timer": ("time.perf_counter around each call followed by torch.cuda.synchronize(); the L2 cache flushed "
                  "and the device synchronized in the untimed setup before each call" if device == "cuda"
                  else "time.perf_counter per call (CPU ops are synchronous)"),
    }
