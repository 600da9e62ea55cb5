"""The report's plots: models (quality and size), graph latency, the distillation curves, the planner's candidates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from compress.sources.corpora import GENERAL_EVAL


def plots(run_dir: Path, report: dict[str, Any]) -> list[str]:
    """Write the report_*.png plots of ``report`` into ``run_dir`` (atomically); their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig: Any, name: str) -> None:
        tmp = run_dir / f".{name}.tmp.png"
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, run_dir / name)
        written.append(name)

    for draw in (_models, _latency, _distillation, _planner):
        figure = draw(plt, report)
        if figure is not None:
            save(*figure)
    return written


def _models(plt: Any, report: dict[str, Any]) -> tuple[Any, str] | None:
    """Perplexity (in-domain and general English) and size on disk of every row."""
    rows = report["rows"]
    color = {"torch": "#4c72b0", "onnx": "#dd8452"}
    if not rows:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 1.6 + 0.5 * len(rows)), sharey=True)
    names = [r["name"] for r in rows]
    values = [r["perplexity"] for r in rows]
    left.hlines(names, 0, values, color="#cccccc", linewidth=1)
    left.scatter(values, names, color=[color[r["kind"]] for r in rows], zorder=3)
    for value, name in zip(values, names, strict=True):
        left.annotate(f"{value:,.2f}", (value, name), textcoords="offset points", xytext=(6, 4), fontsize=8)
    general = [(r["evals"][GENERAL_EVAL]["perplexity"], r["name"]) for r in rows if GENERAL_EVAL in r.get("evals", {})]
    if general:
        left.scatter([g[0] for g in general], [g[1] for g in general], marker="D", facecolors="none",
                     edgecolors="#55a868", zorder=3, label=f"{GENERAL_EVAL} (held out)")
        for value, name in general:
            left.annotate(f"{value:,.1f}", (value, name), textcoords="offset points", xytext=(6, -10), fontsize=7,
                          color="#55a868")
        left.legend(fontsize=7, loc="lower right")
        values = values + [g[0] for g in general]
    _perplexity_axis(left, values, "x")
    left.set_xlabel("perplexity, in-domain (dots) and general (diamonds); lower is better")
    left.set_xlim(right=max(values) * (1.6 if left.get_xscale() == "log" else 1.15))
    left.invert_yaxis()
    left.set_title("Quality (blue: PyTorch, orange: ONNX Runtime)")
    sizes = [r["mb"] or 0.0 for r in rows]
    right.barh(names, sizes, color=[color[r["kind"]] for r in rows])
    for size, name, row in zip(sizes, names, rows, strict=True):
        right.annotate("–" if row["mb"] is None else f"{size:,.1f} MB", (size, name), textcoords="offset points",
                       xytext=(4, -3), fontsize=8)
    right.set_xlim(right=max(sizes + [1e-9]) * 1.25)
    right.set_xlabel("size on disk (MB)")
    right.set_title("Size")
    return fig, "report_models.png"


def _latency(plt: Any, report: dict[str, Any]) -> tuple[Any, str] | None:
    """Prefill latency and decode speed of the graphs."""
    rows = report["rows"]
    graphs = [r for r in rows if r["kind"] == "onnx"]
    if not graphs:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 2.2 + 0.4 * len(graphs)))
    names = [r["name"] for r in graphs]
    left.barh(names, [r["prefill_latency_ms"] for r in graphs], color="#dd8452")
    left.set_xlabel(f"prefill latency of {report['config']['quant']['seq_len']} tokens (ms, median; lower is better)")
    left.invert_yaxis()
    right.barh(names, [r["decode_tokens_per_second"] or 0 for r in graphs], color="#55a868")
    right.set_xlabel("decode speed (tokens/s; higher is better)")
    right.invert_yaxis()
    fig.suptitle("ONNX Runtime on this machine")
    return fig, "report_latency.png"


