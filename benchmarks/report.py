"""Results: JSON and CSV rows, PNG plots, the markdown summary, and ``--compare A.json B.json``."""

from __future__ import annotations

import csv
import json
import math
import os

#: CSV columns (every row also carries the run's device, versions, git sha and timestamp).
CSV_COLUMNS = ["op", "sweeps", "label", "provider", "kind", "status", "reason", "ms", "p20", "p80", "reps",
               "tflops", "gbps", "roofline_pct", "bound", "peak_mb", "tokens_per_s", "speedup_vs_ref",
               "speedup_vs_eager", "mem_vs_ref", "check_err", "check_int_err", "check_tol", "check_what", "flops",
               "bytes", "n_sets", "note", "config"]
META_COLUMNS = ["device", "torch", "triton", "cuda", "git_sha", "timestamp", "profile"]

FORMULAS = {
    "two_stream_attention": "fwd+bwd FLOPs = 3 x 6·B·H·D·Lk·(L+P) (ac, bd band and PV, both streams, dense count; "
                            "backward = 2 x forward, recomputation not counted); sdpa_content counts its own "
                            "3 x 4·B·H·D·Lk·L",
    "rtd_loss": "bytes = 2·N·Dd·itemsize + 24·N (read hidden, ids, mask once; write d hidden once); FLOPs 6·N·Dd",
    "linear_cross_entropy": "FLOPs = 6·N·E·V (logits forward, d hidden and d weight backward)",
    "xlnet_step": "ms per step (fwd + bwd + AdamW); tokens/s = B·L / step time",
    "electra_step": "ms per step (fwd + bwd + AdamW); tokens/s = B·L / step time",
}


def key(row: dict) -> tuple:
    return row["op"], row["label"], row["provider"]


# --- files --------------------------------------------------------------------------------------------

def write_json(path: str, meta: dict, rows: list) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
        f.write("\n")


def load_json(path: str) -> tuple:
    with open(path) as f:
        data = json.load(f)
    return data["meta"], data["rows"]


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


# --- derived columns ------------------------------------------------------------------------------

def add_ratios(rows: list, refs: dict, eagers: dict) -> None:
    """Speedup / memory against the reference and the eager baseline of the same op, config and run."""
    timed = {key(r): r for r in rows if r.get("ms") is not None}
    for r in rows:
        if r.get("ms") is None:
            continue
        for col, base_name in (("speedup_vs_ref", refs.get(r["op"])), ("speedup_vs_eager", eagers.get(r["op"]))):
            base = timed.get((r["op"], r["label"], base_name))
            r[col] = base["ms"] / r["ms"] if base else None
        base = timed.get((r["op"], r["label"], refs.get(r["op"])))
        r["mem_vs_ref"] = (r["peak_mb"] / base["peak_mb"]) if base and r.get("peak_mb") and base.get("peak_mb") \
            else None


def add_roofline(rows: list, roofline: dict) -> None:
    """Throughput columns and the fraction of the roofline measured in the same run.

    floor time = max(FLOPs / matmul rate of the row's dtype, bytes / copy bandwidth);
    roofline_pct = 100 * floor / measured.
    """
    for r in rows:
        if r.get("ms") is None:
            continue
        secs = r["ms"] * 1e-3
        if r.get("tokens"):
            r["tokens_per_s"] = r["tokens"] / secs
        flops, nbytes = r.get("flops"), r.get("bytes")
        r["tflops"] = flops / secs / 1e12 if flops else None
        r["gbps"] = nbytes / secs / 1e9 if nbytes else None
        peak = (roofline.get("matmul_TFLOPs") or {}).get(r.get("dtype"))
        bw = roofline.get("copy_GBps")
        t_compute = flops / (peak * 1e12) if flops and peak else 0.0
        t_memory = nbytes / (bw * 1e9) if nbytes and bw else 0.0
        if t_compute or t_memory:
            r["bound"] = "compute" if t_compute >= t_memory else "memory"
            r["roofline_pct"] = 100 * max(t_compute, t_memory) / secs


# --- markdown -------------------------------------------------------------------------------------

