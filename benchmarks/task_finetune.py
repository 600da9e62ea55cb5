"""Task fine-tuning of distilled students on real (input, output) pairs, with LoRA.

The task comes from the default corpus (Debian's Python 3.11 documentation sources): each ``.. function::``,
``.. method::``, ``.. class::`` or ``.. exception::`` entry of the library reference becomes a pair,
input ``Describe the Python function os.path.join(path, *paths).``, output the entry's first paragraph
(reST markup kept). Pairs from documents of the corpus's validation and calibration splits are held out
(``split`` column), so no held-out description was seen in distillation or fine-tuning.

Each student (default: the three students of ``benchmarks.student_shapes``) is
fine-tuned by :func:`compress.app.finetune.finetune`, as ``compress finetune`` does it (a finished fine-tuning
with the same settings in ``--work`` is reused; delete it to redo it), and scored before and
after on the held-out outputs (teacher-forced perplexity and top-1 token accuracy); the teacher is scored
on the same pairs as a causal model reading input then output. Writes
``benchmarks/results/task_finetune.{json,md}``.

    python -m benchmarks.task_finetune [--students runs/student-shapes/minitron/student,...] [--train-pairs 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.plots import machine, provenance
from compress.app.finetune import FinetuneConfig, finetune
from compress.evaluation.quality import pair_quality
from compress.io import write_json, write_text
from compress.sources.corpora import fetch_source
from compress.sources.data import document_split, load_pairs, pair_batches
from compress.sources.teachers import load_teacher

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent
_ENTRY = re.compile(r"^\.\. (function|method|class|exception):: ([^\n]+)\n(?:[ \t]*\n)*((?:   [^\n]*\n)+)", re.M)
_MODULE = re.compile(r"^\.\. (?:module|currentmodule):: (\S+)", re.M)


def python_doc_pairs(limit_words: int = 60) -> list[dict[str, str]]:
    """The task's pairs from the default corpus's Python documentation, each with the split of its document."""
    pairs = []
    with open(fetch_source("python-docs")) as handle:
        for line in handle:
            document = json.loads(line)
            if not document["id"].startswith("python3.11-doc/library/"):
                continue
            text = document["text"]
            held_out = document_split(text) != "train"  # distillation trains on the train split only
            module = _MODULE.search(text)
            for match in _ENTRY.finditer(text):
                kind, signature = match.group(1), match.group(2).strip()
                paragraph = match.group(3).split("\n\n")[0]
                if paragraph.lstrip().startswith((":", "..")):  # an option list or a directive, not prose
                    continue
                words = " ".join(paragraph.split()).split(" ")
                described = " ".join(words[:limit_words])
                if len(words) < 4:
                    continue
                name = signature if module is None or "." in signature.split("(")[0] else f"{module.group(1)}.{signature}"
                pairs.append({"input": f"Describe the Python {kind} {name}.", "output": described,
                              "split": "validation" if held_out else "train"})
    return pairs


def _write_pairs(path: Path, train_pairs: int, validation_pairs: int) -> dict[str, int]:
    pairs = python_doc_pairs()
    train = [p for p in pairs if p["split"] == "train"]
    valid = [p for p in pairs if p["split"] == "validation"]
    # A deterministic subset of each split (by a hash of the pair), so reruns train on the same pairs.
    def order(pair: dict[str, str]) -> str:
        return hashlib.sha256((pair["input"] + pair["output"]).encode()).hexdigest()

    train = sorted(train, key=order)[:train_pairs]
    valid = sorted(valid, key=order)[:validation_pairs]
    write_text(path, "".join(json.dumps(p) + "\n" for p in train + valid))
    return {"available": len(pairs), "train": len(train), "validation": len(valid)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", default=",".join(f"runs/student-shapes/{f}/student" for f in ("minitron", "mobilellm", "mu")))
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--train-pairs", type=int, default=1024)
    parser.add_argument("--validation-pairs", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-input-tokens", type=int, default=48)
    parser.add_argument("--max-output-tokens", type=int, default=96)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "task-finetune")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    started = time.perf_counter()
    data = args.work / "python-doc-pairs.jsonl"
    counts = _write_pairs(data, args.train_pairs, args.validation_pairs)
    print(f"pairs: {counts['available']:,} in the corpus; {counts['train']:,} for training, {counts['validation']:,} "
          "held out", flush=True)

    teacher, tokenizer = load_teacher(args.teacher)
    valid = pair_batches(load_pairs(str(data)), tokenizer, "validation", args.max_input_tokens, args.max_output_tokens)
    teacher_quality = pair_quality(teacher, valid).to_dict()
    del teacher
    print(f"teacher on the held-out outputs: perplexity {teacher_quality['perplexity']:.2f}, "
          f"accuracy {teacher_quality['accuracy']:.3f}", flush=True)

    runs = {}
    for student in args.students.split(","):
        name = Path(student).parent.name
        config = FinetuneConfig(student=student, data=str(data), out=str(args.work / name), lora_rank=args.lora_rank,
                                epochs=args.epochs, lr=args.lr, max_input_tokens=args.max_input_tokens,
                                max_output_tokens=args.max_output_tokens)
        finished = Path(config.out) / "finetune.json"
        if finished.exists() and json.loads(finished.read_text())["config"] == config.to_dict():
            metrics = json.loads(finished.read_text())  # a finished fine-tuning with these settings: reused
            print(f"{name}: reusing {finished}", flush=True)
        else:
            metrics = finetune(config, progress=False)
        runs[name] = {key: metrics[key] for key in ("before", "after", "steps", "seconds", "params", "trainable_params",
                                                    "lora_layers", "train_pairs", "validation_pairs", "train_output_tokens")}
        runs[name]["student"] = student
        runs[name]["lr"] = config.learning_rate
        print(f"{name}: held-out output perplexity {metrics['before']['perplexity']:,.2f} -> "
              f"{metrics['after']['perplexity']:,.2f}, accuracy {metrics['before']['accuracy']:.3f} -> "
              f"{metrics['after']['accuracy']:.3f} ({metrics['steps']} steps, {metrics['seconds']:.0f} s)", flush=True)

    report = {"task": "Python library reference: signature -> first paragraph", "pairs": counts,
              "teacher": args.teacher, "teacher_quality": teacher_quality, "epochs": args.epochs,
              "lora_rank": args.lora_rank, "max_input_tokens": args.max_input_tokens,
              "max_output_tokens": args.max_output_tokens, "runs": runs, "seconds": time.perf_counter() - started,
              **provenance(), "date": datetime.now(UTC).strftime("%Y-%m-%d"),
              "machine": machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "task_finetune.json", report)
    write_text(args.out / "task_finetune.md", markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    t, pairs = report["teacher_quality"], report["pairs"]
    lines = [
        "# Task fine-tuning with LoRA: Python reference descriptions",
        "",
        f"{report['date']}, {report['machine']}. Task: {report['task']} (pairs built from the default corpus's Python "
        f"documentation: {pairs['available']:,} entries; {pairs['train']:,} training pairs from documents of the "
        f"corpus's train split, {pairs['validation']:,} held-out pairs from documents outside that split, never trained on). "
        f"LoRA rank {report['lora_rank']} on every linear layer but the head, {report['epochs']:g} epoch(s), "
        f"cross-entropy on the output tokens; inputs cut to {report['max_input_tokens']} tokens, outputs to "
        f"{report['max_output_tokens']}. Scored teacher-forced on the {t['tokens']:,} held-out output tokens.",
        "",
        "| model | trained parameters | steps | seconds | output perplexity before | after | token accuracy before | after |",
        "|---|---|---|---|---|---|---|---|",
        f"| teacher {report['teacher']} (not fine-tuned) | – | – | – | {t['perplexity']:,.2f} | – | {t['accuracy']:.3f} | – |",
    ]
    for name, run in report["runs"].items():
        b, a = run["before"], run["after"]
        lines.append(f"| {name} student ({run['params'] / 1e6:.1f}M) | {run['trainable_params']:,} "
                     f"({run['trainable_params'] / run['params']:.1%}) | {run['steps']} | {run['seconds']:.0f} | "
                     f"{b['perplexity']:,.2f} | **{a['perplexity']:,.2f}** | {b['accuracy']:.3f} | {a['accuracy']:.3f} |")
    lines += [f"- {note}" for note in report.get("notes", [])]  # observations added by whoever ran it
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
