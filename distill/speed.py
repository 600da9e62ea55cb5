"""What makes a CPU distillation step fast, each a context manager around the loop: the attention kernel,
the frozen teacher's linears held in bf16, compiled decoder layers, autocast, and malloc that keeps freed memory
(measured in ``benchmarks/distill_overhead.py``)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


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
def attention_implementation(models: list[nn.Module | None], choice: str | None) -> Any:
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
def low_precision_linears(model: nn.Module | None, dtype: torch.dtype | None) -> Any:
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
def compiled_layers(models: list[nn.Module | None], enabled: bool) -> Any:
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


def autocast(bf16: bool, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX-512 BF16 or AMX, as oneDNN reports it).

    Without them bf16 autocast is emulated: on an AVX2-only EPYC the README's distillation ran at 6 tokens/s."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
