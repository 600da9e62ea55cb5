"""Quantization-aware training of a GPTQ-rounded :class:`~compress.deploy.export.StaticLM` on its LPBQ int4 grids.

Post-training rounding does not get a 135M model to 4-bit weights (docs/quantize.md). ``qat_`` goes on from
GPTQ's rounding: the block linears train with every forward pass on their int4 block grids (the steps GPTQ chose,
kept fixed, so the graph's LPBQ scales do not change; the rounding's gradient passed straight through, as in
LLM-QAT and EfficientQAT), on the KL from the float model's next-token distributions (self-distillation: the
quantized model learns to say what the float model says, on text it never had to fit before). The float
parameters the graph keeps at 16 bits (norms, per-row table scales, the head mix, biases) train with them; the
int4 table stays as GPTQ rounded it. At the end every block weight is set to its rounded value, so the exported
weights lie on their grids as GPTQ's did.

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

from compress.deploy.export import LINEARS, MatMulLinear, StaticLM
from compress.deploy.gptq import graph_names, weight_matrix
from quant.gptq import BlockScales, levels

log = logging.getLogger(__name__)


class _OnGrid(nn.Module):
    """Parametrization: the weight rounded onto fixed steps, the rounding's gradient passed straight through."""

    def __init__(self, steps: torch.Tensor, top: int) -> None:
        super().__init__()
        self.register_buffer("steps", steps.float())
        self.top = top

    def nearest(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` on its grid, in steps."""
        return torch.clamp(torch.round(weight / self.steps), -self.top, self.top)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        x = weight / self.steps
        return (x + (self.nearest(weight) - x).detach()) * self.steps


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


def _grid_steps(layer: nn.Module, scales: BlockScales) -> torch.Tensor:
    """Every weight's step in the layer's own weight layout (a MatMul stores (in, out))."""
    steps = scales.steps()
    return steps.t().contiguous() if isinstance(layer, MatMulLinear) else steps.reshape(layer.weight.shape)


@contextlib.contextmanager
def _training(lm: StaticLM) -> Iterator[None]:
    """``lm``'s block linears on their grids, its norms as plain ops (the fused norm has no gradient), its int4 table
    (and the tied head) frozen as GPTQ rounded it. On exit every block weight is left on its grid and
    ``lm.weight_blocks`` points at them."""
    names = graph_names(lm)
    grids = []
    for block in lm.unique_blocks:
        for name in LINEARS:
            layer = getattr(block, name)
            scales = lm.weight_blocks[names[id(layer.weight)][0]][1]
            grids.append((layer, names[id(layer.weight)], scales, _OnGrid(_grid_steps(layer, scales), levels(4))))
    fused = [m.fused_norm for m in (lm, *lm.blocks)]
    for m in (lm, *lm.blocks):
        m.fused_norm = False
    for layer, _, _, grid in grids:
        parametrize.register_parametrization(layer, "weight", grid)
    lm.requires_grad_(True)
    lm.embed.requires_grad_(False)
    lm.head.requires_grad_(False)
    try:
        yield
    finally:
        lm.requires_grad_(True)
        for m, was in zip((lm, *lm.blocks), fused, strict=True):
            m.fused_norm = was
        for layer, aliases, scales, grid in grids:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            with torch.no_grad():
                layer.weight.copy_(grid.nearest(layer.weight) * grid.steps)
            lm.weight_blocks.update({alias: (weight_matrix(layer).detach(), scales) for alias in aliases})


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) of two [t, vocab] logit tensors."""
    return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True,
                    reduction="batchmean")


def qat_(lm: StaticLM, reference: StaticLM, ids: torch.Tensor, lr: float = 1e-4, batch: int = 4,
         warmup: int = 20, progress: bool = False) -> QatResult:
    """Train ``lm`` (in place; GPTQ-rounded onto LPBQ int4 blocks by :func:`compress.deploy.gptq.gptq_`, which left
    ``lm.weight_blocks``) on its grids to match ``reference`` (its float model, unchanged) on the sequences ``ids``
    [n, L], ``batch`` of them a step, AdamW at ``lr`` after ``warmup`` steps, cosine to zero; bf16 autocast. Its block
    weights end on their grids and ``lm.weight_blocks`` holds them."""
    if not getattr(lm, "weight_blocks", None):
        raise ValueError("qat_ trains LPBQ int4 block weights: round the model with gptq_(..., block_size=) first")
    ids = torch.as_tensor(ids)
    steps = len(ids) // batch
    if steps < 1:
        raise ValueError(f"quantization-aware training needs at least {batch} sequences, got {len(ids)}")
    started, kls = time.perf_counter(), []
    with _training(lm):
        params = [p for p in lm.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        warm = min(warmup, max(1, steps // 4))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
        lm.train()
        for step in range(steps):
            rows = ids[step * batch:(step + 1) * batch]
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                targets = [reference.prefill(row[None])[0][0] for row in rows]
            with parametrize.cached(), torch.autocast("cpu", dtype=torch.bfloat16):  # each weight rounded once a step
                loss = sum(_kl(lm.prefill(row[None])[0][0], target) for row, target in zip(rows, targets, strict=True))
                (loss / len(rows)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            kls.append(loss.item() / len(rows))
            if progress and (step % 10 == 0 or step == steps - 1):
                log.info("QAT step %d/%d: KL %.4f", step + 1, steps, kls[-1])
        lm.eval()
    return QatResult(steps * batch * ids.shape[1], steps, time.perf_counter() - started, kls[0], kls[-1])
