"""Minitron-like, MobileLLM-like and Mu-like students at one parameter budget, from one teacher.

Each family is built and distilled by the pipeline exactly as ``compress --student F`` does it
(``compress.run(..., student=F, stop_after="distill")``, one run directory per family, reused when
present), with the same target size and the same distillation tokens. Then, for every student:

- **quality**: fp32 perplexity and top-1 agreement with the teacher on the continuations of the run's
  validation sequences: the first ``--prompt-tokens`` of each are read (a causal model reads them as
  context, a Mu-like model encodes them), the rest is scored; the teacher is scored on the same tokens;
- **graphs**: static-shape float graphs for a ``--prompt-tokens`` prompt and ``--new-tokens`` generated
  tokens (decoder-only: a [1, 128] prefill graph and a decode graph with a 192-slot cache; Mu-like: a
  [1, 128] encoder graph and a decoder step graph with a 64-slot self-attention cache), quantized with
  ``--quant`` for ``--npu-profile`` and checked against the profile;
- **speed** with ONNX Runtime on this CPU, float and quantized graphs: first-token latency (decoder-only:
  the prefill run; Mu-like: the encoder run plus the first decoder step) and decode tokens/s (the median
  step of greedy generation after the first token). The families are timed in interleaved rounds, so a
  change in machine load hits all of them alike; medians over the rounds.

Writes ``benchmarks/results/student_shapes.{json,md,png}``.

    python -m benchmarks.student_shapes [--target-size 60M] [--tokens 100000] [--quant a8w8]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from benchmarks.plots import machine, provenance
from compress.app.pipeline import run
from compress.core.config import CompressConfig
from compress.core.family import get_family, load_model
from compress.evaluation.quality import continuation_quality
from compress.io import read_json, write_text
from compress.sources.data import load_corpus, token_batches
from compress.sources.teachers import load_teacher

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent
FAMILIES = {"minitron": "Minitron-like (pruned teacher)", "mobilellm": "MobileLLM-like (deep-thin, blocks x2)",
            "mu": "Mu-like (encoder-decoder)"}


def _build(family: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run the pipeline up to distillation for ``family``; its plan and distillation metrics."""
    out = args.runs / family
    started = time.perf_counter()
    result = run(args.base, student=family, out=str(out), distill_tokens=args.tokens, stop_after="distill",
                 progress=False)
    stages = result.metrics()
    plan = read_json(out / "plan.json")
    distilled = stages["distill"]
    return {"run_dir": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out),
            "params": plan["params"], "shape": plan.get("shape"), "repeats": plan.get("repeats", 1),
            "distill_tokens": distilled["tokens"], "distill_tokens_per_second": distilled["tokens_per_second"],
            "pipeline_seconds_this_call": time.perf_counter() - started,
            "reused": [s.stage for s in result.stages if s.reused]}


