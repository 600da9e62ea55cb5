"""Which distillation recipe keeps the most of the teacher, judged on text unlike the training data?

One teacher (default smollm2-135m) pruned once to one size (default 0.67x) with activation importance, then
trained by each arm on the same budget of training tokens. Every arm is measured (fp32 perplexity and top-1
agreement with the teacher) on three sets: the training corpus's own validation split (in-domain), the
validation split of Debian's kernel and Python docs (``debian-docs``, the default corpus until 2026-12-01, so
figures compare with older results) and ``general-english``, general English from packages no training corpus
contains. The arms sweep the peak learning rate, KD against cross-entropy against a mix, the training corpus,
the temperature, the schedule, a hidden-state loss, Minitron's teacher correction and KD on the teacher's
stored top-k log-probabilities (an arm's seconds include building them when they are not in the cache yet). With
``--vocab`` the plan also trims the vocabulary (``--axes heads,hidden,mlp,vocab``, the floor from this budget's
training data): the student reads every set in its own vocabulary, learns from the teacher over the kept tokens,
and every figure is per teacher token of the same text. Writes ``benchmarks/results/<name>.{md,json,png}``
(default ``distill_recovery``); step time is ``benchmarks/distill_overhead.py``'s.

    python -m benchmarks.distill_recovery [--teacher gemma3-270m] [--tokens 100352] [--arms kd-3e-4,ce-1e-4,...]
        [--vocab] [--no-bf16] [--name distill_recovery_gemma3-270m]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.plots import machine, provenance
from compress.app.distillation import TrimmedVocabTeacher
from compress.core.config import BLOCK_AXES, DISTILL_DEFAULTS, CompressConfig, TargetSize
from compress.core.state import per_teacher_agreement, per_teacher_token
from compress.evaluation.quality import mean_nll, quality
from compress.io import cache_dir, write_json, write_text
from compress.pruning.archspec import resolve
from compress.pruning.planner import plan
from compress.pruning.scoring import score_importance
from compress.pruning.surgery import apply_plan, prune
from compress.pruning.vocab import VocabMap, kept_ids, vocab_importance
from compress.sources.corpora import GENERAL_EVAL
from compress.sources.data import load_corpus, token_batches
from compress.sources.teachers import load_teacher
from distill import DistillConfig, distill
from distill.teacher_logits import ids_fingerprint

RESULTS = Path(__file__).parent / "results"
# Arm name -> (what it is, DistillConfig overrides, training corpus, teacher-correction tokens).
ARMS: dict[str, tuple[str, dict, str, int]] = {
    "kd-3e-4-docs": ("KD, LR 3e-4, debian-docs (the recipe and data until 2026-12-01)", {"lr": 3e-4}, "debian-docs", 0),
    "kd-3e-4": ("KD, LR 3e-4", {"lr": 3e-4}, "default-mix", 0),
    "kd-1e-3": ("KD, LR 1e-3", {"lr": 1e-3}, "default-mix", 0),
    "kd-1e-4": ("KD, LR 1e-4", {"lr": 1e-4}, "default-mix", 0),
    "kd-3e-5": ("KD, LR 3e-5", {"lr": 3e-5}, "default-mix", 0),
    "ce-1e-4": ("cross-entropy, LR 1e-4", {"lr": 1e-4, "kl_weight": 0.0, "ce_weight": 1.0}, "default-mix", 0),
    "ce-3e-4": ("cross-entropy, LR 3e-4", {"lr": 3e-4, "kl_weight": 0.0, "ce_weight": 1.0}, "default-mix", 0),
    "mix-3e-4": ("KD + cross-entropy (0.5 each), LR 3e-4", {"lr": 3e-4, "kl_weight": 0.5, "ce_weight": 0.5},
                 "default-mix", 0),
    "mix-1e-4": ("KD + cross-entropy (0.5 each), LR 1e-4", {"lr": 1e-4, "kl_weight": 0.5, "ce_weight": 0.5},
                 "default-mix", 0),
    "mix-3e-5": ("KD + cross-entropy (0.5 each), LR 3e-5", {"lr": 3e-5, "kl_weight": 0.5, "ce_weight": 0.5},
                 "default-mix", 0),
    "mix-1e-5": ("KD + cross-entropy (0.5 each), LR 1e-5", {"lr": 1e-5, "kl_weight": 0.5, "ce_weight": 0.5},
                 "default-mix", 0),
    "kd-t2-1e-4": ("KD at temperature 2, LR 1e-4", {"lr": 1e-4, "temperature": 2.0}, "default-mix", 0),
    "kd-cosine-1e-4": ("KD, LR 1e-4, cosine schedule", {"lr": 1e-4, "schedule": "cosine"}, "default-mix", 0),
    "kd-hidden-1e-4": ("KD + cosine hidden-state loss (every 6th layer, weight 1), LR 1e-4",
                       {"lr": 1e-4, "hidden_weight": 1.0, "hidden_pairs": [[i, i] for i in (6, 12, 18, 24, 30)]},
                       "default-mix", 0),
    "kd-topk64-1e-4": ("KD on the teacher's stored top-64 log-probabilities (+ tail bucket), LR 1e-4",
                       {"lr": 1e-4, "teacher_top_k": 64}, "default-mix", 0),
    "mix-topk64-3e-4": ("KD on the teacher's stored top-64 log-probabilities (+ tail bucket) + cross-entropy "
                        "(0.5 each), LR 3e-4", {"lr": 3e-4, "kl_weight": 0.5, "ce_weight": 0.5, "teacher_top_k": 64},
                        "default-mix", 0),
    # Around the default (KD + cross-entropy at 3e-4): temperature, schedule, a hidden-state loss.
    "mix-t2-3e-4": ("KD at temperature 2 + cross-entropy (0.5 each), LR 3e-4",
                    {"lr": 3e-4, "kl_weight": 0.5, "ce_weight": 0.5, "temperature": 2.0}, "default-mix", 0),
    "mix-cosine-3e-4": ("KD + cross-entropy (0.5 each), LR 3e-4, cosine schedule",
                        {"lr": 3e-4, "kl_weight": 0.5, "ce_weight": 0.5, "schedule": "cosine"}, "default-mix", 0),
    "mix-hidden-3e-4": ("KD + cross-entropy (0.5 each) + cosine hidden-state loss (every 6th layer, weight 0.5), LR 3e-4",
                        {"lr": 3e-4, "kl_weight": 0.5, "ce_weight": 0.5, "hidden_weight": 0.5,
                         "hidden_pairs": [[i, i] for i in (6, 12, 18, 24, 30)]}, "default-mix", 0),
    "mix-corrected-3e-4": ("KD from the teacher corrected on 51k training tokens (CE, LR 5e-5) + cross-entropy "
                           "(0.5 each), LR 3e-4", {"lr": 3e-4, "kl_weight": 0.5, "ce_weight": 0.5}, "default-mix", 51_200),
    "kd-corrected-3e-4": ("KD from the teacher corrected on 51k training tokens (CE, LR 5e-5), LR 3e-4",
                          {"lr": 3e-4}, "default-mix", 51_200),
    "kd-corrected-1e-4": ("KD from the teacher corrected on 51k training tokens (CE, LR 5e-5), LR 1e-4",
                          {"lr": 1e-4}, "default-mix", 51_200),
}
DEFAULT_ARMS = "kd-3e-4-docs,kd-corrected-1e-4,kd-3e-4,kd-1e-4,kd-3e-5,ce-1e-4,mix-1e-4"
SETS = ("in-domain", "debian-docs", GENERAL_EVAL)
# Learning curves are measured on the first sequences of each set (fp32); the final figures on all of them.
_CURVE_SEQUENCES = 16


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--target-size", default="0.67x")
    parser.add_argument("--tokens", type=int, default=100_352, help="training tokens per arm (default 49 steps of 8 x 256)")
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="distill_recovery", help="stem of the results files (default distill_recovery)")
    parser.add_argument("--vocab", action="store_true", help="the vocabulary as one more pruning axis")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="fp32 scoring and training (a CPU without bf16 instructions runs bf16 autocast slower)")
    return parser


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    chosen_arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in chosen_arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {', '.join(unknown)}; known: {', '.join(ARMS)}")
    if args.vocab and (stored := [a for a in chosen_arms if ARMS[a][1].get("teacher_top_k")]):
        parser.error(f"--vocab: arms {', '.join(stored)} store the teacher's top-k over its whole vocabulary")
    defaults = CompressConfig(teacher=args.teacher, target_size=args.target_size, bf16=args.bf16,
                              distill=dataclasses.replace(DISTILL_DEFAULTS, tokens=args.tokens))
    started = time.perf_counter()

    teacher, tokenizer = load_teacher(args.teacher)
    spec = resolve(teacher)
    corpora = {name: load_corpus(name) for name in {ARMS[a][2] for a in chosen_arms} | {"default-mix", "debian-docs"}}
    general = load_corpus(GENERAL_EVAL, evaluation=True)
    length, count = defaults.eval.seq_len, defaults.eval.samples
    sets = {"in-domain": token_batches(corpora["default-mix"], tokenizer, "validation", length, count),
            "debian-docs": token_batches(corpora["debian-docs"], tokenizer, "validation", length, count),
            GENERAL_EVAL: token_batches(general, tokenizer, "all", length, count)}
    reference = {name: quality(teacher, ids, defaults.batch_size) for name, ids in sets.items()}
    teacher_row = {name: r.perplexity.perplexity for name, r in reference.items()}
    print("teacher", json.dumps(teacher_row))
    chosen, floor = _plan(args, defaults, teacher, tokenizer, spec, corpora["default-mix"])
    print(f"student shape {chosen.shape.to_dict()}, {chosen.params / 1e6:.1f}M params")
    pruned = apply_plan(teacher, spec, chosen)
    vocab_map = VocabMap(chosen.kept["vocab"], spec.vocab, tokenizer) if chosen.shape.vocab else None
    seen = {name: _StudentSet(ids, reference[name].top1, vocab_map) for name, ids in sets.items()}
    before = _measure(pruned, seen, reference, defaults.batch_size)
    print("pruned", json.dumps(before))

    curves = {name: _StudentSet(ids[:_CURVE_SEQUENCES], None, vocab_map) for name, ids in sets.items()}
    curve_start = {"tokens": 0, **{k: c.perplexity(pruned, defaults.batch_size) for k, c in curves.items()}}
    base = DistillConfig(tokens=args.tokens, batch_size=defaults.distill.batch_size, lr=defaults.distill.lr,
                         eval_every=args.eval_every, checkpoint_every=0, bf16=defaults.bf16, seed=defaults.seed)
    train = {name: token_batches(corpus, tokenizer, "train", defaults.distill.seq_len,
                                 -(-args.tokens // defaults.distill.seq_len)) for name, corpus in corpora.items()}
    arms = {}
    for arm in chosen_arms:
        name, overrides, data, correction = ARMS[arm]
        arm_started = time.perf_counter()
        arm_teacher = teacher
        if correction:
            arm_teacher = copy.deepcopy(teacher).requires_grad_(True)
            fix = DistillConfig(tokens=correction, batch_size=base.batch_size, lr=5e-5, kl_weight=0.0, ce_weight=1.0,
                                eval_every=0, checkpoint_every=0, bf16=base.bf16, seed=base.seed)
            distill(arm_teacher, None, train[data], fix, progress=False)
            arm_teacher.requires_grad_(False).eval()
        student = copy.deepcopy(pruned)
        config = DistillConfig(**{**base.to_dict(), **overrides})
        arm_train = train[data]
        if vocab_map is not None:  # the student's own ids, and the teacher over the kept tokens only
            arm_train = vocab_map.convert(arm_train).ids
            arm_teacher = TrimmedVocabTeacher(arm_teacher, vocab_map.kept)
        stored = (cache_dir() / "teacher-logits" / f"{args.teacher}-{ids_fingerprint(train[data])}-k{config.teacher_top_k}"
                  ".safetensors") if config.teacher_top_k else None
        reused = stored is not None and stored.exists()
        distill_started = time.perf_counter()
        result = distill(student, arm_teacher if config.kl_weight or config.hidden_weight else None, arm_train, config,
                         teacher_logits=stored,
                         evaluate=lambda m: {k: c.perplexity(m, defaults.batch_size) for k, c in curves.items()})
        distill_seconds = time.perf_counter() - distill_started
        after = _measure(student, seen, reference, defaults.batch_size)
        curve = [curve_start]
        curve += [{"tokens": r["tokens"], **r["val_perplexities"]} for r in result.history if "val_perplexities" in r]
        arms[arm] = {"name": name, "settings": overrides, "data": data, "teacher_correction_tokens": correction,
                     "after": after, "curve": curve, "tokens": result.tokens, "steps": result.steps,
                     "tokens_per_second": result.tokens_per_second, "seconds": time.perf_counter() - arm_started,
                     # the distill call: training, its curve evaluations and (unless reused) building stored logits
                     "distill_seconds": distill_seconds, "teacher_logits_reused": reused}
        print(f"[{arm}] {name}: " + ", ".join(f"{k} {before[k]['perplexity']:,.1f} -> {after[k]['perplexity']:,.2f}"
                                             for k in SETS) + f" ({result.tokens_per_second:,.0f} tokens/s)", flush=True)
        _write(args, teacher_row, chosen, before, arms, sets, base, started, floor)


def _plan(args, defaults, teacher, tokenizer, spec, corpus):  # noqa: ANN001, ANN202
    """The student's plan: activation importance (and with ``--vocab`` the vocabulary's) and the planner's pick."""
    calib = token_batches(corpus, tokenizer, "calibration", defaults.prune.calib_seq_len, defaults.prune.calib_samples)
    activation = score_importance(teacher, spec, "activation", ids=calib, batch_size=defaults.batch_size, bf16=defaults.bf16)
    floor = None
    if args.vocab:
        vocab, floor = vocab_importance(corpus, tokenizer, defaults, teacher, spec.vocab)
        activation = dataclasses.replace(activation, scores={**activation.scores, "vocab": vocab})
        print(f"vocabulary floor: {floor:,} of {spec.vocab:,} tokens")

    def evaluate_proxy(kept, shape):
        ids = calib[:16] if shape.vocab is None else kept_ids(calib[:16], kept["vocab"], spec.vocab)
        return mean_nll(prune(teacher, spec, shape, kept), ids, defaults.batch_size, bf16=defaults.bf16)

    axes = (*BLOCK_AXES, "vocab") if args.vocab else BLOCK_AXES
    chosen = plan(spec, teacher.config, activation, TargetSize.parse(args.target_size), axes=axes,
                  align=defaults.prune.align, tolerance=defaults.prune.tolerance, evaluate=evaluate_proxy,
                  vocab_floor=floor)
    return chosen, floor


