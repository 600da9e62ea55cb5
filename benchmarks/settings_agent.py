"""Mu's own job: which student, at which precision, turns settings requests into calls, and how fast does it answer?

From one teacher, at one parameter budget and one distillation budget, the Minitron-like, MobileLLM-like and
Mu-like students (each built and distilled by the pipeline, ``compress.run(..., stop_after="distill")``, one run
folder per family, reused when present) and the teacher itself are fine-tuned on the settings-agent task's
training split (``compress finetune``: LoRA, and every weight), then answer the test split, whose phrasings, some
words and some values never occur in training (:mod:`compress.sources.settings_agent`):

- in fp32, from the fine-tuned checkpoint;
- as their shipped integer graphs: A16W8 for the ``qnn-htp`` profile (prefill + decode, or encoder + decoder, for a
  ``--prompt-tokens`` request and ``--new-tokens`` of answer, calibrated on training pairs), and for decoder-only
  models the ``ort-cpu`` profile's int8 weight-only graphs, through the host loop an app runs.

Each is scored by :func:`compress.evaluation.calls.evaluate_calls`: exact match, setting accuracy, invalid outputs
and response time on this CPU (request to first token and to the whole call, median and 90th percentile).

    python -m benchmarks.settings_agent [--families minitron,mobilellm,mu] [--modes lora,full] [--test-pairs 200]

Writes ``benchmarks/results/settings_agent.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.plots import provenance
from compress.app.finetune import FinetuneConfig, finetune
from compress.app.htp_calls import emulated_calls
from compress.app.pipeline import run
from compress.core.family import family_of, load_model
from compress.evaluation.calls import (
    CheckpointDecoder,
    GraphDecoder,
    evaluate_calls,
    known_settings,
    read_pairs,
    stop_tokens,
)
from compress.io import read_json, write_text
from compress.sources.data import pair_inputs
from compress.sources.settings_agent import write_task
from compress.sources.teachers import resolve_teacher
from quant import qnn

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent
FAMILIES = ("minitron", "mobilellm", "mu")
MODES = {"lora": 8, "full": 0}  # LoRA rank; 0 trains every weight


def _student(family: str, args: argparse.Namespace) -> Path:
    """The distilled student of ``family`` (the pipeline's run folder, reused when its stages are done)."""
    out = args.runs / family
    base = json.loads(args.config.read_text()) if args.config else {}
    run(None, progress=False, **{**base, "teacher": args.teacher, "target_size": args.target_size, "student": family,
                                 "out": str(out), "distill_tokens": args.distill_tokens, "stop_after": "distill"})
    return out / "student"


def _finetuned(name: str, source: Path, mode: str, task: Path, args: argparse.Namespace) -> Path:
    """``source`` fine-tuned in ``mode``; an earlier fine-tuning is reused only if it is of the same folder and newer
    than every file in it (a student distilled again since is fine-tuned again)."""
    out = args.runs / f"{name}-{mode}"
    done = out / "finetune.json"
    if (done.exists() and read_json(done)["config"]["student"] == str(source)
            and done.stat().st_mtime > max(f.stat().st_mtime for f in source.iterdir())):
        return out
    finetune(FinetuneConfig(student=str(source), data=str(task / "train.jsonl"), out=str(out), lora_rank=MODES[mode],
                            epochs=args.epochs, max_input_tokens=args.prompt_tokens, max_output_tokens=args.new_tokens,
                            bf16=args.bf16), progress=False)
    return out


def _calibration(tokenizer: Any, task: Path, length: int, rows: int) -> np.ndarray:
    """``rows`` sequences of ``length`` tokens packed from training pairs (request, call, EOS, ...)."""
    pairs = [json.loads(line) for line in (task / "train.jsonl").read_text().splitlines()][: rows * 8]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    inputs = pair_inputs(tokenizer, [p["input"] for p in pairs], length)
    outputs = tokenizer([p["output"] for p in pairs], add_special_tokens=False).input_ids
    stream = [t for i, o in zip(inputs, outputs, strict=True) for t in (*i, *o, eos)]
    need = rows * length
    stream = (stream * (need // max(1, len(stream)) + 1))[:need]
    return np.asarray(stream, dtype=np.int64).reshape(rows, length)


def _measure(model_dir: Path, task: Path, args: argparse.Namespace) -> dict[str, Any]:
    """fp32 checkpoint, A16W8 qnn-htp graphs and (decoder-only) w8 ort-cpu graphs of one fine-tuned model."""
    from transformers import AutoTokenizer

    from quant.profiles import get_profile
    from quant.quantize import PRESETS

    pairs = read_pairs(task / "test.jsonl")
    known = known_settings(task / "catalog.json", pairs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, dtype=torch.float32).eval()
    family = family_of(model.config)
    eos = stop_tokens(tokenizer, model.config)
    common = {"max_new_tokens": args.new_tokens, "max_input_tokens": args.prompt_tokens}
    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    fp32 = evaluate_calls(CheckpointDecoder(family, model, eos), tokenizer, pairs[: args.test_pairs], known, **common)
    out["fp32"] = fp32.to_dict()
    print(f"  fp32: exact {fp32.exact_match:.3f}, call {fp32.call_ms_p50:.0f} ms", flush=True)
    calib = _calibration(tokenizer, task, args.prompt_tokens + args.new_tokens, args.calib_samples)
    precisions = [("a16w8", "qnn-htp")]
    if family.weight_only_graphs:
        precisions.append(("w8", "ort-cpu"))
    for recipe, profile in precisions:
        folder = model_dir / "graphs" / recipe
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        graphs = family.generation_graphs(model, folder, args.prompt_tokens, args.new_tokens, calib, PRESETS[recipe],
                                          get_profile(profile), args.decode_calib_tokens)
        seconds = time.perf_counter() - started
        first, step = graphs["first"]["quantized"], graphs["step"]["quantized"]
        decoder = GraphDecoder(family, first, step, model.config, eos)
        result = evaluate_calls(decoder, tokenizer, pairs[: args.test_pairs], known, **common)
        size = sum(graphs[k]["quantized"].stat().st_size for k in graphs) / 1e6
        out[f"{recipe}-{profile}"] = {**result.to_dict(), "mb": size, "graph_seconds": seconds}
        print(f"  {recipe} ({profile}): exact {result.exact_match:.3f}, call {result.call_ms_p50:.0f} ms", flush=True)
        if profile == "qnn-htp" and args.htp_pairs and qnn.unavailable() is None:
            out[f"{recipe}-{profile}"]["htp_emulated"] = _emulated(first, step, model_dir, task, result, args)
    return out


def _emulated(first: Path, step: Path, model_dir: Path, task: Path, cpu: Any, args: argparse.Namespace) -> dict:
    """The first ``--htp-pairs`` test pairs answered by the graphs on the HTP emulator, next to ONNX Runtime CPU's
    answers from the same graphs."""
    started = time.perf_counter()
    emulated = emulated_calls(first, step, model_dir, task / "test.jsonl", args.htp_pairs, args.new_tokens,
                              args.prompt_tokens)
    n = emulated["pairs"]
    same = sum(a["output"] == b["output"] for a, b in zip(emulated["answers"], cpu.answers[:n], strict=True))
    print(f"  HTP emulator, {n} pairs: exact {emulated['exact_match']:.3f}", flush=True)
    return {"pairs": n, "exact_match": emulated["exact_match"], "setting_accuracy": emulated["setting_accuracy"],
            "cpu_exact_match": sum(a["exact"] for a in cpu.answers[:n]) / n, "same_output_as_cpu": same / n,
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--target-size", default="60M")
    parser.add_argument("--distill-tokens", type=int, default=100_000)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--no-teacher-row", dest="teacher_row", action="store_false")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--test-pairs", type=int, default=200, help="test pairs each model and graph answers")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="the graphs' request length (requests are short)")
    parser.add_argument("--new-tokens", type=int, default=32, help="the longest answer (a call is about 20 tokens)")
    parser.add_argument("--htp-pairs", type=int, default=20, help="test pairs the qnn-htp graphs also answer on the "
                        "HTP emulator (seconds per decode step; 0: none)")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--decode-calib-tokens", type=int, default=256)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--config", type=Path, help="a JSON file of CompressConfig fields every student's run starts "
                        "from (flat, as the flags are named); the flags above win")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "settings-agent")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    started = time.perf_counter()
    task = args.runs / "task"
    counts = write_task(task)
    names = [f for f in args.families.split(",") if f] + (["teacher"] if args.teacher_row else [])
    modes = [m for m in args.modes.split(",") if m]
    rows: list[dict[str, Any]] = []
    # Students first, the teacher (the reference) last; results are written after every row, so a run stopped
    # early leaves the rows it finished, and ``planned`` says which are missing.
    for name in names:
        source = Path(resolve_teacher(args.teacher)) if name == "teacher" else _student(name, args)
        for mode in modes:
            print(f"{name} ({mode})", flush=True)
            tuned = _finetuned(name, source, mode, task, args)
            tuning = read_json(tuned / "finetune.json")
            rows.append({"model": name, "mode": mode, "finetune_seconds": tuning["seconds"],
                         "trainable_params": tuning["trainable_params"], **_measure(tuned, task, args)})
            report = {"teacher": args.teacher, "target_size": args.target_size, "distill_tokens": args.distill_tokens,
                      "task": counts, "test_pairs": min(args.test_pairs, counts["test"]),
                      "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "epochs": args.epochs,
                      "planned": [f"{n} ({m})" for n in names for m in modes], "rows": rows, **provenance(),
                      "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                      "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                      "seconds": time.perf_counter() - started}
            args.out.mkdir(parents=True, exist_ok=True)
            write_text(args.out / "settings_agent.json", json.dumps(report, indent=2) + "\n")
            write_text(args.out / "settings_agent.md", markdown(report))
            _plot(report, args.out / "settings_agent.png")
    print(markdown(report))


