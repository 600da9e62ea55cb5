"""Knobs and results of one distillation run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("wsd", "cosine", "constant")
PARALLEL = ("ddp", "fsdp")
ATTENTION = ("auto", "eager", "sdpa", "model")
COMPILE = ("auto", "on", "off")
# compile "auto" pays off from here: compilation costs ~20 s once (cold), and saves ~0.8 s a step on the README's
# 91M-parameter student (benchmarks/results/distill_overhead.md); tiny test models and short runs skip it.
_COMPILE_MIN_STEPS, _COMPILE_MIN_PARAMS = 50, 10_000_000


class DistillError(RuntimeError):
    """A distillation run cannot continue (bad settings, or the loss became NaN/inf)."""


@dataclass(frozen=True)
class DistillConfig:
    """How to distill: budget, batch, optimizer, schedule, loss mix, checkpointing."""

    tokens: int | None = 300_000  # budget in training tokens (ignored when ``steps`` is set)
    # Tokens per training sequence, as the caller cuts them (distill() refuses train_ids of another length);
    # None: whatever train_ids hold.
    seq_len: int | None = None
    steps: int | None = None
    batch_size: int = 8  # sequences per micro-batch and process
    grad_accum: int = 1
    lr: float = 3e-4
    # > 0: at the first step after warmup, a validation perplexity above the start's means the peak learning rate is
    # too high for this student (one that starts near its teacher): the student goes back to its initial weights,
    # the peak is divided by 10 and the schedule restarts over the remaining steps, at most this many times
    # (distill.backoff). Needs an evaluation; 0: the learning rate is used as given.
    lr_backoffs: int = 0
    min_lr_ratio: float = 0.01
    warmup_steps: int = 10
    schedule: str = "wsd"
    decay_fraction: float = 0.2  # share of steps in warmup-stable-decay's final decay
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    hidden_loss: str = "cosine"
    hidden_pairs: tuple[tuple[int, int], ...] = ()  # (student layer, teacher layer) of hidden_states
    # Logits memory bound: positions per KL chunk = kl_chunk_elements // vocabulary. 2^28 fp32 elements
    # (1 GiB a logits tensor) covers SmolLM2 at 8 x 256 tokens in one chunk, so nothing is recomputed
    # there, and splits Gemma's 262k vocabulary into chunks of 1,024 positions.
    kl_chunk_elements: int = 2**28
    # > 0: KL on the teacher's top-k log-probabilities, computed once over the training sequences and stored
    # (distill.teacher_logits), instead of running the teacher every step. 0: the full-vocabulary KL, online.
    teacher_top_k: int = 0
    clip: float = 1.0
    bf16: bool = True
    # The attention kernel while training. "auto": eager (matmul + softmax) on CPU for sequences up to 512 tokens,
    # where it beats the fused CPU kernel (benchmarks/distill_overhead.py), else the model's own; "model": never
    # change it. Eager attention keeps (heads x length x length) weights per layer, so long sequences keep sdpa.
    attention: str = "auto"
    # The KL and cross-entropy with gradients taken in their own pass (distill.losses.FusedLogitLoss);
    # False runs them through autograd (the same math, about twice the time and more memory).
    fused_loss: bool = True
    # torch.compile each decoder layer of student and teacher for training (one compilation serves every layer of
    # a model; validation runs them eagerly). "auto": on CPU with a C++ compiler, for runs of at least 50 steps
    # on a student of at least 10M parameters; "on" / "off" force it.
    compile: str = "auto"
    eval_every: int = 50  # steps; 0 = only at the end
    checkpoint_every: int = 50  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    # Under torchrun: "ddp" keeps a whole student per process; "fsdp" shards the student's weights,
    # gradients and AdamW state across processes (the frozen teacher stays whole on each).
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise DistillError(f"optimizer {self.optimizer!r}: allowed are {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise DistillError(f"schedule {self.schedule!r}: allowed are {', '.join(SCHEDULES)}")
        if self.parallel not in PARALLEL:
            raise DistillError(f"parallel {self.parallel!r}: allowed are {', '.join(PARALLEL)}")
        if self.attention not in ATTENTION:
            raise DistillError(f"attention {self.attention!r}: allowed are {', '.join(ATTENTION)}")
        if self.compile not in COMPILE:
            raise DistillError(f"compile {self.compile!r}: allowed are {', '.join(COMPILE)}")
        if self.parallel == "fsdp" and self.optimizer == "muon":
            raise DistillError("Muon needs whole matrices, which FSDP shards: use optimizer adamw with fsdp, or ddp")
        if self.steps is None and not self.tokens:
            raise DistillError("give a budget: tokens or steps")
        if self.lr_backoffs < 0:
            raise DistillError(f"lr_backoffs {self.lr_backoffs}: use 0 (off) or how many times the peak may drop 10x")
        if self.temperature <= 0:
            raise DistillError(f"temperature {self.temperature}: must be positive")
        if self.seq_len is not None and self.seq_len < 2:
            raise DistillError(f"seq_len {self.seq_len}: a training sequence needs at least 2 tokens")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise DistillError("batch_size and grad_accum must be at least 1")
        if self.teacher_top_k < 0:
            raise DistillError(f"teacher_top_k {self.teacher_top_k}: use 0 (online, full vocabulary) or a positive k")
        if self.teacher_top_k and self.temperature != 1.0:
            raise DistillError("stored teacher top-k log-probabilities are at temperature 1: use temperature 1 "
                               "with teacher_top_k, or teacher_top_k 0")
        if self.teacher_top_k and self.hidden_weight:
            raise DistillError("the hidden-state loss needs the teacher's hidden states every step: set hidden_weight 0 "
                               "with teacher_top_k, or teacher_top_k 0")
        object.__setattr__(self, "hidden_pairs", tuple(tuple(p) for p in self.hidden_pairs))

    def attention_for(self, device_type: str, seq_len: int) -> str | None:
        """The attention implementation to train with, or None to keep the model's."""
        if self.attention == "auto":
            return "eager" if device_type == "cpu" and seq_len <= 512 else None
        return None if self.attention == "model" else self.attention

    def compile_for(self, device_type: str, parameters: int, steps: int) -> bool:
        """Whether to compile the decoder layers for a run of ``steps`` on a student of ``parameters``."""
        if self.compile != "auto":
            return self.compile == "on"
        import shutil

        return (device_type == "cpu" and steps >= _COMPILE_MIN_STEPS and parameters >= _COMPILE_MIN_PARAMS
                and shutil.which("g++") is not None)

    def global_batch(self, world_size: int = 1) -> int:
        """Sequences per optimizer step, over all processes."""
        return self.batch_size * self.grad_accum * world_size

    def total_steps(self, seq_len: int, world_size: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        assert self.tokens is not None
        return max(1, math.ceil(self.tokens / (self.global_batch(world_size) * seq_len)))

    def warmup(self, total: int) -> int:
        """Warmup steps of a run of ``total``: ``warmup_steps``, at most a quarter of the run, so a short run (a
        small budget) still reaches its peak, holds it and decays instead of ending mid-warmup at the peak."""
        return min(self.warmup_steps, total // 4)

    def lr_at(self, step: int, total: int, peak: float | None = None) -> float:
        """Learning rate at optimizer step ``step`` (0-based) of ``total``, with peak ``peak`` (default ``lr``)."""
        peak = self.lr if peak is None else peak
        warmup = self.warmup(total)
        if step < warmup:
            return peak * (step + 1) / warmup
        floor = peak * self.min_lr_ratio
        if self.schedule == "constant":
            return peak
        if self.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        decay_start = total - max(1, int(total * self.decay_fraction))
        if step < decay_start:
            return peak
        progress = (step - decay_start + 1) / max(1, total - decay_start)
        return peak + (floor - peak) * min(progress, 1.0)  # linear decay to the floor

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["hidden_pairs"] = [list(p) for p in self.hidden_pairs]
        return values


@dataclass(frozen=True)
class DistillResult:
    """What a distillation run did and measured. ``seconds`` and ``tokens_per_second`` leave validation out."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    final_loss: float
    history: tuple[dict[str, float], ...] = field(default_factory=tuple)  # {"step", "tokens", "loss", "val_perplexity"?}
    resumed_from_step: int = 0
    # The peak learning rate the run ended with: ``config.lr`` unless the guard backed it off (then the history's
    # records carry "lr_backoff").
    peak_lr: float = 0.0
    parallel: str = "none"  # what ran: none (one process), ddp or fsdp
    processes: int = 1

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["history"] = list(self.history)
        return values
