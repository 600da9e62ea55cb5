"""Weight ranges of symmetric integer grids: the range that rounds a weight with the least error, and clipping a
graph's weights to it before ONNX Runtime's MinMax quantizer reads them (``QuantRecipe.weight_range="mse"``)."""

from __future__ import annotations

import numpy as np
import onnx


def mse_range(weight: np.ndarray, axis: int | None, levels: int = 127) -> np.ndarray:
    """The symmetric range r <= max|w| of each channel along ``axis`` (``None``: one for the whole tensor) that
    minimizes the squared error of rounding ``weight`` to ``levels`` steps each side of zero.

    A coarse-then-fine search of r / max|w| in [0.5, 1] (steps of 0.05, then 0.01 around the best). MinMax's
    r = max|w| spends the 8-bit grid on a channel's few largest weights; a narrower range rounds the bulk finer
    and clips those few. A channel already on a grid of ``levels`` steps with its largest |w| at the last step
    (a GPTQ-rounded one) keeps r = max|w|: it rounds without error there."""
    if axis is None:
        rows = weight.reshape(1, -1)
    else:
        rows = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    rows = rows.astype(np.float32, copy=False)
    peak = np.abs(rows).max(1)
    safe = np.where(peak > 0, peak, 1.0).astype(np.float32)

    def error(ratio: np.ndarray) -> np.ndarray:
        step = (ratio * safe / levels)[:, None]
        return np.square(np.clip(np.round(rows / step), -levels, levels) * step - rows).sum(1)

    best = np.ones_like(safe)
    best_error = error(best)

    def consider(ratio: np.ndarray) -> None:
        nonlocal best, best_error
        candidate = error(ratio)
        better = candidate < best_error
        best, best_error = np.where(better, ratio, best), np.where(better, candidate, best_error)

    for ratio in np.arange(0.95, 0.49, -0.05, dtype=np.float32):
        consider(np.full_like(safe, ratio))
    coarse = best
    for delta in np.arange(-0.04, 0.045, 0.01, dtype=np.float32):
        if abs(delta) > 1e-6:
            consider(np.clip(coarse + delta, 0.5, 1.0).astype(np.float32))
    return (best * peak).astype(np.float32)


_LEVELS = {"QInt8": 127, "QUInt8": 127, "QInt4": 7, "QUInt4": 7}  # steps each side of zero, symmetric types


def clip_weights(model: onnx.ModelProto, config) -> int:  # noqa: ANN001 - ORT's StaticQuantConfig
    """Clip every symmetric 8- or 4-bit MatMul/Gemm/Conv weight of ``model`` (in place) to its :func:`mse_range`, along
    the axis ORT will quantize it on (``config``: per-tensor overrides, per-channel overrides, else the global
    per-channel switch); ORT's MinMax on the clipped weight then takes that range. Returns how many changed."""
    from onnx import numpy_helper

    overrides = config.extra_options.get("TensorQuantOverrides", {})
    op_axes = config.extra_options.get("QDQOpTypePerChannelSupportToAxis", {})
    symmetric_default = config.extra_options.get("WeightSymmetric", True)
    initializers = {t.name: t for t in model.graph.initializer}
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1 and node.input[1] in initializers:
            default = {"MatMul": 1, "Conv": 0}.get(node.op_type)
            if node.op_type == "Gemm":
                default = 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
            readers.setdefault(node.input[1], set()).add(op_axes.get(node.op_type, default))
    clipped = 0
    for name, axes in readers.items():
        entry = overrides.get(name, [{}])[0]
        quant_type = getattr(entry.get("quant_type", config.weight_type), "name", str(entry.get("quant_type")))
        if quant_type not in _LEVELS or not entry.get("symmetric", symmetric_default):
            continue
        if "axis" in entry:
            axis = entry["axis"]
        elif name in overrides or not config.per_channel or len(axes) != 1:
            axis = None
        else:
            axis = next(iter(axes))
        weight = numpy_helper.to_array(initializers[name])
        if weight.dtype != np.float32:
            continue
        if axis is not None:
            axis %= weight.ndim
        limit = mse_range(weight, axis, _LEVELS[quant_type])
        if axis is not None:
            shape = [1] * weight.ndim
            shape[axis] = -1
            limit = limit.reshape(shape)
        if np.all(limit >= np.abs(weight).max(axis=axis, keepdims=axis is not None)):
            continue
        initializers[name].CopyFrom(numpy_helper.from_array(np.clip(weight, -limit, limit), name))
        clipped += 1
    return clipped
