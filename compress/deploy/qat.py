"""Quantization-aware training of a GPTQ-rounded :class:`~compress.deploy.export.StaticLM` on its LPBQ int4 grids.

Post-training rounding does not get a 135M model to 4-bit weights (docs/quantize.md). ``qat_`` goes on from
GPTQ's rounding: the block linears train with every forward pass on their int4 block grids (the rounding's gradient
passed straight through, as in LLM-QAT and EfficientQAT), on the KL from the float model's next-token distributions
(self-distillation: the quantized model learns to say what the float model says, on text it never had to fit
before). Each block's step is its channel's unit times a small integer (LPBQ): the integers stay as GPTQ chose
them, and the units train too when asked (LSQ-style, on their logarithms), which the graph still stores exactly (a
float per channel). The float parameters the graph keeps at 16 bits (norms, per-row table scales, the head mix,
biases) train with them; the tied int4 table stays as GPTQ rounded it, or trains on its own grid when asked. At the
end every block weight (and the table) is set to its rounded value, so the exported weights lie on their grids as
GPTQ's did.

Written here rather than taken from a library: the grids are LPBQ blocks that the graph writer
(:mod:`quant.lpbq`) stores exactly, which torch.ao's fake-quant modules do not express, and the model is the
export module, not the Hugging Face one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from compress.deploy.export import LINEARS, StaticLM
from compress.deploy.gptq import graph_names, weight_matrix
from compress.deploy.layouts import MatMulLinear
from distill.speed import autocast, cpu_has_bf16
from quant.gptq import BlockScales, levels

log = logging.getLogger(__name__)

# The training's default rates (QuantConfig's and QatSettings' too): the weights' and the LPBQ channel units'
# logarithms' learning rates (0: GPTQ's units stay), and the tied int4 table's largest move a step (0: it stays).
QAT_LR, QAT_UNIT_LR, QAT_TABLE_LR = 1e-4, 3e-3, 0.0


def _round_through(weight: torch.Tensor, steps: torch.Tensor | float, top: int) -> torch.Tensor:
    """``weight`` rounded onto ±``top`` multiples of ``steps``, the rounding's gradient passed straight through."""
    x = torch.clamp(weight / steps, -top, top)
    return (x + (torch.round(x) - x).detach()) * steps


