"""Benchmark suite (benchmarks/): a tiny config end to end on the CPU, its files, --compare, skip reasons."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from pyobjectives import backends, reference
from pyobjectives.backends import BACKENDS, OpImpl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import common, run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny profile is the CPU path")


def _run(tmp_path, *extra):
    code = run.main(["--profile", "tiny", "--out", str(tmp_path), "--name", "t", "--budget", "0.01", *extra])
    meta, rows = json.load(open(tmp_path / "t.json")).values()
    return code, meta, rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("matplotlib")
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bench")
    code = run.main(["--profile", "tiny", "--out", str(out), "--name", "t", "--budget", "0.01", "--no-memory",
                     "--no-interpreter"])
    return code, out


def test_tiny_suite_writes_json_csv_png_md(tiny_run):
    code, out = tiny_run
    assert code == 0
    data = json.load(open(out / "t.json"))
    meta, rows = data["meta"], data["rows"]
    for k in ("device", "torch", "triton", "cuda", "git_sha", "timestamp", "profile", "roofline", "memory_method"):
        assert k in meta, k
    assert meta["roofline"]["copy_GBps"] > 0 and meta["roofline"]["matmul_TFLOPs"]["float32"] > 0
    ops = {r["op"] for r in rows}
    assert ops == {"two_stream_attention", "rtd_loss", "linear_cross_entropy", "xlnet_step", "electra_step"}
    timed = [r for r in rows if r["ms"] is not None]
    assert timed and all(r["status"] in ("ok", "check-failed") for r in timed)
    assert all(r["status"] == "ok" for r in timed), [(r["op"], r["provider"], r["check_err"]) for r in timed]
    for r in timed:
        assert r["p20"] <= r["ms"] <= r["p80"] and r["reps"] >= 1 and r["config"]
    # every op has its reference (or the step's eager baseline) timed, and ratios against it
    for op in ops:
        assert any(r["op"] == op and r["provider"] == run.REFERENCE[op] and r["ms"] for r in rows), op
    attn_ref = [r for r in timed if r["op"] == "two_stream_attention" and r["provider"] == "reference"]
    assert all(r["speedup_vs_ref"] == pytest.approx(1.0) and r["tflops"] > 0 for r in attn_ref)
    assert all(r["roofline_pct"] > 0 for r in attn_ref)

    with open(out / "t.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert all(r["device"] == meta["device"] and r["git_sha"] == meta["git_sha"] for r in csv_rows)
    json.loads(csv_rows[0]["config"])

    pngs = sorted(p.name for p in out.glob("t_*.png"))
    assert pngs == ["t_linear_cross_entropy.png", "t_rtd_loss.png", "t_steps.png", "t_two_stream_attention.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    md = (out / "t.md").read_text()
    assert meta["device"] in md and "| config | provider |" in md and "### Not run" in md


def test_unavailable_providers_are_skipped_with_a_reason(tiny_run):
    _, out = tiny_run
    rows = json.load(open(out / "t.json"))["rows"]
    by = {}
    for r in rows:
        by.setdefault((r["op"], r["provider"]), r)
    for (op, prov), r in by.items():
        if r["status"] == "skipped":
            assert r["reason"], (op, prov)
    assert "CUDA" in by[("two_stream_attention", "flex_bd")]["reason"]
    assert by[("linear_cross_entropy", "liger_flce")]["status"] == "skipped"
    assert by[("linear_cross_entropy", "cut_cross_entropy")]["status"] == "skipped"
    for name in backends.PRIORITY:   # every registered backend appears, run or skipped with the registry's reasons
        row = by[("rtd_loss", name)]
        reasons = BACKENDS[name].op_reasons("rtd_loss")
        if reasons and "interpreter" not in row["reason"]:
            assert row["status"] == "skipped" and row["reason"] == "; ".join(reasons)
    if not hasattr(__import__("pyobjectives").nn, "ElectraObjective"):
        assert "does not exist" in by[("electra_step", "ElectraObjective")]["reason"]


def test_compare_mode(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    data = json.load(open(out / "t.json"))
    for r in data["rows"]:
        if r["ms"] is not None:
            r["ms"] *= 2
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps(data))
    capsys.readouterr()
    assert run.main(["--compare", str(out / "t.json"), str(slower)]) == 0
    text = capsys.readouterr().out
    assert "2.00x" in text and "B/A" in text
    from benchmarks import report
    result = report.compare(str(out / "t.json"), str(slower))
    assert result and all(r["ratio"] == pytest.approx(2.0) for r in result)


def test_report_regenerates_markdown_and_plots(tiny_run, tmp_path):
    _, out = tiny_run
    assert run.main(["--report", str(out / "t.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "t.md").exists() and (tmp_path / "t_rtd_loss.png").read_bytes()[:8] == PNG_MAGIC


def _run_rtd_with(tmp_path, monkeypatch, backend):
    """The rtd benchmark with ``backend`` given the reference's rtd_loss as its implementation."""
    monkeypatch.setitem(BACKENDS[backend].ops, "rtd_loss", OpImpl(lambda: reference.rtd_loss))
    code, _, rows = _run(tmp_path, "--ops", "rtd", "--no-memory", "--no-plots")
    return code, rows


def test_new_backend_is_picked_up_without_edits(tmp_path, monkeypatch):
    """A backend that gains an implementation (here: 'cpu' for rtd_loss) is benchmarked with no suite change."""
    monkeypatch.setattr(BACKENDS["cpu"], "probed", [])
    code, rows = _run_rtd_with(tmp_path, monkeypatch, "cpu")
    assert code == 0
    cpu_rows = [r for r in rows if r["provider"] == "cpu"]
    assert cpu_rows and all(r["status"] == "ok" and r["ms"] > 0 and r["speedup_vs_ref"] for r in cpu_rows)


@pytest.mark.skipif(not backends.triton_interpreter_enabled(), reason="needs TRITON_INTERPRET=1")
def test_interpreter_is_checked_never_timed(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    code, rows = _run_rtd_with(tmp_path, monkeypatch, "triton")
    assert code == 0
    triton_rows = [r for r in rows if r["provider"] == "triton"]
    assert triton_rows and all(r["ms"] is None for r in triton_rows)
    assert [r["status"] for r in triton_rows].count("checked-only") == 1
    assert all("interpreter" in r["reason"] for r in triton_rows)


def test_memory_worker_measures_peak_rss():
    spec = json.dumps(dict(op="rtd", provider="reference", profile="tiny",
                           configs=[dict(tokens=4096, L=64, Dd=256, dtype="float32")]))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--memory-worker", spec], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result.get("error", "").startswith("cannot reset"):
        pytest.skip(result["error"])
    # d hidden alone is 4096 * 256 * 4 bytes = 4 MB
    assert result["peak_mb"] is not None and 3.5 < result["peak_mb"] < 64, result


def test_checks_catch_a_wrong_provider():
    from benchmarks import rtd
    case = rtd.make_case(dict(tokens=256, L=64, Dd=16, dtype="float32"), "cpu", "tiny")
    oracle = case.oracle(case.sets[0], case.gouts[0], case.grad_names)
    wrong = common.Provider("wrong", "eager", fn=lambda s: [rtd.hf_eager(s)[0] * 1.01])
    err, _, ok, _ = common.check_provider(case, wrong, oracle)
    assert not ok and err > 1e-3
    right = common.Provider("right", "eager", fn=rtd.hf_eager)
    assert common.check_provider(case, right, oracle)[2]
