"""GPTQ rounding (:mod:`quant.gptq`) of a :class:`~compress.deploy.export.StaticLM`'s block weights onto their int8 or int4 grids.

Every block linear (q k v o gate up down), in any export layout, rounded under the Hessian of its inputs on
calibration text. The result is a float model whose block weights already lie on their grids, each channel's
largest |weight| at the last step, so the quantizer (whose MSE range search keeps such a channel's range)
stores exactly those values. Hessians come from one pass of the float model (at 8 bits the inputs barely change)
or, with ``sequential`` (the int4 recipe), block after block from the model whose earlier blocks are already
rounded. At 4 bits the weights may go in LPBQ blocks (:func:`quant.gptq.block_scales`), and the tied table is
rounded as the output head (:func:`gptq_table_`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from compress.deploy.export import LINEARS, StaticLM
from compress.deploy.layouts import Conv1x1, MatMulLinear
from quant.gptq import block_scales, gptq_round, owq_columns


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The (out, in) view of a block linear's weight in any of the export layouts (shares storage)."""
    if isinstance(layer, Conv1x1):
        return layer.weight[:, :, 0, 0]
    if isinstance(layer, MatMulLinear):
        return layer.weight.t()
    return layer.weight


def graph_names(lm: StaticLM) -> dict[int, list[str]]:
    """Every parameter's names in the exported graph (``lm.<path>``) by the parameter's id: a shared block's weight
    has a name per depth, of which the exporter keeps one."""
    names: dict[int, list[str]] = {}
    for n, p in lm.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(f"lm.{n}")
    return names


class _Done(Exception):
    """Ends a calibration prefill early: the blocks whose inputs are wanted have all run."""


@torch.no_grad()
def input_hessians(lm: StaticLM, ids: torch.Tensor, blocks: list[nn.Module] | None = None) -> dict[nn.Module, torch.Tensor]:
    """Σ x·xᵀ / n (float64) of every block linear's inputs (of ``blocks``' only, if given) over prefill runs on
    ``ids`` [n, L]; layers reading the same input get the same matrix, a shared block's layers sum over all their
    depths. A prefill stops once the last of ``blocks`` has run (nothing after it changes their inputs)."""
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}
    hooks = []
    chosen = lm.unique_blocks if blocks is None else blocks
    last = max(i for i, b in enumerate(lm.blocks) if any(b is c for c in chosen))  # the last depth that reads them
    # A prefill is done after the last depth's down projection: the block's how-many-th run that is.
    needed = sum(b is lm.blocks[last] for b in lm.blocks[: last + 1])
    seen = [0]

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        sums[module] = sums.get(module, 0) + x.T @ x
        counts[module] = counts.get(module, 0) + x.shape[0]
        if module is lm.blocks[last].down:
            seen[0] += 1
            if seen[0] == needed:
                raise _Done

    for block in chosen:
        hooks += [getattr(block, name).register_forward_pre_hook(record) for name in LINEARS]
    try:
        for row in ids:
            seen[0] = 0
            with contextlib.suppress(_Done):
                lm.prefill(torch.as_tensor(row)[None])
    finally:
        for h in hooks:
            h.remove()
    return {m: s / counts[m] for m, s in sums.items()}


@torch.no_grad()
def gptq_(lm: StaticLM, ids: torch.Tensor, per_channel: bool = True, weight_range: str = "minmax",
          bits: int = 8, block_size: int = 0, sequential: bool = False,
          keep_columns: dict[str, int] | None = None) -> StaticLM:
    """Round every block linear of ``lm`` onto its ``bits``-bit grid with :func:`gptq_round` (in place), Hessians
    from prefills of ``ids`` of the float model (``sequential``: each block's from the model whose earlier blocks are
    already rounded, as the integer graph will feed it); with ``block_size``, onto LPBQ blocks of that many inputs (:func:`block_scales`):
    ``lm.weight_blocks`` then holds each such weight's (out, in) matrix and scales by its graph names.
    ``keep_columns`` (LPBQ only; linear name -> count) leaves that many input columns of each such linear float, the
    ones :func:`owq_columns` names, with GPTQ rounding the rest around them; ``lm.kept_columns`` holds their indices by
    graph name. No exporter stores such columns yet: the quantizer refuses a weight off its grid."""
    if keep_columns and not block_size:
        raise ValueError("keep_columns needs LPBQ blocks (block_size)")
    hessians = {} if sequential else input_hessians(lm, ids)
    names = graph_names(lm)
    lm.weight_blocks, lm.kept_columns = {}, {}
    for block in lm.unique_blocks:
        if sequential:  # this block's inputs as the blocks already rounded make them (one more pass per block)
            hessians = input_hessians(lm, ids, [block])
        for name in LINEARS:
            layer = getattr(block, name)
            matrix = weight_matrix(layer)
            scales = block_scales(matrix, block_size, bits, weight_range=weight_range) if block_size else None
            keep = None
            if scales is not None and (count := (keep_columns or {}).get(name, 0)):
                keep = owq_columns(matrix, hessians[layer], scales, bits, count)
                rest = matrix.detach().clone()
                rest[:, keep] = 0.0  # the grid is fitted to the columns it holds
                scales = block_scales(rest, block_size, bits, weight_range=weight_range)
                lm.kept_columns.update({alias: keep for alias in names[id(layer.weight)]})
            matrix.copy_(gptq_round(matrix, hessians[layer], per_channel, weight_range, bits=bits, scales=scales,
                                    keep=keep))
            if scales is not None:
                lm.weight_blocks.update({alias: (matrix.detach(), scales) for alias in names[id(layer.weight)]})
    return lm


@torch.no_grad()
def gptq_table_(lm: StaticLM, ids: torch.Tensor, bits: int, wide_rows: torch.Tensor | None = None) -> StaticLM:
    """Round the tied embedding table of ``lm`` (rows of max |value| 1: the embed-rows rewrite) onto the per-row
    ``bits``-bit grid the graph stores it on, with GPTQ as the output head: the head's logits move as little as
    possible, where nearest rounding of a 4-bit table costs far more than the block weights do. The rows of
    ``wide_rows`` (token ids) go on the 8-bit grid instead (compress.deploy.split_table)."""
    if not lm.tied or lm.embed_scale is None:
        raise ValueError("gptq_table_ rounds a tied table with per-row scales (the embed-rows rewrite)")
    total, count = 0, 0

    def record(x: torch.Tensor) -> torch.Tensor:
        nonlocal total, count
        h = lm.head_input(x).double()
        total, count = total + h.T @ h, count + h.shape[0]
        return logits(x)

    logits, lm.logits = lm.logits, record
    try:
        for row in ids:
            lm.prefill(torch.as_tensor(row)[None])
    finally:
        del lm.logits
    hessian = total / count
    narrow = torch.ones(lm.embed.shape[0], dtype=torch.bool)
    if wide_rows is not None and len(wide_rows):
        narrow[wide_rows] = False
        lm.embed[wide_rows] = gptq_round(lm.embed[wide_rows], hessian, per_channel=True, bits=8)
    lm.embed[narrow] = gptq_round(lm.embed[narrow], hessian, per_channel=True, bits=bits)
    return lm


def block_op(lm: StaticLM) -> str:
    """The ONNX operator the block linears of ``lm`` export as (its layout): Conv or MatMul."""
    return "Conv" if isinstance(lm.unique_blocks[0].q, Conv1x1) else "MatMul"
