"""The distillation loop: one entry point for a notebook, the CLI and ``torchrun`` (DDP or FSDP, gloo or nccl).

``distill(student, teacher, train_ids, config)`` trains ``student`` in place to match ``teacher``'s
next-token distributions on ``train_ids`` (sequences, seq_len). Models are duck-typed like Hugging Face
causal LMs: ``model.base_model(input_ids=...)`` gives hidden states and ``model.get_output_embeddings()``
the output projection.

An encoder-decoder student (``student_io=EncoderDecoderStudent()``, e.g. the Mu-like one) learns from a causal
teacher across architectures: each batch is cut at a split point (pseudo-random per batch, reproducible
from its tokens, between a quarter and three quarters of the length); the teacher reads the whole
sequence, the student encodes the prefix and decodes the continuation (``decoder_input_ids`` = the start
token, then the continuation shifted right), and the loss compares their predictions of the continuation
tokens only.

``train_ids`` may also be :class:`distill.pairs.Pairs`, (input, output) pairs for task training: the loss
(KL from the teacher, which reads input and output, and/or cross-entropy) is then taken on the output tokens
only, a causal student reading input and output as one sequence, an encoder-decoder student encoding the
input and decoding the output. Token budgets count padded positions (rows x the pairs' longest length).
Such an encoder-decoder student's ``forward(input_ids, decoder_input_ids, output_hidden_states=True)`` must return
``decoder_hidden_states`` whose last entry feeds the output projection.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from distill.backoff import LearningRateGuard
from distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from distill.config import DistillConfig, DistillError, DistillResult
from distill.losses import HiddenStateLoss
from distill.objective import KnowledgeDistillationLoss
from distill.pairs import Pairs
from distill.speed import (
    attention_implementation,
    autocast,
    compiled_layers,
    keep_freed_memory,
    low_precision_linears,
)
from distill.students import StudentIO
from distill.teacher_logits import TeacherTopK, cached_teacher_topk

log = logging.getLogger(__name__)


def _optimizers(student: nn.Module, extra: nn.Module | None, config: DistillConfig) -> list[torch.optim.Optimizer]:
    params = [p for p in student.parameters() if p.requires_grad]
    if extra is not None:
        params += [p for p in extra.parameters() if p.requires_grad]
    embeddings = {id(p) for m in (student.get_input_embeddings(), student.get_output_embeddings()) for p in m.parameters()}
    # No weight decay on norms and biases (1-D); Muon only for hidden 2-D matrices, as its authors advise:
    # embeddings, the output head and every 1-D parameter go to AdamW.
    matrices = [p for p in params if p.ndim == 2 and id(p) not in embeddings]
    decayed = [p for p in params if p.ndim >= 2 and (config.optimizer == "adamw" or id(p) in embeddings)]
    flat = [p for p in params if p.ndim < 2]
    adamw_groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": flat, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW([g for g in adamw_groups if g["params"]], lr=config.lr, betas=(0.9, 0.95), eps=1e-8)
    if config.optimizer == "adamw":
        return [adamw]
    muon = torch.optim.Muon(matrices, lr=config.lr, weight_decay=config.weight_decay, adjust_lr_fn="match_rms_adamw")
    return [adamw, muon]


class _Order:
    """Deterministic sequence order: a fresh seeded permutation per epoch, indexable by global position."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed = count, seed
        self._cache: dict[int, torch.Tensor] = {}

    def take(self, start: int, length: int) -> torch.Tensor:
        out = []
        for position in range(start, start + length):
            epoch = position // self.count
            if epoch not in self._cache:
                self._cache = {epoch: torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed + epoch))}
            out.append(int(self._cache[epoch][position % self.count]))
        return torch.tensor(out, dtype=torch.long)


def _shard(module: KnowledgeDistillationLoss) -> None:
    """FSDP2: one unit per transformer block (Hugging Face's ``_no_split_modules``), the rest in the root unit.

    The root holds the embeddings, final norm and (tied) head together, so a tied weight stays one tensor.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(module.student, "_no_split_modules", None) or ())
    units = [m for m in module.student.modules() if type(m).__name__ in blocks]
    if not units:
        log.warning("FSDP: %s names no transformer block class (_no_split_modules); sharding it as one unit",
                    type(module.student).__name__)
    for unit in units:
        fully_shard(unit)
    fully_shard(module)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


Evaluation = Callable[[nn.Module], float | dict[str, float]]


def _evaluate(evaluate: Evaluation, model: nn.Module, sharded_root: nn.Module | None) -> dict[str, float]:
    """``evaluate(model)`` in eval mode, as {set name: perplexity} (a plain float is the set "validation"); under
    FSDP every process must call it, as the forward gathers shards. Compiled layers run eagerly here: they would
    recompile for evaluation's shapes and precision."""
    model.eval()
    if sharded_root is not None:
        sharded_root.unshard()  # the root unit (embeddings, final norm, head); blocks gather in their forward
    try:
        with torch.compiler.set_stance("force_eager"):
            value = evaluate(model)
        return {k: float(v) for k, v in value.items()} if isinstance(value, dict) else {"validation": float(value)}
    finally:
        if sharded_root is not None:
            sharded_root.reshard()
        model.train()


