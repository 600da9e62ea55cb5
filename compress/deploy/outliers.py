"""Float rewrites of a :class:`~compress.deploy.export.StaticLM` that leave its outputs unchanged but make its
activations easier to quantize.

- ``fold_norms``: RMSNorm weights move into the linear layers that read the norm's output, so every
  normalization inside the blocks becomes weightless (a rotation commutes with it only then).
- ``rotate``: the residual stream is multiplied by a random orthogonal matrix Q (QuaRot / SpinQuant
  style). Writers into the stream (embedding rows, ``o``, ``down``) are multiplied by Q on their output
  side, readers (``q k v gate up``) by Qᵀ on their input side. An outlier channel of the stream is spread
  over all channels, so per-tensor 8-bit scales fit ordinary tokens. With tied embeddings, E·Q serves
  both the lookup and the head, and one hidden × hidden matrix (Qᵀ·diag(final norm)·Q) before the head
  restores the final norm's weight: the embedding is still stored once. A norm on a sub-layer's output
  (Gemma's sandwich) reads ``o``/``down``'s rotated output; its weight cannot fold into a linear after it, so
  it becomes the same kind of matrix after the weightless norm (``attn_out_mix``, ``mlp_out_mix``).
- ``normalize_embedding``: each embedding row divided by its max |value|, the scales kept as a vector
  the lookup (and a tied head) multiplies back in: an int8 per-tensor table then fits rare tokens' rows
  and common ones alike, and the table is still stored once.
- ``smooth``: SmoothQuant's scale migration for the two inputs that no rotation reaches, the MLP's
  down-projection input silu(gate)·up (scaled through ``up``) and the attention output (scaled
  through ``v``, per key/value head): s_j = max|X_j|^α / max|W_j|^(1−α).
"""

from __future__ import annotations

import torch
from torch import nn

from compress.deploy.decoder import TRANSFORMS
from compress.deploy.export import StaticLM

__all__ = ["TRANSFORMS", "fold_norms", "normalize_embedding", "rotate", "smooth"]


@torch.no_grad()
def fold_norms(lm: StaticLM) -> StaticLM:
    """Fold every block's norm weights into the next linear layers (in place); returns ``lm``."""
    for block in lm.unique_blocks:
        for norm, readers in ((block.ln1, (block.q, block.k, block.v)), (block.ln2, (block.gate, block.up))):
            for linear in readers:
                linear.weight.mul_(norm[None, :])
            norm.fill_(1.0)
    return lm


def random_orthogonal(size: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


@torch.no_grad()
def rotate(lm: StaticLM, seed: int = 0) -> StaticLM:
    """Rotate the residual stream by a random orthogonal matrix (in place; folds norms first)."""
    fold_norms(lm)
    q = random_orthogonal(lm.embed.shape[1], seed)

    def right(w: torch.Tensor) -> None:  # readers: W ← W·Q
        w.copy_((w.double() @ q).float())

    def left(linear: nn.Linear) -> None:  # writers: W ← Qᵀ·W, b ← Qᵀ·b
        linear.weight.copy_((q.T @ linear.weight.double()).float())
        if linear.bias is not None:
            linear.bias.copy_((q.T @ linear.bias.double()).float())

    tied = lm.tied
    final = lm.norm.double()
    right(lm.embed)  # rows of E are written into the stream: E ← E·Q
    for block in lm.unique_blocks:
        for linear in (block.q, block.k, block.v, block.gate, block.up):
            right(linear.weight)
        left(block.o)
        left(block.down)
        for norm in ("attn_out_norm", "mlp_out_norm"):
            weight = getattr(block, norm)
            if weight is not None:  # RMSNorm(y·Q)·Qᵀ·diag(g)·Q = (RMSNorm(y)·g)·Q
                setattr(block, norm.replace("_norm", "_mix"), nn.Parameter((q.T @ torch.diag(weight.double()) @ q).float()))
                weight.fill_(1.0)
    if tied:
        mix = q.T @ torch.diag(final) @ q
        lm.head_mix = nn.Parameter(mix.float())
    else:
        lm.head.copy_((lm.head.double() * final[None, :] @ q).float())
    lm.norm.fill_(1.0)
    return lm


@torch.no_grad()
def normalize_embedding(lm: StaticLM) -> StaticLM:
    """Move each embedding row's scale into ``lm.embed_scale`` (in place); see the module docstring."""
    if lm.embed_scale is not None:
        return lm  # already normalized
    scale = lm.embed.abs().amax(1).clamp(min=1e-8)
    lm.embed.div_(scale[:, None])
    lm.embed_scale = nn.Parameter(scale)
    # A (vocab, 1) copy for the lookup: an Unsqueeze of a large constant would stay in the graph.
    lm.embed_scale_rows = nn.Parameter(scale[:, None].clone())
    return lm


@torch.no_grad()
def activation_maxima(lm: StaticLM, ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Per-channel max |x| of every block's ``o`` and ``down`` inputs over prefill runs on ``ids`` [n, L]."""
    maxima: dict[str, list[torch.Tensor]] = {"o": [], "down": []}
    hooks = []
    for block in lm.unique_blocks:
        for kind in ("o", "down"):
            slot = len(maxima[kind])
            maxima[kind].append(torch.zeros(getattr(block, kind).in_features))

            def hook(_module, args, kind=kind, slot=slot) -> None:  # noqa: ANN001
                x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
                maxima[kind][slot] = torch.maximum(maxima[kind][slot], x)

            hooks.append(getattr(block, kind).register_forward_pre_hook(hook))
    try:
        for row in ids:
            lm.prefill(row[None])
    finally:
        for h in hooks:
            h.remove()
    return maxima


@torch.no_grad()
def smooth(lm: StaticLM, ids: torch.Tensor, alpha: float = 0.5) -> StaticLM:
    """SmoothQuant for ``down`` (through ``up``) and ``o`` (through ``v``), calibrated on ``ids``; in place."""
    maxima = activation_maxima(lm, ids)
    for block, act_down, act_o in zip(lm.unique_blocks, maxima["down"], maxima["o"], strict=True):
        s = _scales(act_down, block.down.weight.abs().amax(0), alpha)
        block.up.weight.div_(s[:, None])
        if block.up.bias is not None:
            block.up.bias.div_(s)
        block.down.weight.mul_(s[None, :])

        groups, d = block.heads // block.kv_heads, block.head_dim
        act = act_o.view(block.kv_heads, groups, d).amax(1)
        weight = block.o.weight.abs().amax(0).view(block.kv_heads, groups, d).amax(1)
        s = _scales(act, weight, alpha)  # (kv_heads, head_dim)
        block.v.weight.div_(s.reshape(-1)[:, None])
        if block.v.bias is not None:
            block.v.bias.div_(s.reshape(-1))
        block.o.weight.mul_(s[:, None, :].expand(block.kv_heads, groups, d).reshape(1, -1))
    return lm


def _scales(act: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act.clamp(min=1e-5).pow(alpha) / weight.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)