class _StudentSet:
    """One evaluation set as the student reads it: the teacher's ids, or for a trimmed vocabulary the same text in
    the student's ids, whose figures convert to per teacher token."""

    def __init__(self, ids: torch.Tensor, teacher_top1: torch.Tensor | None, vocab_map: VocabMap | None) -> None:
        self.ids, self.top1, self.scale, self.tokens = ids, teacher_top1, 1.0, int(ids.shape[0] * (ids.shape[1] - 1))
        if vocab_map is not None:
            converted = vocab_map.convert(ids, teacher_top1)
            self.ids, self.top1 = converted.ids, converted.teacher_top1
            self.scale, self.tokens = converted.nll_scale(), int(converted.teacher_tokens.sum())

    def quality(self, model, batch_size: int) -> tuple[float, float | None]:  # noqa: ANN001
        q = quality(model, self.ids, batch_size, reference=self.top1)
        return per_teacher_token(q.perplexity.perplexity, self.scale), per_teacher_agreement(q.agreement, self.scale)

    def perplexity(self, model, batch_size: int) -> float:  # noqa: ANN001
        return self.quality(model, batch_size)[0]


def _measure(model, sets: dict[str, _StudentSet], reference: dict, batch_size: int) -> dict:
    out = {}
    for name, seen in sets.items():
        perplexity, agreement = seen.quality(model, batch_size)
        out[name] = {"perplexity": perplexity, "agreement": agreement, "tokens": seen.tokens,
                     "vs_teacher": perplexity / reference[name].perplexity.perplexity}
    return out