def _due(step: int, total: int, every: int) -> bool:
    """Whether periodic work (validation, a checkpoint) falls on ``step``: every ``every`` steps and at the end."""
    return step == total or (every > 0 and step % every == 0)


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    train_ids: torch.Tensor | Pairs,
    config: DistillConfig,
    evaluate: Evaluation | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    teacher_logits: str | Path | None = None,
    student_io: StudentIO | None = None,
    baseline: float | None = None,
) -> DistillResult:
    """Distill ``teacher`` into ``student`` (in place) on ``train_ids`` (sequences, seq_len), or on (input,
    output) :class:`Pairs` (loss on the output tokens).

    With ``config.teacher_top_k`` > 0 the teacher's top-k log-probabilities over ``train_ids`` are computed once
    and stored at ``teacher_logits`` (a .safetensors path; reused when the same teacher, ids and k made it, see
    :func:`distill.teacher_logits.cached_teacher_topk`), and training reads them instead of running the teacher.

    ``student_io`` says how the student reads a batch (default :class:`distill.students.CausalStudent`; an
    encoder-decoder student takes :class:`distill.students.EncoderDecoderStudent`).

    ``teacher`` may be None for plain cross-entropy training (``kl_weight`` 0, no hidden-state loss).

    ``evaluate(student)`` returns a validation perplexity, or {evaluation set: perplexity} (the first is the
    history's ``val_perplexity``, all are in ``val_perplexities``), called every ``config.eval_every`` steps and
    at the end. ``baseline`` is the validation perplexity before training, for ``config.lr_backoffs`` (measured
    here when None). With ``checkpoint_dir``, training state is saved every ``config.checkpoint_every`` steps (none while
    the learning-rate guard's check is ahead) and, with ``resume``, a rerun continues from the latest checkpoint exactly.
    Raises DistillError when the loss becomes NaN or infinite (the last good checkpoint is kept).
    """
    world, _ = _distributed()
    device = next(student.parameters()).device
    keep_freed_memory()
    torch.manual_seed(config.seed)
    per_step = config.global_batch(world)
    if config.seq_len is not None and not isinstance(train_ids, Pairs) and train_ids.shape[1] != config.seq_len:
        raise DistillError(f"train_ids hold sequences of {train_ids.shape[1]} tokens, the config says seq_len "
                           f"{config.seq_len}: cut them to that length, or leave seq_len None")
    if train_ids.shape[0] < per_step:
        log.warning("only %d training sequences for a global batch of %d: they repeat within a step",
                    train_ids.shape[0], per_step)
    if teacher is None and (config.kl_weight or config.hidden_weight):
        raise DistillError("kl_weight and hidden_weight need a teacher; pass one, or set both to 0 for plain training")
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    attention = config.attention_for(device.type, int(train_ids.shape[1]))
    # Counted before FSDP empties the caller's parameters (below).
    compiled = config.compile_for(device.type, sum(p.numel() for p in student.parameters()),
                                  config.total_steps(int(train_ids.shape[1]), world))
    sharded = world > 1 and config.parallel == "fsdp"
    # FSDP turns the module it shards into another class holding shards: train a copy and give the
    # caller's student the gathered weights at the end, so it comes back a plain model.
    trained = copy.deepcopy(student) if sharded else student
    trained.train()
    hidden = None
    if teacher is not None and config.hidden_weight and config.hidden_pairs:
        hidden = HiddenStateLoss(list(config.hidden_pairs), student.config.hidden_size, teacher.config.hidden_size,
                                 config.hidden_loss).to(device)
    stored = None
    if config.teacher_top_k:
        stored = _stored_logits(teacher, train_ids, config, teacher_logits, progress)
    loss_module = KnowledgeDistillationLoss(trained, None if stored is not None else teacher, config, hidden, student_io)
    if sharded:
        _shard(loss_module)
        for param in student.parameters():  # the copy holds them now; freed until the gather at the end
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    try:
        with attention_implementation([trained, teacher], attention), \
                low_precision_linears(teacher if stored is None else None, torch.bfloat16 if config.bf16 else None), \
                compiled_layers([trained, None if stored is not None else teacher], compiled):
            return _loop(loss_module, train_ids, config, evaluate, checkpoint_dir, resume, progress, sharded, stored,
                         baseline)
    finally:
        if sharded:
            _gather_into(student, loss_module)


