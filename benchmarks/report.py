"""The report of a run, from pytest-benchmark's JSON: markdown summary, CSV, PNG plots.

    python -m benchmarks.report benchmarks/results/RUN.json            # writes RUN.md, RUN.csv, RUN_*.png beside it
    python -m benchmarks.report RUN.json --out DIR --no-plots

Reads what ``pytest benchmarks --benchmark-json=RUN.json`` wrote: ``benchmarks[]`` (pytest-benchmark's
stats; the suite's ``extra_info``: op, configuration, provider, check error, FLOPs / bytes, TFLOP/s, GB/s,
roofline fraction, peak memory, speedups), ``machine_info`` (with ``pyobjectives``: device, versions,
roofline, method) and ``commit_info``, and the suite's ``pyobjectives`` section (benchmarks not timed, with
their reasons). Before/after comparisons are pytest-benchmark's own: ``pytest-benchmark compare A.json B.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

#: CSV columns (every row also carries the run's device, versions, commit and date).
CSV_COLUMNS = ["op", "sweeps", "label", "provider", "kind", "status", "reason", "test", "ms", "q1", "q3", "min",
               "rounds", "tflops", "gbps", "roofline_pct", "bound", "peak_mb", "tokens_per_s", "speedup_vs_ref",
               "speedup_vs_eager", "mem_vs_ref", "check_err", "check_int_err", "check_tol", "check_what", "flops",
               "bytes", "n_sets", "note", "config"]
META_COLUMNS = ["device", "torch", "triton", "cuda", "commit", "datetime", "profile"]

TITLES = {"two_stream_attention": "two-stream attention", "rtd_loss": "RTD loss",
          "linear_cross_entropy": "linear + cross-entropy (+ sampling)", "xlnet_step": "HF XLNet training step",
          "electra_step": "ELECTRA objective step", "t5_attention": "T5 self-attention (bucketed bias)",
          "t5_step": "HF T5 training step"}
FORMULAS = {
    "two_stream_attention": "fwd+bwd FLOPs = 3 x 6·B·H·D·Lk·(L+P) (ac, bd band and PV, both streams, dense count; "
                            "backward = 2 x forward, recomputation not counted); sdpa_content counts its own "
                            "3 x 4·B·H·D·Lk·L",
    "rtd_loss": "bytes = 2·N·Dd·itemsize + 24·N (read hidden, ids, mask once; write d hidden once); FLOPs 6·N·Dd",
    "linear_cross_entropy": "FLOPs = 6·N·E·V (logits forward, d hidden and d weight backward)",
    "xlnet_step": "ms per step (fwd + bwd + AdamW); tokens/s = B·L / step time",
    "electra_step": "ms per step (fwd + bwd + AdamW); tokens/s = B·L / step time",
    "t5_attention": "fwd+bwd FLOPs = 3 x 4·B·H·L²·D (QK^T and PV, dense count); gradients to q, k, v and the table",
    "t5_step": "ms per step (fwd + bwd + AdamW); tokens/s = (input + label tokens) / step time",
}
#: Ops with a sweep plot: (op, x key, first sweep name) — the x key is the config key the sweep varies.
PLOTS = (("two_stream_attention", "L", "L"), ("rtd_loss", "tokens", "tokens"), ("linear_cross_entropy", "N", "N"),
         ("t5_attention", "L", "L"))
STEPS = ("xlnet_step", "electra_step", "t5_step")


# --- reading --------------------------------------------------------------------------------------

def load(path: str) -> tuple:
    """``(meta, rows)``: the run's facts, and one row per benchmark (timed, checked only, skipped, failed)."""
    with open(path) as f:
        data = json.load(f)
    mi = data.get("machine_info", {})
    env = dict(mi.get("pyobjectives") or {})
    commit = data.get("commit_info", {})
    sha = str(commit.get("id", "unknown"))[:12] + ("+dirty" if commit.get("dirty") else "")
    suite = data.get("pyobjectives") or {}
    meta = dict(env, commit=sha, branch=commit.get("branch"), datetime=data.get("datetime"),
                pytest_benchmark=data.get("version"), memory_method=suite.get("memory_method")
                or env.get("memory_method"), python=mi.get("python_version"), node=mi.get("node"))
    meta.setdefault("device", mi.get("processor") or mi.get("machine") or "?")
    rows = []
    for b in data.get("benchmarks", []):
        info, st = dict(b.get("extra_info") or {}), b["stats"]
        info.update(test=b.get("param") or b.get("name"), group=b.get("group"), status="ok",
                    ms=st["median"] * 1e3, q1=st["q1"] * 1e3, q3=st["q3"] * 1e3, min=st["min"] * 1e3,
                    rounds=st["rounds"])
        rows.append(info)
    for r in suite.get("not_timed", []):
        rows.append(dict(r, status="checked-only" if r.get("check_ok") else "check-failed", ms=None))
    for r in suite.get("failed", []):
        rows.append(dict(r, status="failed", ms=None))
    for r in suite.get("not_run", []):
        rows.append(dict(r, status="skipped", ms=None))
    return meta, rows


