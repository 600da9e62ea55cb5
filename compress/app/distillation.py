"""The distillation stage: hands ``distill`` a ready student, the teacher and token batches.

Used by the pipeline (``--stop-after distill``) and by ``compress distill``, which also runs under
``torchrun --nproc-per-node N`` (DDP or FSDP; gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from compress.core.config import CompressConfig
from compress.core.family import family_of, load_model
from compress.errors import CompressError
from compress.models.mobilellm import is_block_shared
from compress.pruning.surgery import save_checkpoint
from compress.sources.data import token_batches
from distill import DistillError, distill

log = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def teacher_logits_path(config: CompressConfig, train: torch.Tensor) -> Path | None:
    """Where the teacher's stored top-k over ``train`` live (None when distillation runs the teacher online): in the
    cache, named by teacher and data, so later runs and benchmark arms on the same sequences reuse them."""
    if not config.distill.teacher_top_k:
        return None
    from compress.io import cache_dir
    from distill.teacher_logits import ids_fingerprint

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(config.teacher).name or config.teacher)
    return cache_dir() / "teacher-logits" / f"{name}-{ids_fingerprint(train)}-k{config.distill.teacher_top_k}.safetensors"


class _MappedBackbone(nn.Module):
    """The teacher's backbone reading a trimmed student's token ids (each is one teacher token)."""

    def __init__(self, backbone: nn.Module, kept: torch.Tensor) -> None:
        super().__init__()
        self.inner = backbone
        self.register_buffer("kept", kept, persistent=False)

    @property
    def layers(self) -> Any:
        return getattr(self.inner, "layers", None)

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return self.inner(input_ids=self.kept[input_ids], **kwargs)


class TrimmedVocabTeacher(nn.Module):
    """The teacher as a trimmed-vocabulary student sees it: it reads the student's token ids and predicts over the
    kept tokens only (its output head's kept rows), so the distillation loss compares like with like."""

    def __init__(self, teacher: nn.Module, kept: torch.Tensor) -> None:
        super().__init__()
        self.config = teacher.config
        self.backbone = _MappedBackbone(teacher.base_model, kept)
        head = teacher.get_output_embeddings().weight
        self.head = nn.Linear(head.shape[1], len(kept), bias=False)
        self.head.weight = nn.Parameter(head.detach()[kept].clone(), requires_grad=False)

    @property
    def base_model(self) -> nn.Module:
        return self.backbone

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def _in_student_vocabulary(vocab_map: Any, train: torch.Tensor, valid: torch.Tensor,
                           teacher: Any) -> tuple[torch.Tensor, torch.Tensor, int, Any]:
    """Training and validation sequences in a trimmed student's vocabulary, the validation's teacher-token count,
    and the teacher as that student sees it."""
    converted = vocab_map.convert(valid)
    return (vocab_map.convert(train).ids, converted.ids, int(converted.teacher_tokens.sum()),
            TrimmedVocabTeacher(teacher, vocab_map.kept))


def _scorer(family: Any, sets: dict[str, tuple[torch.Tensor, torch.Tensor | None]], scales: dict[str, float],
            batch_size: int, agreement: dict[str, float | None]) -> Any:
    """The trainer's evaluation: perplexity per set (per teacher token with ``scales``), agreements into
    ``agreement``."""
    from compress.core.state import per_teacher_agreement, per_teacher_token

    def evaluate(model: Any) -> dict[str, float]:
        measured = {}
        for name, (ids, top1) in sets.items():
            agreed, perplexity = family.score_set(model, ids, top1, batch_size)
            scale = scales.get(name, 1.0)
            agreement[name], measured[name] = per_teacher_agreement(agreed, scale), per_teacher_token(perplexity, scale)
        return measured

    return evaluate


def _keep_initial(student_dir: Path, metrics: dict[str, Any], before: dict[str, float],
                  trained: dict[str, float]) -> tuple[Any, dict[str, float]]:
    """The student as it started, when training raised its validation perplexity (a student that starts close to
    its teacher, e.g. one whose blocks are whole and only the vocabulary trimmed, can only lose at a learning rate
    meant for recovery): the trained figures are kept in ``metrics["kept_initial"]``."""
    log.warning("distillation raised the validation perplexity from %.2f to %.2f: the student keeps its initial "
                "weights (a lower --distill-lr or more --distill-tokens may help)", before["validation"], trained["validation"])
    metrics["kept_initial"] = {"reason": "training raised the validation perplexity", "trained": dict(trained)}
    return load_model(student_dir, dtype=torch.float32), dict(before)


def _run_metrics(result: Any, train_sequences: int, seq_len: int | None, before: dict[str, float],
                 agreement_before: dict[str, float | None], validation_tokens: int) -> dict[str, Any]:
    """The stage's metrics of the training run ``result`` (a DistillResult), before the final evaluation."""
    return {
        "steps": result.steps,
        "tokens": result.tokens,
        "train_sequences": train_sequences,
        "seq_len": seq_len,
        "tokens_per_second": result.tokens_per_second,
        "seconds": result.seconds,
        "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from_step,
        "parallel": result.parallel,
        "processes": result.processes,
        "history": list(result.history),
        "peak_lr": result.peak_lr,
        "lr_backoffs": [dict(r["lr_backoff"], step=r["step"]) for r in result.history if "lr_backoff" in r],
        "student_perplexity_before": before.get("validation", float("nan")),
        "student_agreement_before": agreement_before.get("validation"),
        "validation_tokens": validation_tokens,
    }


def distill_student(
    student_dir: Path,
    teacher: Any,
    tokenizer: Any,
    dataset: Any,
    config: CompressConfig,
    out_dir: Path,
    checkpoint_dir: Path,
    progress: bool = True,
    reference: torch.Tensor | None = None,
    others: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    vocab_map: Any = None,
    scales: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Distill the checkpoint in ``student_dir`` from ``teacher``; save it to ``out_dir``; return metrics.

    ``reference``: the teacher's top-1 predictions on the validation sequences, for the student's agreement;
    ``others``: more evaluation sets (name -> their sequences and the teacher's top-1 on them), measured alongside.
    With a trimmed vocabulary (``vocab_map``, :class:`compress.pruning.vocab.VocabMap`) the student reads the data
    in its own vocabulary, learns from the teacher's distribution over the kept tokens, and is saved with the
    trimmed tokenizer; ``reference`` and ``others`` are then in the student's vocabulary too, and ``scales``
    (set name -> ``Reference.nll_scale()``) turn its figures into ones per teacher token.
    """
    if not (student_dir / "config.json").exists():
        raise CompressError(f"no student checkpoint in {student_dir}; run the prune stage first or pass --student DIR")
    student = load_model(student_dir, dtype=torch.float32)
    family = family_of(student.config)
    settings = config.distill
    if settings.parallel == "fsdp" and is_block_shared(student):
        # fully_shard gives each decoder layer its own flat shards, and a shared layer lives in two of them.
        raise CompressError("--distill-parallel fsdp cannot shard a block-shared (mobilellm) student: each shared "
                            "block would sit in two FSDP units; use --distill-parallel ddp")
    train = token_batches(dataset, tokenizer, "train", settings.seq_len, config.training_sequences())
    valid = token_batches(dataset, tokenizer, "validation", config.eval.seq_len, config.eval.samples)
    validation_tokens = int(valid.shape[0] * (valid.shape[1] - 1))
    if vocab_map is not None:
        train, valid, validation_tokens, teacher = _in_student_vocabulary(vocab_map, train, valid, teacher)
        tokenizer = vocab_map.tokenizer
    agreement: dict[str, float | None] = {}
    evaluate = _scorer(family, {"validation": (valid, reference), **(others or {})}, scales or {}, config.batch_size,
                       agreement)
    before = evaluate(student) if _rank() == 0 else {}
    agreement_before = dict(agreement)
    try:
        # Every process evaluates: under FSDP the forward pass gathers shards from all of them.
        result = distill(student, teacher, train, settings, evaluate=evaluate, checkpoint_dir=checkpoint_dir,
                         progress=progress, teacher_logits=teacher_logits_path(config, train),
                         student_io=family.student_io, baseline=before.get("validation"))
    except DistillError as error:
        raise CompressError(str(error)) from error
    metrics = _run_metrics(result, int(train.shape[0]), config.distill.seq_len, before, agreement_before,
                           validation_tokens)
    if _rank() == 0:
        last = result.history[-1]  # the trainer evaluates at the final step, so this is normally measured already
        after = last.get("val_perplexities") or ({"validation": last["val_perplexity"]} if "val_perplexity" in last
                                                 else evaluate(student))
        if before and after["validation"] > before["validation"]:
            student, after = _keep_initial(student_dir, metrics, before, after)
            agreement = agreement_before
        metrics["student_perplexity"] = after["validation"]
        metrics["student_agreement"] = agreement.get("validation")
        metrics["evals_before"] = {k: {"perplexity": v, "agreement": agreement_before.get(k)} for k, v in before.items()}
        metrics["evals"] = {k: {"perplexity": v, "agreement": agreement.get(k)} for k, v in after.items()}
        save_checkpoint(student, tokenizer, out_dir)
    return metrics
