"""Qualcomm's HTP compiler in the loop: compile a QDQ graph for a Snapdragon NPU, read which nodes it took,
write the compiled (EPContext) model an app loads without recompiling, and run a graph on the HTP emulator.

The compiler and the emulator come from the ``onnxruntime-qnn`` wheel (a plugin execution provider for
ONNX Runtime >= 1.24; Linux x86_64 and Windows): ``libHtpPrepare.so`` compiles, ``libQnnHtp.so`` on x86 runs
the compiled graph in an emulation of the Hexagon NPU's integer arithmetic. Our own profile check
(:func:`quant.profiles.check`) stays the fast static check; this is the toolchain's own word.

Every call runs in a child process (``python -m quant.qnn``): the QNN libraries print to the terminal from
native code, hold gigabytes while compiling a large graph, and write their op trace into a folder, so the
child keeps the caller's terminal, memory and working directory clean.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

# Snapdragon X Elite (the laptop NPU of Windows on Snapdragon PCs); any SoC number QNN knows is accepted.
DEFAULT_SOC_MODEL = "60"
EP_NAME = "QNNExecutionProvider"
TRACE_FILE = "qnn_op_trace.json"  # the name QNN gives the op trace in its folder


def unavailable() -> str | None:
    """Why the HTP backend cannot be used here (with what to do), or None when it can."""
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        return ("the onnxruntime-qnn package is not installed: `pip install onnxruntime-qnn` (wheels for Linux "
                "x86_64 and Windows; ./scripts/setup.sh installs it where one exists)")
    import onnxruntime as ort

    if not hasattr(ort, "register_execution_provider_library"):
        return f"onnxruntime {ort.__version__} cannot load plugin execution providers: onnxruntime-qnn needs >= 1.24"
    return None


def version() -> str | None:
    """The installed onnxruntime-qnn's version, or None."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("onnxruntime-qnn")
    except PackageNotFoundError:
        return None


@dataclass(frozen=True)
class UnsupportedNode:
    name: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} {self.name}: {self.reason}"


@dataclass(frozen=True)
class HtpCompilation:
    """What the HTP compiler made of one graph: which nodes it took, into how many QNN graphs, as which ops."""

    graph: str
    soc_model: str
    nodes: int
    supported_nodes: int
    unsupported: tuple[UnsupportedNode, ...]
    qnn_graphs: int  # the NPU runs each as one unit; more than one means the CPU runs the nodes between them
    qnn_ops: dict[str, int]  # QNN op type -> count
    seconds: float
    context_model: str | None = None  # the compiled EPContext model, when one was written
    error: str | None = None  # the compiler's or the session's own message when it refused the graph

    @property
    def whole(self) -> bool:
        """True when the NPU takes the whole graph as one QNN graph."""
        return not self.unsupported and self.qnn_graphs == 1 and self.error is None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unsupported"] = [asdict(u) for u in self.unsupported]
        d["whole"] = self.whole
        return d

    @classmethod
    def from_dict(cls, d: dict) -> HtpCompilation:
        d = {k: v for k, v in d.items() if k != "whole"}
        return cls(**{**d, "unsupported": tuple(UnsupportedNode(**u) for u in d["unsupported"])})


def _child(args: list[str], timeout: float) -> dict:
    """Run ``python -m quant.qnn ARGS`` and return the JSON it prints last; raise with its output on failure."""
    return run_child("quant.qnn", args, timeout)