def _write(args, teacher_row, chosen, before, arms, sets, base, started, floor) -> None:  # noqa: ANN001
    """Write the results so far (after every arm, so a killed run keeps the arms it finished)."""
    report = {
        **provenance(),
        "teacher": args.teacher, "teacher_perplexity": teacher_row, "target_size": args.target_size,
        "student_shape": chosen.shape.to_dict(), "student_params": chosen.params, "kept_vocab": chosen.shape.vocab,
        "vocab_floor": floor, "bf16": base.bf16,
        "tokens": args.tokens, "seq_len": 256, "settings": base.to_dict(), "pruned": before,
        "evaluation_tokens": {k: int(v.shape[0] * (v.shape[1] - 1)) for k, v in sets.items()},
        "curve_sequences": _CURVE_SEQUENCES, "arms": arms,
        "seconds": time.perf_counter() - started, "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if arms:
        write_json(args.out / f"{args.name}.json", report)
        write_text(args.out / f"{args.name}.md", _markdown(report))
        _plot(report, args.out / f"{args.name}.png")


def _markdown(report: dict) -> str:
    t, p = report["teacher_perplexity"], report["pruned"]
    lines = [
        f"# Distillation recipes: {report['teacher']} pruned to {report['target_size']}, judged on general English",
        "",
        f"Student: {report['student_params'] / 1e6:.1f}M parameters (shape {report['student_shape']}), pruned once "
        f"with activation importance on the default-mix calibration split. Every arm trains a copy of it on "
        f"{report['tokens']:,} training tokens (sequences of {report['seq_len']}, batch {report['settings']['batch_size']}, "
        f"AdamW, warmup-stable-decay unless named, {'bf16 autocast' if report.get('bf16', True) else 'fp32'}). "
        + (f"The plan trimmed the vocabulary too: {report['kept_vocab']:,} tokens kept (the floor, every token this "
           f"budget's training and calibration data use, is {report['vocab_floor']:,}); the student reads every set in "
           "its own vocabulary and learns from the teacher over the kept tokens, and every figure is per teacher token "
           "of the same text. " if report.get("kept_vocab") else "")
        + "fp32 perplexity, with the ratio to the teacher's and "
        f"top-1 agreement with the teacher, on {report['evaluation_tokens']['in-domain']:,} tokens of each set: "
        "**in-domain** (the validation split of default-mix, the default training corpus), "
        "**debian-docs** (the validation split of Debian's kernel and Python docs, the default corpus until "
        "2026-12-01) and **general-english** (GNOME's help, Dungeon Crawl's descriptions and ChatterBot's dialogues, "
        "in no training corpus).",
        "",
        f"Measured {report['date']} on {report['machine']}, commit `{report['commit']}`, command `{report['command']}`"
        + (f" ({report['provenance_note']})" if report.get("provenance_note") else "") + ".",
        "",
        "| arm | data | general-english | vs teacher | agreement | in-domain | vs teacher | debian-docs | vs teacher | tokens/s | distill s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| teacher | – | {t[GENERAL_EVAL]:,.2f} | 1.00x | – | {t['in-domain']:,.2f} | 1.00x | {t['debian-docs']:,.2f} | 1.00x | – | – |",
        f"| pruned, before training | – | {p[GENERAL_EVAL]['perplexity']:,.1f} | {p[GENERAL_EVAL]['vs_teacher']:.2f}x | "
        f"{p[GENERAL_EVAL]['agreement']:.3f} | {p['in-domain']['perplexity']:,.1f} | {p['in-domain']['vs_teacher']:.2f}x | "
        f"{p['debian-docs']['perplexity']:,.1f} | {p['debian-docs']['vs_teacher']:.2f}x | – | – |",
    ]
    for arm, row in report["arms"].items():
        a = row["after"]
        lines.append(f"| `{arm}`: {row['name']} | {row['data']} | {a[GENERAL_EVAL]['perplexity']:,.2f} | "
                     f"{a[GENERAL_EVAL]['vs_teacher']:.2f}x | {a[GENERAL_EVAL]['agreement']:.3f} | "
                     f"{a['in-domain']['perplexity']:,.2f} | {a['in-domain']['vs_teacher']:.2f}x | "
                     f"{a['debian-docs']['perplexity']:,.2f} | {a['debian-docs']['vs_teacher']:.2f}x | "
                     f"{row['tokens_per_second']:,.0f} | {_distill_seconds(row)} |")
    lines += ["", f"Learning curves (the plot) on the first {report['curve_sequences']} sequences of each set. "
              "*distill s*: wall time of the distill call (training, its curve evaluations and, for a stored-logits "
              "arm, building the teacher's top-k unless a cached copy was reused, marked *reused*)."]
    return "\n".join(lines) + "\n"


def _distill_seconds(row: dict) -> str:
    if "distill_seconds" not in row:  # runs before 2026-12-02 did not record it
        return "–"
    return f"{row['distill_seconds']:,.0f}" + (" (reused)" if row.get("teacher_logits_reused") else "")


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, name in zip(axes, (GENERAL_EVAL, "in-domain"), strict=True):
        for arm, row in report["arms"].items():
            ax.plot([p["tokens"] / 1000 for p in row["curve"]], [p[name] for p in row["curve"]], marker="o",
                    markersize=3, label=arm)
        ax.set_xlabel("training tokens (thousands)")
        ax.set_ylabel(f"{name} perplexity (log scale)")
        teacher = report["teacher_perplexity"][name]
        ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label=f"teacher ({teacher:.1f})")
        ax.set_yscale("log")
        ax.set_title(f"{name}: {report['teacher']} → {report['student_params'] / 1e6:.0f}M student", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