# --- files ----------------------------------------------------------------------------------------

def write_csv(path: str, meta: dict, rows: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(META_COLUMNS + CSV_COLUMNS)
        for row in rows:
            values = []
            for col in CSV_COLUMNS:
                v = row.get(col)
                if col == "config":
                    v = json.dumps(v, sort_keys=True)
                elif col == "sweeps":
                    v = ";".join(v or [])
                values.append("" if v is None else v)
            writer.writerow([meta.get(c, "") for c in META_COLUMNS] + values)


def _fmt(v, spec=".3g", none="–"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _check(r: dict) -> str:
    if r.get("check_err") is None:
        return "–"
    mark = "ok" if r.get("check_ok", True) else "**FAILED**"
    text = f"{mark} {r['check_err']:.1e}"
    if r.get("check_int_err"):
        text += f", ids {r['check_int_err']:.1%} differ"
    return text


def markdown(meta: dict, rows: list) -> str:
    roof = meta.get("roofline") or {}
    mm = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in (roof.get("matmul_TFLOPs") or {}).items())
    cpu = meta.get("device_type") == "cpu"
    lines = [f"## Benchmarks on {meta['device']}", "",
             f"torch {meta.get('torch')} (CUDA {meta.get('cuda') or 'none'}), triton {meta.get('triton')}, "
             f"transformers {meta.get('transformers')}, pytest-benchmark {meta.get('pytest_benchmark')}, "
             f"commit {meta.get('commit')}, {meta.get('datetime')}, profile `{meta.get('profile')}`"
             + (f", {meta.get('cpu_threads')} CPU thread(s), load average {meta.get('load_average_at_start')} at "
                f"start, {meta.get('load_average_at_end')} at end" if cpu else "")
             + "." + (" Triton ran under the CPU interpreter: checked, never timed."
                      if meta.get("triton_interpret") else ""), "",
             f"Roofline measured in this run: copy {_fmt(roof.get('copy_GBps'), '.4g')} GB/s (read + write); "
             f"matmul n={roof.get('matmul_n')}: {mm or '–'}.", "",
             "Times: pytest-benchmark's median [q1–q3] in ms of one timed round (ops: forward + backward; steps: "
             "fwd + bwd + AdamW), after untimed warm-up rounds, input sets rotated. × ref / × eager: speedup over "
             "the reference / eager baseline measured in this run (> 1 is faster). Peak MB: "
             + (meta.get("memory_method") or "not measured") + ". check: max relative error against the oracle on "
             "the benchmark inputs (checked before timing; a provider that fails is not timed).", ""]
    for op in dict.fromkeys(r["op"] for r in rows):
        shown = [r for r in rows if r["op"] == op and r["status"] in ("ok", "checked-only", "check-failed")]
        lines += [f"### {TITLES.get(op, op)} — {meta['device']}", ""]
        if FORMULAS.get(op):
            lines += [f"_{FORMULAS[op]}_", ""]
        lines += ["| config | provider | ms [q1–q3] | rounds | TFLOP/s | GB/s | % roofline | peak MB | × ref "
                  "| × eager | check |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in shown:
            time_text = (f"{r['ms']:.3g} [{r['q1']:.3g}–{r['q3']:.3g}]" if r.get("ms") is not None
                         else "not timed (interpreter)")
            lines.append(
                f"| {r['label']} | {r['provider']} | {time_text} | {_fmt(r.get('rounds'), 'd')} "
                f"| {_fmt(r.get('tflops'))} | {_fmt(r.get('gbps'))} | {_fmt(r.get('roofline_pct'), '.2g')} "
                f"| {_fmt(r.get('peak_mb'), '.4g')} | {_fmt(r.get('speedup_vs_ref'), '.3g')} "
                f"| {_fmt(r.get('speedup_vs_eager'), '.3g')} | {_check(r)} |")
        if not shown:
            lines.append("| (no provider ran) | | | | | | | | | | |")
        lines.append("")
    failed = [r for r in rows if r["status"] in ("failed", "check-failed")]
    if failed:
        lines += ["### FAILED (not timed)", "", "| op | config | provider | why |", "|---|---|---|---|"]
        for r in failed:
            why = (r.get("reason") or "").replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['op']} | {r['label']} | {r['provider']} | {why} |")
        lines.append("")
    skipped = {}
    for r in rows:
        if r["status"] == "skipped":
            skipped.setdefault((r["op"], r["provider"], r.get("reason") or ""), []).append(r["label"])
    if skipped:
        lines += ["### Not run", "", "| op | provider | why | configs |", "|---|---|---|---|"]
        for (op, prov, reason), labels in skipped.items():
            lines.append(f"| {op} | {prov} | {reason.replace('|', '/')} | {len(labels)} |")
        lines.append("")
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------------

def _title(meta: dict) -> str:
    return f"{meta['device']} — torch {meta.get('torch')}, commit {meta.get('commit')}"


def plot_op(path: str, meta: dict, rows: list, op: str, sweep: str, x_key: str) -> bool:
    """Speedup over the reference and peak memory against the sweep variable, one line per provider."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [r for r in rows if r["op"] == op and sweep in (r.get("sweeps") or []) and r.get("ms") is not None]
    if not data:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for provider in dict.fromkeys(r["provider"] for r in data):
        pts = sorted(((r["config"][x_key], r) for r in data if r["provider"] == provider), key=lambda t: t[0])
        xs = [x for x, _ in pts]
        speed = [r.get("speedup_vs_ref") for _, r in pts]
        mem = [r.get("peak_mb") for _, r in pts]
        if any(v is not None for v in speed):
            axes[0].plot(xs, [math.nan if v is None else v for v in speed], "o-", label=provider)
        if any(v is not None for v in mem):
            axes[1].plot(xs, [math.nan if v is None else v for v in mem], "o-", label=provider)
    axes[0].set_ylabel("speedup over reference (same run)")
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[1].set_ylabel("peak memory above inputs (MB)")
    for ax in axes:
        ax.set_xlabel(x_key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{TITLES.get(op, op)} — {_title(meta)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_steps(path: str, meta: dict, rows: list, ops=STEPS) -> bool:
    """Training steps: ms per step and peak memory per provider (bars), one row of panels per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(op, [r for r in rows if r["op"] == op and r.get("ms") is not None]) for op in ops]
    groups = [(op, rs) for op, rs in groups if rs]
    if not groups:
        return False
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.2 * len(groups)), squeeze=False)
    for (op, rs), ax_row in zip(groups, axes):
        names = [r["provider"] for r in rs]
        ax_row[0].barh(names, [r["ms"] for r in rs], xerr=[[max(r["ms"] - r["q1"], 0) for r in rs],
                                                            [max(r["q3"] - r["ms"], 0) for r in rs]])
        ax_row[0].set_xlabel("ms per step (median, q1–q3)")
        ax_row[0].set_title(f"{op}: {rs[0]['label']}", fontsize=8)
        ax_row[1].barh(names, [r.get("peak_mb") or 0 for r in rs])
        ax_row[1].set_xlabel("peak memory above inputs (MB)")
    fig.suptitle(f"training steps — {_title(meta)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(json_path: str, out_dir: str | None = None, stem: str | None = None, plots: bool = True) -> dict:
    """Markdown, CSV and PNGs of one run; returns the written paths."""
    meta, rows = load(json_path)
    out_dir = out_dir or os.path.dirname(os.path.abspath(json_path))
    stem = stem or os.path.splitext(os.path.basename(json_path))[0]
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    paths = dict(md=base + ".md", csv=base + ".csv", png=[])
    write_csv(paths["csv"], meta, rows)
    md = markdown(meta, rows)
    if plots:
        for op, x_key, sweep in PLOTS:
            png = f"{base}_{op}.png"
            if plot_op(png, meta, rows, op, sweep, x_key):
                paths["png"].append(png)
        png = f"{base}_steps.png"
        if plot_steps(png, meta, rows):
            paths["png"].append(png)
    if paths["png"]:
        md += "\nPlots: " + ", ".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths["png"]) + "\n"
    with open(paths["md"], "w") as f:
        f.write(md)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json) of a run of benchmarks/")
    parser.add_argument("--out", default=None, help="output folder (default: beside the JSON)")
    parser.add_argument("--name", default=None, help="file name stem (default: the JSON's)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--quiet", action="store_true", help="do not print the markdown")
    args = parser.parse_args(argv)
    paths = write(args.json, args.out, args.name, plots=not args.no_plots)
    if not args.quiet:
        print(open(paths["md"]).read())
    print(f"wrote {paths['md']}, {paths['csv']}" + "".join(f", {p}" for p in paths["png"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
