"""Benchmark suite smoke test: the tiny profile through pytest-benchmark, its JSON, the report, skip reasons."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from pyobjectives import backends, reference
from pyobjectives.backends import BACKENDS, OpImpl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import common, memory, report, rtd, suite  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OPS = {"two_stream_attention", "rtd_loss", "linear_cross_entropy", "t5_attention", "xlnet_step", "electra_step",
       "t5_step"}
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny profile is the CPU path")


def _env(**extra):
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``python -m benchmarks.run --profile tiny``: pytest-benchmark JSON, then the report (seconds)."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("transformers")
    pytest.importorskip("pytest_benchmark")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--profile", "tiny", "--out", str(out), "--name",
                           "t", "--budget", "0.01", "--no-memory", "--no-interpreter"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    return proc, out


def test_tiny_suite_writes_pytest_benchmark_json(tiny_run):
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.load(open(out / "t.json"))
    for key in ("machine_info", "commit_info", "benchmarks", "datetime", "version", "pyobjectives"):
        assert key in data, key
    env = data["machine_info"]["pyobjectives"]
    for k in ("device", "torch", "triton", "cuda", "profile", "roofline", "memory_method", "cpu_threads"):
        assert k in env, k
    assert env["profile"] == "tiny" and env["roofline"]["copy_GBps"] > 0
    assert env["roofline"]["matmul_TFLOPs"]["float32"] > 0
    assert data["commit_info"]["id"]

    benches = data["benchmarks"]
    assert {b["extra_info"]["op"] for b in benches} == OPS
    for b in benches:
        info = b["extra_info"]
        # readable ids: op-configuration-provider, e.g. attention-B2-L64-H2-D16-P16-fp32-cpu
        assert re.fullmatch(r"(attention|rtd|lce|t5_attention|xlnet_step|electra_step|t5_step)-[A-Za-z0-9_.-]+", b["param"]), b["param"]
        assert b["param"].endswith(suite.provider_id(info["provider"]))
        # grouped per (op, configuration): the group names the op and the configuration, not the provider
        assert b["group"] == f"{info['op']}: {info['label']}"
        assert info["check_ok"] and info["check_err"] is not None
        assert b["stats"]["rounds"] >= 3 and b["stats"]["median"] > 0
        assert info["median_ms"] == pytest.approx(b["stats"]["median"] * 1e3)
    groups = {}
    for b in benches:
        groups.setdefault(b["group"], set()).add(b["extra_info"]["provider"])
    assert all(len(provs) >= 2 for provs in groups.values()), groups   # providers side by side
    for b in benches:   # every op has its reference (or the step's) timed, and ratios against it
        info = b["extra_info"]
        if info["provider"] == suite.REFERENCE[info["op"]]:
            assert info["speedup_vs_ref"] == pytest.approx(1.0)
        assert info["speedup_vs_ref"] is not None and info["speedup_vs_eager"] is not None, b["param"]
    attn_ref = [b["extra_info"] for b in benches if b["extra_info"]["op"] == "two_stream_attention"
                and b["extra_info"]["provider"] == "reference"]
    assert attn_ref and all(r["tflops"] > 0 and r["gbps"] > 0 and r["roofline_pct"] > 0 for r in attn_ref)
    steps = [b["extra_info"] for b in benches if b["extra_info"]["op"] in ("xlnet_step", "electra_step", "t5_step")]
    assert steps and all(r["tokens_per_s"] > 0 for r in steps)


def test_report_files(tiny_run):
    proc, out = tiny_run
    data = json.load(open(out / "t.json"))
    with open(out / "t.csv") as f:
        csv_rows = list(csv.DictReader(f))
    timed = [r for r in csv_rows if r["status"] == "ok"]
    assert len(timed) == len(data["benchmarks"])
    device = data["machine_info"]["pyobjectives"]["device"]
    assert all(r["device"] == device and r["commit"] for r in csv_rows)
    json.loads(csv_rows[0]["config"])
    pngs = sorted(p.name for p in out.glob("t_*.png"))
    assert pngs == ["t_linear_cross_entropy.png", "t_rtd_loss.png", "t_steps.png", "t_t5_attention.png",
                    "t_two_stream_attention.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    md = (out / "t.md").read_text()
    assert device in md and "| config | provider |" in md and "### Not run" in md
    assert md in proc.stdout   # the summary is printed
    # the report regenerates from the JSON alone
    again = out / "again"
    assert report.main([str(out / "t.json"), "--out", str(again), "--no-plots", "--quiet"]) == 0
    assert (again / "t.md").read_text().split("\n")[0] == md.split("\n")[0]


def test_unavailable_providers_are_skipped_with_a_reason(tiny_run):
    proc, out = tiny_run
    data = json.load(open(out / "t.json"))
    by = {}
    for r in data["pyobjectives"]["not_run"]:
        assert r["reason"], r
        by.setdefault((r["op"], r["provider"]), r)
    assert "CUDA" in by[("two_stream_attention", "flex_bd")]["reason"]
    assert ("linear_cross_entropy", "liger_flce") in by and ("linear_cross_entropy", "cut_cross_entropy") in by
    timed = {(b["extra_info"]["op"], b["extra_info"]["provider"]) for b in data["benchmarks"]}
    for name in backends.PRIORITY:   # every registered backend appears, timed or skipped with the registry's reasons
        assert ("rtd_loss", name) in timed or ("rtd_loss", name) in by, name
        reasons = BACKENDS[name].op_reasons("rtd_loss")
        if reasons:
            assert by[("rtd_loss", name)]["reason"] == "; ".join(reasons)
    assert "SKIPPED" in proc.stdout and "FlexAttention is benchmarked on CUDA only" in proc.stdout   # -rs lines


def test_every_provider_of_a_configuration_is_a_test():
    """Parametrization: op x configuration x provider, provider names known before any input exists."""
    case = rtd.make_case(rtd.sweeps("tiny")[0][2][0], "cpu", "tiny")
    assert [p.name for p in rtd.providers(case)] == suite.provider_names(rtd)
    params = suite.params(rtd, "tiny", interpreter=True)
    names = {p.provider for p in params if not p.interpreter_check}
    assert names == set(suite.provider_names(rtd)) and set(backends.PRIORITY) <= names
    assert len({p.id for p in params}) == len(params)
    assert [p for p in params if p.interpreter_check] == [p for p in params if p.provider == "triton"
                                                          and p.interpreter_check]


def test_new_backend_is_picked_up_without_edits(monkeypatch):
    """A backend that gains an implementation becomes a runnable provider of the benchmark, checked against the
    oracle, with no suite change (here: 'cpu' without, then with, an rtd_loss implementation)."""
    cfg = rtd.sweeps("tiny")[0][2][0]
    monkeypatch.setattr(BACKENDS["cpu"], "probed", [])
    monkeypatch.delitem(BACKENDS["cpu"].ops, "rtd_loss", raising=False)
    case = rtd.make_case(cfg, "cpu", "tiny")
    prov = next(p for p in rtd.providers(case) if p.name == "cpu")
    assert prov.fn is None and "no cpu implementation of rtd_loss" in prov.reason
    monkeypatch.setitem(BACKENDS["cpu"].ops, "rtd_loss", OpImpl(lambda: reference.rtd_loss))
    prov = next(p for p in rtd.providers(case) if p.name == "cpu")
    assert prov.reason is None and prov.fn is not None
    oracle = case.oracle(case.sets[0], case.gouts[0], case.grad_names)
    err, _, ok, _ = common.check_provider(case, prov, oracle)
    assert ok, err


class _FakeBenchmark:
    def __init__(self):
        self.extra_info, self.group, self.timed = {}, None, False

    def pedantic(self, *args, **kwargs):
        self.timed = True


def test_wrong_provider_fails_and_is_never_timed(monkeypatch):
    from benchmarks import conftest as bench_conftest
    st = bench_conftest.State.__new__(bench_conftest.State)   # no options: no thread change in this process
    st.device, st.profile, st.deadline, st.interpreter, st.memory = "cpu", "tiny", None, False, "off"
    st.timing, st.case_key, st.roofline, st.dtypes = dict(suite.TIMING["tiny"]), None, None, {"float32"}
    wrong = OpImpl(lambda: lambda *args, **kwargs: 1.01 * reference.rtd_loss(*args, **kwargs))
    monkeypatch.setitem(BACKENDS["cpu"].ops, "rtd_loss", wrong)
    param = next(p for p in suite.params(rtd, "tiny", False) if p.provider == "cpu")
    fake = _FakeBenchmark()
    with pytest.raises(AssertionError, match="not timed"):
        bench_conftest.Runner(st, fake).run(param)
    assert not fake.timed and fake.extra_info["check_ok"] is False


def test_cpu_peak_memory_in_its_own_process():
    cfg = rtd.sweeps("tiny")[0][2][0]
    found = memory.measure({("rtd", "reference"): [cfg]}, "tiny", 1, log=lambda text: None)
    res = found[("rtd_loss", rtd.label(cfg), "reference")]
    assert res["peak_mb"] is not None and res["peak_mb"] >= 0 and not res.get("error"), res


@pytest.mark.skipif(not backends.triton_interpreter_enabled(), reason="needs TRITON_INTERPRET=1")
def test_interpreter_is_checked_never_timed(tmp_path):
    pytest.importorskip("triton")
    path = tmp_path / "i.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_rtd.py", "-p", "no:cacheprovider", "-q",
                           "-rs", "-k", "triton or reference", "--bench-profile=tiny", "--bench-memory=off",
                           "--bench-budget=0.01", f"--benchmark-json={path}"], cwd=REPO, env=_env(TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    data = json.load(open(path))
    assert not [b for b in data["benchmarks"] if b["extra_info"]["provider"] == "triton"]   # never timed
    checked = data["pyobjectives"]["not_timed"]
    assert [r["provider"] for r in checked] == ["triton"] and checked[0]["check_ok"]
    assert "Triton CPU interpreter: checked" in proc.stdout
    reasons = [r["reason"] for r in data["pyobjectives"]["not_run"] if r["provider"] == "triton"]
    assert reasons and all("never timed" in r for r in reasons)
