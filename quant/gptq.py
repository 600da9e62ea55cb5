"""GPTQ (Frantar et al., 2022): rounding a weight matrix onto its int8 (or int4) grid with error feedback.

Rounding each weight to its nearest step treats every input channel as equally important and every
rounding error as independent. GPTQ rounds one input column at a time and moves the error it just made onto
the columns not yet rounded, weighted by the inverse Hessian H = Σ x·xᵀ of the layer's inputs on calibration
text, so the layer's *outputs* on such inputs move as little as possible. Columns go in order of decreasing
H diagonal (the paper's act-order), in blocks of 128 with lazy updates.

The grid is the one an integer graph will use: symmetric, ``levels`` steps each side of zero (127 for int8,
7 for int4), one step per output channel (or one per tensor), step = range / levels, the range from
:func:`quant.weight_ranges.mse_range` or max|w|. The largest |w| of each channel (of the tensor) is pinned at
±levels steps, so a MinMax quantizer reading the rounded weight finds the very same step and keeps every
value exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quant.weight_ranges import mse_range


def levels(bits: int) -> int:
    """Steps each side of zero of a symmetric signed ``bits``-bit grid (127 for 8, 7 for 4)."""
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class BlockScales:
    """Low-power block quantization (LPBQ, the per-block format Qualcomm's HTP takes) of an (out, in) weight: the
    inputs of each row go in blocks of ``size``, each block's step is ``channel[row] * ints[row, block]``, a float
    per output channel times a small integer per block (1 .. 2**scale_bits - 1)."""

    channel: torch.Tensor  # [out] float
    ints: torch.Tensor  # [out, in // size] integers
    size: int

    def steps(self) -> torch.Tensor:
        """Every weight's step, [out, in]."""
        return (self.channel[:, None].double() * self.ints.double()).repeat_interleave(self.size, 1)


def block_scales(weight: torch.Tensor, size: int, bits: int = 4, scale_bits: int = 4,
                 weight_range: str = "minmax") -> BlockScales:
    """The LPBQ scales of ``weight`` (out, in) for blocks of ``size`` inputs, the unit of each channel its largest
    block step / (2**scale_bits - 1). "minmax": each block's step the smallest multiple of the unit that keeps the
    block's max|w| on the ``bits``-bit grid (nothing clipped); "mse": the multiple nearest to the step of
    :func:`quant.weight_ranges.mse_range`'s range (rounding that step up, as for minmax, coarsened the grid of
    every small block: SmolLM2-135M's int4 blocks lost more perplexity that way)."""
    rows, cols = weight.shape
    if cols % size:
        raise ValueError(f"blocks of {size} do not tile {cols} inputs")
    blocks = weight.detach().reshape(rows * (cols // size), size)
    if weight_range == "mse":
        limit = torch.from_numpy(mse_range(blocks.float().numpy(), 0, levels(bits))).double()
    else:
        limit = blocks.double().abs().amax(1)
    ideal = limit.reshape(rows, cols // size) / levels(bits)
    most = 2 ** scale_bits - 1
    channel = (ideal.amax(1) / most).clamp(min=1e-12)
    multiple = ideal / channel[:, None]
    ints = (torch.round(multiple) if weight_range == "mse" else torch.ceil(multiple - 1e-9)).clamp(1, most)
    return BlockScales(channel.float(), ints.to(torch.uint8), size)


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, per_channel: bool = True, weight_range: str = "minmax",
               damping: float = 0.01, block: int = 128, bits: int = 8, scales: BlockScales | None = None,
               keep: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` (out, in) rounded onto symmetric ``bits``-bit grids (per output channel, or one for the tensor;
    each grid's range by ``weight_range``, "mse" or "minmax"; or per block, on the steps of ``scales``) with GPTQ's
    error feedback under ``hessian`` (in, in); returns the rounded float weight, on its grid. Per channel (tensor),
    each channel's (the tensor's) largest |value| lands at exactly the last step. With ``keep`` (only with
    ``scales``), those input columns stay float and go last, taking up the other columns' error (OWQ, Lee et al.,
    2024); the caller stores them apart from the grid."""
    top = levels(bits)
    w = weight.detach().double().clone()
    rows, cols = w.shape
    if keep is not None and scales is None:
        raise ValueError("kept float columns need block scales (scales=) computed without them")
    if scales is not None:
        return _gptq_loop(w, hessian, scales.steps(), top, damping, block, keep=keep).to(weight.dtype)
    axis = 0 if per_channel else None
    if weight_range == "mse":
        limit = torch.from_numpy(mse_range(w.numpy().astype(np.float32), axis, top)).double()
    elif weight_range == "minmax":
        limit = w.abs().amax(1) if per_channel else w.abs().max().reshape(1)
    else:
        raise ValueError(f"weight_range must be mse or minmax, got {weight_range!r}")
    step = (limit / top).clamp(min=1e-12)
    step = step[:, None] if per_channel else step.reshape(1, 1).expand(rows, 1)
    # Pins: the largest |w| of each channel (of the tensor) rounds to ±top steps, whatever the error feedback
    # made of it, so a MinMax quantizer recovers the step from the rounded weight.
    if per_channel:
        pin_cols = w.abs().argmax(1)
        pin_rows = torch.arange(rows)
    else:
        flat = int(w.abs().argmax())
        pin_rows, pin_cols = torch.tensor([flat // cols]), torch.tensor([flat % cols])
    pins = (pin_rows, pin_cols, torch.sign(w[pin_rows, pin_cols]))
    return _gptq_loop(w, hessian, step.expand(rows, cols), top, damping, block, pins).to(weight.dtype)


def _gptq_loop(w: torch.Tensor, hessian: torch.Tensor, steps: torch.Tensor, top: int, damping: float, block: int,
               pins: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               keep: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ on ``w`` (out, in, float64, modified) with every weight's step in ``steps`` (out, in); ``pins`` (rows,
    columns, signs) are weights set to ±top steps whatever the error feedback made of them; ``keep`` columns are
    not rounded and come last (they absorb the error feedback of all the others)."""
    rows, cols = w.shape
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    priority = torch.diagonal(h).clone()
    kept = torch.zeros(cols, dtype=torch.bool)
    if keep is not None:
        kept[keep] = True
        priority[kept] = -1.0  # after every rounded column (diagonals are >= 0)
    order = torch.argsort(priority, descending=True)  # GPTQ's act-order: large inputs first
    kept = kept[order]
    inverse_order = torch.argsort(order)
    w, h, steps = w[:, order], h[order][:, order], steps[:, order]
    position = inverse_order[pins[1]] if pins is not None else None  # where each pin's column went
    h += damping * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros_like(w)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        chunk = w[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        for i in range(end - start):
            column = chunk[:, i]
            step = steps[:, start + i]
            rounded = column.clone() if kept[start + i] else torch.clamp(torch.round(column / step), -top, top) * step
            if position is not None and (pinned := position == start + i).any():
                r = pins[0][pinned]
                rounded[r] = pins[2][pinned] * top * step[r]
            q[:, start + i] = rounded
            d = upper[start + i, start + i]
            error = (column - rounded) / d
            chunk[:, i:] -= error[:, None] * upper[start + i, start + i:end][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return q[:, inverse_order]


def owq_columns(weight: torch.Tensor, hessian: torch.Tensor, scales: BlockScales, bits: int, count: int) -> torch.Tensor:
    """The ``count`` input columns of ``weight`` (out, in) whose nearest rounding onto the steps of ``scales`` costs
    the layer's output most, H_jj · Σ_i (w_ij - round(w_ij))² (OWQ's sensitivity): a massive input channel makes its
    column's error count that many times more."""
    steps = scales.steps()
    w = weight.detach().double()
    top = levels(bits)
    error = w - torch.clamp(torch.round(w / steps), -top, top) * steps
    sensitivity = torch.diagonal(hessian.double()) * error.pow(2).sum(0)
    return torch.argsort(sensitivity, descending=True)[:count]
