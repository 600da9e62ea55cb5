"""The quantize stage's NPU step for Qualcomm profiles: each integer graph compiled by Qualcomm's HTP compiler
(:mod:`quant.qnn`), its op trace kept, the compiled EPContext model written beside it, and a few validation
sequences run on the HTP emulator next to ONNX Runtime's CPU.

Files, for a graph ``onnx/model.a16w8.onnx``: ``onnx/model.a16w8.qnn.onnx`` and ``onnx/model.a16w8.qnn_qnn.bin``
(the compiled model an app on a Snapdragon device loads without compiling again; written only when the whole
graph compiles) and ``onnx/model.a16w8.qnn_op_trace.json`` (every node's QNN mapping, the refused nodes and why).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from quant import qnn
from quant.profiles import NpuProfile

log = logging.getLogger(__name__)


def compiled_paths(graph: Path) -> tuple[Path, Path]:
    """The EPContext model and the op trace written for ``graph``."""
    stem = graph.name.removesuffix(".onnx")
    return graph.with_name(f"{stem}.qnn.onnx"), graph.with_name(f"{stem}.qnn_op_trace.json")


def compile_graphs(graphs: dict[str, Path], profile: NpuProfile, soc_model: str) -> dict[str, Any]:
    """Compile each of ``graphs`` (part name -> path) for the HTP of ``soc_model`` when ``profile`` is a QNN one.

    Returns ``{"soc_model", "graphs": {part: HtpCompilation.to_dict()}}``, ``{"skipped": why}`` where the
    compiler is not installed, or ``{}`` for a profile of another toolchain."""
    if not profile.qnn_toolchain:
        return {}
    reason = qnn.unavailable()
    if reason:
        log.warning("not compiled for Qualcomm's HTP: %s", reason)
        return {"skipped": reason}
    out: dict[str, Any] = {"soc_model": soc_model, "graphs": {}}
    for part, graph in graphs.items():
        context, trace = compiled_paths(graph)
        for stale in (context, context.with_name(context.stem + "_qnn.bin")):
            stale.unlink(missing_ok=True)
        try:
            result = qnn.compile_graph(graph, soc_model, context_model=context, trace=trace)
        except RuntimeError as error:  # the compiler's process itself failed: the run goes on, the report says so
            log.warning("%s: Qualcomm's HTP compiler failed: %s", graph.name, error)
            return {"skipped": f"the HTP compiler failed on {graph.name}: {str(error).splitlines()[0]}"}
        out["graphs"][part] = {**result.to_dict(), "trace": str(trace) if trace.exists() else None}
        if result.whole:
            log.info("compiled %s for the HTP of SoC %s: all %d nodes in one QNN graph (%.0f s) -> %s", graph.name,
                     soc_model, result.nodes, result.seconds, context.name)
        else:
            log.warning("%s: Qualcomm's HTP compiler refuses %d of %d nodes (%d QNN graphs: the CPU would run the "
                        "rest); the op trace %s says which and why", graph.name, len(result.unsupported), result.nodes,
                        result.qnn_graphs, trace.name)
    return out


def emulate(graph: Path, ids: np.ndarray, soc_model: str, samples: int) -> dict[str, Any] | None:
    """Perplexity of the prefill ``graph`` on the HTP emulator and on ONNX Runtime's CPU over the first
    ``samples`` sequences of ``ids``; None with ``samples`` 0."""
    if samples <= 0:
        return None
    rows = np.asarray(ids)[:samples]
    log.info("running %s on the HTP emulator: %d sequences of %d tokens (about 30 s each for a 100M-parameter "
             "graph)", graph.name, len(rows), rows.shape[1])
    result = qnn.emulated_quality(graph, rows, soc_model).to_dict()
    log.info("HTP emulator: perplexity %.3f against %.3f on ONNX Runtime's CPU (%+.2f%%), top-1 agreement %.3f",
             result["perplexity"], result["cpu_perplexity"], 100 * (result["perplexity"] / result["cpu_perplexity"] - 1),
             result["agreement_with_cpu"])
    return result
