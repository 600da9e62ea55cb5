"""How much of what pruning lost does distillation recover, and what does the trainer cost over a bare loop?

Four arms on one teacher (default smollm2-135m) pruned to one size (default 0.67x), each trained on the
same training tokens with the same settings:
  (a) KD into the activation-pruned student            (b) cross-entropy training of that same student
  (c) KD into a randomly initialized student, same shape (d) KD into the magnitude-pruned student, same shape
Validation perplexity (fp32) is measured before training and every ``--eval-every`` steps.
Then the trainer's median step time is compared with a bare PyTorch loop doing the same student
forward+backward, teacher forward, KL and AdamW step, in the same process, and the bare step is split
into its parts. Writes ``benchmarks/results/distill_recovery.{md,json,png}``.

    python -m benchmarks.distill_recovery [--tokens 300000] [--target-size 0.67x]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.plots import finish_perplexity_plot
from compress.archspec import resolve
from compress.config import CompressConfig, TargetSize
from compress.data import load_corpus, token_batches
from compress.evaluate import mean_nll, perplexity
from compress.planner import plan, select
from compress.scoring import score_importance
from compress.surgery import apply_plan, prune
from compress.teachers import load_teacher
from distill import DistillConfig, distill

RESULTS = Path(__file__).parent / "results"
ARMS = {
    "a": "KD, activation-pruned",
    "b": "cross-entropy, activation-pruned",
    "c": "KD, random init",
    "d": "KD, magnitude-pruned",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--target-size", default="0.67x")
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--timing-steps", type=int, default=12)
    parser.add_argument("--arms", default="abcd")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    defaults = CompressConfig(teacher=args.teacher, target_size=args.target_size)
    started = time.perf_counter()

    teacher, tokenizer = load_teacher(args.teacher)
    spec = resolve(teacher)
    dataset = load_corpus(None)
    calib = token_batches(dataset, tokenizer, "calibration", defaults.calib_seq_len, defaults.calib_samples)
    valid = token_batches(dataset, tokenizer, "validation", defaults.eval_seq_len, defaults.eval_samples)
    train = token_batches(dataset, tokenizer, "train", defaults.distill_seq_len, -(-args.tokens // defaults.distill_seq_len))
    teacher_ppl = perplexity(teacher, valid, defaults.batch_size).perplexity
    print(f"teacher perplexity {teacher_ppl:.2f}; {train.shape[0]} training sequences of {train.shape[1]}")

    activation = score_importance(teacher, spec, "activation", ids=calib, batch_size=defaults.batch_size, bf16=defaults.bf16)
    magnitude = score_importance(teacher, spec, "magnitude")

    def evaluate_proxy(kept, shape):
        return mean_nll(prune(teacher, spec, shape, kept), calib[:16], defaults.batch_size, bf16=True)

    chosen = plan(spec, teacher.config, activation, TargetSize.parse(args.target_size), axes=defaults.axes,
                  align=defaults.align, tolerance=defaults.tolerance, evaluate=evaluate_proxy)
    print(f"student shape {chosen.shape.to_dict()}, {chosen.params / 1e6:.1f}M params")

    def student_for(arm: str):
        if arm in "ab":
            return apply_plan(teacher, spec, chosen)
        if arm == "d":
            return prune(teacher, spec, chosen.shape, select(spec, magnitude, chosen.shape))
        torch.manual_seed(0)
        model = apply_plan(teacher, spec, chosen)
        model.apply(model._init_weights)  # same class and shape, fresh Hugging Face initialization
        model.tie_weights()
        return model

    settings = DistillConfig(tokens=args.tokens, batch_size=defaults.distill_batch_size, lr=defaults.distill_lr,
                             eval_every=args.eval_every, checkpoint_every=0, bf16=defaults.bf16, seed=defaults.seed)
    # Timing first, while nothing else has run for long: the long arms come after.
    timing = _overhead(teacher, apply_plan(teacher, spec, chosen), train, settings, args.timing_steps)
    print(json.dumps(timing, indent=2))
    arms = {}
    for arm in args.arms:
        student = student_for(arm)
        config = DistillConfig(**{**settings.to_dict(), "kl_weight": 0.0, "ce_weight": 1.0}) if arm == "b" else settings
        before = perplexity(student, valid, defaults.batch_size).perplexity
        result = distill(student, teacher, train, config,
                         evaluate=lambda m: perplexity(m, valid, defaults.batch_size).perplexity)
        curve = [{"tokens": 0, "val_perplexity": before}] + [
            {"tokens": r["tokens"], "val_perplexity": r["val_perplexity"]} for r in result.history if "val_perplexity" in r
        ]
        arms[arm] = {"name": ARMS[arm], "curve": curve, "final_perplexity": curve[-1]["val_perplexity"],
                     "tokens": result.tokens, "steps": result.steps, "tokens_per_second": result.tokens_per_second}
        print(f"({arm}) {ARMS[arm]}: {before:,.1f} -> {curve[-1]['val_perplexity']:,.2f} after {result.tokens:,} tokens "
              f"({result.tokens_per_second:,.0f} tokens/s)")

    report = {
        "teacher": args.teacher, "teacher_perplexity": teacher_ppl, "target_size": args.target_size,
        "student_shape": chosen.shape.to_dict(), "student_params": chosen.params,
        "tokens": args.tokens, "seq_len": int(train.shape[1]), "settings": settings.to_dict(),
        "validation_tokens": int(valid.shape[0] * (valid.shape[1] - 1)), "arms": arms, "timing": timing,
        "seconds": time.perf_counter() - started, "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    overhead = {k: report[k] for k in ("teacher", "target_size", "student_shape", "student_params", "seq_len", "timing",
                                       "date", "machine")}
    overhead["batch_size"] = settings.batch_size
    (args.out / "distill_overhead.json").write_text(json.dumps(overhead, indent=2) + "\n")
    (args.out / "distill_overhead.md").write_text(_overhead_markdown(overhead))
    print(_overhead_markdown(overhead))
    if arms:  # --arms "" measures only the trainer's overhead
        (args.out / "distill_recovery.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "distill_recovery.md").write_text(_markdown(report))
        _plot(report, args.out / "distill_recovery.png")
        print(_markdown(report))


def _overhead(teacher, student, train, settings: DistillConfig, steps: int) -> dict:
    """Median step time of the trainer and of a bare loop doing the same work, plus the bare step's parts.

    The two run in alternating blocks (trainer, bare, trainer, bare) so that neither always runs first on a
    warmed-up or cooled-down machine; the first step of every block (allocations, optimizer state) is dropped.
    """
    batch = settings.batch_size
    block = max(3, steps // 2)
    config = DistillConfig(**{**settings.to_dict(), "tokens": None, "steps": block, "eval_every": 0})
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay)
    parts = {"teacher_forward": [], "student_forward_and_kl": [], "backward": [], "optimizer": []}
    trainer_steps, bare_steps = [], []
    for _ in range(2):
        result = distill(student, teacher, train, config, progress=False)
        stamps = [0.0] + [r["seconds"] for r in result.history]
        trainer_steps += [b - a for a, b in zip(stamps, stamps[1:], strict=False)][1:]
        for step in range(block):
            ids = train[step * batch : (step + 1) * batch]
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids).logits[:, :-1].float()
                t1 = time.perf_counter()
                student_logits = student(input_ids=ids).logits[:, :-1].float()
                loss = F.kl_div(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
                                reduction="sum") / (student_logits.shape[0] * student_logits.shape[1])
            t2 = time.perf_counter()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), settings.clip)
            t3 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t4 = time.perf_counter()
            if step == 0:
                continue
            bare_steps.append(t4 - t0)
            for name, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[name].append(value)
    bare = statistics.median(bare_steps)
    trainer = statistics.median(trainer_steps)
    tokens_per_step = batch * int(train.shape[1])
    return {
        "steps_timed": len(bare_steps),
        "trainer_step_seconds_median": trainer,
        "bare_step_seconds_median": bare,
        "trainer_overhead": trainer / bare - 1,
        "trainer_tokens_per_second": tokens_per_step / trainer,
        "bare_tokens_per_second": tokens_per_step / bare,
        "bare_parts_seconds_median": {k: statistics.median(v) for k, v in parts.items()},
    }


def _markdown(report: dict) -> str:
    t = report["timing"]
    lines = [
        f"# Distillation recovery: {report['teacher']} pruned to {report['target_size']}",
        "",
        f"Student: {report['student_params'] / 1e6:.1f}M parameters (shape {report['student_shape']}); teacher "
        f"perplexity {report['teacher_perplexity']:.2f}. Every arm trained on the same {report['tokens']:,} "
        f"training tokens (sequences of {report['seq_len']}), batch {report['settings']['batch_size']}, AdamW, "
        f"peak LR {report['settings']['lr']}, warmup-stable-decay, bf16 autocast. Validation perplexity in fp32 on "
        f"{report['validation_tokens']:,} held-out tokens. Measured {report['date']} on {report['machine']}.",
        "",
        "| arm | student | perplexity before | after | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for arm, row in report["arms"].items():
        lines.append(f"| ({arm}) | {row['name']} | {row['curve'][0]['val_perplexity']:,.1f} | "
                     f"{row['final_perplexity']:,.2f} | {row['tokens_per_second']:,.0f} |")
    lines += ["", _overhead_sentence(t)]
    return "\n".join(lines) + "\n"


def _overhead_sentence(t: dict) -> str:
    parts = ", ".join(f"{k.replace('_', ' ')} {v * 1000:.0f} ms" for k, v in t["bare_parts_seconds_median"].items())
    return (
        f"Trainer vs bare loop (median of {t['steps_timed']} steps each, alternating blocks in one process): trainer "
        f"{t['trainer_step_seconds_median']:.3f} s/step ({t['trainer_tokens_per_second']:,.0f} tokens/s), bare loop "
        f"{t['bare_step_seconds_median']:.3f} s/step ({t['bare_tokens_per_second']:,.0f} tokens/s): overhead "
        f"{t['trainer_overhead']:+.1%}. Bare step parts: {parts}."
    )


def _overhead_markdown(report: dict) -> str:
    return (
        f"# Distillation step time: trainer vs a bare PyTorch loop\n\n"
        f"{report['teacher']} teacher, {report['student_params'] / 1e6:.1f}M student pruned to {report['target_size']}, "
        f"batch {report['batch_size']} x {report['seq_len']} tokens, bf16 autocast, AdamW. Measured {report['date']} "
        f"on {report['machine']}.\n\n{_overhead_sentence(report['timing'])}\n"
    )


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, row in report["arms"].items():
        ax.plot([p["tokens"] / 1000 for p in row["curve"]], [p["val_perplexity"] for p in row["curve"]],
                marker="o", markersize=3, label=f"({arm}) {row['name']}")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation perplexity (log scale)")
    finish_perplexity_plot(fig, ax, report["teacher_perplexity"],
                           f"{report['teacher']} → {report['student_params'] / 1e6:.0f}M student: recovery by training", path)


if __name__ == "__main__":
    main()
