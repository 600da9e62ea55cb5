"""Mu's own job: which student, at which precision, turns settings requests into calls, and how fast does it answer?

From one teacher, at one parameter budget and one distillation budget, the Minitron-like, MobileLLM-like and
Mu-like students (each built and distilled by the pipeline, ``compress.run(..., stop_after="distill")``, one run
folder per family, reused when present) and the teacher itself are fine-tuned on the settings-agent task's
training split (``compress finetune``: LoRA, and every weight; a stopped run resumes both the distillation and the
fine-tuning from their checkpoints when rerun with the same arguments), then answer the test split, whose phrasings, some
words and some values never occur in training (:mod:`compress.sources.settings_agent`):

- in fp32, from the fine-tuned checkpoint;
- as their shipped integer graphs: A16W8 for the ``qnn-htp`` profile (prefill + decode, or encoder + decoder, for a
  ``--prompt-tokens`` request and ``--new-tokens`` of answer, calibrated on training pairs), and for decoder-only
  models the ``ort-cpu`` profile's int8 weight-only graphs, through the host loop an app runs.

Each is scored by :func:`compress.evaluation.calls.evaluate_calls`: exact match, setting accuracy, invalid outputs
and response time on this CPU (request to first token and to the whole call, median and 90th percentile).

    python -m benchmarks.settings_agent [--families minitron,mobilellm,mu] [--modes lora,full] [--test-pairs 200]

Writes ``benchmarks/results/<--name>.{json,md,png}`` (default ``settings_agent``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.plots import machine, provenance
from compress.app.finetune import FinetuneConfig, data_digest, finetune
from compress.app.htp_calls import emulated_calls
from compress.app.pipeline import run
from compress.core.family import family_of, load_model
from compress.evaluation.call_grammar import CallGrammar
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
from compress.sources.settings_agent import KINDS, TAGS, TRAIN_PER_SETTING, write_task
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
    """``source`` fine-tuned in ``mode``; an earlier fine-tuning is reused only if it had the same settings and the
    same training pairs, and is newer than every file of ``source`` (a student distilled again since is fine-tuned
    again)."""
    out = args.runs / f"{name}-{mode}"
    done = out / "finetune.json"
    config = FinetuneConfig(student=str(source), data=str(task / "train.jsonl"), out=str(out), lora_rank=MODES[mode],
                            epochs=args.epochs, lr=args.lr, max_input_tokens=args.prompt_tokens,
                            max_output_tokens=args.new_tokens, bf16=args.bf16)
    earlier = read_json(done) if done.exists() else {}
    if (earlier.get("config") == config.to_dict() and earlier.get("data_sha256") == data_digest(Path(config.data))
            and done.stat().st_mtime > max(f.stat().st_mtime for f in source.iterdir())):
        return out
    finetune(config, progress=False)
    return out


def _distillation(run: Path, name: str) -> dict[str, Any]:
    """A student's distillation as its run recorded it (tokens, time, perplexities after it); nothing for the
    teacher."""
    if name == "teacher" or not (run / "distill.metrics.json").exists():
        return {}
    d = read_json(run / "distill.metrics.json")
    return {"distillation": {"tokens": d["tokens"], "seconds": d["seconds"], "resumed_from_step": d.get("resumed_from_step", 0),
                             "perplexity": {k: v["perplexity"] for k, v in d.get("evals", {}).items()},
                             "validation_tokens": d.get("validation_tokens")}}


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
    grammar = CallGrammar.from_catalog(task / "catalog.json", tokenizer)
    common = {"max_new_tokens": args.new_tokens, "max_input_tokens": args.prompt_tokens}

    def answers(decoder: Any) -> tuple[dict[str, Any], Any]:
        """Free greedy answers, and answers constrained to the catalog's calls (the shipped ones)."""
        free = evaluate_calls(decoder, tokenizer, pairs[: args.test_pairs], known, **common)
        constrained = evaluate_calls(decoder, tokenizer, pairs[: args.test_pairs], known, grammar=grammar, **common)
        print(f"  exact {free.exact_match:.3f}, constrained {constrained.exact_match:.3f}, "
              f"call {constrained.call_ms_p50:.0f} ms", flush=True)
        return {**free.to_dict(), "constrained": constrained.to_dict()}, constrained

    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    out["fp32"], checkpoint = answers(CheckpointDecoder(family, model, eos))
    # What the shipped (constrained) model gets wrong, for reading where a family fails, not only how often.
    out["fp32"]["constrained"]["misses"] = [{k: row[k] for k in ("input", "expected", "output", "tags") if k in row}
                                            for row in checkpoint.answers if not row["exact"]]
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
        print(f"  {recipe} ({profile}) graphs:", flush=True)
        result, constrained = answers(GraphDecoder(family, first, step, model.config, eos))
        size = sum(graphs[k]["quantized"].stat().st_size for k in graphs) / 1e6
        out[f"{recipe}-{profile}"] = {**result, "mb": size, "graph_seconds": seconds}
        if profile == "qnn-htp" and args.htp_pairs and qnn.unavailable() is None:
            out[f"{recipe}-{profile}"]["htp_emulated"] = _emulated(first, step, model_dir, task, constrained, args)
    return out