def _graphs(family: str, model: Any, folder: Path, calib: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Float and quantized graphs for a ``prompt_tokens`` prompt and ``new_tokens`` outputs, and the profile check."""
    from quant.profiles import check, get_profile
    from quant.quantize import PRESETS

    profile, recipe = get_profile(args.npu_profile), PRESETS[args.quant]
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    graphs = get_family(family).generation_graphs(model, folder, args.prompt_tokens, args.new_tokens, calib, recipe,
                                                  profile, args.decode_calib_tokens)
    seconds = time.perf_counter() - started
    violations = [str(v) for kind in graphs.values() for v in check(onnx.load(kind["quantized"]), profile)]
    sizes = {precision: sum(graphs[k][precision].stat().st_size for k in graphs) / 1e6 for precision in ("float", "quantized")}
    return {"paths": {k: {p: str(v) for p, v in d.items()} for k, d in graphs.items()}, "violations": violations,
            "size_mb": sizes, "seconds": seconds}


def kernels(path: str | Path) -> dict[str, int]:
    """How ONNX Runtime runs a graph's matrix products on this CPU, from its optimized graph: integer kernels
    (MatMulNBits: int8 weights; QLinearMatMul / MatMulInteger / QLinearConv: integer activations too) and
    products left in float (MatMul, Gemm, Conv)."""
    import collections
    import os
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        counts = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath,
                                                                  load_external_data=False).graph.node)
    names = ("MatMulNBits", "QLinearMatMul", "MatMulInteger", "QLinearConv", "MatMul", "Gemm", "Conv")
    return {name: counts.get(name, 0) for name in names}


class _Timer:
    """One family's graph pair at one precision: sessions opened once, one timed generation per call."""

    def __init__(self, family: str, paths: dict[str, dict[str, str]], precision: str, model_config: Any) -> None:
        from quant import runtime

        self.family = get_family(family)
        self.first = runtime.session(paths["first"][precision])
        self.step = runtime.session(paths["step"][precision])
        self.model_config = model_config
        self.first_ms: list[float] = []
        self.step_ms: list[float] = []
        self.tokens: list[int] = []

    def once(self, prompt: list[int], new_tokens: int) -> None:
        started = time.perf_counter()
        cache, logits = self.family.begin_generation(self.first, self.step, prompt, self.model_config)
        self.first_ms.append((time.perf_counter() - started) * 1000)
        tokens, steps = [int(np.argmax(logits))], []
        for _ in range(new_tokens - 1):
            started = time.perf_counter()
            logits = cache.step(tokens[-1])
            steps.append((time.perf_counter() - started) * 1000)
            tokens.append(int(np.argmax(logits)))
        self.step_ms.append(statistics.median(steps))
        self.tokens = tokens

    def summary(self) -> dict[str, float]:
        step = statistics.median(self.step_ms)
        return {"first_token_ms": statistics.median(self.first_ms), "decode_step_ms": step,
                "decode_tokens_per_second": 1000.0 / step, "rounds": len(self.first_ms)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--target-size", default="60M")
    parser.add_argument("--tokens", type=int, default=100_000, help="distillation tokens per family")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--compare", default="mu", help="the family whose latency the others are compared against")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "student-shapes", help="one run directory per family")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--quant", default="a8w8", choices=("a8w8", "a16w8"))
    parser.add_argument("--npu-profile", default="generic-a8w8")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--decode-calib-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--config", type=Path, help="a JSON file of CompressConfig fields every family's run starts "
                        "from (e.g. smaller calibration and validation sets); --teacher and --target-size win")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rebuild", action="store_true", help="only rebuild the markdown, the plot and the kernel "
                        "counts of the graphs on disk from an earlier run's JSON (no training, no timing)")
    return parser


