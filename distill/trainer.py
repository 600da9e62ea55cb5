"""The distillation loop: one entry point for a notebook, the CLI and ``torchrun`` (DDP or FSDP, gloo or nccl).

``distill(student, teacher, train_ids, config)`` trains ``student`` in place to match ``teacher``'s
next-token distributions on ``train_ids`` (sequences, seq_len). Models are duck-typed like Hugging Face
causal LMs: ``model.base_model(input_ids=...)`` gives hidden states and ``model.get_output_embeddings()``
the output projection.

An encoder-decoder student (``config.is_encoder_decoder``, e.g. the Mu-like one) learns from a causal
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
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from distill.config import DistillConfig, DistillError, DistillResult
from distill.losses import HiddenStateLoss, logit_distillation_loss
from distill.pairs import Pairs
from distill.teacher_logits import TeacherTopK, cached_teacher_topk

log = logging.getLogger(__name__)


def _cap(model: nn.Module) -> float | None:
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None)


class KnowledgeDistillationLoss(nn.Module):
    """Student forward + teacher forward + loss, as one module so that DDP or FSDP sees the whole step.

    The teacher is held outside the module tree: DDP neither broadcasts nor tracks it.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, config: DistillConfig, hidden: HiddenStateLoss | None) -> None:
        super().__init__()
        self.student = student
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
        if topk is not None and (isinstance(ids, Pairs) or getattr(self.student.config, "is_encoder_decoder", False)):
            raise DistillError("stored teacher top-k logits serve causal students on token sequences only")
        if isinstance(ids, Pairs):
            return self._pairs(ids)
        if getattr(self.student.config, "is_encoder_decoder", False):
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
        """The loss of an encoder-decoder student on ``ids`` cut at ``split_point`` (see the module docstring)."""
        c, teacher = self.config, self._teacher
        if self.hidden is not None:
            raise DistillError("the hidden-state loss pairs layers of one stack; an encoder-decoder student has two")
        cut = split_point(ids)
        prefix, continuation = ids[:, :cut], ids[:, cut:]
        start = torch.full_like(continuation[:, :1], self.student.config.decoder_start_token_id)
        out = self.student(input_ids=prefix, decoder_input_ids=torch.cat((start, continuation[:, :-1]), dim=1),
                           output_hidden_states=True)
        student_hidden = out.decoder_hidden_states[-1]  # position j predicts continuation[:, j]
        teacher_hidden = None
        if teacher is not None and c.kl_weight:
            with torch.no_grad():
                teacher_hidden = teacher.base_model(input_ids=ids).last_hidden_state[:, cut - 1 : -1]  # ids[:, cut:]
        return self._logit_loss(student_hidden, teacher_hidden, continuation)

    def _pairs(self, batch: Pairs) -> torch.Tensor:
        """The loss on the output tokens of (input, output) pairs: the teacher reads input and output as one
        sequence; a causal student too, an encoder-decoder student encodes the input and decodes the output."""
        c, teacher = self.config, self._teacher
        if self.hidden is not None:
            raise DistillError("the hidden-state loss is not defined on (input, output) pairs; set hidden_weight 0")
        mask = batch.attention_mask()
        scored = batch.predicting_outputs()  # (pairs, length - 1): causal positions predicting an output token
        teacher_hidden = None
        if teacher is not None and c.kl_weight:
            with torch.no_grad():
                states = teacher.base_model(input_ids=batch.ids, attention_mask=mask).last_hidden_state[:, :-1]
            teacher_hidden = states[scored]  # (output tokens, width), in row-major order
        if not getattr(self.student.config, "is_encoder_decoder", False):
            student_hidden = self.student.base_model(input_ids=batch.ids, attention_mask=mask).last_hidden_state[:, :-1]
            return self._logit_loss(student_hidden[scored], teacher_hidden, batch.ids[:, 1:][scored])
        inputs, input_mask = batch.inputs()
        outputs, output_mask = batch.outputs()
        out = self.student(input_ids=inputs, attention_mask=input_mask, output_hidden_states=True,
                           decoder_input_ids=batch.decoder_input_ids(self.student.config.decoder_start_token_id))
        # Row-major order of output_mask equals that of ``scored``: output j of row i sits at causal position cut+j-1.
        return self._logit_loss(out.decoder_hidden_states[-1][output_mask], teacher_hidden, outputs[output_mask])


