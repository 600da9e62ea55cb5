"""Pruning quality with no retraining: activation importance against weight magnitude and random choice, and
(``--vocab``) the vocabulary as one more axis, on the in-domain validation split and on general English.

Prunes a teacher (default smollm2-135m) to 0.8x, 0.67x and 0.5x of its parameters with each importance
method (each planned by the same planner with its own scores, as a user running ``--importance M``
would get) and measures fp32 perplexity on the same held-out tokens of both sets. With ``--vocab`` each size
also gets an ``activation + vocab`` row: ``--axes heads,hidden,mlp,vocab``, the kept vocabulary chosen from the
tokens the default run trains and calibrates on, its figures per teacher token of the same text. Writes
``benchmarks/results/<name>.{md,json,png}``.

    python -m benchmarks.pruning_quality [--teacher smollm2-135m] [--sizes 0.8x,0.67x,0.5x] [--vocab] [--no-bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.plots import finish_perplexity_plot, machine, provenance
from compress.core.config import BLOCK_AXES, CompressConfig, TargetSize
from compress.core.state import per_teacher_token
from compress.evaluation.quality import mean_nll, perplexity
from compress.pruning.archspec import resolve
from compress.pruning.planner import plan
from compress.pruning.scoring import score_importance
from compress.pruning.surgery import apply_plan, prune
from compress.pruning.vocab import VocabMap, kept_ids, vocab_importance
from compress.sources.data import GENERAL_EVAL, load_corpus, token_batches
from compress.sources.teachers import load_teacher

RESULTS = Path(__file__).parent / "results"
METHODS = ("activation", "magnitude", "random")
VOCAB_METHOD = "activation + vocab"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--sizes", default="0.8x,0.67x,0.5x")
    parser.add_argument("--vocab", action="store_true", help="add an 'activation + vocab' row per size")
    parser.add_argument("--no-bf16", action="store_true", help="score and rank in fp32 (CPUs without bf16 instructions)")
    parser.add_argument("--name", default=None, help="stem of the results files (default pruning_quality, "
                        "pruning_quality_<teacher> for another teacher)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    name = args.name or ("pruning_quality" if args.teacher == "smollm2-135m" else f"pruning_quality_{args.teacher}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    defaults = CompressConfig(teacher=args.teacher, bf16=not args.no_bf16)
    torch.manual_seed(defaults.seed)

    started = time.perf_counter()
    teacher, tokenizer = load_teacher(args.teacher)
    spec = resolve(teacher)
    dataset = load_corpus(None)
    calib = token_batches(dataset, tokenizer, "calibration", defaults.prune.calib_seq_len, defaults.prune.calib_samples)
    proxy_ids = calib[:16]
    sets = {"validation": token_batches(dataset, tokenizer, "validation", defaults.eval.seq_len, defaults.eval.samples),
            "general-english": token_batches(load_corpus(GENERAL_EVAL, evaluation=True), tokenizer, "all",
                                             defaults.eval.seq_len, defaults.eval.samples)}
    teacher_ppl = {k: perplexity(teacher, ids, defaults.batch_size) for k, ids in sets.items()}
    print(f"teacher {args.teacher}: {spec.params / 1e6:.1f}M params, perplexity "
          + ", ".join(f"{k} {v.perplexity:.2f}" for k, v in teacher_ppl.items()))

    scores, vocab_floor = _scores(teacher, tokenizer, spec, dataset, calib, defaults, args.vocab)

    def evaluate(kept, shape):
        ids = proxy_ids
        if shape.vocab is not None:
            ids = kept_ids(proxy_ids, kept["vocab"], spec.vocab)
        return mean_nll(prune(teacher, spec, shape, kept), ids, defaults.batch_size, bf16=defaults.bf16)

    rows = []
    for size in args.sizes.split(","):
        for method in scores:
            axes = (*BLOCK_AXES, "vocab") if method == VOCAB_METHOD else BLOCK_AXES
            t = time.perf_counter()
            chosen = plan(
                spec, teacher.config, scores[method], TargetSize.parse(size), axes=axes,
                align=defaults.prune.align, tolerance=defaults.prune.tolerance, search_candidates=defaults.prune.search_candidates,
                evaluate=evaluate, vocab_floor=vocab_floor,
            )
            vocab_map = VocabMap(chosen.kept["vocab"], spec.vocab, tokenizer) if chosen.shape.vocab else None
            measured = _measure(apply_plan(teacher, spec, chosen), sets, vocab_map, defaults.batch_size)
            rows.append({
                "target": size, "method": method, "shape": chosen.shape.to_dict(), "params": chosen.params,
                "ratio": chosen.params / spec.params, "perplexity": measured["validation"],
                "general_perplexity": measured["general-english"], "seconds": time.perf_counter() - t,
            })
            print(f"{size:>6} {method:<18} {chosen.params / 1e6:6.1f}M  perplexity {measured['validation']:,.2f}, "
                  f"general-english {measured['general-english']:,.2f}")

    report = _report(args, spec, teacher_ppl, calib, defaults, vocab_floor, rows, time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(_markdown(report))
    _plot(report, args.out / f"{name}.png")
    print(_markdown(report))


def _report(args, spec, teacher_ppl, calib, defaults, vocab_floor, rows, seconds) -> dict:  # noqa: ANN001
    """The results file's content."""
    return {
        "teacher": args.teacher,
        "teacher_params": spec.params,
        "teacher_vocab": spec.vocab,
        "teacher_perplexity": teacher_ppl["validation"].perplexity,
        "teacher_general_perplexity": teacher_ppl["general-english"].perplexity,
        "data": "the default corpus's validation split",
        "general": "general English held out of training (the run's general-english set)",
        "validation_tokens": teacher_ppl["validation"].tokens,
        "general_tokens": teacher_ppl["general-english"].tokens,
        "validation_seq_len": teacher_ppl["validation"].seq_len,
        "calibration": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
        "planner": {"axes": list(BLOCK_AXES), "align": defaults.prune.align, "tolerance": defaults.prune.tolerance,
                    "proxy": defaults.prune.proxy, "search_candidates": defaults.prune.search_candidates},
        "vocab_floor": vocab_floor,
        "bf16": defaults.bf16,
        "rows": rows,
        "seconds": seconds,
        **provenance(), "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
    }