def _stored_logits(teacher: nn.Module | None, train_ids: torch.Tensor | Pairs, config: DistillConfig,
                   path: str | Path | None, progress: bool) -> TeacherTopK:
    """The teacher's stored top-k over ``train_ids``: built by the first process, read by every process."""
    if isinstance(train_ids, Pairs):
        raise DistillError("stored teacher top-k logits serve token sequences, not (input, output) pairs")
    if teacher is None or path is None:
        raise DistillError("teacher_top_k needs the teacher (to compute or check its stored logits) and a "
                           "teacher_logits path to store them")
    world, rank = _distributed()
    if rank == 0:
        stored, _ = cached_teacher_topk(teacher, train_ids, config.teacher_top_k, path, config.batch_size,
                                        config.bf16, progress)
    if world > 1:
        dist.barrier()
        if rank != 0:
            stored = TeacherTopK.load(path)
    return stored


def _gather_into(student: nn.Module, loss_module: nn.Module) -> None:
    """Put the full weights of the sharded ``loss_module.student`` into the plain ``student`` (all processes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(loss_module, options=StateDictOptions(full_state_dict=True))
    for name, param in student.named_parameters(remove_duplicate=False):
        param.data = full[f"student.{name}"].detach().to(param.device)
    student.eval()


def _backward(module: nn.Module, train_ids: torch.Tensor | Pairs, mine: torch.Tensor, stored: TeacherTopK | None,
              config: DistillConfig, device: torch.device, world: int, sharded: bool) -> tuple[float, int]:
    """Forward and backward of one optimizer step's micro-batches ``mine`` of this process: the step's loss,
    averaged over the processes, and the token positions all processes read (pair batches are cut to their own
    width, so this is not always rows x the set's width)."""
    step_loss, positions = 0.0, 0
    for micro in range(config.grad_accum):
        rows = mine[micro * config.batch_size : (micro + 1) * config.batch_size]
        batch = train_ids[rows].to(device)
        positions += batch.shape[0] * batch.shape[1]
        topk = None if stored is None else tuple(t.to(device) for t in stored.batch(rows))
        # DDP and FSDP reduce gradients only on the last micro-batch of a step.
        accumulate = world > 1 and micro < config.grad_accum - 1
        if sharded:
            module.set_requires_gradient_sync(not accumulate)
        with module.no_sync() if accumulate and not sharded else contextlib.nullcontext():
            with autocast(config.bf16, device):
                loss = (module(batch) if topk is None else module(batch, topk)) / config.grad_accum
            loss.backward()
        step_loss += float(loss.detach())
    if world > 1:
        reduced = torch.tensor([step_loss, positions], dtype=torch.float64, device=device)
        dist.all_reduce(reduced)
        step_loss, positions = float(reduced[0]) / world, int(reduced[1])
    return step_loss, positions


def _loop(
    loss_module: KnowledgeDistillationLoss,
    train_ids: torch.Tensor | Pairs,
    config: DistillConfig,
    evaluate: Evaluation | None,
    checkpoint_dir: str | Path | None,
    resume: bool,
    progress: bool,
    sharded: bool,
    stored: TeacherTopK | None = None,
    baseline: float | None = None,
) -> DistillResult:
    """The training loop of ``distill`` on the (possibly sharded) ``loss_module``."""
    world, rank = _distributed()
    seq_len = int(train_ids.shape[1])
    total = config.total_steps(seq_len, world)
    per_step = config.global_batch(world)
    trained, hidden = loss_module.student, loss_module.hidden
    device = next(loss_module.parameters()).device
    optimizers = _optimizers(trained, hidden, config)  # after sharding: they must hold the shards
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    step, tokens, history = _resumed(folder if resume else None, loss_module, optimizers, total)
    resumed = step

    module: nn.Module = loss_module
    if world > 1 and not sharded:
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    order = _Order(int(train_ids.shape[0]), config.seed)
    params = [p for optimizer in optimizers for g in optimizer.param_groups for p in g["params"]]
    guard = LearningRateGuard(config, total, history, params, evaluate is not None)
    if guard.left:
        guard.baseline = _baseline(baseline, evaluate, trained, loss_module if sharded else None, device)
    started_tokens = tokens
    started = time.perf_counter()
    evaluating = 0.0  # seconds spent in validation, left out of throughput
    bar = tqdm(total=total, initial=step, desc="distill", unit="step", disable=not progress or rank != 0)
    while step < total:
        for group in (g for optimizer in optimizers for g in optimizer.param_groups):
            group["lr"] = guard.lr(step)
        indices = order.take(step * per_step, per_step)
        mine = indices[rank * config.batch_size * config.grad_accum : (rank + 1) * config.batch_size * config.grad_accum]
        step_loss, positions = _backward(module, train_ids, mine, stored, config, device, world, sharded)
        _finite(step_loss, step, folder)
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        for group_optimizer in optimizers:
            group_optimizer.step()
            group_optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += positions
        record: dict[str, Any] = {
            "step": step, "tokens": tokens, "loss": step_loss, "lr": guard.lr(step - 1),
            "seconds": time.perf_counter() - started - evaluating,  # training time of this process so far
        }
        if evaluate is not None and (_due(step, total, config.eval_every) or guard.due(step)):
            evaluating += _validate(record, evaluate, trained, loss_module if sharded else None)
            if guard.due(step) and (backoff := guard.check(step, record["val_perplexity"], params)):
                record["lr_backoff"] = backoff
                optimizers = _optimizers(trained, hidden, config)  # a fresh start: no moments of the discarded steps
        history.append(record)
        elapsed = time.perf_counter() - started - evaluating
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{(tokens - started_tokens) / max(elapsed, 1e-9):,.0f}")
        bar.update(1)
        if folder is not None and _due(step, total, config.checkpoint_every) and not guard.pending(step):
            save_checkpoint(folder, step, loss_module, optimizers,
                            {"tokens": tokens, "history": history, "config": config.to_dict()},
                            keep=config.keep_checkpoints)
            if world > 1:
                dist.barrier()
    bar.close()
    trained.eval()
    seconds = time.perf_counter() - started - evaluating
    return DistillResult(steps=step, tokens=tokens, seconds=seconds,
                         tokens_per_second=(tokens - started_tokens) / seconds if seconds > 0 else 0.0,
                         final_loss=history[-1]["loss"] if history else float("nan"), history=tuple(history),
                         resumed_from_step=resumed, peak_lr=guard.peak, parallel=("fsdp" if sharded else "ddp") if world > 1 else "none",
                         processes=world)


def _finite(step_loss: float, step: int, folder: Path | None) -> None:
    """Raise DistillError when the step's loss is NaN or infinite."""
    if not math.isfinite(step_loss):
        last = latest_checkpoint(folder) if folder else None
        raise DistillError(
            f"the distillation loss became {step_loss} at step {step}; "
            + (f"the last good checkpoint is {last}; " if last else "")
            + "lower the learning rate (--distill-lr) or check the data"
        )


def _validate(record: dict[str, Any], evaluate: Evaluation, trained: nn.Module, sharded_root: nn.Module | None) -> float:
    """Put the validation figures into the step's ``record``; the seconds that took."""
    started = time.perf_counter()
    measured = _evaluate(evaluate, trained, sharded_root)
    record["val_perplexity"] = next(iter(measured.values()))
    if len(measured) > 1:
        record["val_perplexities"] = measured
    return time.perf_counter() - started


def _baseline(given: float | None, evaluate: Evaluation, trained: nn.Module, sharded_root: nn.Module | None,
              device: torch.device) -> float:
    """The validation perplexity before training: ``given`` (the first process's), or measured."""
    if dist.is_initialized():
        value = torch.tensor([math.nan if given is None else given], device=device)
        dist.broadcast(value, 0)
        given = None if math.isnan(value.item()) else value.item()
    return given if given is not None else next(iter(_evaluate(evaluate, trained, sharded_root).values()))


def _resumed(folder: Path | None, loss_module: nn.Module, optimizers: list[torch.optim.Optimizer],
             total: int) -> tuple[int, int, list[dict[str, Any]]]:
    """(step, tokens, history) of the latest checkpoint in ``folder``, loaded into the module and optimizers;
    a fresh start without one."""
    if folder is None or (found := latest_checkpoint(folder)) is None:
        return 0, 0, []
    state = load_checkpoint(found, loss_module, optimizers)
    log.info("resuming distillation from %s (step %d of %d)", found, state["step"], total)
    return state["step"], state["tokens"], state["history"]

