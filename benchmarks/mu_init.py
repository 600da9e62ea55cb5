"""Does initializing a Mu-like student from the teacher help cross-architecture distillation?

Three arms of one Mu-like shape sized for ``--target-size`` (default 60M) from the teacher (default
smollm2-135m), distilled on the same training tokens with the pipeline's distillation settings
(continuation KL, the split point varying per batch):
  random     the model's own initialization
  embedding  the teacher's pruned embedding (shared by encoder, decoder and head), blocks at random
  teacher    :func:`compress.families.mu_init.mu_from_teacher` (pruned embedding and blocks, fitted output norms)
Measured: perplexity and top-1 agreement with the teacher on the continuations of the validation
sequences (the encoder reads the first half, the decoder predicts the second), before training and
every ``--eval-every`` steps; the teacher is scored on the same continuation tokens.
Writes ``benchmarks/results/mu_init.{md,json,png}``.

    python -m benchmarks.mu_init [--tokens 98304] [--target-size 60M]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.plots import finish_perplexity_plot, machine, provenance
from compress.core.config import CompressConfig, TargetSize
from compress.evaluation.quality import ENCODER_DECODER, continuation_quality
from compress.families.mu import student_config
from compress.families.mu_init import mu_from_teacher
from compress.models.mu import MuForConditionalGeneration
from compress.pruning.archspec import resolve
from compress.pruning.scoring import score_importance
from compress.sources.data import load_corpus, token_batches
from compress.sources.teachers import load_teacher
from distill import DistillConfig, EncoderDecoderStudent, distill

RESULTS = Path(__file__).parent / "results"
ARMS = {"random": "random initialization", "embedding": "the teacher's pruned embedding, random blocks",
        "teacher": "initialized from the teacher (mu_from_teacher: embedding and blocks)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--target-size", default="60M")
    parser.add_argument("--tokens", type=int, default=98_304)
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--arms", default="random,embedding,teacher")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    defaults = CompressConfig(teacher=args.teacher, target_size=args.target_size)
    started = time.perf_counter()

    teacher, tokenizer = load_teacher(args.teacher)
    spec = resolve(teacher)
    dataset = load_corpus(None)
    calib = token_batches(dataset, tokenizer, "calibration", defaults.prune.calib_seq_len, defaults.prune.calib_samples)
    valid = token_batches(dataset, tokenizer, "validation", defaults.eval.seq_len, defaults.eval.samples)
    train = token_batches(dataset, tokenizer, "train", defaults.distill.seq_len, -(-args.tokens // defaults.distill.seq_len))
    cut = valid.shape[1] // 2
    teacher_quality, reference = continuation_quality(teacher, valid, cut, defaults.batch_size)
    print(f"teacher continuation perplexity {teacher_quality.perplexity:.2f} on {teacher_quality.tokens:,} tokens")

    target = TargetSize.parse(args.target_size).params_for(sum(p.numel() for p in teacher.parameters()))
    config = student_config(teacher, tokenizer, spec, target, defaults.prune.align)  # what --student mu builds
    scores = score_importance(teacher, spec, "activation", ids=calib, batch_size=defaults.batch_size, bf16=defaults.bf16)
    settings = DistillConfig(**{**defaults.distill_config().to_dict(), "tokens": args.tokens,
                                "eval_every": args.eval_every, "checkpoint_every": 0, "parallel": "ddp"})

    def evaluate(model: MuForConditionalGeneration) -> float:
        return continuation_quality(model.eval(), valid, cut, defaults.batch_size, reader=ENCODER_DECODER)[0].perplexity

    arms = {}
    for arm in args.arms.split(","):
        torch.manual_seed(defaults.seed)
        t0 = time.perf_counter()
        if arm == "random":
            student = MuForConditionalGeneration(config).float().eval()
        else:
            student = mu_from_teacher(teacher, spec, scores, config, calib, blocks=arm == "teacher")
        init_seconds = time.perf_counter() - t0
        before, _ = continuation_quality(student, valid, cut, defaults.batch_size, reference, reader=ENCODER_DECODER)
        result = distill(student, teacher, train, settings, evaluate=evaluate, student_io=EncoderDecoderStudent())
        after, _ = continuation_quality(student.eval(), valid, cut, defaults.batch_size, reference, reader=ENCODER_DECODER)
        curve = [{"tokens": 0, "val_perplexity": before.perplexity}] + [
            {"tokens": r["tokens"], "val_perplexity": r["val_perplexity"]} for r in result.history if "val_perplexity" in r]
        arms[arm] = {"name": ARMS[arm], "curve": curve, "before": before.to_dict(), "after": after.to_dict(),
                     "tokens": result.tokens, "steps": result.steps, "tokens_per_second": result.tokens_per_second,
                     "init_seconds": init_seconds}
        print(f"{arm}: {before.perplexity:,.1f} -> {after.perplexity:,.2f} (agreement {before.agreement:.3f} -> "
              f"{after.agreement:.3f}) after {result.tokens:,} tokens ({result.tokens_per_second:,.0f} tokens/s)", flush=True)

    report = {
        "teacher": args.teacher, "teacher_continuation": teacher_quality.to_dict(), "target_size": args.target_size,
        "mu_config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "encoder_layers",
                                                      "decoder_layers", "num_attention_heads", "num_key_value_heads",
                                                      "head_dim", "rope_theta")},
        "mu_params": sum(p.numel() for p in MuForConditionalGeneration(config).parameters()),
        "tokens": args.tokens, "seq_len": int(train.shape[1]), "settings": settings.to_dict(), "cut": cut,
        "arms": arms, "seconds": time.perf_counter() - started, **provenance(), "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mu_init.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "mu_init.md").write_text(markdown(report))
    _plot(report, args.out / "mu_init.png")
    print(markdown(report))


def markdown(report: dict) -> str:
    c = report["mu_config"]
    lines = [
        "# Mu-like student: random vs teacher initialization",
        "",
        f"{report['date']}, {report['machine']}. Teacher {report['teacher']}; Mu-like student for {report['target_size']}: "
        f"{report['mu_params'] / 1e6:.1f}M parameters, hidden {c['hidden_size']}, MLP {c['intermediate_size']}, "
        f"{c['encoder_layers']} encoder + {c['decoder_layers']} decoder layers, {c['num_attention_heads']} heads / "
        f"{c['num_key_value_heads']} KV. Each arm distilled on the same {report['tokens']:,} training tokens "
        f"(sequences of {report['seq_len']}, lr {report['settings']['lr']}, {report['settings']['schedule']} schedule, "
        f"continuation KL with a split point between 1/4 and 3/4 per batch).",
        "",
        f"Scored on the continuations of the validation sequences: the encoder (or, for the teacher, the context) reads "
        f"the first {report['cut']} tokens of each; {report['teacher_continuation']['tokens']:,} continuation tokens in "
        f"all. Teacher on the same tokens: {report['teacher_continuation']['perplexity']:.2f}.",
        "",
        "| arm | before: perplexity | agreement | after: perplexity | agreement | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for arm in report["arms"].values():
        b, a = arm["before"], arm["after"]
        lines.append(f"| {arm['name']} | {b['perplexity']:,.1f} | {b['agreement']:.3f} | {a['perplexity']:,.2f} | "
                     f"{a['agreement']:.3f} | {arm['tokens_per_second']:,.0f} |")
    lines += ["", "Validation perplexity over training tokens:", "",
              "| tokens | " + " | ".join(report["arms"]) + " |", "|---|" + "---|" * len(report["arms"])]
    curves = {name: {p["tokens"]: p["val_perplexity"] for p in arm["curve"]} for name, arm in report["arms"].items()}
    for tokens in sorted({t for c in curves.values() for t in c}):
        lines.append(f"| {tokens:,} | " + " | ".join(f"{c[tokens]:,.1f}" if tokens in c else "–" for c in curves.values()) + " |")
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in report["arms"].values():
        ax.plot([p["tokens"] for p in arm["curve"]], [p["val_perplexity"] for p in arm["curve"]], marker="o",
                markersize=3, label=arm["name"])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("continuation perplexity (validation)")
    finish_perplexity_plot(fig, ax, report["teacher_continuation"]["perplexity"],
                           f"Mu-like {report['target_size']} student distilled from {report['teacher']}", path)


if __name__ == "__main__":
    main()
