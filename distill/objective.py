"""The distillation objective as one module (student forward, teacher forward, loss), so DDP or FSDP sees the
whole step: see :class:`KnowledgeDistillationLoss`."""

from __future__ import annotations

import torch
from torch import nn

from distill.config import DistillConfig, DistillError
from distill.losses import HiddenStateLoss, logit_distillation_loss
from distill.pairs import Pairs
from distill.students import CausalStudent, StudentIO


def _cap(model: nn.Module) -> float | None:
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None)


class KnowledgeDistillationLoss(nn.Module):
    """Student forward + teacher forward + loss, as one module so that DDP or FSDP sees the whole step.

    The teacher is held outside the module tree: DDP neither broadcasts nor tracks it.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, config: DistillConfig,
                 hidden: HiddenStateLoss | None, student_io: StudentIO | None = None) -> None:
        super().__init__()
        self.student = student
        self.student_io = student_io or CausalStudent()
        self.hidden = hidden
        self.config = config
        object.__setattr__(self, "_teacher", teacher)
        self._teacher_heads: dict[torch.dtype, torch.Tensor] = {}

    def _teacher_head(self) -> torch.Tensor:
        """The frozen teacher's output projection, cast once to the autocast dtype instead of on every step."""
        head = self._teacher.get_output_embeddings().weight
        device = head.device.type
        if not torch.is_autocast_enabled(device):
            return head
        dtype = torch.get_autocast_dtype(device)
        if dtype not in self._teacher_heads:
            self._teacher_heads[dtype] = head.detach().to(dtype)
        return self._teacher_heads[dtype]

    def forward(self, ids: torch.Tensor | Pairs, topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if topk is not None and (isinstance(ids, Pairs) or not self.student_io.causal):
            raise DistillError("stored teacher top-k logits serve causal students on token sequences only")
        if isinstance(ids, Pairs):
            return self._pairs(ids)
        if not self.student_io.causal:
            return self._across(ids)
        c, teacher = self.config, self._teacher
        if topk is not None:  # the teacher's stored top-k stand in for its forward pass
            student_hidden = self.student.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            return self._logit_loss(student_hidden, None, ids[:, 1:], topk)
        want_states = self.hidden is not None
        student_out = self.student.base_model(input_ids=ids, output_hidden_states=want_states, use_cache=False)
        student_hidden = student_out.last_hidden_state[:, :-1]  # (batch, seq-1, width): predicts ids[:, 1:]
        teacher_out = teacher_hidden = None
        if teacher is not None and (c.kl_weight or self.hidden is not None):  # plain CE training needs no teacher
            with torch.no_grad():
                teacher_out = teacher.base_model(input_ids=ids, output_hidden_states=want_states, use_cache=False)
            teacher_hidden = teacher_out.last_hidden_state[:, :-1]
        loss = self._logit_loss(student_hidden, teacher_hidden, ids[:, 1:])
        if self.hidden is not None and teacher_out is not None:
            loss = loss + c.hidden_weight * self.hidden(student_out.hidden_states, teacher_out.hidden_states)
        return loss

    def _logit_loss(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor | None,
                    targets: torch.Tensor, topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The logit loss of final hidden states [batch, positions, width] predicting ``targets`` [batch, positions];
        ``teacher_hidden`` None means cross-entropy only, unless stored top-k (log-probs, ids) [batch, positions, k]
        stand in for the teacher."""
        c, teacher = self.config, self._teacher
        head = self.student.get_output_embeddings().weight
        stored = (None, None) if topk is None else (topk[0].reshape(-1, topk[0].shape[-1]),
                                                    topk[1].reshape(-1, topk[1].shape[-1]))
        return logit_distillation_loss(
            student_hidden.reshape(-1, student_hidden.shape[-1]),
            head,
            teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if teacher_hidden is not None else None,
            self._teacher_head() if teacher_hidden is not None else None,
            targets=targets.reshape(-1),
            temperature=c.temperature,
            kl_weight=c.kl_weight,
            ce_weight=c.ce_weight,
            chunk=max(1, c.kl_chunk_elements // head.shape[0]),
            student_cap=_cap(self.student),
            teacher_cap=_cap(teacher) if teacher is not None else None,
            teacher_log_probs=stored[0],
            teacher_indices=stored[1],
            fused=c.fused_loss,
        )

    def _across(self, ids: torch.Tensor) -> torch.Tensor:
        """The loss of a non-causal (encoder-decoder) student on ``ids`` cut at ``split_point`` (module docstring)."""
        c, teacher = self.config, self._teacher
        if self.hidden is not None:
            raise DistillError("the hidden-state loss pairs layers of one stack; an encoder-decoder student has two")
        cut = split_point(ids)
        student_hidden = self.student_io.continuation(self.student, ids, cut)  # position j predicts ids[:, cut + j]
        teacher_hidden = None
        if teacher is not None and c.kl_weight:
            with torch.no_grad():
                teacher_hidden = teacher.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, cut - 1 : -1]
        return self._logit_loss(student_hidden, teacher_hidden, ids[:, cut:])

    def _pairs(self, batch: Pairs) -> torch.Tensor:
        """The loss on the output tokens of (input, output) pairs: the teacher reads input and output as one
        sequence; the student as its ``student_io`` says."""
        c, teacher = self.config, self._teacher
        if self.hidden is not None:
            raise DistillError("the hidden-state loss is not defined on (input, output) pairs; set hidden_weight 0")
        scored = batch.predicting_outputs()  # (pairs, length - 1): causal positions predicting an output token
        teacher_hidden = None
        if teacher is not None and c.kl_weight:
            with torch.no_grad():
                # No KV cache: built per layer it costs memory and makes compiled layers recompile per layer index.
                states = teacher.base_model(input_ids=batch.ids, attention_mask=batch.attention_mask(),
                                            use_cache=False).last_hidden_state
            teacher_hidden = states[:, :-1][scored]  # (output tokens, width), in row-major order
        return self._logit_loss(self.student_io.outputs(self.student, batch), teacher_hidden, batch.ids[:, 1:][scored])


def split_point(ids: torch.Tensor) -> int:
    """Where an encoder-decoder student's batch is cut into prefix and continuation: between a quarter and
    three quarters of the length, varying from batch to batch but a function of the tokens (so a resumed
    run cuts each batch as the uninterrupted one did)."""
    length = ids.shape[1]
    low = max(1, length // 4)
    span = max(1, length * 3 // 4 - low)
    return low + int(ids[0, : min(8, length)].sum().item() * 2654435761 % span)
