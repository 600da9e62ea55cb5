"""The distillation stage: hands ``distill`` a ready student, the teacher and token batches.

Used by the pipeline (``--stop-after distill``) and by ``compress distill``, which also runs under
``torchrun --nproc-per-node N`` (DDP or FSDP; gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from compress.config import CompressConfig
from compress.data import token_batches
from compress.errors import CompressError
from compress.evaluate import continuation_quality, quality
from compress.families.mu import cut_of
from compress.mobilellm import is_block_shared
from compress.surgery import save_checkpoint
from distill import DistillError, distill

log = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def teacher_logits_path(config: CompressConfig, train: torch.Tensor) -> Path | None:
    """Where the teacher's stored top-k over ``train`` live (None when distillation runs the teacher online): in the
    cache, named by teacher and data, so later runs and benchmark arms on the same sequences reuse them."""
    if not config.distill_teacher_top_k:
        return None
    from compress.io import cache_dir
    from distill.teacher_logits import ids_fingerprint

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(config.teacher).name or config.teacher)
    return cache_dir() / "teacher-logits" / f"{name}-{ids_fingerprint(train)}-k{config.distill_teacher_top_k}.safetensors"


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
) -> dict[str, Any]:
    """Distill the checkpoint in ``student_dir`` from ``teacher``; save it to ``out_dir``; return metrics.

    ``reference``: the teacher's top-1 predictions on the validation sequences, for the student's agreement;
    ``others``: more evaluation sets (name -> their sequences and the teacher's top-1 on them), measured alongside.
    """
    from compress.runstate import load_model

    if not (student_dir / "config.json").exists():
        raise CompressError(f"no student checkpoint in {student_dir}; run the prune stage first or pass --student DIR")
    student = load_model(student_dir, dtype=torch.float32)
    encoder_decoder = bool(getattr(student.config, "is_encoder_decoder", False))
    settings = config.distill_config()
    if settings.parallel == "fsdp" and is_block_shared(student):
        # fully_shard gives each decoder layer its own flat shards, and a shared layer lives in two of them.
        raise CompressError("--distill-parallel fsdp cannot shard a block-shared (mobilellm) student: each shared "
                            "block would sit in two FSDP units; use --distill-parallel ddp")
    sequences = math.ceil(config.distill_tokens / config.distill_seq_len)
    train = token_batches(dataset, tokenizer, "train", config.distill_seq_len, sequences)
    valid = token_batches(dataset, tokenizer, "validation", config.eval_seq_len, config.eval_samples)

    sets = {"validation": (valid, reference), **(others or {})}
    agreement: dict[str, float | None] = {}

    def evaluate(model: Any) -> dict[str, float]:
        measured = {}
        for name, (ids, top1) in sets.items():
            if encoder_decoder:  # scored on continuations, like every row of a Mu-like run (compress.families.mu)
                cut = cut_of(ids.shape[1])
                scored, _ = continuation_quality(model, ids, cut, config.batch_size,
                                                 None if top1 is None else top1[:, cut - 1 :])
                agreement[name], measured[name] = scored.agreement, scored.perplexity
            else:
                result = quality(model, ids, config.batch_size, top1)
                agreement[name], measured[name] = result.agreement, result.perplexity.perplexity
        return measured

    before = evaluate(student) if _rank() == 0 else {}
    agreement_before = dict(agreement)
    try:
        # Every process evaluates: under FSDP the forward pass gathers shards from all of them.
        result = distill(student, teacher, train, settings, evaluate=evaluate, checkpoint_dir=checkpoint_dir,
                         progress=progress, teacher_logits=teacher_logits_path(config, train))
    except DistillError as error:
        raise CompressError(str(error)) from error
    metrics: dict[str, Any] = {
        "steps": result.steps,
        "tokens": result.tokens,
        "train_sequences": int(train.shape[0]),
        "seq_len": config.distill_seq_len,
        "tokens_per_second": result.tokens_per_second,
        "seconds": result.seconds,
        "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from_step,
        "parallel": result.parallel,
        "processes": result.processes,
        "history": list(result.history),
        "student_perplexity_before": before.get("validation", float("nan")),
        "student_agreement_before": agreement_before.get("validation"),
        "validation_tokens": int(valid.shape[0] * (valid.shape[1] - 1)),
    }
    if _rank() == 0:
        last = result.history[-1]  # the trainer evaluates at the final step, so this is normally measured already
        after = last.get("val_perplexities") or ({"validation": last["val_perplexity"]} if "val_perplexity" in last
                                                 else evaluate(student))
        metrics["student_perplexity"] = after["validation"]
        metrics["student_agreement"] = agreement.get("validation")
        metrics["evals_before"] = {k: {"perplexity": v, "agreement": agreement_before.get(k)} for k, v in before.items()}
        metrics["evals"] = {k: {"perplexity": v, "agreement": agreement.get(k)} for k, v in after.items()}
        save_checkpoint(student, tokenizer, out_dir)
    return metrics