def _fmt(v, spec=".3g", none="–"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _time(r: dict) -> str:
    if r.get("ms") is None:
        return "–"
    return f"{r['ms']:.3g} [{r['p20']:.3g}–{r['p80']:.3g}]"


def _check(r: dict) -> str:
    if r.get("check_err") is None:
        return "–"
    mark = "ok" if r["status"] in ("ok", "checked-only") else "**FAILED**"
    text = f"{mark} {r['check_err']:.1e}"
    if r.get("check_int_err"):
        text += f", ids {r['check_int_err']:.1%} differ"
    return text


def markdown(meta: dict, rows: list, titles: dict | None = None) -> str:
    titles = titles or {}
    roof = meta.get("roofline") or {}
    mm = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in (roof.get("matmul_TFLOPs") or {}).items())
    lines = [f"## Benchmarks on {meta['device']}", "",
             f"torch {meta['torch']} (CUDA {meta.get('cuda') or 'none'}), triton {meta.get('triton')}, "
             f"transformers {meta.get('transformers')}, git {meta['git_sha']}, {meta['timestamp']}, "
             f"profile `{meta['profile']}`"
             + (f", {meta.get('cpu_threads')} CPU thread(s), load average {meta.get('load_average_at_start')} at "
                f"start, {meta.get('load_average_at_end')} at end" if meta.get("device_type") == "cpu" else "")
             + "." + (" Triton ran under the CPU interpreter: checked, never timed."
                      if meta.get("triton_interpret") else ""), "",
             f"Roofline measured in this run: copy {_fmt(roof.get('copy_GBps'), '.4g')} GB/s (read + write); "
             f"matmul n={roof.get('matmul_n')}: {mm or '–'}.", "",
             "Times: median [p20–p80] ms of one timed call (ops: forward + backward; steps: fwd + bwd + AdamW). "
             "× ref / × eager: speedup over the reference / eager baseline measured in this run (> 1 is faster). "
             "Peak MB: " + meta.get("memory_method", "") + ". check: max relative error against the oracle on the "
             "benchmark inputs.", ""]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    for op in ops:
        shown = [r for r in rows if r["op"] == op and r["status"] in ("ok", "check-failed", "checked-only")]
        lines += [f"### {titles.get(op, op)} — {meta['device']}", ""]
        if FORMULAS.get(op):
            lines += [f"_{FORMULAS[op]}_", ""]
        lines += ["| config | provider | ms [p20–p80] | TFLOP/s | GB/s | % roofline | peak MB | × ref | × eager "
                  "| check |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in shown:
            time_text = _time(r) if r["status"] != "checked-only" else "not timed (interpreter)"
            lines.append(
                f"| {r['label']} | {r['provider']} | {time_text} | {_fmt(r.get('tflops'))} | {_fmt(r.get('gbps'))} "
                f"| {_fmt(r.get('roofline_pct'), '.2g')} | {_fmt(r.get('peak_mb'), '.4g')} "
                f"| {_fmt(r.get('speedup_vs_ref'), '.3g')} | {_fmt(r.get('speedup_vs_eager'), '.3g')} "
                f"| {_check(r)} |")
        if not shown:
            lines.append("| (no provider ran) | | | | | | | | | |")
        lines.append("")
    skipped = {}
    for r in rows:
        if r["status"] in ("skipped", "error"):
            skipped.setdefault((r["op"], r["provider"], r["status"], r.get("reason") or ""), []).append(r["label"])
    if skipped:
        lines += ["### Not run", "", "| op | provider | why | configs |", "|---|---|---|---|"]
        for (op, prov, status, reason), labels in skipped.items():
            why = reason if status == "skipped" else f"error: {reason}"
            lines.append(f"| {op} | {prov} | {why.replace('|', '/')} | {len(labels)} |")
        lines.append("")
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------------

def plot_op(path: str, meta: dict, rows: list, op: str, title: str, sweep: str, x_key: str) -> bool:
    """Speedup over the reference and peak memory against the sweep variable, one line per provider."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [r for r in rows if r["op"] == op and sweep in (r.get("sweeps") or []) and r.get("ms") is not None]
    if not data:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for provider in dict.fromkeys(r["provider"] for r in data):
        pts = sorted((r["config"][x_key], r) for r in data if r["provider"] == provider)
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
    fig.suptitle(f"{title} — {meta['device']} — torch {meta['torch']}, git {meta['git_sha']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_steps(path: str, meta: dict, rows: list, ops: list) -> bool:
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
        ax_row[0].barh(names, [r["ms"] for r in rs], xerr=[[r["ms"] - r["p20"] for r in rs],
                                                            [r["p80"] - r["ms"] for r in rs]])
        ax_row[0].set_xlabel("ms per step (median, p20–p80)")
        ax_row[0].set_title(f"{op}: {rs[0]['label']}", fontsize=8)
        ax_row[1].barh(names, [r.get("peak_mb") or 0 for r in rs])
        ax_row[1].set_xlabel("peak memory above inputs (MB)")
    fig.suptitle(f"training steps — {meta['device']} — torch {meta['torch']}, git {meta['git_sha']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- compare --------------------------------------------------------------------------------------

def compare(path_a: str, path_b: str, out=None) -> list:
    """Print the change between two runs: rows matched by (op, config, provider)."""
    import sys
    out = out or sys.stdout
    meta_a, rows_a = load_json(path_a)
    meta_b, rows_b = load_json(path_b)
    print(f"A: {os.path.basename(path_a)}: {meta_a['device']}, git {meta_a['git_sha']}, {meta_a['timestamp']}",
          file=out)
    print(f"B: {os.path.basename(path_b)}: {meta_b['device']}, git {meta_b['git_sha']}, {meta_b['timestamp']}",
          file=out)
    if meta_a["device"] != meta_b["device"]:
        print("WARNING: the two runs are on different devices; time changes compare machines, not code.", file=out)
    index_b = {key(r): r for r in rows_b}
    header = f"{'op':<22} {'config':<42} {'provider':<20} {'A ms':>9} {'B ms':>9} {'B/A':>7} {'xref A':>7} " \
             f"{'xref B':>7}"
    print(header, file=out)
    print("-" * len(header), file=out)
    result = []
    for ra in rows_a:
        rb = index_b.get(key(ra))
        if rb is None or ra.get("ms") is None or rb.get("ms") is None:
            continue
        ratio = rb["ms"] / ra["ms"]
        result.append(dict(op=ra["op"], label=ra["label"], provider=ra["provider"], a_ms=ra["ms"], b_ms=rb["ms"],
                           ratio=ratio))
        print(f"{ra['op']:<22} {ra['label'][:42]:<42} {ra['provider'][:20]:<20} {ra['ms']:9.3g} {rb['ms']:9.3g} "
              f"{ratio:6.2f}x {_fmt(ra.get('speedup_vs_ref'), '.3g'):>7} {_fmt(rb.get('speedup_vs_ref'), '.3g'):>7}",
              file=out)
    only_a = [k for k in (key(r) for r in rows_a if r.get("ms") is not None)
              if k not in {key(r) for r in rows_b if r.get("ms") is not None}]
    if only_a:
        print(f"{len(only_a)} timed rows of A have no timed counterpart in B", file=out)
    if not result:
        print("no rows in common", file=out)
    return result