def _scores(teacher, tokenizer, spec, dataset, calib, defaults, vocab: bool) -> tuple[dict, int | None]:  # noqa: ANN001
    """Every method's importance scores (and, with ``vocab``, the activation scores with the vocabulary's)."""
    scores = {}
    for method in METHODS:
        t = time.perf_counter()
        scores[method] = score_importance(
            teacher, spec, method, ids=calib if method == "activation" else None, seed=defaults.seed,
            **({"batch_size": defaults.batch_size, "bf16": defaults.bf16} if method == "activation" else {}),
        )
        print(f"{method} importance: {time.perf_counter() - t:.1f} s")
    if not vocab:
        return scores, None
    vocab_scores, floor = vocab_importance(dataset, tokenizer, defaults, teacher, spec.vocab)
    scores[VOCAB_METHOD] = dataclasses.replace(scores["activation"], scores={**scores["activation"].scores, "vocab": vocab_scores})
    print(f"vocabulary floor: {floor:,} of {spec.vocab:,} tokens")
    return scores, floor


def _measure(student, sets: dict, vocab_map: VocabMap | None, batch_size: int) -> dict[str, float]:  # noqa: ANN001
    """fp32 perplexity on every set; per teacher token of the same text for a trimmed vocabulary."""
    if vocab_map is None:
        return {name: perplexity(student, ids, batch_size).perplexity for name, ids in sets.items()}
    out = {}
    for name, ids in sets.items():
        converted = vocab_map.convert(ids)
        out[name] = per_teacher_token(perplexity(student, converted.ids, batch_size).perplexity, converted.nll_scale())
    return out


def _markdown(report: dict) -> str:
    general = "general_perplexity" in report["rows"][0]
    vocab = report.get("vocab_floor")
    lines = [
        f"# Pruning quality without retraining: {report['teacher']}",
        "",
        f"Teacher: {report['teacher_params'] / 1e6:.1f}M parameters, validation perplexity "
        f"{report['teacher_perplexity']:.2f}"
        + (f", general-english {report['teacher_general_perplexity']:.2f}" if general else "")
        + f". Perplexity in fp32 on {report['validation_tokens']:,} held-out tokens "
        f"({report['data']}, sequences of {report['validation_seq_len']})"
        + (f" and {report['general_tokens']:,} of {report['general']}" if general else "")
        + f". Activation importance from "
        f"{report['calibration']['samples']} calibration sequences of {report['calibration']['seq_len']} tokens. "
        f"Each method planned with its own scores (axes {', '.join(report['planner']['axes'])}, align "
        f"{report['planner']['align']}, loss proxy over {report['planner']['search_candidates']} candidates). "
        + (f"The `{VOCAB_METHOD}` rows add the vocabulary axis: at least the {vocab:,} tokens (of "
           f"{report['teacher_vocab']:,}) that the default run's training and calibration data use, with the special and "
           "byte tokens and what they are merged from, and as many more (by the tokenizer's own order) as fit; their "
           "perplexities are per teacher token of the same text (a removed token is spelled in kept pieces). "
           if vocab else "")
        + f"Measured {report['date']} on {report['machine']}"
        + (", fp32 scoring." if report.get("bf16") is False else ".")
        + (f" Commit {report['commit']}, `{report['command']}`." if report.get("commit") else ""),
        "",
        "| target | method | hidden | MLP | heads (kv x per group) |" + (" vocabulary |" if vocab else "")
        + " params | perplexity |" + (" general-english |" if general else ""),
        "|---|---|---|---|---|" + ("---|" if vocab else "") + "---|---|" + ("---|" if general else ""),
    ]
    for row in report["rows"]:
        s = row["shape"]
        lines.append(
            f"| {row['target']} | {row['method']} | {s['hidden']} | {s['mlp']} | {s['kv_heads']}x{s['heads_per_group']} "
            + (f"| {s.get('vocab') or report['teacher_vocab']:,} " if vocab else "")
            + f"| {row['params'] / 1e6:.1f}M ({row['ratio']:.2f}x) | {row['perplexity']:,.1f} |"
            + (f" {row['general_perplexity']:,.1f} |" if general else "")
        )
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r["target"] for r in report["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        values = [next(r["perplexity"] for r in report["rows"] if r["target"] == t and r["method"] == method) for t in targets]
        bars = ax.bar([i + (m - (len(methods) - 1) / 2) * width for i in range(len(targets))], values, width, label=method)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(targets)), [f"{t} of {report['teacher_params'] / 1e6:.0f}M" for t in targets])
    ax.set_xlabel("target size (fraction of teacher parameters)")
    ax.set_ylabel("validation perplexity (log scale, lower is better)")
    finish_perplexity_plot(fig, ax, report["teacher_perplexity"], f"{report['teacher']} pruned without retraining", path)


if __name__ == "__main__":
    main()
