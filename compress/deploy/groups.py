"""The tensor groups of the exported graphs that a quantization recipe may keep wider than the rest, found
from the graph's structure rather than from names (the graphs of :mod:`compress.deploy.export` and
:mod:`compress.deploy.mu_export`).

Activation groups (:func:`find_groups`, a recipe's ``sixteen_bit``):

- ``residual``: the residual stream, i.e. the inputs of every normalization and the Add chains that
  produce them, back through layout changes to the linear layers that write each addend (one outlier token
  sets their range; 8 bits then round ordinary tokens to zero);
- ``softmax``: inputs and outputs of every Softmax, and the scores' scaling and masking before it (the
  masked scores span [-100, +30]);
- ``swiglu``: the MLP's gating (SwiGLU, or GeGLU for Gemma), from the gate and up projections' outputs through act(gate)·up to the
  down projection's input (the worst tensor for 8 bits);
- ``attention``: both inputs of every MatMul between two activations (queries·keys, weights·values).

Weight groups (:func:`find_weight_groups`, a recipe's ``sixteen_bit_weights``), stored as int16:

- ``head-mix``: the square matrix a rotated model with a tied head applies before the head
  (Qᵀ·diag(g)·Q, the final norm's weights seen in the rotated basis, see :func:`compress.deploy.outliers.rotate`).
  Every column mixes all channels, so neither per-tensor nor per-channel int8 fits it: int8 costs about
  2% perplexity on SmolLM2, int16 nothing measurable, and it is d×d (0.66 MB at 16 bits for d=576).
- ``norm-mixes``: the same kind of matrix after each norm on a sub-layer's output (Gemma's sandwich norms) in
  a rotated model (Qᵀ·diag(g)·Q for that norm's weights g): int16 for the same reason, 36 of them for
  Gemma3-270M (29 MB at 16 bits);
- ``embedding``: the token-embedding table(s) read by a Gather, and the head's weight (one tensor when tied);
- ``mlp-weights``: the gate, up and down projections (the linears around the ``swiglu`` activations);
- ``attention-weights``: every other block linear (queries, keys, values, output).

The last three exist to find where an integer graph loses accuracy (``benchmarks/quant_sensitivity.py``):
int16 everywhere would double a graph's size.

:func:`quantize_graph` is :func:`quant.quantize.quantize` with both finders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from quant.quantize import QuantRecipe, QuantReport, quantize

GROUPS = ("residual", "softmax", "swiglu", "attention")
WEIGHT_GROUPS = ("head-mix", "norm-mixes", "embedding", "mlp-weights", "attention-weights")
_GATES = ("Sigmoid", "Gelu", "Tanh", "Erf")  # SiLU's and GELU's ops, as the exporter writes them
_NORMS = ("RMSNormalization", "LayerNormalization", "SimplifiedLayerNormalization")
_LAYOUT = ("Transpose", "Unsqueeze", "Reshape", "Squeeze")  # ops that only move an activation's elements


def find_groups(model: onnx.ModelProto) -> dict[str, list[str]]:
    """The activation tensors of each group in GROUPS (see the module docstring)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name for t in model.graph.initializer}
    residual: list[str] = []
    stack = [n.input[0] for n in model.graph.node if n.op_type in _NORMS]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name in initializers:
            continue
        seen.add(name)
        residual.append(name)
        node = producers.get(name)
        if node is not None and node.op_type == "Add":
            stack += [i for i in node.input if i]
        elif node is not None and node.op_type in _LAYOUT:
            # A 1x1 Conv's output reaches the Add through a layout change; it carries the same values (the MLP's
            # massive activations among them), so it is as wide as the stream it is added to.
            stack.append(node.input[0])
    softmax: list[str] = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        softmax += [*node.input, *node.output]
        # back through the scaling and masking of the scores to the MatMul that made them
        source = producers.get(node.input[0])
        while source is not None and source.op_type in ("Add", "Sub", "Mul", "Div"):
            activations = [i for i in source.input if i and i not in initializers]
            softmax += activations
            source = producers.get(activations[0]) if len(activations) == 1 else None
    swiglu: list[str] = []
    layout = _LAYOUT
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Conv") or n.input[1] not in initializers:
            continue
        source = n.input[0]
        while producers.get(source) is not None and producers[source].op_type in layout:
            source = producers[source].input[0]  # a Conv reads the Mul through a layout change
        if producers.get(source) is None or producers[source].op_type != "Mul":
            continue
        stack, chain = [n.input[0]], []
        while stack:  # back through the gating to the gate/up projections' outputs (included)
            name = stack.pop()
            if name in chain or name in initializers:
                continue
            chain.append(name)
            node = producers.get(name)
            if node is not None and node.op_type in ("Mul", *_GATES, *layout):
                stack += [i for i in node.input if i]
        swiglu += chain
    attention = [i for n in model.graph.node if n.op_type == "MatMul" and not set(n.input) & initializers
                 for i in n.input]
    return {"residual": residual, "softmax": softmax, "swiglu": swiglu, "attention": attention}


def find_weight_groups(model: onnx.ModelProto) -> dict[str, list[str]]:
    """The initializers of each group in WEIGHT_GROUPS (see the module docstring)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name: t for t in model.graph.initializer}
    mixes = []
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.op_type == "Gemm" and node.input[1] in initializers else None
        if source is not None and source.op_type == "MatMul" and source.input[1] in initializers:
            mixes.append(source.input[1])
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    norm_mixes = sorted({n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers
                         and getattr(producers.get(n.input[0]), "op_type", None) in _NORMS
                         and any(r.op_type == "Add" for r in readers.get(n.output[0], []))})
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in initializers
              and len(initializers[n.input[0]].dims) == 2 and initializers[n.input[0]].dims[1] > 1}
    heads = {n.input[1] for n in model.graph.node if n.op_type == "Gemm" and n.input[1] in initializers}
    embedding = tables | heads
    gating = set(find_groups(model)["swiglu"])

    def reaches_gating(name: str) -> bool:  # through layout changes, as find_groups walks them
        stack, seen = [name], set()
        while stack:
            name = stack.pop()
            if name in gating:
                return True
            if name not in seen:
                seen.add(name)
                stack += [o for n in readers.get(name, []) if n.op_type in _LAYOUT for o in n.output]
        return False

    mlp, attention = [], []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Conv") or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        weight = node.input[1]
        if weight in embedding or weight in mixes or weight in norm_mixes:
            continue
        (mlp if node.input[0] in gating or reaches_gating(node.output[0]) else attention).append(weight)
    return {"head-mix": sorted(set(mixes)), "norm-mixes": norm_mixes, "embedding": sorted(embedding), "mlp-weights": sorted(set(mlp)),
            "attention-weights": sorted(set(attention))}


def quantize_graph(float_path: str | Path, out_path: str | Path, feeds: Any, recipe: QuantRecipe, profile: Any,
                   progress: bool = False) -> QuantReport:
    """:func:`quant.quantize.quantize` of one of the project's graphs, its tensor groups found here."""
    return quantize(float_path, out_path, feeds, recipe, profile, progress=progress, groups=find_groups,
                    weight_groups=find_weight_groups)
