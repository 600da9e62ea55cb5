"""How far does int8 (int4) weight rounding move the model, how much does that vary, and what do MSE ranges and GPTQ buy?

Weight-only fake quantization in PyTorch of the model the integer graphs are made from (rotated with each
``--seeds`` rotation, per-row embedding scales): every block linear's weight rounded to symmetric int8 (with
``--bits 4``, int4) per output channel, as the profiles quantize them:

  minmax         nearest step, range r = max|w| (ORT's MinMax)
  mse            nearest step, r from :func:`quant.weight_ranges.mse_range`
  uniform shrink nearest step, r = max|w| times the mean ratio the MSE search chose (a control: the same
                 narrowing, not searched)
  random shrink  nearest step, r = max|w| times a random factor per channel with the same mean (a control)
  gptq           :func:`compress.deploy.gptq.gptq_` on MinMax ranges (the recipes' default), Hessians from
                 ``--calib-seqs`` calibration sequences
  gptq mse       the same on MSE ranges
  + int8 table   gptq, and the (tied) embedding table rounded per row to int8 (what the graphs store)
  + int4 table   gptq, and the table rounded per row to int4 (w4a16's table)

Activations stay float, and the table too except in the last two arms, so the numbers isolate weight rounding. Measured against the
float model on the validation split: perplexity, mean per-token KL(float ‖ rounded) and top-1 agreement.
The controls tell an effect of a method from the effect of any small change of the rounding grid: the
perplexity of a weak model moves by about a percent either way under such changes, so its sign is
rounding luck; the KL is not.
Writes ``benchmarks/results/weight_ranges_<name>[_int4].{md,json}``.

    python -m benchmarks.weight_ranges [--model smollm2-135m] [--seeds 0,1,2,3] [--bits 8|4]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from benchmarks.plots import machine, provenance
from compress.deploy.export import LINEARS, StaticLM
from compress.deploy.gptq import gptq_, gptq_table_, weight_matrix
from compress.deploy.outliers import normalize_embedding, rotate
from compress.io import write_json, write_text
from compress.sources.data import load_corpus, token_batches
from compress.sources.teachers import load_teacher
from quant.gptq import levels
from quant.weight_ranges import mse_range

RESULTS = Path(__file__).parent / "results"
ARMS = ("minmax", "mse", "uniform shrink", "random shrink", "gptq", "gptq mse", "+ int8 table", "+ int4 table")
# At 4 bits: no shrink controls; LPBQ blocks (compress.deploy.gptq, block_scales); the table also GPTQ-rounded as the head.
ARMS_4 = ("minmax", "mse", "gptq", "gptq mse", "gptq blocks of 64", "gptq blocks of 32", "+ int8 table", "+ int4 table",
          "+ int4 table, gptq as head")
GPTQ_ARMS = {"gptq": {"weight_range": "minmax"}, "gptq mse": {"weight_range": "mse"},
             "gptq blocks of 64": {"block_size": 64}, "gptq blocks of 32": {"block_size": 32}}
# On top of the gptq arm (int8), of blocks of 64 (int4): the table's width (the last arm's table GPTQ-rounded).
TABLE_ARMS = {"+ int8 table": 8, "+ int4 table": 4, "+ int4 table, gptq as head": 4}


def arms(bits: int) -> tuple[str, ...]:
    return ARMS_4 if bits == 4 else ARMS


def log_probs(lm: StaticLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Next-token log-probabilities of ``lm``'s prefill for each row of ``ids`` (float32, [L - 1, V])."""
    with torch.no_grad():
        return [torch.log_softmax(lm.prefill(row[None])[0][0, :-1].double(), -1).float() for row in ids]


def compare(lm: StaticLM, ids: torch.Tensor, reference: list[torch.Tensor]) -> dict:
    """Perplexity of ``lm`` on ``ids``, and its mean KL from and top-1 agreement with the ``reference`` log-probs."""
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for row, ref, mine in zip(ids, reference, log_probs(lm, ids), strict=True):
        nll -= mine.gather(1, row[1:, None]).double().sum().item()
        kl += (ref.exp() * (ref - mine)).double().sum().item()
        agree += int((ref.argmax(-1) == mine.argmax(-1)).sum())
        count += len(row) - 1
    return {"perplexity": math.exp(nll / count), "kl": kl / count, "agreement": agree / count}