def _emulated(first: Path, step: Path, model_dir: Path, task: Path, cpu: Any, args: argparse.Namespace) -> dict:
    """The first ``--htp-pairs`` test pairs answered by the graphs on the HTP emulator, next to ONNX Runtime CPU's
    answers from the same graphs (both constrained to the catalog's calls)."""
    started = time.perf_counter()
    emulated = emulated_calls(first, step, model_dir, task / "test.jsonl", args.htp_pairs, args.new_tokens,
                              args.prompt_tokens, catalog=task / "catalog.json")
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
    parser.add_argument("--train-per-setting", type=int, default=TRAIN_PER_SETTING, help="training requests drawn per setting "
                        "(compress task --train-per-setting; the test split is the same whatever it is)")
    parser.add_argument("--lr", type=float, help="fine-tuning learning rate (default: compress finetune's, 1e-3 for "
                        "LoRA, 5e-5 for every weight)")
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
    parser.add_argument("--name", default="settings_agent", help="results file stem (default settings_agent)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    started = time.perf_counter()
    task = args.runs / "task"
    counts = write_task(task, train_per_setting=args.train_per_setting)
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
            rows.append({"model": name, "mode": mode, **_distillation(args.runs / name, name),
                         "finetune_seconds": tuning["seconds"],
                         "finetune_resumed_from_step": tuning.get("resumed_from_step", 0),
                         "trainable_params": tuning["trainable_params"], **_measure(tuned, task, args)})
            report = {"teacher": args.teacher, "target_size": args.target_size, "distill_tokens": args.distill_tokens,
                      "task": counts, "test_pairs": min(args.test_pairs, counts["test"]),
                      "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "epochs": args.epochs,
                      "train_per_setting": args.train_per_setting,
                      "planned": [f"{n} ({m})" for n in names for m in modes], "rows": rows, **provenance(),
                      "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                      "machine": machine(),
                      "seconds": time.perf_counter() - started}
            args.out.mkdir(parents=True, exist_ok=True)
            write_text(args.out / f"{args.name}.json", json.dumps(report, indent=2) + "\n")
            write_text(args.out / f"{args.name}.md", markdown(report))
            _plot(report, args.out / f"{args.name}.png")
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
        *(["Free: greedy decoding as is. Constrained: greedy decoding of only the calls the catalog allows (its "
           "setting ids, each with a value of its type; `compress eval --constrain`), what an app that knows its "
           "settings ships; times are the constrained answers'.", ""]
          if any("constrained" in row.get("fp32", {}) for row in report["rows"]) else []),
        "| model | fine-tuning | params | answered by | exact match, free | exact match, constrained | setting right, "
        "constrained | invalid, free | first token (ms, p50) | call (ms, p50 / p90) | MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        for key, label in _PRECISIONS:
            if key not in row:
                continue
            free = row[key]
            r = free.get("constrained", free)  # rows measured before constrained decoding existed: free only
            constrained = f"{r['exact_match']:.1%}" if "constrained" in free else "–"
            right = f"{r['setting_accuracy']:.1%}" if "constrained" in free else f"({free['setting_accuracy']:.1%} free)"
            mb = f"{free['mb']:.0f}" if "mb" in free else "–"
            lines.append(f"| {row['model']} | {row['mode']} | {row['params'] / 1e6:.0f}M | {label} | "
                         f"{free['exact_match']:.1%} | {constrained} | {right} | {free['invalid_rate']:.1%} | "
                         f"{r['first_token_ms_p50']:.0f} | {r['call_ms_p50']:.0f} / {r['call_ms_p90']:.0f} | {mb} |")
    emulated = [(row, row[k]["htp_emulated"]) for row in report["rows"] for k, _ in _PRECISIONS
                if "htp_emulated" in row.get(k, {})]
    if emulated:
        lines += ["", "The A16W8 graphs compiled for Qualcomm's HTP and run on its emulator (the NPU's integer arithmetic), "
                  "on the first test pairs, next to ONNX Runtime CPU's answers from the same graphs (constrained):", "",
                  "| model | fine-tuning | pairs | exact match, emulator | exact match, CPU (same pairs) "
                  "| same output as CPU |", "|---|---|---|---|---|---|"]
        lines += [f"| {row['model']} | {row['mode']} | {e['pairs']} | {e['exact_match']:.1%} | {e['cpu_exact_match']:.1%} "
                  f"| {e['same_output_as_cpu']:.1%} |" for row, e in emulated]
    # One line per student: its LoRA and full rows share the distillation.
    distilled = list({row["model"]: (row, row["distillation"]) for row in report["rows"] if "distillation" in row}.values())
    if distilled:
        lines += ["", "The students' distillation, as their run folders recorded it (perplexity after it, "
                  f"{distilled[0][1]['validation_tokens'] or 0:,} tokens of each set):", "",
                  "| model | tokens | minutes | " + " | ".join(f"{k} perplexity" for k in distilled[0][1]["perplexity"])
                  + " |", "|---|---|---|" + "---|" * len(distilled[0][1]["perplexity"])]
        lines += [f"| {row['model']} | {d['tokens']:,} | {d['seconds'] / 60:.0f} | "
                  + " | ".join(f"{v:.1f}" for v in d["perplexity"].values()) + " |"
                  for row, d in distilled]
    return "\n".join(lines + _by_kind(report) + _misses(report)) + "\n"


def _by_kind(report: dict) -> list[str]:
    """Constrained exact match of each fp32 checkpoint by kind of request (the test rows' tags), where measured."""
    scored = [(row, row["fp32"]["constrained"]["by_tag"]) for row in report["rows"]
              if row.get("fp32", {}).get("constrained", {}).get("by_tag")]
    if not scored:
        return []
    tags = [t for t in (*KINDS, *TAGS) if any(t in by_tag for _, by_tag in scored)]
    lines = ["", "Exact match (constrained, fp32 checkpoint) by kind of request: the setting's kind, then requests "
             "whose only novelty is the test split's phrasing (template and opening), and those that name a setting by "
             "the word training never used for it, ask for an enum option training never paired with it, change a "
             "range relatively, carry a typo, or state an indirect need (pairs in brackets):", "",
             "| model | fine-tuning | " + " | ".join(tags) + " |", "|---|---|" + "---|" * len(tags)]
    for row, by_tag in scored:
        cells = [f"{by_tag[t]['exact_match']:.0%} ({by_tag[t]['pairs']})" if t in by_tag else "–" for t in tags]
        lines.append(f"| {row['model']} | {row['mode']} | " + " | ".join(cells) + " |")
    return lines


def _misses(report: dict, shown: int = 8) -> list[str]:
    """The first requests each fp32 checkpoint answered wrong (constrained), where recorded."""
    lines = []
    for row in report["rows"]:
        misses = row.get("fp32", {}).get("constrained", {}).get("misses")
        if not misses:
            continue
        lines += ["", f"{row['model']} ({row['mode']}), fp32 checkpoint, constrained: the first {min(shown, len(misses))} "
                  f"of its {len(misses)} wrong answers (all are in the JSON):", "",
                  "| request | expected | answered | kind |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in (
                      m["input"], f"`{json.dumps(m['expected'])}`", f"`{m['output']}`", ", ".join(m.get("tags", [])))) + " |"
                  for m in misses[:shown]]
    return lines


def _missing(report: dict) -> list[str]:
    done = {f"{row['model']} ({row['mode']})" for row in report["rows"]}
    missing = [p for p in report.get("planned", []) if p not in done]
    return [f"Not measured (the run stopped before them): {', '.join(missing)}.", ""] if missing else []


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"fp32": "o", "a16w8-qnn-htp": "s", "w8-ort-cpu": "^"}
    for row in report["rows"]:
        for key in markers:
            if key in row:
                r = row[key].get("constrained", row[key])
                ax.scatter(r["call_ms_p50"], 100 * r["exact_match"], marker=markers[key])
                ax.annotate(f"{row['model']} {row['mode']} {key}", (r["call_ms_p50"], 100 * r["exact_match"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(500, color="grey", linestyle=":", label="500 ms")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.margins(x=0.2, y=0.1)  # room for the point labels
    ax.set_xlabel("time to the whole call, median (ms, this CPU)")
    ax.set_ylabel("exact match on the test split\n(%, constrained where measured)")
    ax.set_title("Settings agent: accuracy against response time")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