def _distillation(plt: Any, report: dict[str, Any]) -> tuple[Any, str] | None:
    """The distillation loss and the perplexity curves."""
    teacher = next((r for r in report["rows"] if r["name"] == "teacher"), None)
    d = report.get("distillation")
    if not (d and d["history"]):
        return None
    fig, left = plt.subplots(figsize=(7, 3.8))
    tokens = [h["tokens"] / 1000 for h in d["history"]]
    left.plot(tokens, [h["loss"] for h in d["history"]], color="#4c72b0", linewidth=1)
    left.set_xlabel("training tokens (thousands)")
    left.set_ylabel("distillation loss (KL, nats/token)", color="#4c72b0")
    right = left.twinx()
    evals = [(0, d["perplexity_before"])] + [(h["tokens"] / 1000, h["val_perplexity"]) for h in d["history"] if "val_perplexity" in h]
    right.plot([e[0] for e in evals], [e[1] for e in evals], color="#c44e52", marker="o", markersize=4,
               label="in-domain validation")
    values = [e[1] for e in evals] + ([teacher["perplexity"]] if teacher else [])
    for (name, other), shade in zip(d.get("others", {}).items(), ("#8172b2", "#937860", "#da8bc3"), strict=False):
        curve = [(0, other["before"])] + [(h["tokens"] / 1000, h["val_perplexities"][name]) for h in d["history"]
                                          if name in h.get("val_perplexities", {})]
        right.plot([e[0] for e in curve], [e[1] for e in curve], color=shade, marker="s", markersize=4, label=name)
        values += [e[1] for e in curve]
        if teacher and name in teacher.get("evals", {}):
            right.axhline(teacher["evals"][name]["perplexity"], color=shade, linestyle=":", linewidth=1,
                          label=f"teacher on {name} ({teacher['evals'][name]['perplexity']:.1f})")
    _perplexity_axis(right, values, "y")
    right.set_ylabel("perplexity", color="#c44e52")
    if teacher:
        right.axhline(teacher["perplexity"], color="black", linestyle="--", linewidth=1, label=f"teacher ({teacher['perplexity']:.1f})")
    right.legend(fontsize=8, loc="upper right")
    left.set_title("Distillation: loss, and perplexity in-domain and on the held-out sets")
    return fig, "report_distill.png"


def _planner(plt: Any, report: dict[str, Any]) -> tuple[Any, str] | None:
    """The planner's candidate shapes around the target."""
    p = report.get("plan")
    if not (p and p["candidates"]):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    checked = [c for c in p["candidates"] if c.get("loss") is not None]
    use_loss = bool(checked)
    points = checked if use_loss else p["candidates"]
    ax.scatter([c["params"] / 1e6 for c in points], [c["loss"] if use_loss else c["mass"] for c in points],
               color="#4c72b0", label="candidate shapes")
    chosen = next((c for c in points if c["shape"] == p["shape"]), None)
    if chosen:
        ax.scatter([chosen["params"] / 1e6], [chosen["loss"] if use_loss else chosen["mass"]], color="#c44e52", s=80,
                   marker="*", label="chosen", zorder=3)
    ax.axvline(p["target_params"] / 1e6, color="black", linestyle="--", linewidth=1, label="target size")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("calibration loss (nats/token)" if use_loss else "importance kept")
    ax.set_title("Planner: candidate shapes near the target, " + ("loss after pruning, lower is better" if use_loss
                                                                else "importance kept, higher is better"), fontsize=10)
    ax.legend(fontsize=8)
    return fig, "report_planner.png"


def _perplexity_axis(ax: Any, values: list[float], axis: str) -> None:
    """Log scale when perplexities span more than 3x, else linear; plain numbers as tick labels either way."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    if max(values) / max(min(values), 1e-9) > 3:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 20, 50, 100, 200...
        target.set_minor_formatter(NullFormatter())
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.6g}"))
