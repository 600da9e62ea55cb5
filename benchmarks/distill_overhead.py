"""How fast is one distillation step, against what the hardware gives and against a bare PyTorch loop?

The README main command's student shape (default: smollm2-135m pruned to hidden 576, MLP 704, 3 x 3 heads, 30
layers, 0.68x; which units are kept does not change the step's cost, so they are picked at random) trains on
batches of 8 x 256 random tokens, with the teacher online (full-vocabulary KL), in alternating blocks within one
process so that none always runs on a warmer or quieter machine:

- ``before``: the step as it was until 2026-12-02: the loss through autograd, the model's own attention (sdpa);
- ``trainer``: the trainer with today's defaults (``distill.losses.FusedLogitLoss``, eager attention on CPU);
- ``bare``: a plain loop doing the same math as ``trainer`` (teacher forward, student forward, the same fused
  loss, backward, clipping, AdamW, with the trainer's attention and teacher weight casts), to bound what the
  trainer's bookkeeping adds;
- ``compiled``: ``trainer`` with ``compile="on"`` (every decoder layer through torch.compile, as the trainer's
  "auto" does for runs like the README's; its compilation, cold (an empty inductor cache), is in the first step
  of the first block, which is reported and not counted);
- ``stored-top-64``: the trainer reading the teacher's stored top-64 log-probabilities instead of running it.

The useful work of a step is counted by ``torch.utils.flop_counter`` (matmuls and attention) and set against
the bf16 matmul ceiling measured in the same run on the step's own largest shapes. One profiled ``trainer``
step of ``trainer`` and of ``compiled`` says what dominates. Writes ``benchmarks/results/distill_overhead.{md,json}``.

    python -m benchmarks.distill_overhead [--steps 4] [--blocks 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.plots import machine, provenance
from compress.io import write_json, write_text
from compress.pruning.archspec import Shape, resolve
from compress.pruning.planner import select
from compress.pruning.scoring import random_scores
from compress.pruning.surgery import prune
from compress.sources.teachers import load_teacher
from distill import DistillConfig, distill, logit_distillation_loss
from distill.speed import attention_implementation, keep_freed_memory, low_precision_linears
from distill.trainer import _optimizers

RESULTS = Path(__file__).parent / "results"
ISSUE_BASELINE = 289.0  # tokens/s of the KD step in the issue that asked for twice as many (2026-12-01)
ARMS = ("before", "trainer", "bare", "compiled", "stored-top-64")
# Profiler op names, grouped into what a step spends its time on.
_KINDS = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::_softmax", "aten::_softmax_backward_data"),
    "loss (softmax over the vocabulary)": ("aten::_log_softmax", "aten::exp", "aten::dot", "aten::sub",
                                           "aten::_log_softmax_backward", "aten::gather", "aten::index_put"),
    "copies and casts": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--shape", default="576,704,3,3,30", help="hidden,mlp,kv_heads,heads_per_group,layers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per arm and block (after one untimed)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    arms = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in arms if a not in ARMS]:
        parser.error(f"unknown arms {', '.join(unknown)}; known: {', '.join(ARMS)}")
    try:
        shape = Shape(*(int(x) for x in args.shape.split(",")))
    except (TypeError, ValueError):
        parser.error(f"--shape {args.shape!r}: give five integers hidden,mlp,kv_heads,heads_per_group,layers")
    keep_freed_memory()
    # A cold compilation, as on a fresh machine: inductor's on-disk cache would hide what it costs.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pdq-inductor-")
    started = time.perf_counter()
    meta = provenance()
    teacher, _ = load_teacher(args.teacher)
    teacher.eval().requires_grad_(False)
    spec = resolve(teacher)
    student = prune(teacher, spec, shape, select(spec, random_scores(spec, 0), shape))
    params = sum(p.numel() for p in student.parameters())
    vocab = teacher.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch_size * (args.steps + 1), args.seq_len), generator=torch.Generator().manual_seed(0))
    tokens_per_step = args.batch_size * args.seq_len

    base = DistillConfig(steps=args.steps + 1, batch_size=args.batch_size, eval_every=0, checkpoint_every=0)
    # The trainer's defaults would compile these short runs' layers only from 50 steps: pin it per arm.
    base = DistillConfig(**{**base.to_dict(), "compile": "off"})
    configs = {"before": DistillConfig(**{**base.to_dict(), "fused_loss": False, "attention": "model"}),
               "trainer": base, "compiled": DistillConfig(**{**base.to_dict(), "compile": "on"}),
               "stored-top-64": DistillConfig(**{**base.to_dict(), "teacher_top_k": 64})}
    logits_dir = Path(tempfile.mkdtemp(prefix="pdq-topk-"))
    times: dict[str, list[float]] = {a: [] for a in arms}
    first: dict[str, list[float]] = {a: [] for a in arms}  # the untimed first step of each block
    for block in range(args.blocks):
        for arm in arms:
            if arm == "bare":
                steps = _bare(student, teacher, ids, base, args.steps + 1)
            else:
                result = distill(student, teacher, ids, configs[arm], progress=False,
                                 teacher_logits=logits_dir / "top64.safetensors")
                stamps = [0.0] + [r["seconds"] for r in result.history]
                steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            first[arm].append(steps[0])
            times[arm] += steps[1:]
            print(f"block {block}: {arm} {statistics.median(times[arm]):.2f} s/step", flush=True)

    flops = _step_flops(student, teacher, ids[: args.batch_size], base)
    ceiling = _matmul_ceiling(tokens_per_step, shape.hidden, vocab, shape.mlp)
    profile = {arm: _profile(student, teacher, ids, configs[arm]) for arm in ("trainer", "compiled") if arm in arms}
    rows = {}
    for arm, values in times.items():
        seconds = statistics.median(values)
        rows[arm] = {"step_seconds_median": seconds, "steps_timed": len(values), "tokens_per_second": tokens_per_step / seconds,
                     "step_seconds": values, "first_step_seconds": first[arm]}
    for arm in ("trainer", "bare", "before", "compiled"):
        if arm in rows:
            rows[arm]["useful_tflops"] = flops["total"] / rows[arm]["step_seconds_median"] / 1e12
            rows[arm]["share_of_bf16_ceiling"] = rows[arm]["useful_tflops"] / ceiling["tflops"]
    report = {
        **meta, "teacher": args.teacher, "student_shape": shape.to_dict(), "student_params": params,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "arms": rows, "step_flops": flops,
        "bf16_matmul_ceiling": ceiling, "profile": profile, "issue_baseline_tokens_per_second": ISSUE_BASELINE,
        "seconds": time.perf_counter() - started, "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
    }
    if "trainer" in rows and "bare" in rows:
        report["trainer_overhead"] = rows["trainer"]["step_seconds_median"] / rows["bare"]["step_seconds_median"] - 1
    if "trainer" in rows and "before" in rows:
        report["speedup_over_before"] = rows["before"]["step_seconds_median"] / rows["trainer"]["step_seconds_median"]
    if "compiled" in rows:
        report["compile_seconds"] = rows["compiled"]["first_step_seconds"][0] - rows["compiled"]["step_seconds_median"]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "distill_overhead.json", report)
    write_text(args.out / "distill_overhead.md", _markdown(report))
    print(_markdown(report))


def _bare(student, teacher, ids: torch.Tensor, config: DistillConfig, steps: int) -> list[float]:  # noqa: ANN001
    """Step times of a plain loop doing the trainer's math."""
    optimizer = _optimizers(student, None, config)[0]
    head, teacher_head = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    chunk = max(1, config.kl_chunk_elements // head.shape[0])
    out = []
    student.train()
    teacher_head_bf16 = teacher_head.detach().to(torch.bfloat16)
    with attention_implementation([student, teacher], config.attention_for("cpu", int(ids.shape[1]))), \
            low_precision_linears(teacher, torch.bfloat16):
        for step in range(steps):
            batch = ids[step * config.batch_size : (step + 1) * config.batch_size]
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with torch.no_grad():
                    t_hidden = teacher.base_model(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
                s_hidden = student.base_model(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
                loss = logit_distillation_loss(s_hidden.reshape(-1, s_hidden.shape[-1]), head,
                                               t_hidden.reshape(-1, t_hidden.shape[-1]), teacher_head_bf16, chunk=chunk)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(student.parameters()), config.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            out.append(time.perf_counter() - t0)
    student.eval()
    return out


def _step_flops(student, teacher, batch: torch.Tensor, config: DistillConfig) -> dict[str, float]:  # noqa: ANN001
    """Floating-point operations of one trainer step, counted by torch (matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    config = DistillConfig(**{**config.to_dict(), "steps": 1})
    with counter:
        distill(student, teacher, batch, config, progress=False)
    return {"total": float(counter.get_total_flops())}


def _matmul_ceiling(tokens: int, hidden: int, vocab: int, mlp: int, repeats: int = 5) -> dict[str, float]:
    """bf16 matmul throughput on the step's own shapes (output head and MLP, forward and weight gradient)."""
    shapes = [(tokens, hidden, vocab), (vocab, tokens, hidden), (tokens, hidden, mlp * 2), (tokens, hidden, hidden)]
    best = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        a @ b
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            seconds.append(time.perf_counter() - t0)
        best[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(seconds) / 1e12
    return {"tflops": max(best.values()), "by_shape_tflops": best}


def _profile(student, teacher, ids: torch.Tensor, config: DistillConfig) -> dict:  # noqa: ANN001
    """Self CPU time of one step (after a warm-up step), by kind of op and by the top ops; compiled steps' fused
    kernels count as their own kind."""
    from torch.profiler import ProfilerActivity, profile

    config = DistillConfig(**{**config.to_dict(), "steps": 1})
    batch = ids[: config.batch_size]
    distill(student, teacher, batch, config, progress=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        distill(student, teacher, batch, config, progress=False)
    events = list(prof.key_averages())  # a compiled region's fused kernels are its "## Call CompiledFxGraph" event
    total = sum(e.self_cpu_time_total for e in events)
    kinds = dict.fromkeys([*_KINDS, "compiled fused kernels", "other"], 0.0)
    for event in events:
        kind = next((k for k, prefixes in _KINDS.items() if event.key.startswith(prefixes)),
                    "compiled fused kernels" if "CompiledFxGraph" in event.key else "other")
        kinds[kind] += event.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {"self_seconds": total / 1e6, "share_by_kind": {k: v / total for k, v in kinds.items() if v},
            "top_ops": [{"op": e.key[:60], "share": e.self_cpu_time_total / total, "calls": e.count} for e in top]}


def _markdown(r: dict) -> str:
    rows = r["arms"]
    lines = [
        f"# Distillation step time: {r['teacher']} teacher, {r['student_params'] / 1e6:.1f}M student",
        "",
        f"Student shape {r['student_shape']}, batch {r['batch_size']} x {r['seq_len']} tokens, bf16 autocast, AdamW, "
        f"the teacher online unless the arm says stored. Measured {r['date']} on {r['machine']}, commit "
        f"`{r['commit']}`, command `{r['command']}`. Medians of each arm's steps, arms alternating in "
        f"{len(next(iter(rows.values()))['step_seconds'])} timed steps each.",
        "",
        "| arm | s/step | tokens/s | vs the issue's 289 tokens/s | useful TFLOP/s | share of bf16 ceiling |",
        "|---|---|---|---|---|---|",
    ]
    for arm, row in rows.items():
        share = f"{row['share_of_bf16_ceiling']:.0%}" if "share_of_bf16_ceiling" in row else "–"
        useful = f"{row['useful_tflops']:.2f}" if "useful_tflops" in row else "–"
        lines.append(f"| {arm} | {row['step_seconds_median']:.2f} | {row['tokens_per_second']:,.0f} | "
                     f"{row['tokens_per_second'] / r['issue_baseline_tokens_per_second']:.2f}x | {useful} | {share} |")
    lines.append("")
    if "speedup_over_before" in r:
        lines.append(f"The trainer's step is {r['speedup_over_before']:.2f}x the `before` step measured in this run.")
    if "trainer_overhead" in r:
        lines.append(f"Trainer overhead over the bare loop: {r['trainer_overhead']:+.1%}.")
    if "compile_seconds" in r:
        lines.append(f"Compiling the decoder layers took {r['compile_seconds']:.0f} s (the compiled arm's first step "
                     "less its median).")
    c = r["bf16_matmul_ceiling"]
    lines += [
        f"One step does {r['step_flops']['total'] / 1e12:.2f} TFLOP of matmul and attention work (torch's flop "
        f"counter); the bf16 matmul ceiling measured here is {c['tflops']:.2f} TFLOP/s (best of "
        + ", ".join(f"{k} {v:.2f}" for k, v in c["by_shape_tflops"].items()) + ").",
        "",
    ]
    for arm, p in r["profile"].items():
        lines += ["", f"What one `{arm}` step spends its CPU time on (torch profiler, self time): "
                  + ", ".join(f"{k} {v:.0%}" for k, v in p["share_by_kind"].items()) + ". Top ops: "
                  + ", ".join(f"`{o['op']}` {o['share']:.0%}" for o in p["top_ops"][:6]) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