def run_child(module: str, args: list[str], timeout: float) -> dict:
    """Run ``python -m MODULE ARGS`` (a module of this project that loads the QNN libraries) in a child process and
    return the JSON it prints last; raise with its output on failure."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"the QNN HTP child process ({module}) failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1])


def compile_graph(graph: str | Path, soc_model: str = DEFAULT_SOC_MODEL, context_model: str | Path | None = None,
                  trace: str | Path | None = None, timeout: float = 3600) -> HtpCompilation:
    """Compile ``graph`` for the HTP of ``soc_model`` with CPU fallback disabled.

    With ``context_model`` (a path ending in .onnx) a graph the compiler takes whole is also written there as
    an EPContext model, its context binary beside it (``<stem>_qnn.bin``); both appear at once, by rename,
    and only for a whole graph. With ``trace`` the op trace (every ONNX node's QNN mapping, the refused nodes
    and why) is kept there as JSON."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    graph = Path(graph)
    with tempfile.TemporaryDirectory(prefix=".qnn.", dir=Path(context_model).parent if context_model else None) as tmp:
        args = ["compile", str(graph), "--soc-model", str(soc_model), "--work", tmp]
        if context_model is not None:
            args += ["--context", str(Path(tmp) / Path(context_model).name)]
        result = HtpCompilation.from_dict(_child(args, timeout))
        if trace is not None and (Path(tmp) / TRACE_FILE).exists():
            Path(trace).parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / TRACE_FILE, trace)
        if context_model is not None and result.whole:
            context_model = Path(context_model)
            binary = context_model.with_name(context_model.stem + "_qnn.bin")
            os.replace(Path(tmp) / binary.name, binary)  # the binary first: the model names it
            os.replace(Path(tmp) / context_model.name, context_model)
            result = HtpCompilation.from_dict({**result.to_dict(), "context_model": str(context_model)})
    return result


@dataclass(frozen=True)
class HtpQuality:
    """Perplexity and top-1 of one graph on the HTP emulator, next to ONNX Runtime CPU's on the same sequences."""

    soc_model: str
    sequences: int
    tokens: int
    perplexity: float
    cpu_perplexity: float
    agreement_with_cpu: float  # share of positions whose top-1 is the CPU run's
    seconds_per_sequence: float
    compile_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def emulated_quality(graph: str | Path, ids: np.ndarray, soc_model: str = DEFAULT_SOC_MODEL,
                     timeout: float = 7200) -> HtpQuality:
    """Next-token perplexity of the prefill graph ``graph`` over ``ids`` [n, L] on the HTP emulator (the
    compiled graph in the NPU's own arithmetic) and on ONNX Runtime's CPU, with their top-1 agreement.

    The emulator is slow (about 30 s per 256-token prefill of a 190M-parameter student on two cores): pass
    a few sequences."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory(prefix=".qnn-eval.") as tmp:
        np.save(Path(tmp) / "ids.npy", np.asarray(ids, dtype=np.int64))
        return HtpQuality(**_child(["evaluate", str(graph), "--soc-model", str(soc_model),
                                    "--ids", str(Path(tmp) / "ids.npy"), "--work", tmp], timeout))


def layer_norm_parameters(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """The stored scales (gamma) and biases (beta) of every LayerNormalization, which a QNN recipe quantizes
    its own way (:mod:`quant.quantize`).

    QNN's HTP refuses a LayerNorm whose scale is symmetric int8, ORT's default for weights, and one whose int32
    bias (ORT's default, on the input's scale times the weight's) follows an 8-bit input ("Failed to add node":
    the NPU would hand every norm to the CPU). It takes the scale as uint8 with a zero point (the same 256
    levels, spent on the scale's own range) and the bias as uint16 on its own range."""
    initializers = {t.name for t in model.graph.initializer}
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    return (sorted({n.input[1] for n in norms if len(n.input) > 1 and n.input[1] in initializers}),
            sorted({n.input[2] for n in norms if len(n.input) > 2 and n.input[2] in initializers}))


# The child process: everything below runs inside ``python -m quant.qnn``.

def emulator_session(graph: str | Path, soc_model: str = DEFAULT_SOC_MODEL, work: str | Path | None = None):  # noqa: ANN201
    """An ONNX Runtime session that runs ``graph`` on the HTP emulator (CPU fallback disabled; op trace into
    ``work``). It loads the QNN libraries into this process: call it in a child process of its own, as
    :func:`compile_graph` does (:mod:`compress.app.htp_calls` is one)."""
    work = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix=".qnn."))
    return _session(Path(graph), soc_model, work)


def _session(graph: Path, soc_model: str, work: Path, context: Path | None = None):  # noqa: ANN202 - ort session
    import onnxruntime as ort
    import onnxruntime_qnn as qnn

    if EP_NAME not in {d.ep_name for d in ort.get_ep_devices()}:
        ort.register_execution_provider_library(EP_NAME, qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME][:1]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    provider = {"backend_path": qnn.get_qnn_htp_path(), "soc_model": soc_model, "enable_framework_op_trace": "1",
                "framework_op_trace_dir": str(work)}
    if context is not None:
        options.add_session_config_entry("ep.context_enable", "1")
        options.add_session_config_entry("ep.context_file_path", str(context))
        options.add_session_config_entry("ep.context_embed_mode", "0")
        provider["enable_htp_prepare_only"] = "1"
    options.add_provider_for_devices(devices, provider)
    return ort.InferenceSession(str(graph), options)