class _OnGrid(nn.Module):
    """Parametrization: the weight rounded onto its LPBQ grid, the rounding's gradient passed straight through.

    Each step is the channel's unit times its block's integer. The integers stay as GPTQ chose them; with
    ``learn_units`` the units train too, in log space (LSQ, Esser et al. 2020: a weight clipped at the grid's end
    pulls its unit up, one inside pulls it towards where its rounding error is smallest). The graph stores the unit
    as a float per output channel, so a trained unit is written exactly."""

    def __init__(self, scales: BlockScales, shape: torch.Size, transposed: bool, top: int, learn_units: bool) -> None:
        super().__init__()
        self.register_buffer("ints", scales.ints.float().repeat_interleave(scales.size, 1))  # (out, in)
        self.register_buffer("unit", scales.channel.float())
        gain = torch.zeros_like(self.unit)  # log of the trained unit over GPTQ's: 0 leaves GPTQ's unit exactly
        if learn_units:
            self.log_gain = nn.Parameter(gain)
        else:
            self.register_buffer("log_gain", gain)
        self.shape, self.transposed, self.top, self.size = shape, transposed, top, scales.size

    def units(self) -> torch.Tensor:
        """Each output channel's unit, [out]."""
        return self.unit * self.log_gain.exp()

    @property
    def steps(self) -> torch.Tensor:
        """Every weight's step in the layer's own weight layout (a MatMul stores (in, out))."""
        steps = self.units()[:, None] * self.ints
        return steps.t() if self.transposed else steps.reshape(self.shape)

    def nearest(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` on its grid, in steps."""
        return torch.clamp(torch.round(weight / self.steps), -self.top, self.top)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _round_through(weight, self.steps, self.top)

    def scales(self) -> BlockScales:
        """The LPBQ scales this grid stands for now: the trained units, the block integers unchanged."""
        return BlockScales(self.units().detach(), self.ints[:, ::self.size].to(torch.uint8), self.size)


class _TableOnGrid(nn.Module):
    """Parametrization of the tied int4 table: on its per-tensor grid (±7 steps of its largest value; the embed-rows
    rewrite made every row's largest 1 and the per-row scales float), the rounding's gradient passed straight
    through. The graph's table scale is its peak over 7 (quant.quantize), so one entry is kept at the grid's end."""

    def __init__(self, table: torch.Tensor, top: int) -> None:
        super().__init__()
        self.top, self.step = top, float(table.abs().max()) / top
        if not torch.allclose(table / self.step, torch.round(table / self.step), atol=1e-3):
            raise ValueError("the table trains on the int4 grid GPTQ rounded it onto: round it with gptq_table_ first")
        self.held: torch.Tensor | None = None

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return self.held if self.held is not None else _round_through(table, self.step, self.top)

    @contextlib.contextmanager
    def cached(self, table: torch.Tensor) -> Iterator[None]:
        """Round ``table`` once for every lookup and head inside (one training step), as parametrize.cached does."""
        self.held = self(table)
        try:
            yield
        finally:
            self.held = None

    def rounded(self, table: torch.Tensor) -> torch.Tensor:
        """``table`` on its grid, its largest entry (in magnitude) at the grid's end."""
        steps = torch.clamp(torch.round(table / self.step), -self.top, self.top)
        i = table.abs().argmax()
        steps.view(-1)[i] = torch.sign(table.view(-1)[i]) * self.top
        return steps * self.step


@dataclass
class QatResult:
    """What a quantization-aware training did: tokens, optimizer steps, seconds, and the KL to the float model
    (nats per token) on the first and the last step's sequences."""

    tokens: int
    steps: int
    seconds: float
    first_kl: float
    last_kl: float

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "steps": self.steps, "seconds": round(self.seconds, 1),
                "first_kl": self.first_kl, "last_kl": self.last_kl}


@contextlib.contextmanager
def _training(lm: StaticLM, learn_units: bool, learn_table: bool) -> Iterator[dict[str, list[nn.Parameter]]]:
    """``lm``'s block linears on their grids, its norms as plain ops (the fused norm has no gradient), its int4
    table (and the tied head) on its grid if ``learn_table``, else frozen as GPTQ rounded it. Yields the parameters
    that train at their own rates: the grids' ``units`` (if ``learn_units``) and the ``table``. On exit every block
    weight (and the table) is left on its grid and ``lm.weight_blocks`` holds the blocks and their scales."""
    if learn_table and (not lm.tied or lm.embed_scale is None):
        raise ValueError("training the table needs the tied int4 table with per-row scales (w4a16's embed-rows)")
    names = graph_names(lm)
    grids = []
    for block in lm.unique_blocks:
        for name in LINEARS:
            layer = getattr(block, name)
            scales = lm.weight_blocks[names[id(layer.weight)][0]][1]
            grid = _OnGrid(scales, layer.weight.shape, isinstance(layer, MatMulLinear), levels(4), learn_units)
            grids.append((layer, names[id(layer.weight)], grid))
    fused = [m.fused_norm for m in (lm, *lm.blocks)]
    for m in (lm, *lm.blocks):
        m.fused_norm = False
    for layer, _, grid in grids:
        parametrize.register_parametrization(layer, "weight", grid)
    table = _TableOnGrid(lm.embed.detach(), levels(4)) if learn_table else None
    lm.table_grid = table
    lm.requires_grad_(True)
    lm.embed.requires_grad_(learn_table)
    lm.head.requires_grad_(learn_table)
    try:
        yield {"units": [grid.log_gain for *_, grid in grids] if learn_units else [],
               "table": [lm.embed] if learn_table else []}
    finally:
        lm.requires_grad_(True)
        lm.table_grid = None
        if table is not None:
            with torch.no_grad():
                lm.embed.copy_(table.rounded(lm.embed))
        for m, was in zip((lm, *lm.blocks), fused, strict=True):
            m.fused_norm = was
        for layer, aliases, grid in grids:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            with torch.no_grad():
                layer.weight.copy_(grid.nearest(layer.weight) * grid.steps)
            scales = grid.scales()
            lm.weight_blocks.update({alias: (weight_matrix(layer).detach(), scales) for alias in aliases})


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) of two [t, vocab] logit tensors."""
    return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True,
                    reduction="batchmean")


def qat_(lm: StaticLM, reference: StaticLM, ids: torch.Tensor, lr: float = QAT_LR, batch: int = 4,
         warmup: int = 20, unit_lr: float = QAT_UNIT_LR, table_lr: float = QAT_TABLE_LR, progress: bool = False) -> QatResult:
    """Train ``lm`` (in place; GPTQ-rounded onto LPBQ int4 blocks by :func:`compress.deploy.gptq.gptq_`, which left
    ``lm.weight_blocks``) on its grids to match ``reference`` (its float model, unchanged) on the sequences ``ids``
    [n, L], ``batch`` of them a step, AdamW at ``lr`` after ``warmup`` steps, cosine to zero; bf16 autocast where the
    CPU has bf16. With ``unit_lr`` > 0 each channel's LPBQ unit trains too, at that rate on its logarithm (0: GPTQ's
    units stay); with ``table_lr`` > 0 the tied int4 table trains on its grid by gradient steps in which its largest
    entry moves by that rate (each other entry in proportion to its gradient; rows have largest value 1 and a grid
    step of 1/7; 0: GPTQ's table stays).
    Its block weights end on their grids and ``lm.weight_blocks`` holds them and their scales."""
    if not getattr(lm, "weight_blocks", None):
        raise ValueError("qat_ trains LPBQ int4 block weights: round the model with gptq_(..., block_size=) first")
    ids = torch.as_tensor(ids)
    steps = len(ids) // batch
    if steps < 1:
        raise ValueError(f"quantization-aware training needs at least {batch} sequences, got {len(ids)}")
    started, kls = time.perf_counter(), []
    bf16, cpu = cpu_has_bf16(), torch.device("cpu")  # emulated bf16 would cost far more than the fp32 it replaces
    with _training(lm, unit_lr > 0, table_lr > 0) as own:
        apart = {id(p) for params in own.values() for p in params}
        params = [p for p in lm.parameters() if p.requires_grad and id(p) not in apart]
        groups = [{"params": params, "lr": lr}, *([{"params": own["units"], "lr": unit_lr}] if own["units"] else [])]
        optimizers = [torch.optim.AdamW(groups, weight_decay=0.0)]
        if own["table"]:
            # Gradient steps for the table, scaled so that its largest entry moves by the rate: AdamW would move every
            # entry by about its rate whatever its gradient, so a rate that changes the roundings of frequent tokens
            # would change those of tokens the text never shows; plain SGD's rate would depend on the model's scale.
            optimizers.append(torch.optim.SGD(own["table"], lr=table_lr))
        warm = min(warmup, max(1, steps // 4))
        schedules = [torch.optim.lr_scheduler.LambdaLR(
            o, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))) for o in optimizers]
        lm.train()
        for step in range(steps):
            rows = ids[step * batch:(step + 1) * batch]
            with torch.no_grad(), autocast(bf16, cpu):
                targets = [reference.prefill(row[None])[0][0] for row in rows]
            table = lm.table_grid.cached(lm.embed) if lm.table_grid is not None else contextlib.nullcontext()
            with parametrize.cached(), table, autocast(bf16, cpu):  # each weight rounded once a step
                loss = sum(_kl(lm.prefill(row[None])[0][0], target) for row, target in zip(rows, targets, strict=True))
                (loss / len(rows)).backward()
            if own["table"]:
                lm.embed.grad /= lm.embed.grad.abs().max().clamp_min(1e-30)
            for optimizer, schedule in zip(optimizers, schedules, strict=True):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
            kls.append(loss.item() / len(rows))
            if progress and (step % 10 == 0 or step == steps - 1):
                log.info("QAT step %d/%d: KL %.4f", step + 1, steps, kls[-1])
        lm.eval()
    return QatResult(steps * batch * ids.shape[1], steps, time.perf_counter() - started, kls[0], kls[-1])


def _relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖out − target‖² / ‖target‖²: the error the next block's RMS norm sees, in which a token
    whose stream carries a massive activation counts no more than any other."""
    out, target = out.float().reshape(-1, out.shape[-1]), target.float().reshape(-1, target.shape[-1])
    return ((out - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


def blockwise_(lm: StaticLM, reference: StaticLM, ids: torch.Tensor, epochs: int = 2, lr: float = 2e-5,
               batch: int = 4, unit_lr: float = 0.0, progress: bool = False) -> QatResult:
    """Block-wise reconstruction of ``lm`` (in place; GPTQ-rounded onto LPBQ int4 blocks by
    :func:`compress.deploy.gptq.gptq_`): each block in turn trains on its grids (and its norms) to give the output
    the ``reference`` (float) block gives, from the input the blocks before it, already trained, give it: the
    relative squared error per token (:func:`_relative_error`), ``epochs`` passes over the sequences ``ids`` [n, L],
    ``batch`` a step, AdamW at ``lr`` (the units' logarithms at ``unit_lr``; 0: GPTQ's stay), cosine to zero. As
    EfficientQAT's Block-AP: one block's pass a step, not the whole model's, so far more text than :func:`qat_`
    for the same time. The table stays as GPTQ rounded it. The result counts the tokens each block trained on and
    every block's steps; its ``first_kl`` and ``last_kl`` hold the first and the last block's relative error after
    training, not KLs."""
    if not getattr(lm, "weight_blocks", None):
        raise ValueError("blockwise_ trains LPBQ int4 block weights: round the model with gptq_(..., block_size=) first")
    if len(lm.unique_blocks) != len(lm.blocks):
        raise ValueError("block-wise reconstruction trains one depth at a time; a model with shared blocks "
                         "(MobileLLM-like) needs qat_, which trains them at every depth at once")
    ids = torch.as_tensor(ids)
    steps_per_epoch = len(ids) // batch
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"block-wise reconstruction needs at least {batch} sequences and one epoch, "
                         f"got {len(ids)} and {epochs}")
    started, errors, steps = time.perf_counter(), [], epochs * steps_per_epoch
    bf16, cpu = cpu_has_bf16(), torch.device("cpu")
    tables, ref_tables = lm.prefill_tables(ids.shape[1]), reference.prefill_tables(ids.shape[1])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x_q = torch.cat([lm.embedding(row[None]) for row in ids])  # [n, L, d]: the int4 table's stream
        x_f = torch.cat([reference.embedding(row[None]) for row in ids])
    with _training(lm, unit_lr > 0, False) as own:
        units = {id(p) for p in own["units"]}
        for depth, (block, ref) in enumerate(zip(lm.blocks, reference.blocks, strict=True)):
            with torch.no_grad(), autocast(bf16, cpu):
                y_f = torch.cat([ref.prefill(x[None], ref_tables)[0].float() for x in x_f])
            params = [p for p in block.parameters() if p.requires_grad]
            groups = [{"params": [p for p in params if id(p) not in units], "lr": lr},
                      *([{"params": [p for p in params if id(p) in units], "lr": unit_lr}] if units else [])]
            optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
            for step in range(steps):
                if step % steps_per_epoch == 0:
                    order = torch.randperm(len(ids), generator=generator)
                rows = order[(step % steps_per_epoch) * batch:(step % steps_per_epoch + 1) * batch]
                with parametrize.cached(), autocast(bf16, cpu):
                    loss = sum(_relative_error(block.prefill(x_q[j][None], tables)[0], y_f[j]) for j in rows) / len(rows)
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
            with torch.no_grad(), parametrize.cached(), autocast(bf16, cpu):
                x_q = torch.cat([block.prefill(x[None], tables)[0].float() for x in x_q])
                errors.append(float(_relative_error(x_q, y_f)))
            x_f = y_f
            if progress:
                log.info("block %d/%d reconstructed: relative error %.5f", depth + 1, len(lm.blocks), errors[-1])
    return QatResult(steps * batch * ids.shape[1], steps * len(lm.blocks), time.perf_counter() - started,
                     errors[0], errors[-1])
