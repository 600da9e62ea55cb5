"""NPU profiles as data, and the graph checks that hold a QDQ ONNX graph against one.

A profile says what an NPU toolchain accepts: the operator set, the activation and weight integer
types, which operators may take per-channel weights, the channel multiple its vector units want.
``check(model, profile)`` lists every violation: dynamic dimensions, control flow or shape arithmetic,
operators outside the set, float islands (a compute node reading a float tensor that no
DequantizeLinear produced, or writing one that no QuantizeLinear consumes), weights of the wrong type
or granularity, and weight channels that are not a multiple of the profile's alignment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import onnx
from onnx import TensorProto

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
SHAPE_ARITHMETIC = frozenset({"Shape", "Size", "ConstantOfShape", "Range", "NonZero", "NonMaxSuppression"})
_COMMON_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "MatMul", "Gemm", "Softmax", "Sigmoid", "Tanh", "Relu", "Gather",
    "Reshape", "Transpose", "Concat", "Slice", "Split", "Expand", "Tile", "Unsqueeze", "Squeeze",
    "RMSNormalization", "LayerNormalization", "ReduceMean", "ReduceMax", "Sqrt", "Pow", "Exp", "Where",
    "Cast", "Clip", "Max", "Min", "Equal", "Conv", "Gelu", "Erf", "Sin", "Cos",
}) | QDQ_OPS
_INT_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL}
_TYPE_NAMES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8, "uint16": TensorProto.UINT16,
               "int16": TensorProto.INT16, "int4": TensorProto.INT4}


@dataclass(frozen=True)
class NpuProfile:
    """What one NPU toolchain accepts; see the module docstring."""

    name: str
    description: str
    activation_type: str  # default activation integer type: uint8 or uint16
    weight_type: str  # weight integer type (symmetric): int8
    ops: frozenset[str]
    per_channel_ops: tuple[str, ...]  # operators whose weights may be per-channel
    channel_multiple: int  # weight matrix dimensions must be multiples of this (1: no rule)
    activation_types: tuple[str, ...] = ("uint8", "uint16")  # types per-tensor overrides may use
    weight_types: tuple[str, ...] = ("int8", "int16")  # weight types per-tensor overrides may use
    default_quant: str = "a8w8"
    linear_as_conv: bool = False  # export linear layers as 1x1 Convs so their weights can be per-channel
    # The toolchain is Qualcomm's QNN: run ORT's QNN graph preprocessing before quantizing, and leave per-channel
    # weights to ORT's QNN config (it sets them where QNN takes them) instead of this profile's per_channel_ops.
    qnn_toolchain: bool = False
    # Float activations and integer weights inside the matmul operators (no Q/DQ pairs): float tensors are
    # expected, a float matmul weight is not. The head is exported as its own MatMul so it is quantized too.
    weight_only: bool = False

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ops"] = sorted(self.ops)
        return d


PROFILES: dict[str, NpuProfile] = {}


def register(profile: NpuProfile) -> NpuProfile:
    """Add a profile to the registry (users may add their own)."""
    PROFILES[profile.name] = profile
    return profile


register(NpuProfile(
    name="qnn-htp",
    description="Qualcomm Hexagon NPU through ONNX Runtime's QNN EP: 16-bit activations by default, 8-bit "
                "weights (4-bit for w4a16), per-channel weights on Conv only (ORT's QNN config keeps MatMul "
                "per-tensor), channel counts in multiples of 32.",
    activation_type="uint16",
    weight_type="int8",
    weight_types=("int8", "int16", "int4"),
    ops=_COMMON_OPS,
    per_channel_ops=("Conv",),
    channel_multiple=32,
    default_quant="a16w8",
    linear_as_conv=True,
    qnn_toolchain=True,
))
register(NpuProfile(
    name="generic-a8w8",
    description="Any QDQ-consuming NPU or ONNX Runtime on CPU: 8-bit unsigned activations, 8-bit "
                "symmetric per-channel weights on MatMul, Gemm and Conv.",
    activation_type="uint8",
    weight_type="int8",
    ops=_COMMON_OPS,
    per_channel_ops=("MatMul", "Gemm", "Conv"),
    channel_multiple=1,
))


register(NpuProfile(
    name="ort-cpu",
    description="ONNX Runtime on a CPU, for machines without an NPU: float activations, every matmul weight stored "
                "as int8 or int4 blocks (com.microsoft MatMulNBits), the format ORT's CPU kernels decode fastest.",
    activation_type="float",
    weight_type="int8",
    ops=_COMMON_OPS | {"MatMulNBits"},
    per_channel_ops=(),
    channel_multiple=1,
    activation_types=(),
    weight_types=("int8", "int4"),
    default_quant="w8",
    weight_only=True,
))


def get_profile(name: str) -> NpuProfile:
    if name not in PROFILES:
        raise KeyError(f"unknown NPU profile {name!r}; known: {', '.join(sorted(PROFILES))}")
    return PROFILES[name]


@dataclass(frozen=True)
class Violation:
    kind: str  # dynamic-dim, control-flow, shape-arithmetic, op, float-island, weight-type, alignment
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.where}: {self.detail}"


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def check(model: onnx.ModelProto, profile: NpuProfile, quantized: bool = True) -> list[Violation]:
    """Every way ``model`` breaks ``profile``. ``quantized=False`` checks shapes and operators only."""
    found: list[Violation] = []
    graph = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # noqa: BLE001 - a graph shape inference cannot read still gets the other checks
        inferred = graph
    values = {v.name: v for v in (*inferred.input, *inferred.output, *inferred.value_info)}
    for value in (*graph.input, *graph.output):
        dims = _dims(values.get(value.name, value))
        if any(not isinstance(d, int) or d <= 0 for d in dims):
            found.append(Violation("dynamic-dim", value.name, f"shape {dims}: every dimension must be a fixed number"))
    for value in inferred.value_info:
        dims = _dims(value)
        if any(not isinstance(d, int) or d <= 0 for d in dims):
            found.append(Violation("dynamic-dim", value.name, f"shape {dims}"))

    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {v.name for v in graph.output}

    def elem_type(name: str) -> int | None:
        if name in initializers:
            return initializers[name].data_type
        value = values.get(name)
        return value.type.tensor_type.elem_type if value is not None else None

    for node in graph.node:
        where = f"{node.op_type} {node.name or node.output[0]}"
        if node.op_type in CONTROL_FLOW:
            found.append(Violation("control-flow", where, "static graphs only: no If/Loop/Scan"))
        elif node.op_type in SHAPE_ARITHMETIC:
            found.append(Violation("shape-arithmetic", where, "shape computation left in the graph"))
        elif node.op_type not in profile.ops:
            found.append(Violation("op", where, f"{node.op_type} is not in {profile.name}'s operator set"))
        if not quantized or profile.weight_only or node.op_type in QDQ_OPS or node.op_type == "Cast":
            continue
        for name in node.input:
            if not name or elem_type(name) in _INT_TYPES or elem_type(name) is None and name not in producers:
                continue
            producer = producers.get(name)
            if name in initializers:
                if elem_type(name) in (TensorProto.FLOAT, TensorProto.FLOAT16):
                    found.append(Violation("float-island", where, f"reads float weight {name}"))
            elif (producer is None or producer.op_type != "DequantizeLinear") and elem_type(name) in (
                TensorProto.FLOAT, TensorProto.FLOAT16
            ):
                found.append(Violation("float-island", where, f"reads float tensor {name} not produced by DequantizeLinear"))
        for name in node.output:
            if elem_type(name) not in (TensorProto.FLOAT, TensorProto.FLOAT16):
                continue
            users = consumers.get(name, [])
            if name in outputs or not users or any(u.op_type != "QuantizeLinear" for u in users):
                found.append(Violation("float-island", where, f"writes float tensor {name} not quantized by QuantizeLinear"))
    if quantized and profile.weight_only:
        found += [Violation("weight-type", f"{n.op_type} {n.name or n.output[0]}", f"float weight {n.input[1]}: "
                            f"{profile.name} stores every matmul weight as integers (MatMulNBits)")
                  for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.input[1] in initializers]
    elif quantized:
        found += _check_weights(graph, profile, initializers, producers, consumers)
    return found


def _check_weights(graph, profile: NpuProfile, initializers, producers, consumers) -> list[Violation]:  # noqa: ANN001
    found = []
    allowed = {_TYPE_NAMES[t] for t in (profile.weight_type, *profile.weight_types)}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        where = f"{node.op_type} {node.name or node.output[0]}"
        for name in node.input[1:2]:
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
                continue  # activation x activation (attention) or already reported as a float island
            weight = initializers[dq.input[0]]
            if weight.data_type not in allowed:
                found.append(Violation("weight-type", where, f"weight {weight.name} is "
                                       f"{TensorProto.DataType.Name(weight.data_type).lower()}, "
                                       f"{profile.name} takes {' or '.join(sorted(set((profile.weight_type, *profile.weight_types))))}"))
            scale = initializers.get(dq.input[1])
            per_channel = scale is not None and len(scale.dims) > 0 and max(scale.dims) > 1
            if per_channel and node.op_type not in profile.per_channel_ops:
                found.append(Violation("weight-type", where, f"per-channel weight {weight.name}; {profile.name} "
                                       f"takes per-channel only on {', '.join(profile.per_channel_ops)}"))
            if profile.channel_multiple > 1:
                channels = list(weight.dims[:2])  # out and in channels; a Conv's kernel dims are not channels
                bad = [d for d in channels if d % profile.channel_multiple]
                if bad:
                    found.append(Violation("alignment", where, f"weight {weight.name} {list(weight.dims)}: "
                                           f"dimensions must be multiples of {profile.channel_multiple}"))
    return found