def rounded(weight: np.ndarray, limit: np.ndarray, top: int = 127) -> np.ndarray:
    """``weight`` [out, in] rounded to steps of limit / ``top`` per output channel (127: int8), back in float."""
    step = (limit / top)[:, None]
    return (np.clip(np.round(weight / step), -top, top) * step).astype(np.float32)


def measure_seed(model, ids: torch.Tensor, calib: torch.Tensor, seq_len: int, seed: int,  # noqa: ANN001
                 bits: int = 8) -> dict:
    top = levels(bits)
    lm = StaticLM(model, seq_len).eval()
    rotate(lm, seed)
    normalize_embedding(lm)
    linears = [getattr(block, name) for block in lm.unique_blocks for name in LINEARS]
    originals = [linear.weight.detach().numpy().copy() for linear in linears]
    rounded_by_gptq, gptq_seconds = {}, 0.0
    for arm, options in GPTQ_ARMS.items():
        if arm not in arms(bits):
            continue
        with torch.no_grad():
            for linear, weight in zip(linears, originals, strict=True):
                linear.weight.copy_(torch.from_numpy(weight))
        started = time.perf_counter()
        gptq_(lm, calib, bits=bits, **options)
        gptq_seconds = time.perf_counter() - started
        rounded_by_gptq[arm] = [weight_matrix(linear).detach().numpy().copy() for linear in linears]
    peaks = [np.abs(w).max(1) for w in originals]
    searched = [mse_range(w, 0, top) for w in originals]
    ratio = float(np.concatenate([s / np.where(p > 0, p, 1) for s, p in zip(searched, peaks, strict=True)]).mean())
    rng = np.random.default_rng(seed)
    limits = {
        "minmax": peaks,
        "mse": searched,
        "uniform shrink": [p * ratio for p in peaks],
        "random shrink": [p * rng.uniform(1 - 2 * (1 - ratio), 1, p.shape) for p in peaks],
    }
    with torch.no_grad():
        for linear, weight in zip(linears, originals, strict=True):
            linear.weight.copy_(torch.from_numpy(weight))
    table = lm.embed.detach().clone()  # rows of max |value| 1 (normalize_embedding)
    tables = {}
    if "+ int4 table, gptq as head" in arms(bits):
        tables["+ int4 table, gptq as head"] = gptq_table_(lm, calib, 4).embed.detach().clone()
        with torch.no_grad():
            lm.embed.copy_(table)
    reference = log_probs(lm, ids)
    result = {"seed": seed, "float": compare(lm, ids, reference)["perplexity"], "mean_range_ratio": ratio,
              "gptq_seconds": gptq_seconds}
    errors = {}
    table_base = "gptq blocks of 64" if bits == 4 else "gptq"
    for arm in arms(bits):
        total = 0.0
        with torch.no_grad():
            for i, (linear, weight) in enumerate(zip(linears, originals, strict=True)):
                if arm in GPTQ_ARMS or arm in TABLE_ARMS:
                    q = rounded_by_gptq.get(arm, rounded_by_gptq[table_base])[i]
                else:
                    q = rounded(weight, limits[arm][i], top)
                total += float(np.square(q - weight).sum())
                linear.weight.copy_(torch.from_numpy(q))
            if arm in tables:
                lm.embed.copy_(tables[arm])
            elif arm in TABLE_ARMS:  # per row: the rows already have max |value| 1
                table_top = levels(TABLE_ARMS[arm])
                lm.embed.copy_(torch.clamp(torch.round(table * table_top), -table_top, table_top) / table_top)
            else:
                lm.embed.copy_(table)
        result[arm] = compare(lm, ids, reference)
        errors[arm] = total
        r = result[arm]
        print(f"seed {seed} {arm}: perplexity {r['perplexity']:.2f} ({r['perplexity'] / result['float'] - 1:+.2%} vs "
              f"float {result['float']:.2f}), KL {r['kl']:.5f}, agreement {r['agreement']:.4f}", flush=True)
    result["rounding_error_vs_minmax"] = {arm: errors[arm] / errors["minmax"] for arm in arms(bits)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="teacher alias or Hugging Face checkpoint directory")
    parser.add_argument("--name", default=None, help="results suffix (default: the alias, else 'student')")
    parser.add_argument("--seeds", default="0,1,2,3", help="rotation seeds")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-seqs", type=int, default=16)
    parser.add_argument("--calib-seqs", type=int, default=8, help="calibration sequences for GPTQ's Hessians")
    parser.add_argument("--bits", type=int, choices=(8, 4), default=8, help="block weights' integer width")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    model, tokenizer = load_teacher(args.model)
    model.eval()
    dataset = load_corpus(None)
    ids = token_batches(dataset, tokenizer, "validation", args.seq_len, args.eval_seqs)
    calib = token_batches(dataset, tokenizer, "calibration", args.seq_len, args.calib_seqs)
    seeds = [measure_seed(model, ids, calib, args.seq_len, int(s), args.bits) for s in args.seeds.split(",")]
    costs = {arm: [r[arm]["perplexity"] / r["float"] - 1 for r in seeds] for arm in arms(args.bits)}
    report = {
        "model": args.model, "seq_len": args.seq_len, "validation_tokens": int(ids.shape[0] * (ids.shape[1] - 1)),
        **provenance(), "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
        "data": f"the {dataset.name} corpus (validation split)", "seeds": seeds,
        "calibration_sequences": int(calib.shape[0]), "bits": args.bits,
        "summary": {arm: {"mean_cost": statistics.mean(c), "sd_cost": statistics.stdev(c) if len(c) > 1 else 0.0,
                          "mean_abs_cost": statistics.mean(abs(x) for x in c),
                          "mean_kl": statistics.mean(r[arm]["kl"] for r in seeds),
                          "mean_agreement": statistics.mean(r[arm]["agreement"] for r in seeds),
                          "mean_rounding_error_vs_minmax": statistics.mean(
                              r["rounding_error_vs_minmax"][arm] for r in seeds)} for arm, c in costs.items()},
        "seconds": time.perf_counter() - started,
    }
    name = args.name or (args.model if not Path(args.model).exists() else "student")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"weight_ranges_{name}" + ("_int4" if args.bits == 4 else "")
    write_json(args.out / f"{stem}.json", report)
    write_text(args.out / f"{stem}.md", markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    bits = report.get("bits", 8)
    columns = arms(bits)
    lines = [f"# Int{bits} weight rounding: {report['model']}", "",
             f"Weight-only fake quantization (block linears, int{bits} symmetric per output channel; activations float, "
             f"the embedding table too except in the '+ table' arms, which round it per row) of the rotated model, for {len(report['seeds'])} rotation seeds; perplexity, mean "
             f"per-token KL(float ‖ rounded) and top-1 agreement with the float model on {report['validation_tokens']:,} "
             f"validation tokens of {report['data']}; GPTQ's Hessians from {report['calibration_sequences']} "
             f"calibration sequences. Measured {report['date']} on {report['machine']}, commit "
             f"`{report['commit'][:7]}`, `{report['command']}`.", "",
             "| seed | float perplexity | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for r in report["seeds"]:
        cells = " | ".join(f"{r[arm]['perplexity']:.2f} ({r[arm]['perplexity'] / r['float'] - 1:+.2%}), "
                           f"KL {r[arm]['kl']:.4f}" for arm in columns)
        lines.append(f"| {r['seed']} | {r['float']:.2f} | {cells} |")
    s = report["summary"]
    lines += ["", "| over the seeds | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns),
              "| perplexity cost, mean ± sd | " + " | ".join(
                  f"{s[a]['mean_cost']:+.2%} ± {s[a]['sd_cost']:.2%}" for a in columns) + " |",
              "| mean \\|cost\\| | " + " | ".join(f"{s[a]['mean_abs_cost']:.2%}" for a in columns) + " |",
              "| mean KL(float ‖ rounded) | " + " | ".join(f"{s[a]['mean_kl']:.5f}" for a in columns) + " |",
              "| mean top-1 agreement | " + " | ".join(f"{s[a]['mean_agreement']:.4f}" for a in columns) + " |",
              "| weight rounding error (sum of squares) vs minmax | " + " | ".join(
                  f"{s[a]['mean_rounding_error_vs_minmax']:.3f}" for a in columns) + " |",
              "", "Mean range / max|w| chosen by the MSE search: "
              + ", ".join(f"{r['mean_range_ratio']:.4f}" for r in report["seeds"])
              + f". GPTQ took {statistics.mean(r['gptq_seconds'] for r in report['seeds']):.0f} s per model.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
