"""What fine-tuning on (request, call) pairs saves when each batch is cut to its own longest pair.

`compress finetune` batches :class:`distill.pairs.Pairs`; until 2026-12-07 every batch kept the width of the
longest pair of the whole set (46 tokens on the settings-agent task), now a batch is cut to its own longest
pair rounded up to a multiple of 8 (``distill.pairs.WIDTH_MULTIPLE``), so compiled layers see a few widths. The
math is the same (padding is neither read nor scored); this measures the time. Both arms train a copy of the
same model with the trainer as `compress finetune` sets it (every weight, batch 8, bf16 where the CPU has it,
compiled layers as "auto" decides) on the same rows in the same order, in alternating blocks within one process
so that neither always runs on a warmer or quieter machine:

- ``set-width``: every batch padded to the set's longest pair (the behaviour before);
- ``own-width``: the default.

Reported: the median seconds of a step (the first steps of each width compile and are outliers the median
ignores; the sum of all steps' seconds is reported too), token positions per step, the first step's loss of
both arms (same weights and rows: equal up to bf16 rounding), and whether torch.compile hit its recompile limit.
Writes ``benchmarks/results/<name>.{md,json}``.

    python -m benchmarks.pair_widths [--model smollm2-135m] [--steps 60] [--blocks 2]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks.plots import machine, provenance
from compress.core.family import family_of, load_model
from compress.io import write_json, write_text
from compress.sources.data import load_pairs, pair_batches
from compress.sources.settings_agent import write_task
from compress.sources.teachers import resolve_teacher
from distill import DistillConfig, Pairs, distill
from distill.speed import cpu_has_bf16

RESULTS = Path(__file__).parent / "results"
ARMS = ("set-width", "own-width")


class SetWidthPairs(Pairs):
    """Pairs whose batches keep the whole set's width: the behaviour before batches were cut."""

    def __getitem__(self, rows: torch.Tensor | slice) -> SetWidthPairs:
        return SetWidthPairs(self.ids[rows], self.cuts[rows], self.lengths[rows], self.pad_id)


class _RecompileLimit(logging.Handler):
    """Remembers whether torch.compile said it hit its recompile limit (it then runs the layer eagerly)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hit = False

    def emit(self, record: logging.LogRecord) -> None:
        self.hit = self.hit or "recompile_limit" in record.getMessage() or "cache_size_limit" in record.getMessage()


def _block(model: torch.nn.Module, pairs: Pairs, config: DistillConfig, student_io: Any) -> dict[str, Any]:
    student = copy.deepcopy(model).train()
    result = distill(student, None, pairs, config, progress=False, student_io=student_io)
    ends = [record["seconds"] for record in result.history]
    seconds = [end - start for start, end in zip([0.0, *ends[:-1]], ends, strict=True)]
    return {"step_seconds": seconds, "positions": result.tokens, "first_loss": result.history[0]["loss"],
            "seconds": result.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a registered teacher or a checkpoint folder")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per block and arm")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-per-setting", type=int, default=80, help="as the settings-agent benchmark's runs")
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="pair_widths")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    watcher = _RecompileLimit()
    logging.getLogger("torch._dynamo").addHandler(watcher)

    from transformers import AutoTokenizer

    folder = Path(args.model) if Path(args.model).exists() else Path(resolve_teacher(args.model))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as task:
        write_task(task, train_per_setting=args.train_per_setting)
        own = pair_batches(load_pairs(str(Path(task) / "train.jsonl")), tokenizer, "train", args.prompt_tokens,
                           args.new_tokens)
    arms = {"own-width": own, "set-width": SetWidthPairs(own.ids, own.cuts, own.lengths, own.pad_id)}
    # What compress finetune sets for every weight (lora rank 0), but a fixed number of steps and no validation.
    config = DistillConfig(tokens=None, steps=args.steps, batch_size=args.batch_size, lr=5e-5, warmup_steps=10,
                           schedule="cosine", kl_weight=0.0, ce_weight=1.0, bf16=cpu_has_bf16(), seed=0)
    student_io = family_of(model.config).student_io
    params = sum(p.numel() for p in model.parameters())
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    started = time.perf_counter()
    for block in range(args.blocks):
        for arm in ARMS if block % 2 == 0 else reversed(ARMS):
            runs[arm].append(_block(model, arms[arm], config, student_io))
            print(f"block {block} {arm}: median step {statistics.median(runs[arm][-1]['step_seconds']):.3f} s, "
                  f"{runs[arm][-1]['positions'] / args.steps:,.0f} positions a step", flush=True)
    summary = {arm: {"median_step_seconds": statistics.median(s for r in runs[arm] for s in r["step_seconds"]),
                     "sum_step_seconds": sum(sum(r["step_seconds"]) for r in runs[arm]),
                     "positions_per_step": statistics.mean(r["positions"] / args.steps for r in runs[arm]),
                     "first_loss": runs[arm][0]["first_loss"]} for arm in ARMS}
    report = {"model": args.model, "params": params, "pairs": len(own),
              "set_width": int(own.shape[1]), "steps": args.steps, "blocks": args.blocks, "batch_size": args.batch_size,
              "bf16": config.bf16, "compiled": config.compile_for("cpu", params, args.steps),
              "recompile_limit_hit": watcher.hit,
              "compiled_graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]), "summary": summary, "runs": runs,
              "speedup": summary["set-width"]["median_step_seconds"] / summary["own-width"]["median_step_seconds"],
              "seconds": time.perf_counter() - started, **provenance(), "date": datetime.now(UTC).strftime("%Y-%m-%d"),
              "machine": machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", report)
    write_text(args.out / f"{args.name}.md", markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        "# Fine-tuning on pairs: batches at their own width against the set's width",
        "",
        f"{report['date']}, {report['machine']}; commit {report['commit']}, `{report['command']}`.",
        f"{report['model']} ({report['params'] / 1e6:.1f}M parameters), every weight trained, on the settings-agent "
        f"task's {report['pairs']:,} training pairs (the set's longest: {report['set_width']} tokens); batch "
        f"{report['batch_size']}, bf16 {report['bf16']}, compiled layers {report['compiled']}; {report['blocks']} "
        f"alternating blocks of {report['steps']} steps per arm, the same rows in the same order.",
        "",
        "| arm | median step (s) | all steps (s) | token positions a step | first step's loss |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        lines.append(f"| {arm} | {s[arm]['median_step_seconds']:.3f} | {s[arm]['sum_step_seconds']:.0f} | "
                     f"{s[arm]['positions_per_step']:,.0f} | {s[arm]['first_loss']:.4f} |")
    lines += ["", f"Median step {report['speedup']:.2f}x faster at the batches' own width. torch.compile hit its "
              f"recompile limit: {'yes' if report['recompile_limit_hit'] else 'no'} ({report['compiled_graphs']} graphs "
              "compiled in all)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
