"""Does Qualcomm's HTP compiler take every integer graph of every student family whole?

Compiles each quantized qnn-htp graph (``onnx/<graph>.a16w8.onnx`` or ``.a8w8.onnx``) of the given run
directories with ``onnxruntime-qnn``'s HTP compiler for one SoC, CPU fallback disabled, and records per graph
its nodes, the nodes the NPU takes, the refused ones with the compiler's reason, the QNN graphs it made and
the compile time. The runs are made by ``compress``, for example (the training budget does not change which
operators a graph holds)::

    compress --teacher smollm2-135m --target-size 0.67x                       # runs/smollm2-135m-0.67x
    compress --teacher smollm2-135m --target-size 60M --student mu --out runs/mu-htp --distill-tokens 2048 \\
        --stop-after quantize --calib-samples 128
    compress --teacher smollm2-135m --target-size 60M --student mobilellm --out runs/mobilellm-htp \\
        --distill-tokens 2048 --stop-after quantize --calib-samples 128

    python -m benchmarks.htp_compile runs/smollm2-135m-0.67x runs/mu-htp runs/mobilellm-htp

Writes ``benchmarks/results/htp_compile.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.plots import machine, provenance
from compress.io import write_json, write_text
from quant import qnn

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories whose quantize stage made qnn-htp graphs")
    parser.add_argument("--soc-model", default=qnn.DEFAULT_SOC_MODEL)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    reason = qnn.unavailable()
    if reason:
        raise SystemExit(f"error: {reason}")
    report = {**provenance(), "date": datetime.now(UTC).strftime("%Y-%m-%d"), "soc_model": args.soc_model,
              "compiler": f"onnxruntime-qnn {qnn.version()}", "machine": machine(), "graphs": []}
    for run in args.runs:
        config = json.loads((run / "config.json").read_text())
        if config["quant"]["npu_profile"] != "qnn-htp":
            raise SystemExit(f"error: {run} made graphs for {config['quant']['npu_profile']}, not qnn-htp")
        graphs = sorted(p for p in (run / "onnx").glob(f"*.{config['quant']['recipe']}.onnx"))
        if not graphs:
            raise SystemExit(f"error: {run}/onnx holds no {config['quant']['recipe']} graph; run its quantize stage first")
        for graph in graphs:
            result = qnn.compile_graph(graph, args.soc_model)
            row = {"run": str(run), "student": config["student"], "teacher": config["teacher"],
                   "target_size": config["target_size"], "recipe": config["quant"]["recipe"], **result.to_dict()}
            report["graphs"].append(row)
            print(f"{graph}: {result.supported_nodes}/{result.nodes} nodes on the NPU, {len(result.unsupported)} refused, "
                  f"{result.qnn_graphs} QNN graph(s), {result.seconds:.1f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "htp_compile.json", report)
    write_text(args.out / "htp_compile.md", markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = ["# Qualcomm's HTP compiler on every student family's graphs", "",
             f"Each quantized graph compiled for SoC {report['soc_model']} by {report['compiler']} with CPU fallback "
             f"disabled, on {report['machine']}, {report['date']}, commit `{report['commit'][:7]}`, "
             f"`{report['command']}`. A graph the NPU runs whole is one QNN graph with no refused node.", "",
             "| student | teacher → size | graph | nodes | on the NPU | refused | QNN graphs | compile (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for g in report["graphs"]:
        lines.append(f"| {g['student']} | {g['teacher']} → {g['target_size']} | `{Path(g['graph']).name}` | {g['nodes']:,} | "
                     f"{g['supported_nodes']:,} | {len(g['unsupported'])} | {g['qnn_graphs']} | {g['seconds']:.1f} |")
    refused = [(Path(g["graph"]).name, u) for g in report["graphs"] for u in g["unsupported"]]
    if refused:
        lines += ["", "Refused: " + "; ".join(f"`{name}`: {u['op_type']} `{u['name']}` ({u['reason']})"
                                              for name, u in refused[:20])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
