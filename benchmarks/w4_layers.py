"""Where do W4A16's int4 block weights lose their accuracy? Each group of layers given back its float weights in turn.

For one model (a teacher alias or a student's checkpoint directory), the block weights the ``--quant w4a16`` recipe
stores: int4 LPBQ blocks of 32 inputs (MSE-searched ranges), GPTQ-rounded block after block on the recipe's
calibration sequences, the same float rewrites (rotation, per-row table scales). The model is then scored in
PyTorch with float activations and the float table, so a row's gap is the block weights' alone (the graph's 16-bit
activations and its table add little to it: ``benchmarks/quant_accuracy.py`` measures the graphs). Rows: every block
weight int4; then one linear kind (q k v o gate up down) float in every block; five blocks at a time float; each
block's down projection float; and two rows that keep only ``--owq-columns`` input columns of each down
projection (of each linear) float, the ones whose rounding costs most (OWQ), with GPTQ rounding the rest around
them: what storing those few columns apart from the int4 grid would buy (``--rows owq``: only those and the first);
and one row of GPTQ followed by block-wise reconstruction (:func:`compress.deploy.qat.blockwise_`: each block's
weights trained on their grids to its float output, ``--recon-seqs`` training sequences; ``--rows recon``).
Each row is scored on the same validation and general-English sequences as the float model, so the rows' gaps
compare within one run. The input RMS of each layer's largest input channel over
the median channel's says where a massive activation enters a layer.

    python -m benchmarks.w4_layers --model runs/main_command_smollm2-135m-epyc/student --name smollm2-135m-0.67x-student

Writes ``benchmarks/results/w4_layers_<name>.{md,json}``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

import torch
import torch.nn.functional as F

from benchmarks.plots import evaluation_sets, load_model, machine, model_parser, provenance, write_results
from compress.core.config import DEFAULT_TRANSFORMS, QuantConfig
from compress.deploy.export import LINEARS, StaticLM
from compress.deploy.gptq import gptq_, input_hessians
from compress.deploy.qat import blockwise_
from compress.deploy.quantization import prepare
from compress.sources.data import load_corpus, token_batches
from quant.quantize import PRESETS

RECIPE = PRESETS["w4a16"]
SPAN = 5  # blocks per "blocks a-b float" row


@torch.no_grad()
def perplexity(lm: StaticLM, ids: torch.Tensor) -> float:
    """Perplexity of ``lm``'s prefill on the sequences ``ids`` [n, L] (every next token but the first)."""
    nll, count = 0.0, 0
    for row in ids:
        logits = lm.prefill(row[None])[0][0].float()
        nll += F.cross_entropy(logits[:-1], row[1:], reduction="sum").item()
        count += len(row) - 1
    return math.exp(nll / count)


def with_float(rounded: StaticLM, reference: StaticLM, layers: list[tuple[int, str]]) -> StaticLM:
    """A copy of ``rounded`` whose ``layers`` (block index, linear name) hold ``reference``'s float weights."""
    out = copy.deepcopy(rounded)
    with torch.no_grad():
        for index, name in layers:
            getattr(out.blocks[index], name).weight.copy_(getattr(reference.blocks[index], name).weight)
    return out


def input_peaks(lm: StaticLM, ids: torch.Tensor) -> list[dict]:
    """Each block linear's largest input channel: its RMS over the median channel's, and which channel."""
    hessians = input_hessians(lm, ids)
    peaks = []
    for index, block in enumerate(lm.blocks):
        for name in LINEARS:
            rms = torch.diagonal(hessians[getattr(block, name)]).sqrt()
            channel = int(rms.argmax())
            peaks.append({"block": index, "layer": name, "channel": channel,
                          "ratio": float(rms[channel] / rms.median().clamp_min(1e-12))})
    return peaks