_PRECISIONS = (("fp32", "fp32 checkpoint"), ("a16w8-qnn-htp", "A16W8 graphs (qnn-htp)"), ("w8-ort-cpu", "w8 graphs (ort-cpu)"))


def markdown(report: dict) -> str:
    lines = [
        "# Settings agent: requests to settings calls", "",
        f"Teacher {report['teacher']}; students at {report['target_size']} after {report['distill_tokens']:,} "
        f"distillation tokens; fine-tuned ({report.get('epochs', 3):g} epochs) on {report['task']['train']:,} training "
        f"pairs of the settings-agent task ({report['task']['settings']} settings) and scored on the first {report['test_pairs']} test pairs (phrasings, "
        "words and values never seen in training). Times: one request at a time on this CPU, request to first token "
        f"and to the whole call (greedy, at most {report['new_tokens']} tokens). Measured {report['date']} on "
        f"{report['machine']}, commit `{report['commit']}`, `{report['command']}`, {report['seconds'] / 60:.0f} min.", "",
        *_missing(report),
        *([f"Note: {report['provenance_note']}", ""] if report.get("provenance_note") else []),
        "| model | fine-tuning | params | answered by | exact match | setting right | invalid | first token (ms, p50) "
        "| call (ms, p50 / p90) | MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        for key, label in _PRECISIONS:
            if key not in row:
                continue
            r = row[key]
            mb = f"{r['mb']:.0f}" if "mb" in r else "–"
            lines.append(f"| {row['model']} | {row['mode']} | {row['params'] / 1e6:.0f}M | {label} | {r['exact_match']:.1%} | "
                         f"{r['setting_accuracy']:.1%} | {r['invalid_rate']:.1%} | {r['first_token_ms_p50']:.0f} | "
                         f"{r['call_ms_p50']:.0f} / {r['call_ms_p90']:.0f} | {mb} |")
    emulated = [(row, row[k]["htp_emulated"]) for row in report["rows"] for k, _ in _PRECISIONS
                if "htp_emulated" in row.get(k, {})]
    if emulated:
        lines += ["", "The A16W8 graphs compiled for Qualcomm's HTP and run on its emulator (the NPU's integer arithmetic), "
                  "on the first test pairs, next to ONNX Runtime CPU's answers from the same graphs:", "",
                  "| model | fine-tuning | pairs | exact match, emulator | exact match, CPU (same pairs) "
                  "| same output as CPU |", "|---|---|---|---|---|---|"]
        lines += [f"| {row['model']} | {row['mode']} | {e['pairs']} | {e['exact_match']:.1%} | {e['cpu_exact_match']:.1%} "
                  f"| {e['same_output_as_cpu']:.1%} |" for row, e in emulated]
    return "\n".join(lines) + "\n"


def _missing(report: dict) -> list[str]:
    done = {f"{row['model']} ({row['mode']})" for row in report["rows"]}
    missing = [p for p in report.get("planned", []) if p not in done]
    return [f"Not measured (the run stopped before them): {', '.join(missing)}.", ""] if missing else []


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"fp32": "o", "a16w8-qnn-htp": "s", "w8-ort-cpu": "^"}
    for row in report["rows"]:
        for key in markers:
            if key in row:
                ax.scatter(row[key]["call_ms_p50"], 100 * row[key]["exact_match"], marker=markers[key])
                ax.annotate(f"{row['model']} {row['mode']} {key}", (row[key]["call_ms_p50"], 100 * row[key]["exact_match"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(500, color="grey", linestyle=":", label="500 ms")
    ax.set_xscale("log")
    ax.set_xlabel("time to the whole call, median (ms, this CPU)")
    ax.set_ylabel("exact match on the test split (%)")
    ax.set_title("Settings agent: accuracy against response time")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
