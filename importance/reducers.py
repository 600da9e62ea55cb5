"""Pure tensor reductions that turn activations into importance statistics.

Minitron aggregates each channel's activation magnitude first over the sequence, then over the batch;
(batch = L2, sequence = mean) ranked best in its study, (var, var) worst.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Aggregation = Literal["mean", "l2", "var"]
AGGREGATIONS: tuple[str, ...] = ("mean", "l2", "var")


def reduce_sequence(values: torch.Tensor, how: Aggregation) -> torch.Tensor:
    """Reduce non-negative per-token values (batch, seq, channels) over the sequence to (batch, channels)."""
    if how == "mean":
        return values.mean(dim=1)
    if how == "l2":
        return values.pow(2).sum(dim=1).sqrt()
    if how == "var":
        return values.var(dim=1, unbiased=False)
    raise ValueError(f"unknown aggregation {how!r}; allowed: {', '.join(AGGREGATIONS)}")


def channel_magnitudes(x: torch.Tensor) -> torch.Tensor:
    """|x| per channel, in float32: (..., channels)."""
    return x.detach().float().abs()


def head_norms(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """L2 norm of each head's slice of the last dimension: (..., heads * head_dim) -> (..., heads)."""
    x = x.detach().float()
    return x.unflatten(-1, (-1, head_dim)).norm(dim=-1)  # (..., heads, head_dim) -> (..., heads)


def block_influence(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """ShortGPT's Block Influence per token: 1 - cos(layer input, layer output). (batch, seq, hidden) -> (batch, seq)."""
    cos = torch.nn.functional.cosine_similarity(inputs.detach().float(), outputs.detach().float(), dim=-1)
    return 1.0 - cos


@dataclass
class BatchStatistic:
    """Streaming aggregate over samples of per-sample vectors; holds sum and sum of squares only."""

    total: torch.Tensor | None = None
    total_sq: torch.Tensor | None = None
    count: int = 0
    _shape: tuple[int, ...] = field(default=())

    def update(self, per_sample: torch.Tensor) -> None:
        """Add a (samples, channels) block."""
        per_sample = per_sample.detach().double()
        if self.total is None:
            self.total = torch.zeros(per_sample.shape[1:], dtype=torch.float64)
            self.total_sq = torch.zeros_like(self.total)
        self.total += per_sample.sum(dim=0)
        self.total_sq += per_sample.pow(2).sum(dim=0)
        self.count += per_sample.shape[0]

    def result(self, how: Aggregation) -> torch.Tensor:
        if self.total is None or self.count == 0:
            raise ValueError("no samples were recorded")
        if how == "mean":
            out = self.total / self.count
        elif how == "l2":
            out = self.total_sq.sqrt()
        elif how == "var":
            mean = self.total / self.count
            out = (self.total_sq / self.count - mean.pow(2)).clamp_min(0)
        else:
            raise ValueError(f"unknown aggregation {how!r}; allowed: {', '.join(AGGREGATIONS)}")
        return out.float()


def weight_slice_norms(weight: torch.Tensor, dim: int, start: int, count: int, unit: int) -> torch.Tensor:
    """L2 norm of each of ``count`` slices of ``unit`` elements along ``dim``, starting at ``start``."""
    part = weight.detach().float().narrow(dim, start, count * unit).movedim(dim, 0)
    return part.reshape(count, -1).norm(dim=1)  # (count, unit * rest) -> (count,)
