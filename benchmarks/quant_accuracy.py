"""Do the integer graphs keep the model's accuracy, and which method buys what?

For one model (default: the smollm2-135m teacher; ``--model DIR`` for a pruned or distilled student):

1. **Methods table** (prefill graphs): each row one combination of float rewrite and recipe, quantized
   whole-graph for A16W8 (qnn-htp profile) and A8W8 (generic-a8w8 profile), validation perplexity and
   top-1 agreement with the fp32 graph.
2. **Final graphs** (the recipes ``compress`` ships): fp32, A16W8 (qnn-htp), A8W8 (generic-a8w8 and
   qnn-htp) and W4A16 (qnn-htp) prefill and decode graphs: perplexity, agreement, size on disk, median prefill latency, decode
   tokens/s, ``compress inspect`` violations; the qnn-htp graphs compiled by Qualcomm's HTP compiler (refused
   nodes) and ``--htp-seqs`` validation sequences run on its emulator next to ONNX Runtime's CPU; and the
   weight-only CPU graphs (ort-cpu: int8 and int4 MatMulNBits blocks), whose decode speed is the point.
   ``--final`` picks some of them.

Writes ``benchmarks/results/quant_accuracy{,_<name>}.{md,json}``.

    python -m benchmarks.quant_accuracy [--model DIR] [--rows all|final|3,10,final] [--eval-seqs 16] [--htp-seqs 2]
"""

from __future__ import annotations

import argparse
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

from benchmarks.plots import machine, provenance
from compress.core.config import DEFAULT_TRANSFORMS, CompressConfig, QuantConfig
from compress.deploy.htp import compile_graphs, emulate
from compress.deploy.quantization import (
    FREQUENCY_TOKENS,
    QatSettings,
    export_graphs,
    measure,
    prepare,
    quantize_graphs,
)
from compress.sources.corpora import GENERAL_EVAL
from compress.sources.data import load_corpus, token_batches
from compress.sources.teachers import load_teacher
from quant import runtime
from quant.profiles import get_profile
from quant.qnn import DEFAULT_SOC_MODEL
from quant.quantize import PRESETS, QuantRecipe

RESULTS = Path(__file__).parent / "results"
# The final graphs: (key, recipe, profile). A8W8 on both NPU profiles (per-channel MatMul weights on generic-a8w8, 1x1
# Convs on qnn-htp); W4A16 (the NPU LLM toolchains' format) and W4A8 on qnn-htp; w8 and w4 weight-only, for a CPU.
FINAL_GRAPHS = (("a16w8", "a16w8", "qnn-htp"), ("a8w8", "a8w8", "generic-a8w8"), ("a8w8-qnn-htp", "a8w8", "qnn-htp"),
                ("w4a16", "w4a16", "qnn-htp"), ("w4a16-int4-table", "w4a16", "qnn-htp"), ("w4a16-qat", "w4a16", "qnn-htp"),
                ("w4a8", "w4a16", "qnn-htp"), ("w8", "w8", "ort-cpu"), ("w4", "w4", "ort-cpu"))
# w4a16 with one int4 table, beside the split one; w4a8: w4a16's weights under a8w8's activations (not a preset).
RECIPE_CHANGES = {"w4a16-int4-table": {"embedding_wide_rows": 0}, "w4a8": {"name": "w4a8", "activation_bits": 8,
                                                                          "sixteen_bit": PRESETS["a8w8"].sixteen_bit}}
QAT_GRAPHS = ("w4a16-qat",)  # the same recipe after quantization-aware training (--qat-tokens of the training split)
DECODE_SAMPLES = 8  # validation sequences whose second halves score the decode graphs (1,024 tokens at 256)

