"""Offline teacher logits: the teacher's top-k next-token log-probabilities on the training sequences, computed once
and stored as safetensors with their provenance, so that later runs, benchmark arms and resumes train without
running the teacher again.

The KL against stored top-k is the forward KL over k + 1 outcomes: the teacher's k most likely tokens and one
bucket for the rest of the vocabulary (the teacher's tail mass against the student's mass outside those tokens).
With k equal to the vocabulary the bucket is empty and the loss is the full-vocabulary KL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from distill.config import DistillError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherTopK:
    """Top-k log-probabilities (float32) and token ids (int32) of the teacher, each (sequences, seq_len - 1, k)."""

    log_probs: torch.Tensor
    indices: torch.Tensor
    provenance: dict[str, str]

    @property
    def k(self) -> int:
        return int(self.indices.shape[-1])

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (log-probabilities, indices) of training sequences ``rows``."""
        return self.log_probs[rows], self.indices[rows].long()

    def save(self, path: str | Path) -> None:
        """Write atomically: a temporary name in the same folder, then a rename."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"log_probs": self.log_probs.contiguous(), "indices": self.indices.contiguous()}, tmp,
                      metadata=self.provenance)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> TeacherTopK:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            provenance = dict(handle.metadata() or {})
            return cls(handle.get_tensor("log_probs"), handle.get_tensor("indices"), provenance)


def model_fingerprint(model: nn.Module) -> str:
    """A hash of a model's weights (names, shapes, dtypes and values): which teacher produced stored logits."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def ids_fingerprint(ids: torch.Tensor) -> str:
    """A hash of the training token ids: which data stored logits belong to."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def compute_teacher_topk(teacher: nn.Module, ids: torch.Tensor, k: int, batch_size: int = 8, bf16: bool = True,
                         progress: bool = False) -> TeacherTopK:
    """The teacher's top-k log-probabilities (normalized over the whole vocabulary) predicting ``ids[:, 1:]``."""
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if not 0 < k <= vocab:
        raise DistillError(f"teacher top-k {k}: must be between 1 and the vocabulary size {vocab}")
    teacher.eval()
    values, indices = [], []
    cap = getattr(teacher.config, "final_logit_softcapping", None)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    for start in tqdm(range(0, len(ids), batch_size), desc="teacher top-k", unit="batch", disable=not progress):
        with autocast:
            hidden = teacher.base_model(input_ids=ids[start : start + batch_size]).last_hidden_state[:, :-1]
            logits = teacher.get_output_embeddings()(hidden).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        top = F.log_softmax(logits, dim=-1).topk(k, dim=-1)
        values.append(top.values)
        indices.append(top.indices.to(torch.int32))
    return TeacherTopK(torch.cat(values), torch.cat(indices), {})


def cached_teacher_topk(teacher: nn.Module, ids: torch.Tensor, k: int, path: str | Path, batch_size: int = 8,
                        bf16: bool = True, progress: bool = False) -> tuple[TeacherTopK, bool]:
    """The stored top-k at ``path`` when it was made by this teacher, on these ids, with this k; else computed and
    stored there. Returns the logits and whether they were reused."""
    provenance = {"teacher": model_fingerprint(teacher), "ids": ids_fingerprint(ids), "k": str(k),
                  "shape": json.dumps([int(ids.shape[0]), int(ids.shape[1]) - 1, k]), "bf16": str(bf16)}
    path = Path(path)
    if path.exists():
        try:
            stored = TeacherTopK.load(path)
        except Exception as error:  # a damaged file is rebuilt, never trusted
            log.warning("teacher logits %s unreadable (%s); rebuilding them", path, error)
        else:
            if stored.provenance == provenance:
                log.info("reusing teacher top-%d logits %s", k, path)
                return stored, True
            log.info("teacher logits %s were made for another teacher, data or k; rebuilding them", path)
    computed = compute_teacher_topk(teacher, ids, k, batch_size, bf16, progress)
    result = TeacherTopK(computed.log_probs, computed.indices, provenance)
    result.save(path)
    return result, False


def topk_kl(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, teacher_indices: torch.Tensor) -> torch.Tensor:
    """Summed forward KL(teacher || student) over positions on the teacher's top-k plus one tail bucket.

    ``student_logits`` (positions, vocab) float32; ``teacher_log_probs`` and ``teacher_indices`` (positions, k).
    """
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    picked = student_log_probs.gather(-1, teacher_indices)  # (positions, k)
    teacher_probs = teacher_log_probs.exp()
    kl = (teacher_probs * (teacher_log_probs - picked)).sum()
    teacher_tail = (1.0 - teacher_probs.sum(-1)).clamp_min(0.0)
    # log(1 - sum q_k) from the student's log-probabilities, kept finite when the top-k hold all its mass
    student_tail = torch.log1p(-picked.exp().sum(-1).clamp(max=1.0 - 1e-6))
    tail = torch.where(teacher_tail > 0, teacher_tail * (teacher_tail.clamp_min(1e-30).log() - student_tail),
                       torch.zeros_like(teacher_tail))
    return kl + tail.sum()
