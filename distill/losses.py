"""Distillation losses.

The vocabulary-wide KL and cross-entropy of a training step go through :class:`FusedLogitLoss`: the output
projection, both losses and their gradients with respect to the student's hidden states and head, computed in
the forward pass a slice of positions at a time. Autograd would keep several (positions x vocabulary) float32
tensors alive and walk each of them a dozen times (the log-softmaxes, the KL's exp / sub / mul and their
backward); here each slice's probabilities are used while they are in cache and only the gradient of the logits
is kept, in the matmul dtype, for two large matmuls. It is the same math as the unfused path, which stays for
stored top-k logits, for ``fused=False`` and for gradients of the teacher side.
"""

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


_SLICE = 64  # positions whose (slice x vocabulary) float32 probabilities are worked on while in cache


class FusedLogitLoss(torch.autograd.Function):
    """Summed ``kl_weight`` x T^2 x KL(teacher_T || student_T) + ``ce_weight`` x cross-entropy over positions, with
    its gradients with respect to ``hidden`` (positions, width) and ``head`` (vocab, width) taken in the forward
    pass. Matmuls run in ``matmul_dtype`` (bfloat16 under autocast), probabilities in float32."""

    @staticmethod
    def forward(ctx, hidden, head, teacher_hidden, teacher_head, targets, temperature, kl_weight,  # noqa: ANN001, ANN205
                ce_weight, student_cap, teacher_cap, matmul_dtype):
        want_hidden, want_head = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(matmul_dtype), head.to(matmul_dtype)
            teacher = None
            if teacher_hidden is not None and teacher_head is not None:
                teacher = teacher_hidden.to(matmul_dtype) @ teacher_head.to(matmul_dtype).t()
            total, logits_grad = _fused(h @ w.t(), teacher, targets, temperature, kl_weight, ce_weight,
                                        student_cap, teacher_cap, want_grad=want_hidden or want_head)
            grad_hidden = (logits_grad @ w).to(hidden.dtype) if want_hidden else None
            grad_head = (logits_grad.t() @ h).to(head.dtype) if want_head else None
        ctx.has = (grad_hidden is not None, grad_head is not None)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_head) if g is not None))
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205
        saved = iter(ctx.saved_tensors)
        grad_hidden = grad_head = None
        if ctx.has[0]:
            stored = next(saved)
            grad_hidden = (stored * grad_total).to(stored.dtype)
        if ctx.has[1]:
            stored = next(saved)
            grad_head = (stored * grad_total).to(stored.dtype)
        return grad_hidden, grad_head, None, None, None, None, None, None, None, None, None


def _fused(logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor | None,
           temperature: float, kl_weight: float, ce_weight: float, student_cap: float | None,
           teacher_cap: float | None, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed loss of ``logits`` (positions, vocab) and, with ``want_grad``, its gradient with respect to them,
    written over ``logits`` (each slice's logits are not read again once its gradient is known)."""
    use_kl = bool(kl_weight) and teacher_logits is not None
    use_ce = bool(ce_weight) and targets is not None
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], _SLICE):
        end = min(start + _SLICE, logits.shape[0])
        s = logits[start:end].float()
        squashed = None
        if student_cap:
            squashed = torch.tanh(s / student_cap)
            s = squashed * student_cap
        grad = None
        log_q = F.log_softmax(_scaled(s, temperature), dim=-1) if use_kl else None
        log_q1 = log_q if log_q is not None and temperature == 1.0 else None
        if use_ce and log_q1 is None:
            log_q1 = F.log_softmax(s, dim=-1)
        if use_ce:
            chosen = targets[start:end]
            total -= ce_weight * log_q1.gather(-1, chosen[:, None]).sum()
        if use_kl:
            assert teacher_logits is not None and log_q is not None
            log_p = F.log_softmax(_scaled(_capped(teacher_logits[start:end].float(), teacher_cap), temperature), dim=-1)
            p = log_p.exp()
            # KL = sum p log p - sum p log q, as two reductions that allocate nothing
            total += kl_weight * temperature**2 * (torch.dot(p.view(-1), log_p.view(-1)) - torch.dot(p.view(-1), log_q.view(-1)))
            if want_grad:  # d(T^2 KL)/ds = T (softmax(s / T) - p)
                weight = kl_weight * temperature
                if use_ce and log_q1 is log_q:  # T = 1: one softmax serves both terms
                    grad = log_q.exp_().mul_(weight + ce_weight).sub_(p, alpha=weight)
                else:
                    grad = log_q.exp_().sub_(p).mul_(weight)
        if use_ce and want_grad:
            if grad is None or log_q1 is not log_q:
                ce = log_q1.exp_().mul_(ce_weight)
                grad = ce if grad is None else grad.add_(ce)
            grad[torch.arange(end - start, device=logits.device), chosen] -= ce_weight
        if want_grad:
            if grad is None:
                logits[start:end] = 0
            else:
                if squashed is not None:
                    grad.mul_(1 - squashed * squashed)
                logits[start:end] = grad
    return total, logits if want_grad else None


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
    fused: bool = True,
) -> torch.Tensor:
    """Mean per-position forward KL(teacher || student) at ``temperature``, plus ``ce_weight`` x cross-entropy.

    With stored top-k ``teacher_log_probs`` and ``teacher_indices`` (positions, k; see distill.teacher_logits), the
    KL is taken on those k tokens plus a tail bucket, at temperature 1, and the teacher's hidden states are unused.

    Hidden states are (positions, width); heads are output projection weights (vocab, width). When there
    are more positions than ``chunk``, each chunk's student and teacher logits are recomputed in the
    backward pass instead of kept, so memory holds one chunk of logits at a time. With ``kl_weight`` 0
    the teacher may be None (plain cross-entropy training).

    ``fused`` (without stored top-k, and targets without ignored positions) takes each chunk through
    :class:`FusedLogitLoss`, which keeps one chunk's logit gradient instead of recomputing its logits.
    """
    positions = student_hidden.shape[0]
    total = student_hidden.new_zeros((), dtype=torch.float32)
    if teacher_hidden is not None and teacher_head is not None:
        teacher_hidden, teacher_head = teacher_hidden.detach(), teacher_head.detach()
    if fused and teacher_log_probs is None and (targets is None or not bool((targets < 0).any())):
        device = student_hidden.device.type
        matmul_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else student_hidden.dtype
        for start in range(0, positions, chunk):
            end = min(start + chunk, positions)
            total = total + FusedLogitLoss.apply(
                student_hidden[start:end], student_head,
                teacher_hidden[start:end] if teacher_hidden is not None else None, teacher_head,
                targets[start:end] if targets is not None else None,
                temperature, kl_weight, ce_weight, student_cap, teacher_cap, matmul_dtype)
        return total / positions
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
