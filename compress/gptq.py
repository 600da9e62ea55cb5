"""GPTQ rounding of a :class:`~compress.export.StaticLM`'s block weights onto their int8 grids.

Rounding each weight to its nearest int8 step (what a quantizer does) treats every input channel as
equally important and every rounding error as independent. GPTQ (Frantar et al., 2022) rounds one input
column at a time and moves the error it just made onto the columns not yet rounded, weighted by the
inverse Hessian H = Σ x·xᵀ of the layer's inputs on calibration text, so the layer's *outputs* on such
inputs move as little as possible. Applied here to every block linear (q k v o gate up down) with the
grid an integer graph will use: symmetric int8, one step per output channel (or one per tensor), step =
range / 127 with the range from :func:`quant.quantize.mse_range`.

The result is a float model whose block weights already lie on those grids. One weight per channel
(per tensor) is pinned at ±127 steps, so ORT's MinMax quantizer, reading the largest |weight| of each
channel, finds the very same step and keeps every value exactly (:func:`quant.quantize.quantize` is told
the weights are pre-rounded and checks it). Hessians come from one pass of the float model (not layer by
layer through already rounded ones): at 8 bits the inputs barely change.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compress.export import Conv1x1, MatMulLinear, StaticLM
from quant.quantize import mse_range

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
LEVELS = 127


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The (out, in) view of a block linear's weight in any of the export layouts (shares storage)."""
    if isinstance(layer, Conv1x1):
        return layer.weight[:, :, 0, 0]
    if isinstance(layer, MatMulLinear):
        return layer.weight.t()
    return layer.weight


@torch.no_grad()
def input_hessians(lm: StaticLM, ids: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
    """Σ x·xᵀ / n (float64) of every block linear's inputs over prefill runs on ``ids`` [n, L]; layers
    reading the same input get the same matrix, a shared block's layers sum over all their depths."""
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}
    hooks = []
    for block in lm.unique_blocks:
        for name in LINEARS:
            layer = getattr(block, name)

            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[module] = sums.get(module, 0) + x.T @ x
                counts[module] = counts.get(module, 0) + x.shape[0]

            hooks.append(layer.register_forward_pre_hook(hook))
    try:
        for row in ids:
            lm.prefill(torch.as_tensor(row)[None])
    finally:
        for h in hooks:
            h.remove()
    return {m: s / counts[m] for m, s in sums.items()}


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, per_channel: bool = True, weight_range: str = "mse",
               damping: float = 0.01, block: int = 128) -> torch.Tensor:
    """``weight`` (out, in) rounded onto symmetric int8 grids (per output channel, or one for the tensor; each
    grid's range by ``weight_range``, "mse" or "minmax") with GPTQ's error feedback under ``hessian`` (in, in);
    returns the rounded float weight, on its grid with each channel's (the tensor's) largest |value| at
    exactly 127 steps."""
    w = weight.detach().double().clone()
    rows, cols = w.shape
    axis = 0 if per_channel else None
    if weight_range == "mse":
        limit = torch.from_numpy(mse_range(w.numpy().astype(np.float32), axis)).double()
    elif weight_range == "minmax":
        limit = w.abs().amax(1) if per_channel else w.abs().max().reshape(1)
    else:
        raise ValueError(f"weight_range must be mse or minmax, got {weight_range!r}")
    step = (limit / LEVELS).clamp(min=1e-12)
    step = step[:, None] if per_channel else step.reshape(1, 1).expand(rows, 1)
    # Pins: the largest |w| of each channel (of the tensor) rounds to ±127 steps, whatever the error feedback
    # made of it, so a MinMax quantizer recovers the step from the rounded weight.
    if per_channel:
        pin_cols = w.abs().argmax(1)
        pin_rows = torch.arange(rows)
    else:
        flat = int(w.abs().argmax())
        pin_rows, pin_cols = torch.tensor([flat // cols]), torch.tensor([flat % cols])
    pin_signs = torch.sign(w[pin_rows, pin_cols])

    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True)  # GPTQ's act-order: large inputs first
    inverse_order = torch.argsort(order)
    w, h = w[:, order], h[order][:, order]
    position = inverse_order[pin_cols]  # where each pin's column went
    h += damping * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros_like(w)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        chunk = w[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        for i in range(end - start):
            column = chunk[:, i]
            rounded = torch.clamp(torch.round(column / step[:, 0]), -LEVELS, LEVELS) * step[:, 0]
            pinned = position == start + i
            if pinned.any():
                r = pin_rows[pinned]
                rounded[r] = pin_signs[pinned] * LEVELS * step[r, 0]
            q[:, start + i] = rounded
            d = upper[start + i, start + i]
            error = (column - rounded) / d
            chunk[:, i:] -= error[:, None] * upper[start + i, start + i:end][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return q[:, inverse_order].to(weight.dtype)


@torch.no_grad()
def gptq_(lm: StaticLM, ids: torch.Tensor, per_channel: bool = True, weight_range: str = "mse") -> StaticLM:
    """Round every block linear of ``lm`` with :func:`gptq_round` (in place), Hessians from prefills of ``ids``."""
    hessians = input_hessians(lm, ids)
    for block in lm.unique_blocks:
        for name in LINEARS:
            layer = getattr(block, name)
            matrix = weight_matrix(layer)
            matrix.copy_(gptq_round(matrix, hessians[layer], per_channel, weight_range))
    return lm


def block_op(lm: StaticLM) -> str:
    """The ONNX operator the block linears of ``lm`` export as (its layout): Conv or MatMul."""
    return "Conv" if isinstance(lm.unique_blocks[0].q, Conv1x1) else "MatMul"