A16 = QuantRecipe("a16w8", 16)
A8 = QuantRecipe("a8w8", 8)
RS = ("residual", "softmax")
A8RS = QuantRecipe("a8w8", 8, sixteen_bit=RS)
# (label, transforms, fused norm, linears as 1x1 Conv in the A16W8 (qnn-htp) graph, A16W8 recipe, A8W8 recipe).
# A16W8 graphs are made for qnn-htp (per-channel weights on Conv only), A8W8 graphs for generic-a8w8
# (per-channel weights on MatMul and Gemm).
METHOD_ROWS = [
    ("decomposed RMSNorm (Pow, ReduceMean, Sqrt, ...), MinMax, per-tensor MatMul weights", (), False, False, A16, A8),
    ("fused RMSNorm (one RMSNormalization node)", (), True, False, A16, A8),
    ("+ A8: residual stream and softmax in 16 bits", (), True, False, None, A8RS),
    ("+ linears as 1x1 Conv (per-channel weights on QNN)", (), True, True, A16, None),
    ("+ per-row embedding scales", ("embed-rows",), True, True, A16, A8RS),
    ("+ rotation (QuaRot-style)", ("rotate", "embed-rows"), True, True, A16, A8RS),
    ("+ rotation + SmoothQuant", ("rotate", "smooth", "embed-rows"), True, True, None, A8RS),
    ("+ rotation; A8 SwiGLU gating also in 16 bits", ("rotate", "embed-rows"), True, True, None,
     QuantRecipe("a8w8", 8, sixteen_bit=(*RS, "swiglu"))),
    ("+ rotation; A8 SwiGLU gating and attention matmul inputs in 16 bits", ("rotate", "embed-rows"), True, True,
     None, QuantRecipe("a8w8", 8, sixteen_bit=(*RS, "swiglu", "attention"))),
    ("rotation, percentile (99.999) instead of MinMax calibration", ("rotate", "embed-rows"), True, True,
     QuantRecipe("a16w8", 16, calibration="percentile"),
     QuantRecipe("a8w8", 8, calibration="percentile", sixteen_bit=(*RS, "swiglu"))),
    ("+ rotation; the rotated head's mix matrix in int16 weights", ("rotate", "embed-rows"), True, True,
     dataclasses.replace(PRESETS["a16w8"], weight_range="minmax"),
     dataclasses.replace(PRESETS["a8w8"], weight_range="minmax")),
    ("row 10 with MSE-searched int8 weight ranges per channel instead of max|w|", ("rotate", "embed-rows"), True, True,
     dataclasses.replace(PRESETS["a16w8"], weight_rounding="nearest", weight_range="mse"),
     dataclasses.replace(PRESETS["a8w8"], weight_rounding="nearest", weight_range="mse")),
    ("row 10 + GPTQ rounding of the block weights (the a16w8 and a8w8 defaults)", ("rotate", "embed-rows"),
     True, True, PRESETS["a16w8"], PRESETS["a8w8"]),
    ("SmoothQuant instead of rotation, the a8w8 preset (Gemma3's blocks refused rotation until commit a3817e1)",
     ("smooth", "embed-rows"), True, True, None, PRESETS["a8w8"]),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="teacher alias or Hugging Face checkpoint directory")
    parser.add_argument("--name", default=None, help="results suffix (default: teacher for the alias, else 'student')")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-seqs", type=int, default=16)
    parser.add_argument("--calib-seqs", type=int, default=8)
    parser.add_argument("--gptq-seqs", type=int, default=QuantConfig.gptq_samples,
                        help="calibration sequences the final graphs' GPTQ rounding takes its Hessians from "
                        "(--quant-gptq-samples); method rows use --calib-seqs")
    parser.add_argument("--rows", default="all", help="'all', or comma-separated method row numbers and/or 'final'")
    parser.add_argument("--final", default=",".join(g[0] for g in FINAL_GRAPHS),
                        help=f"comma-separated final graphs, of {', '.join(g[0] for g in FINAL_GRAPHS)} (default all)")
    parser.add_argument("--htp-seqs", type=int, default=2, help="validation sequences each final qnn-htp prefill graph "
                        "runs on the HTP emulator (about 30 s each for a 100M-parameter graph)")
    parser.add_argument("--qat-tokens", type=int, default=393_216, help="training-split tokens the w4a16-qat graph's "
                        "quantization-aware training runs on (batches of 4 sequences)")
    parser.add_argument("--qat-lr", type=float, default=QuantConfig.qat_lr, help="peak learning rate of that training")
    parser.add_argument("--qat-unit-lr", type=float, default=QuantConfig.qat_unit_lr,
                        help="peak learning rate of the LPBQ channel units' logarithms in that training (0: fixed)")
    parser.add_argument("--qat-table-lr", type=float, default=QuantConfig.qat_table_lr,
                        help="the tied int4 table's largest move per step at that training's peak, on its grid "
                        "(rows of largest value 1, steps of 1/7; 0: frozen)")
    parser.add_argument("--table-int8-rows", type=int, default=None,
                        help="rows of the w4a16 graphs' int4 table kept in int8 (default: the recipe's; 0: one int4 "
                        "table, which --qat-table-lr above 0 needs; w4a16-int4-table always has 0)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("compress.deploy.qat").setLevel(logging.INFO)  # its steps, every ten
    started = time.perf_counter()
    defaults = CompressConfig(teacher=args.model, target_size="1x")
    model, tokenizer = load_teacher(args.model)
    model.eval()
    dataset = load_corpus(None)
    valid = token_batches(dataset, tokenizer, "validation", args.seq_len, args.eval_seqs).numpy()
    calib = token_batches(dataset, tokenizer, "calibration", args.seq_len, args.calib_seqs)
    general = token_batches(load_corpus(GENERAL_EVAL, evaluation=True), tokenizer, "all", args.seq_len,
                            args.eval_seqs).numpy()
    report: dict = {
        "model": args.model, "seq_len": args.seq_len, "validation_tokens": int(valid.shape[0] * (valid.shape[1] - 1)),
        "calibration_sequences": int(calib.shape[0]), **provenance(), "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
        "data": f"the {dataset.name} corpus (validation / calibration splits)", "seed": defaults.seed,
    }
    wanted = args.rows.split(",")
    rows = list(range(len(METHOD_ROWS))) if "all" in wanted else [int(r) for r in wanted if r != "final"]
    work = Path(tempfile.mkdtemp(prefix="pdq-quant-"))
    try:
        reference_top1, fp32 = _fp32_reference(model, args.seq_len, work, valid)
        report["fp32_perplexity"] = fp32
        report["methods"] = []
        for index in rows:
            label, transforms, fused, conv, a16, a8 = METHOD_ROWS[index]
            row = {"row": index, "method": label, "transforms": list(transforms), "fused_norm": fused, "conv": conv,
                   "date": report["date"], "commit": report["commit"]}
            for recipe, profile, as_conv in ((a16, "qnn-htp", conv), (a8, "generic-a8w8", False)):
                if recipe is None:
                    continue
                lm = prepare(model, args.seq_len, transforms, calib, fused_norm=fused, conv=as_conv)
                row["applied"] = list(lm.transforms)  # what the family's blocks allowed
                folder = work / f"row{index}-{recipe.name}"
                export_graphs(lm, folder, decode=False)
                graphs = quantize_graphs(lm, folder, recipe, get_profile(profile), calib.numpy(), decode=False)
                quality, _ = runtime.quality(runtime.session(graphs.prefill), valid, reference_top1)
                row[recipe.name] = {"perplexity": quality.perplexity, "agreement": quality.agreement,
                                    "sixteen_bit_tensors": graphs.reports["prefill"].sixteen_bit_tensors,
                                    "recipe": recipe.to_dict(), "profile": profile,
                                    "violations": len(graphs.violations["prefill"])}
                print(f"[{index}] {label} {recipe.name}: perplexity {quality.perplexity:.2f} "
                      f"(fp32 {fp32:.2f}), agreement {quality.agreement:.3f}", flush=True)
                shutil.rmtree(folder, ignore_errors=True)
            report["methods"].append(row)
        if "all" in wanted or "final" in wanted:
            keys = args.final.split(",")
            qat = _qat_settings(args, dataset, tokenizer, report) if any(k in QAT_GRAPHS for k in keys) else None
            report["general_tokens"] = int(general.shape[0] * (general.shape[1] - 1))
            report["gptq_sequences"] = args.gptq_seqs
            gptq = token_batches(dataset, tokenizer, "calibration", args.seq_len, args.gptq_seqs).numpy()
            # As the pipeline does: the table rows kept int8 (w4a16) are those of the most frequent training tokens.
            counted = None
            if any(PRESETS[g[1]].embedding_bits == 4 for g in FINAL_GRAPHS if g[0] in keys):
                report["frequency_tokens"] = FREQUENCY_TOKENS
                counted = token_batches(dataset, tokenizer, "train", args.seq_len, FREQUENCY_TOKENS // args.seq_len).numpy()
            report["final"] = _final_graphs(model, args.seq_len, work / "final", calib, valid, reference_top1,
                                            args.htp_seqs, keys, qat, general, gptq, counted, args.table_int8_rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = time.perf_counter() - started
    name = args.name or (args.model if not Path(args.model).exists() else "student")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"quant_accuracy_{name}"  # names like smollm2-135m-0.67x hold dots: no with_suffix
    _keep_earlier(report, args.out / f"{stem}.json", wanted)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


def _keep_earlier(report: dict, path: Path, wanted: list[str]) -> None:
    """A partial run (``--rows 3,final``) keeps the other method rows and final graphs of the results file,
    when they were measured on the same data; each method row carries its date."""
    if "all" in wanted or not path.exists():
        return
    earlier = json.loads(path.read_text())
    same = all(earlier.get(k) == report[k] for k in ("model", "seq_len", "validation_tokens", "calibration_sequences"))
    if not same:
        print(f"not merging with {path}: it was measured on other data or lengths", flush=True)
        return
    done = {row["row"] for row in report["methods"]}
    kept = [dict(row, date=row.get("date", earlier["date"]), method=METHOD_ROWS[row["row"]][0])  # labels live here
            for row in earlier.get("methods", []) if row["row"] not in done and row["row"] < len(METHOD_ROWS)]
    report["methods"] = sorted(kept + report["methods"], key=lambda row: row["row"])
    if "final" not in wanted and "final" in earlier:
        report["final"] = earlier["final"]
        report["final_commit"] = earlier.get("final_commit", earlier["commit"])  # the commit that measured them
        if earlier.get("provenance_note"):
            report["provenance_note"] = earlier["provenance_note"]


def _qat_settings(args: argparse.Namespace, dataset, tokenizer, report: dict) -> QatSettings:  # noqa: ANN001
    """The QAT_GRAPHS' training: ``--qat-tokens`` of the training split (recorded in ``report``)."""
    sequences = -(-args.qat_tokens // args.seq_len)
    report.update(qat_tokens=args.qat_tokens, qat_lr=args.qat_lr, qat_unit_lr=args.qat_unit_lr,
                  qat_table_lr=args.qat_table_lr)
    return QatSettings(token_batches(dataset, tokenizer, "train", args.seq_len, sequences).numpy(), args.qat_lr,
                       args.qat_unit_lr, args.qat_table_lr)


def _fp32_reference(model, seq_len: int, work: Path, valid: np.ndarray) -> tuple[np.ndarray, float]:  # noqa: ANN001
    lm = prepare(model, seq_len, ())
    export_graphs(lm, work / "fp32", decode=False)
    quality, top1 = runtime.quality(runtime.session(work / "fp32" / "model.onnx"), valid)
    print(f"fp32 graph perplexity {quality.perplexity:.2f} on {quality.tokens} tokens", flush=True)
    return top1, quality.perplexity


def _final_graphs(model, seq_len: int, folder: Path, calib: torch.Tensor, valid: np.ndarray,  # noqa: ANN001
                  reference_top1: np.ndarray, htp_seqs: int, keys: list[str], qat: QatSettings | None = None,
                  general: np.ndarray | None = None, gptq: np.ndarray | None = None,
                  counted: np.ndarray | None = None, table_rows: int | None = None) -> dict:
    """The graphs ``compress --stop-after quantize`` writes, for each shipped recipe and profile (FINAL_GRAPHS),
    GPTQ's Hessians from the ``gptq`` sequences; those of a Qualcomm profile compiled by the HTP compiler, and
    ``htp_seqs`` validation sequences run on its emulator; the QAT_GRAPHS after ``qat``. Each is also scored on the
    ``general`` English sequences. An int4 table keeps ``table_rows`` rows (default: the recipe's) of the tokens
    most frequent in ``counted`` in int8."""
    out = {}
    float_dir = folder / "fp32"
    export_graphs(prepare(model, seq_len, ()), float_dir)
    others = {}
    if general is not None:
        _, general_top1 = runtime.quality(runtime.session(float_dir / "model.onnx"), general)
        others[GENERAL_EVAL] = (general, general_top1)
    out["fp32"], _ = measure(float_dir / "model.onnx", float_dir / "decode.onnx", valid, reference_top1,
                             decode_samples=DECODE_SAMPLES, others=others)
    out["fp32"].update(violations=[], transforms=[], profile="-")
    print(f"fp32: {json.dumps(out['fp32'])}", flush=True)
    for key, name, profile_name in (g for g in FINAL_GRAPHS if g[0] in keys):
        profile = get_profile(profile_name)
        transforms = DEFAULT_TRANSFORMS[name]
        rows = {"embedding_wide_rows": table_rows} if table_rows is not None and PRESETS[name].embedding_bits == 4 else {}
        recipe = dataclasses.replace(PRESETS[name], **(rows | RECIPE_CHANGES.get(key, {})))
        lm = prepare(model, seq_len, transforms, calib, conv=recipe.linears_as_conv(profile),
                     separate_head=profile.weight_only)
        export_graphs(lm, folder / key)
        graphs = quantize_graphs(lm, folder / key, recipe, profile, calib.numpy(),
                                 qat=qat if key in QAT_GRAPHS else None, progress=key in QAT_GRAPHS, gptq_ids=gptq,
                                 frequency_ids=counted)
        out[key], _ = measure(graphs.prefill, graphs.decode, valid, reference_top1, decode_samples=DECODE_SAMPLES,
                              others=others)
        if graphs.qat:
            out[key]["qat"] = graphs.qat
        if recipe.embedding_bits == 4:
            out[key]["table_int8_rows"] = recipe.embedding_wide_rows
        out[key].update(violations=graphs.violations["prefill"] + graphs.violations["decode"],
                        transforms=list(lm.transforms), profile=profile_name,
                        sixteen_bit_tensors=graphs.reports["prefill"].sixteen_bit_tensors,
                        sixteen_bit_groups=graphs.reports["prefill"].sixteen_bit_groups,
                        sixteen_bit_weights=graphs.reports["prefill"].sixteen_bit_weights)
        htp = compile_graphs({"prefill": graphs.prefill, "decode": graphs.decode}, profile, DEFAULT_SOC_MODEL)
        if htp.get("graphs", {}).get("prefill", {}).get("whole"):
            htp["emulated"] = emulate(graphs.prefill, valid, DEFAULT_SOC_MODEL, htp_seqs)
        out[key]["htp"] = htp
        print(f"{key}: {json.dumps(out[key])}", flush=True)
    return out


def _measured(row: dict, report: dict) -> str:
    """A method row's date and the commit that measured it (rows from before commits were kept per row have none)."""
    if row.get("commit"):
        return f"{row.get('date', report['date'])}, `{row['commit'][:7]}`"
    return row.get("date", report["date"]) + ("" if "date" in row else f", `{report['commit'][:7]}`")


def markdown(report: dict) -> str:
    lines = [f"# Quantization accuracy: {report['model']}", "",
             f"Prefill graphs of {report['seq_len']} tokens; validation perplexity on {report['validation_tokens']:,} "
             f"tokens of {report['data']}; calibration on {report['calibration_sequences']} sequences of the "
             "calibration split" + (f" (the final graphs' GPTQ Hessians: {report['gptq_sequences']})"
                                    if report.get("gptq_sequences") else "")
             + f". fp32 graph perplexity {report['fp32_perplexity']:.2f}. Agreement = top-1 next-token "
             f"agreement with the fp32 graph. Measured {report['date']} on {report['machine']}; this file's last run: "
             f"commit `{report['commit'][:7]}`, `{report['command']}` (each row names the commit that measured it)."
             + (f" Note: {report['provenance_note']}" if report.get("provenance_note") else ""), ""]
    if report.get("methods"):
        lines += ["| # | method | A16W8 perplexity | A16W8 agreement | A8W8 perplexity | A8W8 agreement | A8 tensors in 16 bits "
                  "| measured |", "|---|---|---|---|---|---|---|---|"]
        for row in report["methods"]:
            a16, a8 = row.get("a16w8"), row.get("a8w8")
            lines.append(
                f"| {row['row']} | {row['method']} | {_ppl(a16)} | {_agree(a16)} | {_ppl(a8)} | {_agree(a8)} | "
                f"{a8['sixteen_bit_tensors'] if a8 else '–'} | {_measured(row, report)} |")
        lines.append("")
    if report.get("final"):
        lines += ["| graph | profile | rewrites | perplexity | vs fp32 | agreement | decode-graph perplexity | vs fp32 "
                  "| decode-graph agreement | prefill MB | decode MB | prefill latency (ms, median) | decode tokens/s "
                  "| inspect violations | HTP compiler: refused nodes (prefill / decode) | HTP emulator vs CPU, same sequences |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base = report["final"]["fp32"]["perplexity"]
        decode_base = report["final"]["fp32"].get("decode_perplexity")
        for name, g in report["final"].items():
            decode = g.get("decode_perplexity")
            lines.append(
                f"| {name} | {g['profile']} | {', '.join(g['transforms']) or '–'} | {g['perplexity']:.2f} | "
                f"{g['perplexity'] / base - 1:+.1%} | {_agree(g)} | "
                + (f"{decode:.2f} | {decode / decode_base - 1:+.1%} | {g['decode_agreement']:.3f} | "
                   if decode is not None and decode_base else "– | – | – | ")
                + f"{g['prefill_mb']:.0f} | {g['decode_mb']:.0f} | "
                f"{g['prefill_latency_ms']:.0f} | {g['decode_tokens_per_second']:.1f} | {len(g['violations'])} | "
                f"{_htp_cells(g.get('htp'))} |")
        if report.get("final_commit"):
            lines += ["", f"Final graphs measured at commit `{report['final_commit'][:7]}`."]
        tokens = report["final"]["fp32"].get("decode_validation_tokens")
        if tokens:
            lines += ["", f"Decode graphs are scored on the second halves of the first validation sequences ({tokens:,} "
                      "tokens), fed one token at a time after a prefill of the first halves; their agreement is with the "
                      "fp32 prefill graph's top-1 at the same positions. Int16 weights: "
                      + ("; ".join(f"{n}: {', '.join(g['sixteen_bit_weights'])}" for n, g in report["final"].items()
                                   if g.get("sixteen_bit_weights")) or "none") + "."]
    final = report.get("final", {})
    if any("evals" in g for g in final.values()):
        base = final["fp32"]["evals"][GENERAL_EVAL]["perplexity"]
        lines += ["", f"General English held out of every training corpus ({report['general_tokens']:,} tokens), "
                  "perplexity (vs fp32, top-1 agreement with fp32): " + "; ".join(
                      f"{n} {g['evals'][GENERAL_EVAL]['perplexity']:.2f} ({g['evals'][GENERAL_EVAL]['perplexity'] / base - 1:+.1%}"
                      + (f", {g['evals'][GENERAL_EVAL]['agreement']:.3f}" if n != "fp32" else "") + ")"
                      for n, g in final.items() if "evals" in g) + "."]
    tables = [f"{n} {g['table_int8_rows']:,}" for n, g in final.items() if "table_int8_rows" in g]
    if tables:
        lines += ["", "Int4 tables: rows kept in int8 (those of the most frequent of "
                  f"{report.get('frequency_tokens', 0):,} training-split tokens; 0: one int4 table): "
                  + "; ".join(tables) + "."]
    for n, g in final.items():
        if g.get("qat"):
            q = g["qat"]
            lines += ["", f"{n}: quantization-aware training after GPTQ on {q['tokens']:,} training-split tokens "
                      f"({q['steps']} steps of 4 sequences, peak learning rate {report.get('qat_lr')}"
                      + (f", the LPBQ channel units' logarithms {report['qat_unit_lr']}" if report.get("qat_unit_lr")
                         else ", the LPBQ steps fixed")
                      + (f", the int4 table {report['qat_table_lr']}" if report.get("qat_table_lr") else ", the table frozen")
                      + f", {q['seconds'] / 60:.0f} min), KL to the float model {q['first_kl']:.4f} on the first step's sequences, {q['last_kl']:.4f} on "
                      "the last's."]
    lines += ["", "Notes:", "- CPU latency says little about an NPU: ONNX Runtime has no 16-bit kernels, so every 16-bit tensor runs "
              "as DequantizeLinear → float op → QuantizeLinear, and the decode graphs also pass their whole KV cache "
              "through Q/DQ each step. Compare latencies only within one run of this script.",
              "- 'A8 tensors in 16 bits' counts activation tensors; rows measured before row 10 existed also counted "
              "the tied embedding's int8 override (one more)."]
    by_row = {m["row"]: m for m in report.get("methods", [])}
    if 0 in by_row and 1 in by_row and _ppl(by_row[0].get("a16w8")) == _ppl(by_row[1].get("a16w8")):
        lines.append("- Rows 0 and 1 gave the same graph: the exporter's optimizer (onnxscript) already fuses the "
                     "plain-ops RMSNorm into `RMSNormalization`, so the decomposed case is not reproduced here (it is "
                     "what `quant.ops.rms_norm` guarantees on any exporter version).")
    return "\n".join(lines) + "\n"


def _htp_cells(htp: dict | None) -> str:
    """The final table's two HTP cells: refused nodes per graph, and the emulator's perplexity against the CPU's."""
    if not htp or not htp.get("graphs"):
        return f"{'not compiled: ' + htp['skipped'] if htp and 'skipped' in htp else '–'} | –"
    refused = " / ".join(str(len(g["unsupported"])) + ("" if g["whole"] else f" ({g['qnn_graphs']} QNN graphs)")
                         for g in htp["graphs"].values())
    e = htp.get("emulated")
    emulated = (f"{e['perplexity']:.2f} vs {e['cpu_perplexity']:.2f} ({e['perplexity'] / e['cpu_perplexity'] - 1:+.2%}), "
                f"agreement {e['agreement_with_cpu']:.3f}, {e['tokens']:,} tokens" if e else "–")
    return f"{refused} | {emulated}"


def _ppl(cell: dict | None) -> str:
    return "–" if cell is None else f"{cell['perplexity']:,.2f}"


def _agree(cell: dict | None) -> str:
    return "–" if cell is None or cell["agreement"] is None else f"{cell['agreement']:.3f}"


if __name__ == "__main__":
    main()