def _layer_rows(depth: int) -> list[tuple[str, list[tuple[int, str]]]]:
    """One linear kind float in every block; five blocks at a time float; each block's down projection float."""
    rows = [(f"{name} float in every block", [(i, name) for i in range(depth)]) for name in LINEARS]
    rows += [(f"blocks {a}-{min(a + SPAN, depth) - 1} float",
              [(i, n) for i in range(a, min(a + SPAN, depth)) for n in LINEARS]) for a in range(0, depth, SPAN)]
    return rows + [(f"down of block {i} float", [(i, "down")]) for i in range(depth)]


def main() -> None:
    parser = model_parser(__doc__, "w4_layers", eval_seqs=16)
    parser.add_argument("--gptq-seqs", type=int, default=QuantConfig.gptq_samples,
                        help="calibration sequences GPTQ's Hessians come from (--quant-gptq-samples)")
    parser.add_argument("--owq-columns", type=int, default=8,
                        help="float input columns per layer in the two OWQ rows (0: no such rows)")
    parser.add_argument("--recon-seqs", type=int, default=128,
                        help="training-split sequences of the block-wise reconstruction row (0: no such row)")
    parser.add_argument("--recon-epochs", type=int, default=2, help="passes of each block over them")
    parser.add_argument("--recon-lr", type=float, default=2e-5, help="its AdamW rate (weights on their grids)")
    parser.add_argument("--rows", choices=("all", "owq", "recon"), default="all",
                        help="owq / recon: only the every-weight-int4 row and the OWQ / block-wise rows (not 20 min)")
    args = parser.parse_args()
    if args.rows == "owq" and args.owq_columns < 1:
        parser.error("--rows owq needs --owq-columns of at least 1")
    if args.rows == "recon" and args.recon_seqs < 4:
        parser.error("--rows recon needs --recon-seqs of at least 4")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    started = time.perf_counter()
    model, tokenizer = load_model(parser, args.model)
    corpus = load_corpus(None)
    sets = evaluation_sets(tokenizer, args.seq_len, args.eval_seqs)
    calib = token_batches(corpus, tokenizer, "calibration", args.seq_len, args.calib_seqs)
    gptq_ids = token_batches(corpus, tokenizer, "calibration", args.seq_len, args.gptq_seqs)
    lm = prepare(model, args.seq_len, DEFAULT_TRANSFORMS["w4a16"], calib, conv=False)
    depth = len(lm.blocks)
    if len(lm.unique_blocks) != depth:
        parser.error("a model whose blocks are shared (MobileLLM-like) has no per-depth layers to give back")
    report: dict = {
        "model": args.model, "seq_len": args.seq_len, "gptq_sequences": int(gptq_ids.shape[0]),
        "tokens": {name: int(ids.shape[0] * (ids.shape[1] - 1)) for name, ids in sets.items()},
        "transforms": list(lm.transforms), "recipe": RECIPE.to_dict(),
        **provenance(), "date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine(),
    }
    report["float"] = {name: perplexity(lm, ids) for name, ids in sets.items()}
    report["input_peaks"] = input_peaks(lm, calib)

    def rounded_with(keep: dict[str, int] | None = None) -> StaticLM:
        return gptq_(copy.deepcopy(lm), gptq_ids, bits=RECIPE.weight_bits, block_size=RECIPE.weight_block,
                     weight_range=RECIPE.weight_range, sequential=True, keep_columns=keep)

    rounded = rounded_with()

    def reconstructed() -> StaticLM:
        ids = token_batches(corpus, tokenizer, "train", args.seq_len, args.recon_seqs)
        trained = copy.deepcopy(rounded)
        result = blockwise_(trained, lm, ids, args.recon_epochs, lr=args.recon_lr)
        report["reconstruction"] = {"sequences": int(ids.shape[0]), "lr": args.recon_lr, **result.as_dict()}
        return trained

    # (label, layers given back their float weights, the rounded model, float input columns per linear kind)
    rows: list[tuple[str, list[tuple[int, str]], Callable[[], StaticLM], dict[str, int]]] = [
        ("every block weight int4 (the recipe's GPTQ)", [], lambda: rounded, {})]
    if (k := args.owq_columns) and args.rows in ("all", "owq"):  # OWQ: a few float input columns per layer
        for label, keep in ((f"down's {k} most sensitive input columns float (OWQ), GPTQ around them", {"down": k}),
                            (f"every linear's {k} most sensitive input columns float (OWQ)", dict.fromkeys(LINEARS, k))):
            rows.append((label, [], lambda keep=keep: rounded_with(keep), keep))
    if args.recon_seqs and args.rows in ("all", "recon"):
        rows.append((f"GPTQ, then block-wise reconstruction ({args.recon_seqs} training sequences, "
                     f"{args.recon_epochs} epochs a block)", [], reconstructed, {}))
    if args.rows == "all":
        rows += [(label, layers, lambda: rounded, {}) for label, layers in _layer_rows(depth)]
    report["rows"] = []
    for label, layers, make, keep in rows:
        model_row = with_float(make(), lm, layers)
        row = {"variant": label, "float_layers": len(layers), "float_columns": keep}
        for name, ids in sets.items():
            ppl = perplexity(model_row, ids)
            row[name] = {"perplexity": ppl, "vs_float": ppl / report["float"][name] - 1}
        report["rows"].append(row)
        print(f"{label}: " + ", ".join(f"{n} {row[n]['perplexity']:.2f} ({row[n]['vs_float']:+.2%})" for n in sets),
              flush=True)
    report["seconds"] = time.perf_counter() - started
    write_results(args.out, f"w4_layers_{args.name}", report, markdown(report))


