"""How an export-ready model computes a linear layer, as the profile's toolchain wants its weights laid out.

:meth:`compress.deploy.export.StaticLM.conv_layout` and ``matmul_layout`` turn every block linear into one of
these; GPTQ (:mod:`compress.deploy.gptq`) and quantization-aware training (:mod:`compress.deploy.qat`) read the
weight through the same layout the graph stores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Conv1x1(nn.Module):
    """A linear layer computed as a 1x1 Conv over [1, in, 1, T]: NPU toolchains that take per-channel
    weights only on Conv (QNN) then quantize it per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach()[:, :, None, None].clone())
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x.transpose(1, 2).unsqueeze(2), self.weight, self.bias)  # (1, out, 1, T)
        return y.squeeze(2).transpose(1, 2)


class MatMulLinear(nn.Module):
    """A linear layer whose weight is stored transposed, (in, out), and applied as ``x @ weight``.

    The exporter folds ``linear``'s transpose of a weight into the stored tensor only when one node reads
    the weight; a block applied at several depths (MobileLLM-like sharing) would keep a runtime Transpose of
    a float weight in the graph, which then stays unquantized."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().t().contiguous())
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight)
        return y + self.bias if self.bias is not None else y
