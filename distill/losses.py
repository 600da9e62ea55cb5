"""Distillation losses. The vocabulary-wide KL is computed a chunk of positions at a time, with each chunk's
logits recomputed in the backward pass, so memory stays flat as sequence length and vocabulary grow."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from distill.teacher_logits import topk_kl


def _chunk_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.Tensor | None,
    targets: torch.Tensor | None,
    temperature: float,
    kl_weight: float,
    ce_weight: float,
    student_cap: float | None,
    teacher_cap: float | None,
    teacher_log_probs: torch.Tensor | None = None,
    teacher_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    # student_hidden: (positions, hidden); teacher_hidden: (positions, teacher hidden); stored top-k: (positions, k)
    logits = _capped(F.linear(student_hidden, student_head).float(), student_cap)
    total = logits.new_zeros(())
    if kl_weight and teacher_log_probs is not None and teacher_indices is not None:
        total = total + kl_weight * topk_kl(logits, teacher_log_probs, teacher_indices)
    elif kl_weight and teacher_hidden is not None and teacher_head is not None:
        with torch.no_grad():
            teacher_logits = _capped(F.linear(teacher_hidden, teacher_head).float(), teacher_cap)
            teacher_log_probs = F.log_softmax(_scaled(teacher_logits, temperature), dim=-1)
        student_log_probs = F.log_softmax(_scaled(logits, temperature), dim=-1)
        # forward KL(teacher || student), summed over positions; T^2 keeps gradient scale independent of T
        kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
        total = total + kl_weight * kl * temperature**2
    if ce_weight and targets is not None:
        total = total + ce_weight * F.cross_entropy(logits, targets, reduction="sum")
    return total


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # At T = 1 (the default) a division would cost a pass over positions x vocabulary, forward and backward.
    return logits if temperature == 1.0 else logits / temperature


def _capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap if cap else logits


def logit_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.Tensor | None,
    targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk: int = 1024,
    student_cap: float | None = None,
    teacher_cap: float | None = None,
    teacher_log_probs: torch.Tensor | None = None,
    teacher_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean per-position forward KL(teacher || student) at ``temperature``, plus ``ce_weight`` x cross-entropy.

    With stored top-k ``teacher_log_probs`` and ``teacher_indices`` (positions, k; see distill.teacher_logits), the
    KL is taken on those k tokens plus a tail bucket, at temperature 1, and the teacher's hidden states are unused.

    Hidden states are (positions, width); heads are output projection weights (vocab, width). When there
    are more positions than ``chunk``, each chunk's student and teacher logits are recomputed in the
    backward pass instead of kept, so memory holds one chunk of logits at a time. With ``kl_weight`` 0
    the teacher may be None (plain cross-entropy training).
    """
    positions = student_hidden.shape[0]
    total = student_hidden.new_zeros((), dtype=torch.float32)
    if teacher_hidden is not None and teacher_head is not None:
        teacher_hidden, teacher_head = teacher_hidden.detach(), teacher_head.detach()
    for start in range(0, positions, chunk):
        end = min(start + chunk, positions)
        args = (
            student_hidden[start:end], student_head,
            teacher_hidden[start:end] if teacher_hidden is not None else None, teacher_head,
            targets[start:end] if targets is not None else None,
            temperature, kl_weight, ce_weight, student_cap, teacher_cap,
            teacher_log_probs[start:end] if teacher_log_probs is not None else None,
            teacher_indices[start:end] if teacher_indices is not None else None,
        )
        if positions > chunk and torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss(*args)
    return total / positions


class HiddenStateLoss(nn.Module):
    """Cosine or MSE distance between chosen student and teacher layers, with a learned projection where widths differ."""

    def __init__(self, pairs: list[tuple[int, int]], student_width: int, teacher_width: int, kind: str = "cosine") -> None:
        super().__init__()
        if kind not in ("cosine", "mse"):
            raise ValueError(f"hidden loss {kind!r}: allowed are cosine, mse")
        self.pairs = pairs
        self.kind = kind
        self.projections = nn.ModuleList(
            nn.Linear(student_width, teacher_width, bias=False) if student_width != teacher_width else nn.Identity()
            for _ in pairs
        )

    def forward(self, student_states: tuple[torch.Tensor, ...], teacher_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        total = student_states[0].new_zeros((), dtype=torch.float32)
        for (s, t), projection in zip(self.pairs, self.projections, strict=True):
            student = projection(student_states[s]).float()
            teacher = teacher_states[t].float()
            if self.kind == "cosine":
                total = total + (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
            else:
                total = total + F.mse_loss(student, teacher)
        return total / max(len(self.pairs), 1)