def markdown(report: dict) -> str:
    sets = list(report["float"])
    whole = report["rows"][0]
    head = "| variant | " + " | ".join(f"{n} perplexity | vs float | share of the int4 cost" for n in sets) + " |"
    lines = [
        f"# W4A16 block weights, layer by layer: {report['model']}", "",
        f"The `w4a16` recipe's int4 LPBQ block weights (blocks of {report['recipe']['weight_block']} inputs, "
        f"{report['recipe']['weight_range']} ranges, GPTQ block after block on {report['gptq_sequences']} calibration "
        f"sequences; rewrites: {', '.join(report['transforms'])}), scored in PyTorch with float activations and the "
        "float table, each row with one group of layers given back its float weights. Scored on "
        + ", ".join(f"{report['tokens'][n]:,} tokens of {n}" for n in sets) + "; float model: "
        + ", ".join(f"{n} {report['float'][n]:.2f}" for n in sets) + ". Share of the int4 cost = how much of the "
        "first row's gap the row takes back. "
        f"Measured {report['date']} on {report['machine']}, commit `{report['commit']}`, `{report['command']}`, "
        f"{report['seconds'] / 60:.0f} min.", "",
    ]
    if r := report.get("reconstruction"):
        lines += [f"Block-wise reconstruction (`compress.deploy.qat.blockwise_`): each block trained on its int4 grids to "
                  f"its float block's output, {r['sequences']} training-split sequences ({r['tokens']:,} tokens a block), AdamW at "
                  f"{r['lr']:g} (units as GPTQ chose them), "
                  f"{r['steps']:,} steps in all, {r['seconds'] / 60:.1f} min; relative error of the first block's output "
                  f"{r['first_kl']:.5f}, of the last's {r['last_kl']:.5f}.", ""]
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for row in report["rows"]:
        cells = []
        for n in sets:
            share = 1 - row[n]["vs_float"] / whole[n]["vs_float"] if whole[n]["vs_float"] else 0.0
            cells.append(f"{row[n]['perplexity']:.2f} | {row[n]['vs_float']:+.2%} | "
                         + ("–" if row is whole else f"{share:.0%}"))
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    peaks = sorted(report["input_peaks"], key=lambda p: -p["ratio"])[:8]
    lines += ["", "Layers whose largest input channel's RMS is furthest above the median channel's (massive "
              "activations), on the calibration sequences:", "",
              "| block | layer | channel | RMS / median |", "|---|---|---|---|"]
    lines += [f"| {p['block']} | {p['layer']} | {p['channel']} | {p['ratio']:.0f} |" for p in peaks]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
