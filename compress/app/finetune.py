"""Task fine-tuning of a student on (input, output) pairs, with LoRA adapters or all weights.

``finetune(FinetuneConfig(student="runs/demo/student", data="task.jsonl", out="runs/demo/task"))`` trains the
student to produce each output given its input (cross-entropy on the output tokens and, with a teacher,
KL from the teacher's predictions of the same tokens), then writes ``out/`` atomically: the fine-tuned
checkpoint (adapters merged, so it is the student's own architecture and exports like any student), the
adapters alone in ``out/adapter/`` (peft's ``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained`` on the student) and ``out/finetune.json``
(the settings and the held-out output-token perplexity and accuracy before and after). An interrupted run resumes
from the checkpoints it keeps in ``OUT.checkpoints/`` until it finishes.
Causal and encoder-decoder (Mu-like) students alike: see :class:`distill.pairs.Pairs`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.errors import CompressError, ConfigError
from compress.io import atomic_dir, write_json
from distill import DistillConfig, DistillError, distill, latest_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """Every knob of ``compress finetune``; each field is one flag."""

    student: str
    data: str
    out: str
    teacher: str | None = None  # with kl_weight > 0: KL from this teacher's predictions of the outputs
    lora_rank: int = 8  # 0: train every weight instead of adapters
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()  # linear layers by name (q_proj, ...); empty: all but the output head
    epochs: float = 3.0
    batch_size: int = 8
    lr: float | None = None  # default 1e-3 for adapters, 5e-5 for all weights (the usual ranges)
    kl_weight: float = 0.0
    ce_weight: float = 1.0
    max_input_tokens: int = 256
    max_output_tokens: int = 128
    bf16: bool = True
    seed: int = 0
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.lora_rank < 0:
            raise ConfigError(f"--lora-rank {self.lora_rank}: use a positive rank such as 8, or 0 to train every weight")
        if self.epochs <= 0 or self.batch_size < 1 or (self.lr is not None and self.lr <= 0):
            raise ConfigError("--epochs and --lr must be positive and --batch-size at least 1")
        if self.max_input_tokens < 1 or self.max_output_tokens < 1:
            raise ConfigError("--max-input-tokens and --max-output-tokens must be at least 1")
        if self.kl_weight < 0 or self.ce_weight < 0 or not (self.kl_weight or self.ce_weight):
            raise ConfigError("--kl-weight and --ce-weight must be >= 0 and not both 0")
        if self.kl_weight and not self.teacher:
            raise ConfigError(f"--kl-weight {self.kl_weight} needs a teacher: pass --teacher, or --kl-weight 0")
        if Path(self.out).resolve() == Path(self.student).resolve():
            raise ConfigError(f"--out {self.out} is the student's own folder; choose a new folder for the fine-tuned model")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.lora_rank else 5e-5)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["lora_targets"] = list(self.lora_targets)
        return values


def finetune(config: FinetuneConfig, progress: bool = True, resume: bool = True) -> dict[str, Any]:
    """Fine-tune ``config.student`` on the pairs of ``config.data``; write ``config.out``; return its metrics.

    Training state is checkpointed in ``OUT.checkpoints/`` beside ``out`` about every twentieth of the run; an
    interrupted fine-tuning run again with the same settings, pairs and student continues from its latest checkpoint
    (``resume=False`` starts over). The checkpoints are removed once ``out`` is written."""
    from transformers import AutoTokenizer

    from compress.core.family import family_of, load_model
    from compress.evaluation.quality import pair_quality
    from compress.sources.data import load_pairs, pair_batches
    from compress.sources.teachers import load_teacher

    student_dir, out = Path(config.student), Path(config.out)
    if not (student_dir / "config.json").exists():
        raise CompressError(f"--student {student_dir}: no checkpoint there (no config.json); pass a student folder, "
                            "e.g. runs/<name>/student")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "finetune.json").exists())):
        raise CompressError(f"--out {out} exists and holds no earlier fine-tuning; choose a new or empty folder")
    dataset = load_pairs(config.data)
    data_sha256 = data_digest(Path(config.data))
    checkpoints = _checkpoint_folder(config, data_sha256, student_dir, out, resume)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    train = pair_batches(dataset, tokenizer, "train", config.max_input_tokens, config.max_output_tokens)
    valid = pair_batches(dataset, tokenizer, "validation", config.max_input_tokens, config.max_output_tokens)
    student = load_model(student_dir, dtype=torch.float32).eval()
    family = family_of(student.config)
    teacher = load_teacher(config.teacher, config.trust_remote_code)[0] if config.kl_weight else None
    torch.manual_seed(config.seed)
    before = pair_quality(student, valid, config.batch_size, family.reader)
    log.info("held-out outputs before fine-tuning: perplexity %.2f, accuracy %.3f on %d tokens",
             before.perplexity, before.accuracy, before.tokens)
    total_params = sum(p.numel() for p in student.parameters())
    adapted: list[str] = []
    wrapped = None
    if config.lora_rank:
        wrapped = add_adapters(student, config.lora_rank, config.lora_alpha, config.lora_targets, base=str(student_dir))
        adapted = adapter_layers(student)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    steps = max(1, math.ceil(config.epochs * len(train) / config.batch_size))
    settings = DistillConfig(tokens=None, steps=steps, batch_size=config.batch_size, lr=config.learning_rate,
                             warmup_steps=max(1, min(10, steps // 10)), schedule="cosine", kl_weight=config.kl_weight,
                             ce_weight=config.ce_weight, eval_every=max(1, steps // 5), checkpoint_every=max(1, steps // 20),
                             bf16=config.bf16, seed=config.seed)
    if (found := latest_checkpoint(checkpoints)) is not None:
        log.info("resuming the fine-tuning from %s (remove %s, or pass --no-resume, to start over)", found,
                 checkpoints.parent)
    started = time.perf_counter()
    try:
        result = distill(student, teacher, train, settings, progress=progress, student_io=family.student_io,
                         checkpoint_dir=checkpoints, evaluate=lambda model: pair_quality(model, valid, config.batch_size, family.reader).perplexity)
    except DistillError as error:
        raise CompressError(str(error)) from error
    adapter_dir = None
    if wrapped is not None:
        adapter_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.adapter-", dir=out.parent if out.parent.exists() else None))
        wrapped.save_pretrained(adapter_dir)  # peft's format: adapter_config.json + adapter_model.safetensors
        student = merge_adapters(wrapped)  # the student's own architecture again, the updates in its weights
    student.eval()
    after = pair_quality(student, valid, config.batch_size, family.reader)  # the merged model: what is saved
    metrics = {
        "config": config.to_dict(), "data_sha256": data_sha256, "train_pairs": len(train),
        "validation_pairs": len(valid), "train_output_tokens": train.output_tokens, "steps": result.steps,
        "seconds": time.perf_counter() - started, "resumed_from_step": result.resumed_from_step,
        "params": total_params, "trainable_params": trainable, "lora_layers": len(adapted),
        "before": before.to_dict(), "after": after.to_dict(), "history": list(result.history),
    }
    try:
        with atomic_dir(out) as tmp:
            student.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if adapter_dir is not None:
                shutil.move(adapter_dir, tmp / "adapter")
            write_json(tmp / "finetune.json", metrics)
    finally:
        if adapter_dir is not None:
            shutil.rmtree(adapter_dir, ignore_errors=True)
    shutil.rmtree(checkpoints.parent, ignore_errors=True)
    log.info("held-out outputs after fine-tuning: perplexity %.2f, accuracy %.3f", after.perplexity, after.accuracy)
    return metrics


def _checkpoint_folder(config: FinetuneConfig, data_sha256: str, student_dir: Path, out: Path, resume: bool) -> Path:
    """``OUT.checkpoints/<fingerprint>``: named after the settings, the pairs and the student's files, so a run
    resumes only what the same fine-tuning wrote; checkpoints of other settings (or all, without ``resume``) are
    removed."""
    blob = json.dumps({"config": config.to_dict(), "data": data_sha256,
                       "student": data_digest(student_dir)}, sort_keys=True)
    folder = out.with_name(out.name + ".checkpoints") / hashlib.sha256(blob.encode()).hexdigest()[:16]
    for other in folder.parent.glob("*") if folder.parent.is_dir() else []:
        if other != folder or not resume:
            shutil.rmtree(other, ignore_errors=True)
    return folder


def add_adapters(model: Any, rank: int, alpha: float, targets: tuple[str, ...] = (), base: str | None = None) -> Any:
    """LoRA adapters (peft) on ``model``'s linear layers in place, everything else frozen; the ``PeftModel`` that
    holds them (``merge_and_unload()`` folds them into the weights, ``save_pretrained`` writes them alone).

    ``targets``: linear layers by name (``q_proj``, ...); empty: every one but the output head, which is often tied
    to the input embedding. A block-shared (MobileLLM-like) model's repeated blocks are one module, so they share
    one adapter, and merging keeps the sharing."""
    from peft import LoraConfig, get_peft_model

    settings = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets) or "all-linear",
                          base_model_name_or_path=base)
    try:
        wrapped = get_peft_model(model, settings)
    except ValueError as error:  # no layer matched
        raise ConfigError(f"--lora-targets {','.join(targets)}: {error}") from error
    _share_adapters_of_shared_layers(model)
    return wrapped


def data_digest(data: Path) -> str:
    """SHA-256 of the pair files (a file, or a folder's files in name order): what the fine-tuning learned from."""
    digest = hashlib.sha256()
    for file in sorted(data.rglob("*")) if data.is_dir() else [data]:
        if file.is_file():
            with file.open("rb") as handle:  # a student's weights are hundreds of MB: never all in memory
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def _share_adapters_of_shared_layers(model: Any) -> None:
    """Layers whose base weight is one tied tensor (block sharing) get one adapter: peft wraps each place on its own,
    so every later place is given the first place's wrapper."""
    from peft.tuners.lora import LoraLayer

    first: dict[int, Any] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                kept = first.setdefault(id(child.get_base_layer().weight), child)
                if kept is not child:
                    setattr(parent, name, kept)


def merge_adapters(wrapped: Any) -> Any:
    """The model of ``add_adapters`` with its adapters folded into the weights and the plain layers back."""
    from peft.tuners.lora import LoraLayer

    model = wrapped.merge_and_unload()
    # A wrapper shared by several places (block sharing) is merged and unloaded at its first place only.
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                setattr(parent, name, child.get_base_layer())
    return model


def adapter_layers(model: Any) -> list[str]:
    """Names of the layers of ``model`` that carry an adapter."""
    from peft.tuners.lora import LoraLayer

    return sorted(name for name, m in model.named_modules() if isinstance(m, LoraLayer))
