"""Perplexity and top-1 agreement of a model on packed token sequences (memory flat in the vocabulary size), on
continuations and on (input, output) pairs."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from distill.pairs import Pairs

# Logits are computed for this many positions at a time: Gemma's 262k vocabulary makes a full
# (8, 256, 262144) fp32 logits tensor 2 GiB.
_LOGIT_CHUNK = 512


@dataclass(frozen=True)
class Perplexity:
    """Validation perplexity and what it was measured on."""

    perplexity: float
    nll: float
    tokens: int
    sequences: int
    seq_len: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "perplexity": self.perplexity,
            "nll": self.nll,
            "tokens": self.tokens,
            "sequences": self.sequences,
            "seq_len": self.seq_len,
        }


def _logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def nll_sum(model: nn.Module, ids: torch.Tensor, top1: list[torch.Tensor] | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of a (batch, seq) block, and the number of predicted tokens.

    With ``top1``, the block's most likely next tokens (batch, seq-1) are appended to it.
    """
    hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1]  # (batch, seq-1, hidden)
    targets = ids[:, 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = 0.0
    best = []
    for start in range(0, flat.shape[0], _LOGIT_CHUNK):
        logits = _logits(model, flat[start : start + _LOGIT_CHUNK]).float()
        total += float(
            nn.functional.cross_entropy(logits, targets[start : start + _LOGIT_CHUNK], reduction="sum")
        )
        best.append(logits.argmax(-1))
    if top1 is not None:
        top1.append(torch.cat(best).reshape(ids.shape[0], ids.shape[1] - 1))
    return total, int(targets.numel())


def mean_nll(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, bf16: bool = False, progress: bool = False,
             top1: list[torch.Tensor] | None = None) -> float:
    """Mean next-token NLL over (sequences, seq) token ids (and, with ``top1``, the top-1 predictions per block)."""
    total, count = 0.0, 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for start in tqdm(range(0, len(ids), batch_size), desc="perplexity", unit="batch", disable=not progress):
            block_total, block_count = nll_sum(model, ids[start : start + batch_size], top1)
            total += block_total
            count += block_count
    return total / max(count, 1)


def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, progress: bool = False) -> Perplexity:
    """Perplexity in fp32 (the reported number; bf16 is only used for internal ranking)."""
    return _from_nll(mean_nll(model, ids, batch_size=batch_size, bf16=False, progress=progress), ids)


def _from_nll(nll: float, ids: torch.Tensor) -> Perplexity:
    return Perplexity(
        perplexity=math.exp(min(nll, 700.0)),
        nll=nll,
        tokens=int(ids.shape[0] * (ids.shape[1] - 1)),
        sequences=int(ids.shape[0]),
        seq_len=int(ids.shape[1]),
    )


@dataclass(frozen=True)
class Quality:
    """Perplexity, the top-1 next-token predictions behind it, and their agreement with a reference's."""

    perplexity: Perplexity
    top1: torch.Tensor  # (sequences, seq_len - 1)
    agreement: float | None  # share of positions whose top-1 equals the reference's; None without one


def quality(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, reference: torch.Tensor | None = None,
            progress: bool = False) -> Quality:
    """fp32 perplexity over ``ids`` and top-1 agreement with ``reference`` (e.g. the teacher's top-1), in one pass."""
    blocks: list[torch.Tensor] = []
    nll = mean_nll(model, ids, batch_size=batch_size, bf16=False, progress=progress, top1=blocks)
    top1 = torch.cat(blocks)
    agreement = None if reference is None else float((top1 == reference).float().mean())
    return Quality(_from_nll(nll, ids), top1, agreement)


@dataclass(frozen=True)
class ContinuationQuality:
    """Perplexity of the continuations ``ids[:, cut:]`` given the prefixes ``ids[:, :cut]``, and top-1 agreement."""

    perplexity: float
    nll: float
    tokens: int
    cut: int
    agreement: float | None

    def to_dict(self) -> dict[str, float | int | None]:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens, "cut": self.cut,
                "agreement": self.agreement}


