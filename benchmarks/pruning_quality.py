"""Pruning quality with no retraining: activation importance against weight magnitude and random choice.

Prunes a teacher (default smollm2-135m) to 0.8x, 0.67x and 0.5x of its parameters with each importance
method (each planned by the same planner with its own scores, as a user running ``--importance M``
would get) and measures fp32 validation perplexity on the same held-out tokens. Writes
``benchmarks/results/pruning_quality.{md,json,png}``.

    python -m benchmarks.pruning_quality [--teacher smollm2-135m] [--sizes 0.8x,0.67x,0.5x]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.plots import finish_perplexity_plot, provenance
from compress.core.config import CompressConfig, TargetSize
from compress.evaluation.quality import mean_nll, perplexity
from compress.pruning.archspec import resolve
from compress.pruning.planner import plan
from compress.pruning.scoring import score_importance
from compress.pruning.surgery import apply_plan, prune
from compress.sources.data import load_corpus, token_batches
from compress.sources.teachers import load_teacher

RESULTS = Path(__file__).parent / "results"
METHODS = ("activation", "magnitude", "random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--sizes", default="0.8x,0.67x,0.5x")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    defaults = CompressConfig(teacher=args.teacher)
    torch.manual_seed(defaults.seed)

    started = time.perf_counter()
    teacher, tokenizer = load_teacher(args.teacher)
    spec = resolve(teacher)
    dataset = load_corpus(None)
    calib = token_batches(dataset, tokenizer, "calibration", defaults.prune.calib_seq_len, defaults.prune.calib_samples)
    proxy_ids = calib[:16]
    valid = token_batches(dataset, tokenizer, "validation", defaults.eval.seq_len, defaults.eval.samples)
    teacher_ppl = perplexity(teacher, valid, defaults.batch_size)
    print(f"teacher {args.teacher}: {spec.params / 1e6:.1f}M params, perplexity {teacher_ppl.perplexity:.2f}")

    scores = {}
    for method in METHODS:
        t = time.perf_counter()
        scores[method] = score_importance(
            teacher, spec, method, ids=calib if method == "activation" else None, seed=defaults.seed,
            **({"batch_size": defaults.batch_size, "bf16": defaults.bf16} if method == "activation" else {}),
        )
        print(f"{method} importance: {time.perf_counter() - t:.1f} s")

    def evaluate(kept, shape):
        return mean_nll(prune(teacher, spec, shape, kept), proxy_ids, defaults.batch_size, bf16=defaults.bf16)

    rows = []
    for size in args.sizes.split(","):
        for method in METHODS:
            chosen = plan(
                spec, teacher.config, scores[method], TargetSize.parse(size), axes=defaults.prune.axes,
                align=defaults.prune.align, tolerance=defaults.prune.tolerance, search_candidates=defaults.prune.search_candidates,
                evaluate=evaluate,
            )
            student = apply_plan(teacher, spec, chosen)
            result = perplexity(student, valid, defaults.batch_size)
            rows.append({
                "target": size, "method": method, "shape": chosen.shape.to_dict(), "params": chosen.params,
                "ratio": chosen.params / spec.params, "perplexity": result.perplexity,
            })
            print(f"{size:>6} {method:<10} {chosen.params / 1e6:6.1f}M  perplexity {result.perplexity:,.2f}")

    report = {
        "teacher": args.teacher,
        "teacher_params": spec.params,
        "teacher_perplexity": teacher_ppl.perplexity,
        "data": "debian-docs validation split",
        "validation_tokens": teacher_ppl.tokens,
        "validation_seq_len": teacher_ppl.seq_len,
        "calibration": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
        "planner": {"axes": list(defaults.prune.axes), "align": defaults.prune.align, "tolerance": defaults.prune.tolerance,
                    "proxy": defaults.prune.proxy, "search_candidates": defaults.prune.search_candidates},
        "rows": rows,
        "seconds": time.perf_counter() - started,
        **provenance(), "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pruning_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "pruning_quality.md").write_text(_markdown(report))
    _plot(report, args.out / "pruning_quality.png")
    print(_markdown(report))


def _markdown(report: dict) -> str:
    lines = [
        f"# Pruning quality without retraining: {report['teacher']}",
        "",
        f"Teacher: {report['teacher_params'] / 1e6:.1f}M parameters, validation perplexity "
        f"{report['teacher_perplexity']:.2f}. Perplexity in fp32 on {report['validation_tokens']:,} held-out tokens "
        f"({report['data']}, sequences of {report['validation_seq_len']}). Activation importance from "
        f"{report['calibration']['samples']} calibration sequences of {report['calibration']['seq_len']} tokens. "
        f"Each method planned with its own scores (axes {', '.join(report['planner']['axes'])}, align "
        f"{report['planner']['align']}, loss proxy over {report['planner']['search_candidates']} candidates). "
        f"Measured {report['date']} on {report['machine']}.",
        "",
        "| target | method | hidden | MLP | heads (kv x per group) | params | perplexity |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        s = row["shape"]
        lines.append(
            f"| {row['target']} | {row['method']} | {s['hidden']} | {s['mlp']} | {s['kv_heads']}x{s['heads_per_group']} "
            f"| {row['params'] / 1e6:.1f}M ({row['ratio']:.2f}x) | {row['perplexity']:,.1f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r["target"] for r in report["rows"]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(METHODS)
    for m, method in enumerate(METHODS):
        values = [next(r["perplexity"] for r in report["rows"] if r["target"] == t and r["method"] == method) for t in targets]
        bars = ax.bar([i + (m - 1) * width for i in range(len(targets))], values, width, label=method)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(targets)), [f"{t} of {report['teacher_params'] / 1e6:.0f}M" for t in targets])
    ax.set_xlabel("target size (fraction of teacher parameters)")
    ax.set_ylabel("validation perplexity (log scale, lower is better)")
    finish_perplexity_plot(fig, ax, report["teacher_perplexity"], f"{report['teacher']} pruned without retraining", path)


if __name__ == "__main__":
    main()