def split_point(ids: torch.Tensor) -> int:
    """Where an encoder-decoder student's batch is cut into prefix and continuation: between a quarter and
    three quarters of the length, varying from batch to batch but a function of the tokens (so a resumed
    run cuts each batch as the uninterrupted one did)."""
    length = ids.shape[1]
    low = max(1, length // 4)
    span = max(1, length * 3 // 4 - low)
    return low + int(ids[0, : min(8, length)].sum().item() * 2654435761 % span)


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


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning each large block to the kernel.

    Every training step allocates and frees tensors of hundreds of MB (a batch's logits); glibc serves blocks
    above 32 MB with fresh ``mmap`` pages, so the kernel faults in and zeroes those pages again every step, and
    much of a CPU run's time goes to the kernel. With ``mmap`` off for the heap the freed blocks are reused.
    Process-wide and idempotent; ``PDQ_MALLOC_TUNING=0`` turns it off. Returns whether it applied (Linux with
    glibc only)."""
    if os.environ.get("PDQ_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


@contextlib.contextmanager
def _attention(models: list[nn.Module | None], choice: str | None) -> Any:
    """Train ``models`` with attention implementation ``choice`` (None: unchanged), restoring theirs after."""
    saved = []
    if choice is not None:
        for model in models:
            current = getattr(getattr(model, "config", None), "_attn_implementation", None)
            if current is None or current == choice or not hasattr(model, "set_attn_implementation"):
                continue
            try:
                model.set_attn_implementation(choice)
            except (ValueError, NotImplementedError) as error:  # a model without that kernel keeps its own
                log.debug("%s keeps %s attention: %s", type(model).__name__, current, error)
                continue
            saved.append((model, current))
    try:
        yield
    finally:
        for model, current in saved:
            model.set_attn_implementation(current)


@contextlib.contextmanager
def _low_precision_linears(model: nn.Module | None, dtype: torch.dtype | None) -> Any:
    """Hold the frozen ``model``'s linear weights in ``dtype`` while it runs under autocast to that dtype.

    Autocast casts weights that need no gradient again on every call; cast once, the matmuls get bit-identical
    operands. Weights shared with an embedding (a tied output head) stay as they are: the lookup reads them too.
    """
    swapped: list[tuple[nn.Linear, nn.Parameter]] = []
    if model is not None and dtype is not None:
        shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) and weight is not None and id(weight) not in shared and weight.dtype != dtype:
                swapped.append((module, weight))
                module.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    try:
        yield
    finally:
        for module, weight in swapped:
            module.weight = weight


@contextlib.contextmanager
def _compiled_layers(models: list[nn.Module | None], enabled: bool) -> Any:
    """torch.compile the decoder layers (``base_model.layers``) of ``models`` for the duration."""
    layers = []
    if enabled:
        for model in models:
            found = getattr(getattr(model, "base_model", None), "layers", None)
            if isinstance(found, nn.ModuleList):
                layers += list(found)
        for layer in layers:
            layer.compile(dynamic=False)
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: the layer runs eagerly again


def _autocast(bf16: bool, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


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
) -> DistillResult:
    """Distill ``teacher`` into ``student`` (in place) on ``train_ids`` (sequences, seq_len), or on (input,
    output) :class:`Pairs` (loss on the output tokens).

    With ``config.teacher_top_k`` > 0 the teacher's top-k log-probabilities over ``train_ids`` are computed once
    and stored at ``teacher_logits`` (a .safetensors path; reused when the same teacher, ids and k made it, see
    :func:`distill.teacher_logits.cached_teacher_topk`), and training reads them instead of running the teacher.

    ``teacher`` may be None for plain cross-entropy training (``kl_weight`` 0, no hidden-state loss).

    ``evaluate(student)`` returns a validation perplexity, or {evaluation set: perplexity} (the first is the
    history's ``val_perplexity``, all are in ``val_perplexities``), called every ``config.eval_every`` steps and
    at the end. With ``checkpoint_dir``, training state is saved every ``config.checkpoint_every`` steps and,
    with ``resume``, a rerun continues from the latest checkpoint exactly.
    Raises DistillError when the loss becomes NaN or infinite (the last good checkpoint is kept).
    """
    world, _ = _distributed()
    device = next(student.parameters()).device
    keep_freed_memory()
    torch.manual_seed(config.seed)
    per_step = config.global_batch(world)
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
    loss_module = KnowledgeDistillationLoss(trained, None if stored is not None else teacher, config, hidden)
    if sharded:
        _shard(loss_module)
        for param in student.parameters():  # the copy holds them now; freed until the gather at the end
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    try:
        with _attention([trained, teacher], attention), \
                _low_precision_linears(teacher if stored is None else None, torch.bfloat16 if config.bf16 else None), \
                _compiled_layers([trained, None if stored is not None else teacher], compiled):
            return _loop(loss_module, train_ids, config, evaluate, checkpoint_dir, resume, progress, sharded, stored)
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
    history: list[dict[str, Any]] = []
    step = tokens = 0
    resumed = 0
    if folder is not None and resume and (found := latest_checkpoint(folder)) is not None:
        state = load_checkpoint(found, loss_module, optimizers)
        step, tokens, history = state["step"], state["tokens"], state["history"]
        resumed = step
        log.info("resuming distillation from %s (step %d of %d)", found, step, total)

    module: nn.Module = loss_module
    if world > 1 and not sharded:
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    order = _Order(int(train_ids.shape[0]), config.seed)
    params = [p for optimizer in optimizers for g in optimizer.param_groups for p in g["params"]]
    started_tokens = tokens
    started = time.perf_counter()
    evaluating = 0.0  # seconds spent in validation, left out of throughput
    bar = tqdm(total=total, initial=step, desc="distill", unit="step", disable=not progress or rank != 0)
    while step < total:
        for group_optimizer in optimizers:
            for group in group_optimizer.param_groups:
                group["lr"] = config.lr_at(step, total)
        indices = order.take(step * per_step, per_step)
        mine = indices[rank * config.batch_size * config.grad_accum : (rank + 1) * config.batch_size * config.grad_accum]
        step_loss = 0.0
        for micro in range(config.grad_accum):
            rows = mine[micro * config.batch_size : (micro + 1) * config.batch_size]
            batch = train_ids[rows].to(device)
            topk = None if stored is None else tuple(t.to(device) for t in stored.batch(rows))
            # DDP and FSDP reduce gradients only on the last micro-batch of a step.
            accumulate = world > 1 and micro < config.grad_accum - 1
            if sharded:
                module.set_requires_gradient_sync(not accumulate)
            with module.no_sync() if accumulate and not sharded else contextlib.nullcontext():
                with _autocast(config.bf16, device):
                    loss = (module(batch) if topk is None else module(batch, topk)) / config.grad_accum
                loss.backward()
            step_loss += float(loss.detach())
        if world > 1:
            reduced = torch.tensor([step_loss], device=device)
            dist.all_reduce(reduced)
            step_loss = float(reduced) / world
        if not math.isfinite(step_loss):
            last = latest_checkpoint(folder) if folder else None
            raise DistillError(
                f"the distillation loss became {step_loss} at step {step}; "
                + (f"the last good checkpoint is {last}; " if last else "")
                + "lower the learning rate (--distill-lr) or check the data"
            )
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        for group_optimizer in optimizers:
            group_optimizer.step()
            group_optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += per_step * seq_len
        record: dict[str, Any] = {
            "step": step, "tokens": tokens, "loss": step_loss, "lr": config.lr_at(step - 1, total),
            "seconds": time.perf_counter() - started - evaluating,  # training time of this process so far
        }
        if evaluate is not None and _due(step, total, config.eval_every):
            eval_started = time.perf_counter()
            measured = _evaluate(evaluate, trained, loss_module if sharded else None)
            record["val_perplexity"] = next(iter(measured.values()))
            if len(measured) > 1:
                record["val_perplexities"] = measured
            evaluating += time.perf_counter() - eval_started
        history.append(record)
        elapsed = time.perf_counter() - started - evaluating
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{(tokens - started_tokens) / max(elapsed, 1e-9):,.0f}")
        bar.update(1)
        if folder is not None and _due(step, total, config.checkpoint_every):
            save_checkpoint(folder, step, loss_module, optimizers,
                            {"tokens": tokens, "history": history, "config": config.to_dict()},
                            keep=config.keep_checkpoints)
            if world > 1:
                dist.barrier()
    bar.close()
    trained.eval()
    seconds = time.perf_counter() - started - evaluating
    return DistillResult(
        steps=step,
        tokens=tokens,
        seconds=seconds,
        tokens_per_second=(tokens - started_tokens) / seconds if seconds > 0 else 0.0,
        final_loss=history[-1]["loss"] if history else float("nan"),
        history=tuple(history),
        resumed_from_step=resumed,
        parallel=("fsdp" if sharded else "ddp") if world > 1 else "none",
        processes=world,
    )

