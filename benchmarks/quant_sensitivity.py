"""Where does an integer graph lose its accuracy? One shipped recipe, then one group of tensors at a time made wider.

For one model (a teacher alias, or a student's checkpoint directory such as a run's ``student/``), the prefill
graph the ``compress`` quantize stage writes for ``--quant a16w8 --npu-profile qnn-htp`` (the same float rewrites,
GPTQ rounding and calibration), then variants that each keep one weight group in int16 (``embedding``,
``attention-weights``, ``mlp-weights``; see :mod:`compress.deploy.groups`), round weights to nearest instead of
GPTQ, or calibrate activations differently. Every row is scored on the same in-domain validation sequences and
general-English sequences as the fp32 graph, so the rows' gaps compare within one run.

A row with every weight in int16 leaves only the activations' error; the difference between it and the shipped
recipe is the weights' share.

    python -m benchmarks.quant_sensitivity --model runs/main_command_gemma3-270m-calib32/student --name gemma3-student

Writes ``benchmarks/results/quant_sensitivity_<name>.{md,json}``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from benchmarks.plots import evaluation_sets, load_model, machine, model_parser, provenance, write_results
from compress.core.config import DEFAULT_TRANSFORMS
from compress.deploy.gptq import block_op, gptq_
from compress.deploy.groups import quantize_graph
from compress.deploy.quantization import export_graphs, prepare
from compress.sources.data import load_corpus, token_batches
from quant import runtime
from quant.profiles import get_profile
from quant.quantize import MIXES, PRESETS

PRESET = PRESETS["a16w8"]
NEAREST = dataclasses.replace(PRESET, weight_rounding="nearest")
ALL_WEIGHTS = (*MIXES, "embedding", "attention-weights", "mlp-weights")
NO_ROTATION = ("embed-rows",)
# (label, recipe[, float rewrites]): a recipe with weight_rounding "gptq" is quantized from the GPTQ-rounded graph,
# else from the float one (int16 weights then hold the float weights, not an 8-bit grid). Rewrites default to the
# a16w8 ones compress applies (rotation and per-row embedding scales).
ROWS = [
    ("the a16w8 preset without rotation (what compress shipped for Gemma3 before)", PRESET, NO_ROTATION),
    ("the a16w8 preset (what compress ships): int8 GPTQ weights, int16 activations", PRESET),
    ("+ embedding / head table in int16", dataclasses.replace(PRESET, sixteen_bit_weights=(*MIXES, "embedding"))),
    ("nearest rounding instead of GPTQ", NEAREST),
    ("nearest; attention weights (q k v o) in int16",
     dataclasses.replace(NEAREST, sixteen_bit_weights=(*MIXES, "attention-weights"))),
    ("nearest; MLP weights (gate up down) in int16",
     dataclasses.replace(NEAREST, sixteen_bit_weights=(*MIXES, "mlp-weights"))),
    ("every weight in int16: the activations' error alone", dataclasses.replace(NEAREST, sixteen_bit_weights=ALL_WEIGHTS)),
    ("every weight in int16, percentile (99.999) activation ranges",
     dataclasses.replace(NEAREST, sixteen_bit_weights=ALL_WEIGHTS, calibration="percentile")),
]


def main() -> None:
    parser = model_parser(__doc__, "quant_sensitivity", eval_seqs=32)
    parser.add_argument("--rows", default="all", help="'all' or comma-separated row numbers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    started = time.perf_counter()
    model, tokenizer = load_model(parser, args.model)
    sets = {name: ids.numpy() for name, ids in evaluation_sets(tokenizer, args.seq_len, args.eval_seqs).items()}
    calib = token_batches(load_corpus(None), tokenizer, "calibration", args.seq_len, args.calib_seqs)
    report: dict = {
        "model": args.model, "seq_len": args.seq_len, "calibration_sequences": int(calib.shape[0]),
        "tokens": {name: int(ids.shape[0] * (ids.shape[1] - 1)) for name, ids in sets.items()},
        **provenance(), "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
        "profile": "qnn-htp",
    }
    wanted = range(len(ROWS)) if args.rows == "all" else [int(r) for r in args.rows.split(",")]
    work = Path(tempfile.mkdtemp(prefix="pdq-sensitivity-"))
    try:
        report.update(_measure(model, args.seq_len, calib, sets, work, list(wanted)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = time.perf_counter() - started
    write_results(args.out, f"quant_sensitivity_{args.name}", report, markdown(report))


def _measure(model, seq_len: int, calib: torch.Tensor, sets: dict[str, np.ndarray], work: Path,  # noqa: ANN001
             rows: list[int]) -> dict:
    """The fp32 graph's and every wanted row's perplexity and agreement on each evaluation set."""
    profile = get_profile("qnn-htp")
    sources: dict[tuple, Path] = {}
    applied: dict[tuple, list[str]] = {}

    def source(transforms: tuple[str, ...], rounding: str) -> Path:
        """The float graph (or its GPTQ-rounded twin) with ``transforms``, exported once."""
        if (transforms, rounding) not in sources:
            lm = prepare(model, seq_len, transforms, calib, conv=profile.linear_as_conv)
            applied[transforms] = list(lm.transforms)
            if rounding == "gptq":
                lm = gptq_(lm, calib, per_channel=block_op(lm) in profile.per_channel_ops)
            folder = work / f"{'-'.join(transforms) or 'none'}-{rounding}"
            sources[transforms, rounding] = export_graphs(lm, folder, decode=False)[0]
        return sources[transforms, rounding]

    fp32_sess = runtime.session(source(DEFAULT_TRANSFORMS["a16w8"], "nearest"))
    fp32, references = {}, {}
    for name, ids in sets.items():
        quality, references[name] = runtime.quality(fp32_sess, ids)
        fp32[name] = {"perplexity": quality.perplexity, "tokens": quality.tokens}
    del fp32_sess
    print(f"fp32 graph: {json.dumps(fp32)}", flush=True)
    feeds = [{"input_ids": row[None].numpy().astype(np.int64)} for row in calib]
    measured = []
    for index in rows:
        label, recipe, *rest = ROWS[index]
        transforms = rest[0] if rest else DEFAULT_TRANSFORMS["a16w8"]
        out = work / f"row{index}.onnx"
        quantized = quantize_graph(source(transforms, recipe.weight_rounding), out, feeds, recipe, profile)
        sess = runtime.session(out)
        row = {"row": index, "method": label, "recipe": recipe.to_dict(), "transforms": applied[transforms],
               "mb": out.stat().st_size / 1e6,
               "int16_weights": len(quantized.sixteen_bit_weights)}
        for name, ids in sets.items():
            quality, _ = runtime.quality(sess, ids, references[name])
            row[name] = {"perplexity": quality.perplexity, "agreement": quality.agreement,
                         "vs_fp32": quality.perplexity / fp32[name]["perplexity"] - 1}
        del sess
        out.unlink()
        measured.append(row)
        print(f"[{index}] {label}: " + ", ".join(f"{n} {row[n]['perplexity']:.2f} ({row[n]['vs_fp32']:+.2%})"
                                                 for n in sets), flush=True)
    return {"transforms": applied[DEFAULT_TRANSFORMS["a16w8"]], "fp32": fp32, "rows": measured}


def markdown(report: dict) -> str:
    sets = list(report["fp32"])
    head = "| # | variant | rewrites | " + " | ".join(f"{n} perplexity | vs fp32 | agreement" for n in sets) + " | MB |"
    lines = [
        f"# Quantization sensitivity: {report['model']}", "",
        f"Prefill graphs of {report['seq_len']} tokens for the {report['profile']} profile, calibrated on {report['calibration_sequences']} sequences "
        "of the calibration split; scored on "
        + ", ".join(f"{report['tokens'][n]:,} tokens of {n}" for n in sets)
        + ". fp32 graph (rewrites: " + (", ".join(report["transforms"]) or "none") + "): " + ", ".join(f"{n} {report['fp32'][n]['perplexity']:.2f}" for n in sets)
        + ". Agreement = top-1 next-token agreement with the fp32 graph. "
        f"Measured {report['date']} on {report['machine']}, commit `{report['commit']}`, `{report['command']}`, "
        f"{report['seconds'] / 60:.0f} min.", "",
        head, "|" + "---|" * (head.count("|") - 1),
    ]
    for row in report["rows"]:
        cells = [f"{row[n]['perplexity']:.2f} | {row[n]['vs_fp32']:+.2%} | {row[n]['agreement']:.3f}" for n in sets]
        lines.append(f"| {row['row']} | {row['method']} | {', '.join(row['transforms']) or 'none'} | " + " | ".join(cells)
                     + f" | {row['mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
