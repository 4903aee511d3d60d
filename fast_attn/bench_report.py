"""Tables, JSON and plots of benchmark records (for fast_attn.bench and for
pytest-benchmark runs of benchmarks/).

A record is a flat dict: card, capability (a GPU's, "sm_90"; None on a CPU),
device_type, implementation, mode, batch, heads, seqlen, head_dim, causal,
window (None, or the left window of a causal case), dtype, bias, median_ms,
flops, peak_memory_mb, error. Throughput and the
ratios to every SDPA backend are derived from it.
"""

from __future__ import annotations

import json
import platform
from collections import defaultdict
from pathlib import Path

import torch

CASE_KEYS = ("mode", "dtype", "bias", "head_dim", "causal", "window", "batch", "heads", "seqlen")
PANEL_KEYS = CASE_KEYS[:6]  # a plot's panel: everything but the shape


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def write_ratio_table(pytest_config, title: str, medians_by_group: dict[str, dict], row_of) -> None:
    """Write the ratio table a benchmarks/ module prints after its runs to pytest's terminal:
    a blank line, `title`, then row_of(group, medians) indented for each group of median
    seconds by implementation (a row of None leaves the group out). Nothing without a
    terminal reporter or a median."""
    reporter = pytest_config.pluginmanager.getplugin("terminalreporter")
    if reporter is None or not medians_by_group:
        return
    reporter.write_line("")
    reporter.write_line(title)
    for group, medians in medians_by_group.items():
        row = row_of(group, medians)
        if row is not None:
            reporter.write_line(f"  {row}")


def record(result, card: str, device_type: str, capability: str | None = None) -> dict:
    case = result.case
    return {
        "card": card,
        "capability": capability,
        "device_type": device_type,
        "implementation": result.implementation,
        "mode": case.mode,
        "batch": case.batch,
        "heads": case.heads,
        "seqlen": case.seqlen,
        "head_dim": case.head_dim,
        "causal": case.causal,
        "window": case.window,
        "dtype": case.dtype,
        "bias": case.bias,
        "median_ms": result.median_ms,
        "flops": case.flops,
        "peak_memory_mb": result.peak_memory_mb,
        "error": result.error,
    }


def throughput(rec: dict) -> float | None:
    """TFLOP/s for GPU records, GFLOP/s for CPU records."""
    if rec.get("median_ms") in (None, 0):
        return None
    per_second = rec["flops"] / (rec["median_ms"] * 1e-3)
    return per_second / (1e12 if rec["device_type"] == "cuda" else 1e9)


def unit(records: list[dict]) -> str:
    return "TFLOP/s" if records and records[0]["device_type"] == "cuda" else "GFLOP/s"


def grouped(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for rec in records:
        cases[tuple(rec[k] for k in CASE_KEYS)][rec["implementation"]] = rec
    return cases


def ratio_columns(impls: list[str]) -> list[tuple[str, str]]:
    ours = [i for i in impls if i.startswith("fast_attn")]
    theirs = [i for i in impls if i.startswith("sdpa") or i.startswith("flex")]
    return [(a, b) for a in ours for b in theirs]


def short_name(impl: str) -> str:
    """ "fast_attn:cpu" -> "cpu", "sdpa_flash" -> "flash", "fast_attn" stays."""
    for prefix in ("fast_attn:", "sdpa:", "sdpa_"):
        if impl.startswith(prefix):
            return impl[len(prefix) :]
    return impl


def causal_label(causal: bool, window: int | None) -> str:
    if window is not None:
        return f"window ({window}, 0)"
    return "yes" if causal else "no"


def markdown_table(records: list[dict], title: str) -> str:
    cases = grouped(records)
    impls = sorted({r["implementation"] for r in records}, key=lambda n: (not n.startswith("fast_attn"), n))
    ratios = ratio_columns(impls)
    header = ["mode", "dtype", "bias", "D", "causal", "B x H", "S"]
    header += [f"{i} {unit(records)}" for i in impls]
    header += [f"{short_name(a)}/{short_name(b)}" for a, b in ratios]
    header += ["peak MB (fast_attn)"]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, by_impl in cases.items():
        mode, dtype, bias, head_dim, causal, window, batch, heads, seqlen = key
        masking = causal_label(causal, window)
        row = [mode, dtype, bias, str(head_dim), masking, f"{batch}x{heads}", str(seqlen)]
        for impl in impls:
            value = throughput(by_impl[impl]) if impl in by_impl else None
            row.append(f"{value:.1f}" if value is not None else "n/a")
        for a, b in ratios:
            ta = throughput(by_impl[a]) if a in by_impl else None
            tb = throughput(by_impl[b]) if b in by_impl else None
            row.append(f"{ta / tb:.2f}x" if ta and tb else "n/a")
        peaks = [
            r["peak_memory_mb"]
            for n, r in by_impl.items()
            if n.startswith("fast_attn") and r["peak_memory_mb"] is not None
        ]
        row.append(f"{max(peaks):.0f}" if peaks else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    errors = [r for r in records if r.get("error")]
    if errors:
        lines += ["", "Not run (the implementation refused the case):", ""]
        seen = set()
        for r in errors:
            note = (r["implementation"], r["error"])
            if note not in seen:
                seen.add(note)
                lines.append(f"- {r['implementation']}: {r['error']}")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path, title: str) -> bool:
    """Throughput vs sequence length, one line per implementation, one panel per setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        panels[tuple(rec[key] for key in PANEL_KEYS)].append(rec)
    if not panels:
        return False
    columns = min(4, len(panels))
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    for ax, (key, recs) in zip(axes.flat, sorted(panels.items(), key=lambda kv: str(kv[0]))):
        mode, dtype, bias, head_dim, causal, window = key
        by_impl: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for rec in recs:
            value = throughput(rec)
            if value is not None:
                by_impl[rec["implementation"]].append((rec["seqlen"], value))
        for impl, points in sorted(by_impl.items()):
            points.sort()
            style = "-o" if impl.startswith("fast_attn") else "--."
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(
            f"{mode} {dtype} D={head_dim} {'causal' if causal else 'full'}"
            + (f" window {window}" if window is not None else "")
            + (" bias" if bias != "none" else ""),
            fontsize=9,
        )
        ax.set_xlabel("sequence length")
        ax.set_ylabel(unit(records))
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_records(records: list[dict], out_dir: Path, title: str) -> str:
    """results.json and results.md; returns the markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"title": title, "records": records}, indent=1))
    table = markdown_table(records, title)
    (out_dir / "results.md").write_text(table)
    return table


def write_all(records: list[dict], out_dir: Path, title: str) -> None:
    table = write_records(records, out_dir, title)
    plotted = plot(records, out_dir / "throughput.png", title)
    print(table)
    print(
        f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}"
        + (f", {out_dir / 'throughput.png'}" if plotted else "")
    )


def load_pytest_benchmark(path: Path) -> list[dict]:
    """Records from a `pytest --benchmark-json` file whose benchmarks set extra_info
    with the record's case keys, implementation and flops (see benchmarks/conftest.py)."""
    data = json.loads(path.read_text())
    records = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "implementation" not in info:
            continue
        rec = {key: info.get(key) for key in CASE_KEYS}
        rec.update(
            card=info.get("card", data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "unknown")),
            device_type=info.get("device_type", "cpu"),
            implementation=info["implementation"],
            median_ms=bench["stats"]["median"] * 1e3,
            flops=info["flops"],
            peak_memory_mb=info.get("peak_memory_mb"),
            error=None,
        )
        records.append(rec)
    return records
