"""Block-quantized int4 MatMul weights in the form Qualcomm's HTP compiler takes: low-power block quantization.

ONNX Runtime's quantizer stores a MatMul weight per tensor or per channel. Per channel, int4 costs a 135M
model about half its perplexity again (``benchmarks/weight_ranges.py --bits 4``); blocks of a few dozen inputs
with their own step cost far less. QNN's HTP runs blocks in one form only (its EP's LPBQ MatMul fusion): each
block's step is a float per output channel times a small unsigned integer per block, written as two
DequantizeLinear nodes, the first making the block steps from the integers, the second (``block_size`` along
the input axis) reading the int4 weight with them::

    block_ints uint8 [K / B, N], channel_scale float [N] --DequantizeLinear(axis=1)--> steps [K / B, N]
    weight int4 [K, N], steps --DequantizeLinear(axis=0, block_size=B)--> MatMul's weight

:func:`write_blocks` puts weights rounded onto such grids (:func:`quant.gptq.block_scales`) into a graph ONNX
Runtime quantized, in place of the per-tensor weights it chose for those MatMuls. ONNX Runtime's CPU runs the
same graph (both nodes are standard opset 21).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from quant.gptq import BlockScales, levels


def _int4(name: str, values: np.ndarray) -> TensorProto:
    """An INT4 initializer of ``values`` (integers in [-8, 7]), two per byte, the first in the low nibble."""
    flat = (values.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = flat[0::2] | (flat[1::2] << 4)
    return helper.make_tensor(name, TensorProto.INT4, list(values.shape), packed.tobytes(), raw=True)


def _read_blocks(dq: onnx.NodeProto, name: str, size: int) -> None:
    """Point the DequantizeLinear ``dq`` at the int4 blocks of weight ``name`` (made by :func:`write_blocks`)."""
    del dq.input[:]
    dq.input.extend([f"{name}_int4", f"{name}_block_steps", f"{name}_block_zero"])
    del dq.attribute[:]
    dq.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", size)])


def write_blocks(path: str | Path, weights: Mapping[str, tuple[torch.Tensor, BlockScales]], bits: int = 4) -> int:
    """Rewrite the graph at ``path`` (atomically): every MatMul whose weight ONNX Runtime quantized from the
    initializer named in ``weights`` (name -> the (out, in) weight already on its grid, and its scales; a weight
    may go by several names, sharing its scales object) reads it as LPBQ blocks instead. Returns how many weights were rewritten; raises if a named weight is not found."""
    path = Path(path)
    model = onnx.load(path)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    found: set[str] = set()
    stale: set[str] = set()
    step_nodes = []  # they read initializers only: first in the graph, before the DequantizeLinear reading them
    top = levels(bits)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producers:
            continue
        dq = producers[node.input[1]]
        source = dq.input[0]
        name = source.removesuffix("_quantized")  # ONNX Runtime's name for the integer copy of an initializer
        if dq.op_type != "DequantizeLinear" or source not in initializers or name not in weights:
            continue
        stale.update(dq.input)
        _read_blocks(dq, name, weights[name][1].size)
        if name in found:  # a weight read by several MatMuls (a shared block) through DequantizeLinears of its own
            continue
        weight, scales = weights[name]
        steps = scales.steps()
        weight = weight.detach().double()
        q = torch.round(weight / steps)
        if (q.abs() > top).any() or (q * steps - weight).abs().max() > 1e-4 * steps.max():
            raise ValueError(f"{name} is not on its block grid: round it with quant.gptq.gptq_round(..., scales=)")
        rows, cols = q.shape  # (out, in); the graph's MatMul weight is (in, out)
        blocks = cols // scales.size
        graph.initializer.extend([
            _int4(f"{name}_int4", q.t().numpy()),
            _int4(f"{name}_block_zero", np.zeros((blocks, rows), np.int8)),
            numpy_helper.from_array(scales.ints.t().contiguous().numpy().astype(np.uint8), f"{name}_block_ints"),
            numpy_helper.from_array(scales.channel.numpy().astype(np.float32), f"{name}_channel_scale"),
            numpy_helper.from_array(np.zeros(rows, np.uint8), f"{name}_channel_zero"),
        ])
        step_nodes.append(helper.make_node(
            "DequantizeLinear", [f"{name}_block_ints", f"{name}_channel_scale", f"{name}_channel_zero"],
            [f"{name}_block_steps"], name=f"{name}_block_steps_DequantizeLinear", axis=1))
        found.add(name)
    found_ids = {id(weights[name][1]) for name in found}  # one of a shared weight's names is enough
    missing = sorted(name for name, (_, scales) in weights.items() if id(scales) not in found_ids)
    if missing:
        raise ValueError(f"no MatMul reads the quantized weights {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
                         " (LPBQ blocks need the MatMul layout: export with conv=False)")
    nodes = [*step_nodes, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name not in stale or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    staged = path.with_name(f".{path.name}.blocks")
    onnx.save(model, staged)
    staged.replace(path)
    return len(found)
