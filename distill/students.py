"""How the trainer feeds a student and reads its final hidden states: a causal student reads what the teacher
reads (:class:`CausalStudent`); an encoder-decoder one encodes a prefix and decodes the rest
(:class:`EncoderDecoderStudent`). ``distill(..., student_io=...)`` takes one; the caller knows its student's kind.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.pairs import Pairs


class StudentIO:
    """A student's side of a distillation batch. ``causal`` students read the teacher's own sequence, so the
    hidden-state loss and stored teacher top-k apply to them."""

    causal = True

    def continuation(self, student: nn.Module, ids: torch.Tensor, cut: int) -> torch.Tensor:
        """Final hidden states [batch, L - cut, width], position j predicting ``ids[:, cut + j]``."""
        return student.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, cut - 1 : -1]

    def outputs(self, student: nn.Module, batch: Pairs) -> torch.Tensor:
        """Final hidden states [output tokens, width] predicting ``batch``'s output tokens in row-major order."""
        states = student.base_model(input_ids=batch.ids, attention_mask=batch.attention_mask(),
                                    use_cache=False).last_hidden_state[:, :-1]
        return states[batch.predicting_outputs()]


class CausalStudent(StudentIO):
    """A decoder-only student: it reads the whole sequence, like the teacher."""


class EncoderDecoderStudent(StudentIO):
    """An encoder-decoder student (e.g. the Mu-like one) learning from a causal teacher across architectures: it
    encodes the prefix (a pair's input) and decodes the continuation after ``config.decoder_start_token_id``;
    its ``forward(..., output_hidden_states=True)`` returns ``decoder_hidden_states`` whose last entry feeds the
    output projection."""

    causal = False

    def continuation(self, student: nn.Module, ids: torch.Tensor, cut: int) -> torch.Tensor:
        prefix, continuation = ids[:, :cut], ids[:, cut:]
        start = torch.full_like(continuation[:, :1], student.config.decoder_start_token_id)
        out = student(input_ids=prefix, decoder_input_ids=torch.cat((start, continuation[:, :-1]), dim=1),
                      output_hidden_states=True)
        return out.decoder_hidden_states[-1]

    def outputs(self, student: nn.Module, batch: Pairs) -> torch.Tensor:
        inputs, input_mask = batch.inputs()
        out = student(input_ids=inputs, attention_mask=input_mask, output_hidden_states=True,
                      decoder_input_ids=batch.decoder_input_ids(student.config.decoder_start_token_id))
        # Row-major order of the output mask equals that of the causal positions predicting an output token.
        return out.decoder_hidden_states[-1][batch.outputs()[1]]