class Reader:
    """How a model's predictions of a continuation or of a pair's output are read: a causal LM reads the whole
    sequence (this class); :class:`EncoderDecoderReader` encodes the prefix and decodes the rest. A student
    family names its reader (:attr:`compress.core.family.StudentFamily.reader`)."""

    def continuation_logits(self, model: nn.Module, ids: torch.Tensor, cut: int) -> torch.Tensor:
        """Logits [B, L - cut, V] predicting ``ids[:, cut:]``."""
        return model(input_ids=ids).logits[:, cut - 1 : -1]

    def pair_logits(self, model: nn.Module, pairs: Pairs) -> torch.Tensor:
        """Logits [output tokens, V] predicting every output token of ``pairs`` in row-major order."""
        return model(input_ids=pairs.ids, attention_mask=pairs.attention_mask()).logits[:, :-1][pairs.predicting_outputs()]


class EncoderDecoderReader(Reader):
    """An encoder-decoder: the prefix (a pair's input) is encoded, the continuation decoded after the start token."""

    def continuation_logits(self, model: nn.Module, ids: torch.Tensor, cut: int) -> torch.Tensor:
        start = torch.full_like(ids[:, :1], model.config.decoder_start_token_id)
        return model(input_ids=ids[:, :cut], decoder_input_ids=torch.cat((start, ids[:, cut:-1]), dim=1)).logits

    def pair_logits(self, model: nn.Module, pairs: Pairs) -> torch.Tensor:
        inputs, input_mask = pairs.inputs()
        logits = model(input_ids=inputs, attention_mask=input_mask,
                       decoder_input_ids=pairs.decoder_input_ids(model.config.decoder_start_token_id)).logits
        return logits[pairs.outputs()[1]]


CAUSAL = Reader()
ENCODER_DECODER = EncoderDecoderReader()


def continuation_quality(model: nn.Module, ids: torch.Tensor, cut: int, batch_size: int = 8,
                         reference: torch.Tensor | None = None,
                         reader: Reader = CAUSAL) -> tuple[ContinuationQuality, torch.Tensor]:
    """fp32 perplexity of the continuations of ``ids`` after ``cut`` tokens, for a causal or (with
    ``reader=ENCODER_DECODER``) an encoder-decoder model alike (how a decoder-only teacher and a Mu-like student
    are compared), the model's top-1 predictions [B, L - cut] and their agreement with ``reference``."""
    if not 0 < cut < ids.shape[1]:
        raise ValueError(f"cut must be in (0, {ids.shape[1]}), got {cut}")
    total, best = 0.0, []
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            block = ids[start : start + batch_size]
            logits = reader.continuation_logits(model, block, cut).float()
            total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), block[:, cut:].reshape(-1),
                                                       reduction="sum"))
            best.append(logits.argmax(-1))
    top1 = torch.cat(best)
    tokens = int(top1.numel())
    nll = total / tokens
    agreement = None if reference is None else float((top1 == reference).float().mean())
    return ContinuationQuality(math.exp(min(nll, 700.0)), nll, tokens, cut, agreement), top1


@dataclass(frozen=True)
class PairQuality:
    """How well a model predicts the outputs of (input, output) pairs, given the inputs (teacher-forced)."""

    perplexity: float
    nll: float
    tokens: int  # output tokens scored
    accuracy: float  # share of output tokens that are the model's top-1 prediction

    def to_dict(self) -> dict[str, float | int]:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens, "accuracy": self.accuracy}


def pair_quality(model: nn.Module, pairs: Pairs, batch_size: int = 8, reader: Reader = CAUSAL) -> PairQuality:
    """fp32 perplexity and top-1 accuracy of ``model`` on the output tokens of ``pairs``."""
    total, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            block = pairs[start : start + batch_size]
            logits = reader.pair_logits(model, block).float()
            outputs, scored = block.outputs()
            targets = outputs[scored]
            total += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            count += int(targets.numel())
    nll = total / count
    return PairQuality(math.exp(min(nll, 700.0)), nll, count, correct / count)
