"""The learning-rate guard of ``DistillConfig.lr_backoffs``.

A peak learning rate that recovers a heavily pruned student (far from its teacher) wrecks one that starts near its
teacher, e.g. one whose blocks are whole and only the vocabulary trimmed: measured on Gemma3-270M, 3e-4 took such
a student from 31.8 to 58.7 validation perplexity where 3e-5 took it to 28.2
(benchmarks/results/distill_recovery_gemma3-270m-vocab.md). The guard checks once, right after warmup, where the
peak has been applied: a validation perplexity above the one at the start sends the student back to its initial
weights (fresh optimizer state), divides the peak by ``FACTOR`` and restarts the schedule, warmup included, over
the steps that are left. Each restart is checked the same way, up to ``lr_backoffs`` times.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from distill.config import DistillConfig

log = logging.getLogger(__name__)

FACTOR = 10.0


class LearningRateGuard:
    """The learning rate of each step, and the check that backs its peak off.

    ``history`` is the run's history so far (a resumed run carries on at the peak and restart its records hold;
    checks need the initial weights, so they run only in a run that starts at step 0); ``params`` are the trained
    tensors, snapshotted at the start so a backoff can put them back.
    """

    def __init__(self, config: DistillConfig, total: int, history: list[dict[str, Any]], params: list[torch.Tensor],
                 enabled: bool) -> None:
        self.config, self.total = config, total
        backoffs = [r for r in history if "lr_backoff" in r]
        self.peak = backoffs[-1]["lr_backoff"]["to"] if backoffs else config.lr
        self.restart = backoffs[-1]["step"] if backoffs else 0
        self.left = config.lr_backoffs - len(backoffs) if enabled and not history else 0
        self.initial = [p.detach().clone() for p in params] if self.left else None
        self.baseline: float | None = None

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        return self.config.lr_at(step - self.restart, self.total - self.restart, self.peak)

    def _check_step(self) -> int:
        return self.restart + self.config.warmup(self.total - self.restart) + 1

    def due(self, step: int) -> bool:
        """Whether the check falls after step ``step`` (1-based: steps done): the first step past the warmup of
        the current schedule, when steps remain after it."""
        return self.left > 0 and step == self._check_step() < self.total

    def pending(self, step: int) -> bool:
        """Whether a check is still ahead of step ``step``. No checkpoint is written then: a run resumed from it
        would lack the initial weights the check may need to go back to, and so would skip the check."""
        return self.left > 0 and step < self._check_step() < self.total

    def check(self, step: int, validation: float, params: list[torch.Tensor]) -> dict[str, Any] | None:
        """After step ``step``, with the validation perplexity ``validation``: None when it is at most the
        baseline; else the weights are back at their start, the peak is lower, and the record of the backoff
        (for the history) is returned. The caller must then start its optimizers afresh."""
        assert self.baseline is not None and self.initial is not None
        worse = torch.tensor([float(validation > self.baseline)], device=params[0].device)
        if dist.is_initialized():  # every process takes the same decision
            dist.all_reduce(worse, op=dist.ReduceOp.MAX)
        if not worse.item():
            self.left = 0
            return None
        with torch.no_grad():
            for param, start in zip(params, self.initial, strict=True):
                param.copy_(start)
        record = {"from": self.peak, "to": self.peak / FACTOR, "validation": validation, "baseline": self.baseline}
        log.warning("validation perplexity %.2f after %d steps at peak learning rate %.1e is above the start's %.2f: "
                    "back to the initial weights at peak %.1e for the remaining %d steps", validation, step, self.peak,
                    self.baseline, record["to"], self.total - step)
        self.peak, self.restart, self.left = record["to"], step, self.left - 1
        return record