def _read_trace(graph: Path, soc_model: str, work: Path, seconds: float, error: str | None) -> HtpCompilation:


    nodes = len(onnx.load(graph, load_external_data=False).graph.node)
    path = work / TRACE_FILE
    if not path.exists():  # the compiler stopped before it traced anything
        return HtpCompilation(str(graph), soc_model, nodes, 0, (), 0, {}, seconds, None,
                              error or "the QNN EP wrote no op trace")
    trace = json.loads(path.read_text())
    summary = trace.get("summary", {})
    ops = Counter(m["dst_qnn_op_type"] for sub in trace.get("subgraph_traces", []) for m in sub.get("op_mappings", []))
    unsupported = tuple(UnsupportedNode(u.get("node_name", ""), u.get("op_type", ""), u.get("reason", ""))
                        for u in trace.get("unsupported_nodes", []))
    return HtpCompilation(str(graph), soc_model, int(summary.get("total_onnx_nodes", nodes)),
                          int(summary.get("supported_nodes", 0)), unsupported, int(summary.get("qnn_subgraphs", 0)),
                          dict(sorted(ops.items())), seconds, None, error)


def _compile(graph: Path, soc_model: str, work: Path, context: Path | None) -> dict:
    start = time.perf_counter()
    error = None
    try:
        _session(graph, soc_model, work, context)
    except Exception as exc:  # noqa: BLE001 - the compiler's refusal is the answer, reported with the trace
        error = str(exc).strip().splitlines()[0][:500]
    return _read_trace(graph, soc_model, work, time.perf_counter() - start, error).to_dict()


def _evaluate(graph: Path, soc_model: str, work: Path, ids: np.ndarray) -> dict:
    import onnxruntime as ort

    from quant.runtime import _log_softmax

    start = time.perf_counter()
    htp = _session(graph, soc_model, work)
    compile_seconds = time.perf_counter() - start
    cpu_options = ort.SessionOptions()
    cpu_options.log_severity_level = 3
    cpu = ort.InferenceSession(str(graph), cpu_options, providers=["CPUExecutionProvider"])
    nll = {"htp": 0.0, "cpu": 0.0}
    agree, count, seconds = 0, 0, []
    for row in ids:
        feed = {"input_ids": row[None].astype(np.int64)}
        start = time.perf_counter()
        on_npu = htp.run(["logits"], feed)[0][0, :-1].astype(np.float64)
        seconds.append(time.perf_counter() - start)
        on_cpu = cpu.run(["logits"], feed)[0][0, :-1].astype(np.float64)
        for name, logits in (("htp", on_npu), ("cpu", on_cpu)):
            nll[name] -= float(_log_softmax(logits)[np.arange(len(row) - 1), row[1:]].sum())
        agree += int((on_npu.argmax(-1) == on_cpu.argmax(-1)).sum())
        count += len(row) - 1
    return HtpQuality(soc_model, len(ids), count, math.exp(nll["htp"] / count), math.exp(nll["cpu"] / count),
                      agree / count, float(np.median(seconds)), compile_seconds).to_dict()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant.qnn", description="Compile a QDQ graph for Qualcomm's "
                                     "HTP (CPU fallback disabled) or evaluate it on the HTP emulator; prints JSON.")
    parser.add_argument("action", choices=("compile", "evaluate"))
    parser.add_argument("graph", type=Path)
    parser.add_argument("--soc-model", default=DEFAULT_SOC_MODEL)
    parser.add_argument("--work", type=Path, help="folder for the op trace (default: a temporary one)")
    parser.add_argument("--context", type=Path, help="compile: write the EPContext model here")
    parser.add_argument("--ids", type=Path, help="evaluate: token sequences [n, L] as .npy")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix=".qnn.") as tmp:
        work = args.work or Path(tmp)
        if args.action == "compile":
            result = _compile(args.graph, args.soc_model, work, args.context)
        else:
            if args.ids is None:
                parser.error("evaluate needs --ids")
            result = _evaluate(args.graph, args.soc_model, work, np.load(args.ids))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