def _rebuild(out: Path) -> None:
    """The markdown, the plot and the kernel counts again from the stored JSON."""
    report = json.loads((out / "student_shapes.json").read_text())
    _add_kernels(report["students"])
    write_text(out / "student_shapes.json", json.dumps(report, indent=2, default=str) + "\n")
    write_text(out / "student_shapes.md", markdown(report))
    _plot(report, out / "student_shapes.png")
    print(markdown(report))


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.rebuild:
        _rebuild(args.out)
        return
    families = args.families.split(",")
    if unknown := sorted(set(families) - set(FAMILIES)):
        parser.error(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    started = time.perf_counter()
    base = json.loads(args.config.read_text()) if args.config else {}
    args.base = defaults = CompressConfig.from_dict({**base, "teacher": args.teacher, "target_size": args.target_size})
    built = {}
    for family in families:
        built[family] = _build(family, args)
        print(f"{family}: {built[family]['params'] / 1e6:.1f}M parameters, distilled on {built[family]['distill_tokens']:,} "
              f"tokens ({built[family]['distill_tokens_per_second']:,.0f} tokens/s)", flush=True)

    teacher, tokenizer = load_teacher(args.teacher)
    dataset = load_corpus(defaults.data)
    # The pipeline's validation sequences: the first prompt_tokens are read, the rest scored.
    valid = token_batches(dataset, tokenizer, "validation", defaults.eval.seq_len, defaults.eval.samples)
    calib = token_batches(dataset, tokenizer, "calibration", args.prompt_tokens + args.new_tokens,
                          args.calib_samples).numpy()
    cut = args.prompt_tokens
    teacher_quality, reference = continuation_quality(teacher, valid, cut, defaults.batch_size)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    del teacher
    print(f"teacher: continuation perplexity {teacher_quality.perplexity:.2f} on {teacher_quality.tokens:,} tokens", flush=True)

    students: dict[str, dict[str, Any]] = {}
    timers: dict[tuple[str, str], _Timer] = {}
    prompt = [int(t) for t in valid[0, : args.prompt_tokens]]
    for family in families:
        run_dir = args.runs / family
        model = load_model(run_dir / "student", dtype=torch.float32).eval()
        measured, _ = continuation_quality(model, valid, cut, defaults.batch_size, reference,
                                           reader=get_family(family).reader)
        graphs = _graphs(family, model, run_dir / "shapes-onnx", calib, args)
        for precision in ("float", "quantized"):
            timers[family, precision] = _Timer(family, graphs["paths"], precision, model.config)
        students[family] = {"name": FAMILIES[family], **built[family], "continuation": measured.to_dict(),
                            "graphs": graphs}
        print(f"{family}: continuation perplexity {measured.perplexity:,.2f} (agreement {measured.agreement:.3f}); "
              f"graphs {graphs['size_mb']['quantized']:.0f} MB {args.quant}, {len(graphs['violations'])} violations",
              flush=True)
        del model

    for _ in range(2):  # warm-up: first runs allocate
        for timer in timers.values():
            timer.once(prompt, 4)
    for timer in timers.values():
        timer.first_ms.clear()
        timer.step_ms.clear()
    for _ in range(args.rounds):
        for timer in timers.values():
            timer.once(prompt, args.new_tokens)
    for family in families:
        speed = {precision: timers[family, precision].summary() for precision in ("float", "quantized")}
        float_tokens, quant_tokens = timers[family, "float"].tokens, timers[family, "quantized"].tokens
        same = next((i for i, (a, b) in enumerate(zip(float_tokens, quant_tokens, strict=True)) if a != b), len(float_tokens))
        students[family]["speed"] = speed
        students[family]["quantized_greedy_prefix_equal"] = same
    _add_kernels(students)

    report = {
        "teacher": args.teacher, "teacher_params": teacher_params, "target_size": args.target_size,
        "teacher_continuation": teacher_quality.to_dict(), "tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "validation_sequences": int(valid.shape[0]),
        "validation_seq_len": int(valid.shape[1]), "quant": args.quant, "npu_profile": args.npu_profile, "rounds": args.rounds,
        "students": students, "compare": args.compare, "ratios": _ratios(students, args.compare), "seconds": time.perf_counter() - started,
        **provenance(), "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "student_shapes.json", json.dumps(report, indent=2, default=str) + "\n")
    write_text(args.out / "student_shapes.md", markdown(report))
    _plot(report, args.out / "student_shapes.png")
    print(markdown(report))


def _add_kernels(students: dict[str, dict[str, Any]]) -> None:
    for student in students.values():
        student["quantized_kernels"] = {kind: kernels(paths["quantized"]) for kind, paths in student["graphs"]["paths"].items()}


def _ratios(students: dict[str, dict[str, Any]], against: str) -> dict[str, dict[str, float]]:
    """The family ``against`` (by default the Mu-like one) against each other family, as Mu's authors report it:
    first-token latency reduction (1 - it/other) and decode speed-up (its tokens/s / other tokens/s), per precision."""
    if against not in students:
        return {}
    ours = students[against]["speed"]
    out = {}
    for family, student in students.items():
        if family == against:
            continue
        for precision in ("float", "quantized"):
            other = student["speed"][precision]
            out[f"{against}_vs_{family}_{precision}"] = {
                "first_token_latency_reduction": 1.0 - ours[precision]["first_token_ms"] / other["first_token_ms"],
                "decode_speedup": ours[precision]["decode_tokens_per_second"] / other["decode_tokens_per_second"],
            }
    return out


def markdown(report: dict[str, Any]) -> str:
    q = report["quant"].upper()
    lines = [
        "# Student families at one budget: Minitron-like, MobileLLM-like, Mu-like",
        "",
        f"{report['date']}, {report['machine']}. Teacher {report['teacher']} ({report['teacher_params'] / 1e6:.1f}M); "
        f"each student built by `compress --student F --target-size {report['target_size']}` and distilled on "
        f"{report['tokens']:,} training tokens (the pipeline's defaults otherwise).",
        "",
        f"Quality: fp32 continuation perplexity on {report['validation_sequences']} validation sequences of "
        f"{report['validation_seq_len']} tokens: the first {report['prompt_tokens']} of each are read, the rest "
        f"scored ({report['teacher_continuation']['tokens']:,} tokens in all). Teacher on the same tokens: "
        f"{report['teacher_continuation']['perplexity']:.2f}.",
        "",
        f"Speed: ONNX Runtime on this CPU, a {report['prompt_tokens']}-token prompt and {report['new_tokens']} greedy "
        f"tokens, medians over {report['rounds']} interleaved rounds. First token: decoder-only = the prefill graph; "
        f"Mu-like = the encoder graph + the first decoder step. {q} graphs for the `{report['npu_profile']}` profile.",
        "",
        f"| student | params | shape | continuation perplexity | agreement | "
        f"first token fp32 (ms) | first token {q} (ms) | decode fp32 (tok/s) | decode {q} (tok/s) | {q} size (MB) | violations |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for student in report["students"].values():
        s, c, g = student["speed"], student["continuation"], student["graphs"]
        lines.append(
            f"| {student['name']} | {student['params'] / 1e6:.1f}M | {_shape(student)} | "
            f"{c['perplexity']:,.2f} | {c['agreement']:.3f} | {s['float']['first_token_ms']:.1f} | "
            f"{s['quantized']['first_token_ms']:.1f} | {s['float']['decode_tokens_per_second']:.1f} | "
            f"{s['quantized']['decode_tokens_per_second']:.1f} | {g['size_mb']['quantized']:.0f} | {len(g['violations'])} |")
    if report["ratios"]:
        lines += ["", "Mu-like against the decoder-only students (Mu's authors, on a Hexagon NPU: 47% lower first-token "
                  "latency, 4.7x faster decoding):", "",
                  "| against | precision | first-token latency reduction | decode speed-up |", "|---|---|---|---|"]
        for key, ratio in report["ratios"].items():
            family, precision = key.removeprefix(f"{report.get('compare', 'mu')}_vs_").rsplit("_", 1)
            lines.append(f"| {FAMILIES[family]} | {'fp32' if precision == 'float' else q} | "
                         f"{ratio['first_token_latency_reduction'] * 100:.0f}% lower | {ratio['decode_speedup']:.2f}x |")
    slower = [s["name"] for s in report["students"].values()
              if s["speed"]["quantized"]["decode_tokens_per_second"] < s["speed"]["float"]["decode_tokens_per_second"]]
    if slower:
        lines += ["", f"On this CPU the {q} decode graphs of {', '.join(slower)} run slower than their float graphs: "
                  "ONNX Runtime has no 16-bit kernels, so the tensors a recipe keeps at 16 bits (and the static KV "
                  "cache, quantized at every step) run as DequantizeLinear, a float op and QuantizeLinear. CPU latency "
                  "of QDQ graphs is not an NPU's; compare families within one precision."]
    rows = [(s["name"], s["quantized_kernels"]["step"]) for s in report["students"].values() if "quantized_kernels" in s]
    if rows:
        lines += ["", f"How ONNX Runtime runs the matrix products of each {q} decode-step graph here (its optimized "
                  "graph): integer kernels vs products left in float.", "",
                  "| student | MatMulNBits (int8 weights) | QLinearMatMul (integer) | float MatMul / Gemm |", "|---|---|---|---|"]
        lines += [f"| {name} | {k['MatMulNBits']} | {k['QLinearMatMul'] + k['MatMulInteger']} | {k['MatMul'] + k['Gemm']} |"
                  for name, k in rows]
    return "\n".join(lines) + "\n"


def _shape(student: dict[str, Any]) -> str:
    shape = student.get("shape") or {}
    if "encoder_layers" in shape:
        return (f"hidden {shape['hidden']}, MLP {shape['mlp']}, {shape['encoder_layers']}+{shape['decoder_layers']} "
                f"layers (enc+dec)")
    layers = shape.get("layers", "?")
    repeats = student.get("repeats", 1)
    depth = f"{layers} layers" + (f" x{repeats}" if repeats > 1 else "")
    return f"hidden {shape.get('hidden', '?')}, MLP {shape.get('mlp', '?')}, {depth}"


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = report["students"]
    names = [FAMILIES[f].split(" (")[0] for f in students]
    q = report["quant"].upper()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].bar(names, [s["continuation"]["perplexity"] for s in students.values()], color="tab:blue")
    axes[0].axhline(report["teacher_continuation"]["perplexity"], color="black", linestyle="--", linewidth=1,
                    label=f"teacher ({report['teacher_continuation']['perplexity']:.1f})")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("continuation perplexity (log)")
    axes[0].legend(fontsize=8)
    width = 0.38
    x = np.arange(len(names))
    for ax, key, label in ((axes[1], "first_token_ms", f"first-token latency, {report['prompt_tokens']}-token prompt (ms)"),
                           (axes[2], "decode_tokens_per_second", "decode tokens/s")):
        ax.bar(x - width / 2, [s["speed"]["float"][key] for s in students.values()], width, label="fp32")
        ax.bar(x + width / 2, [s["speed"]["quantized"][key] for s in students.values()], width, label=q)
        ax.set_xticks(x, names)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['target_size']} students from {report['teacher']}, {report['tokens']:,} distillation tokens "
                 f"each; ONNX Runtime, this CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
