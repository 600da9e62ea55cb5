"""A Mu-like student initialized from a decoder-only teacher instead of at random.

``mu_from_teacher(teacher, spec, scores, config, calibration_ids)`` prunes the teacher to the Mu config's
widths with the activation importance scores (:func:`compress.pruning.planner.select`: hidden channels, KV groups
and heads within them, MLP neurons, and the ``encoder_layers + decoder_layers`` most important layers),
then copies:

- the pruned, tied embedding into Mu's shared embedding (and so its head);
- the first ``encoder_layers`` kept blocks into the encoder's self-attention and MLP, the last
  ``decoder_layers`` into the decoder's self-attention and MLP (the layers nearest the output predict
  tokens); each decoder layer's cross-attention starts as a copy of its self-attention;
- each block's RMSNorm weights into the LayerNorm before the sub-layer, the final norm into the decoder's.

Mu normalizes each sub-layer's output too (dual LayerNorm), which the teacher does not. Those norms are
set so that they reproduce, channel by channel, the teacher's sub-layer outputs on ``calibration_ids``
(a least-squares fit of weight and bias per channel over every token but the first, whose massive
activation no normalized output can carry). Cross-attention output norms start like the self-attention's.

RoPE transfers only if the rotary bases agree: the config's ``rope_theta`` must equal the teacher's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.models.mu import MuConfig, MuForConditionalGeneration
from compress.pruning.archspec import ArchSpec, Shape
from compress.pruning.planner import select
from compress.pruning.surgery import prune
from importance import ImportanceScores


def mu_shape(config: MuConfig) -> Shape:
    """The teacher shape a Mu config's widths ask for (its layers counted once, encoder plus decoder)."""
    return Shape(hidden=config.hidden_size, mlp=config.intermediate_size, kv_heads=config.num_key_value_heads,
                 heads_per_group=config.num_attention_heads // config.num_key_value_heads,
                 layers=config.encoder_layers + config.decoder_layers)


def teacher_rope(teacher_config: Any) -> dict[str, Any]:
    """The teacher's RoPE settings (``rope_theta``, ``rope_type``), from either config layout transformers uses."""
    rope = dict(getattr(teacher_config, "rope_parameters", None) or getattr(teacher_config, "rope_scaling", None) or {})
    if "rope_theta" not in rope:
        rope["rope_theta"] = getattr(teacher_config, "rope_theta", 10000.0)
    return rope


def _check(spec: ArchSpec, teacher_config: Any, config: MuConfig) -> None:
    shape = mu_shape(config)
    head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // teacher_config.num_attention_heads
    problems = []
    if config.head_dim != head_dim:
        problems.append(f"head_dim {config.head_dim} != the teacher's {head_dim}")
    rope = teacher_rope(teacher_config)
    if rope.get("rope_type", "default") != "default":
        problems.append(f"the teacher's RoPE is {rope['rope_type']!r}; Mu's is the default (unscaled) one")
    elif abs(float(config.rope_theta) - float(rope["rope_theta"])) > 1e-6:
        problems.append(f"rope_theta {config.rope_theta} != the teacher's {rope['rope_theta']}")
    for name, want, have in (("hidden", shape.hidden, spec.hidden), ("mlp", shape.mlp, spec.mlp),
                             ("kv_heads", shape.kv_heads, spec.kv_heads),
                             ("heads per KV group", shape.heads_per_group, spec.group_size),
                             ("layers (encoder + decoder)", shape.layers, spec.num_layers)):
        if want > have:
            problems.append(f"{name} {want} > the teacher's {have}")
    if problems:
        raise ValueError("cannot initialize this Mu config from the teacher: " + "; ".join(problems)
                         + ". Size the Mu config within the teacher, or initialize it at random.")


def _output_stats(model: nn.Module, ids: torch.Tensor, batch_size: int) -> dict[str, list[torch.Tensor]]:
    """Every layer's attention and MLP outputs on ``ids`` (all tokens but the first of each sequence),
    flattened to [tokens, hidden]."""
    seen: dict[str, list[torch.Tensor]] = {"attn": [[] for _ in model.model.layers], "mlp": [[] for _ in model.model.layers]}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for kind, module in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, kind=kind, i=i: seen[kind][i].append(out[:, 1:].reshape(-1, out.shape[-1]).float())))
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                model(input_ids=ids[start : start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
    return {kind: [torch.cat(chunks) for chunks in per_layer] for kind, per_layer in seen.items()}


def _fit_post_norm(norm: nn.LayerNorm, target: torch.Tensor) -> None:
    """weight and bias (per channel) making ``norm(target)`` closest to ``target`` in least squares."""
    with torch.no_grad():
        centered = target - target.mean(-1, keepdim=True)
        normalized = centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + norm.eps)
        n_mean, t_mean = normalized.mean(0), target.mean(0)
        covariance = ((normalized - n_mean) * (target - t_mean)).mean(0)
        variance = (normalized - n_mean).pow(2).mean(0).clamp_min(1e-12)
        weight = covariance / variance
        norm.weight.copy_(weight)
        norm.bias.copy_(t_mean - weight * n_mean)


def _copy_attention(dst: nn.Module, src: nn.Module) -> None:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(dst, name).weight.data.copy_(getattr(src, name).weight.data)


def _copy_mlp(dst: nn.Module, src: nn.Module) -> None:
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(dst, name).weight.data.copy_(getattr(src, name).weight.data)


def _pre_norm(dst: nn.LayerNorm, weight: torch.Tensor) -> None:
    dst.weight.data.copy_(weight)
    dst.bias.data.zero_()


def mu_from_teacher(teacher: nn.Module, spec: ArchSpec, scores: ImportanceScores, config: MuConfig,
                    calibration_ids: torch.Tensor, batch_size: int = 4, blocks: bool = True) -> MuForConditionalGeneration:
    """A Mu-like model of ``config`` whose weights come from ``teacher`` (see the module docstring); with
    ``blocks=False`` only the pruned embedding (and head) and the final norm, the blocks left at random."""
    _check(spec, teacher.config, config)
    if config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"the Mu config's vocabulary ({config.vocab_size}) must be the teacher's "
                         f"({teacher.config.vocab_size}): they share the tokenizer")
    shape = mu_shape(config)
    # validate=False: Mu's attention width (heads x head_dim) need not equal its hidden size, which the
    # teacher family's config class would refuse; this pruned teacher only lends its weights and outputs.
    pruned = prune(teacher, spec, shape, select(spec, scores, shape), validate=False).float().eval()
    mu = MuForConditionalGeneration(config).float()
    base, layers = mu.model, pruned.model.layers
    if not blocks:
        with torch.no_grad():
            base.shared.weight.copy_(pruned.model.embed_tokens.weight)
            _pre_norm(base.decoder_norm, pruned.model.norm.weight)
        mu.tie_weights()
        return mu.eval()
    stats = _output_stats(pruned, calibration_ids, batch_size)
    with torch.no_grad():
        base.shared.weight.copy_(pruned.model.embed_tokens.weight)
        encoder, decoder = layers[: config.encoder_layers], layers[config.encoder_layers :]
        sources = [(dst, src, i) for i, (dst, src) in enumerate(zip(base.encoder_layers, encoder, strict=True))]
        sources += [(dst, src, config.encoder_layers + i) for i, (dst, src) in
                    enumerate(zip(base.decoder_layers, decoder, strict=True))]
        for dst, src, index in sources:
            _copy_attention(dst.self_attn, src.self_attn)
            _copy_mlp(dst.mlp, src.mlp)
            _pre_norm(dst.attn_pre_norm, src.input_layernorm.weight)
            _pre_norm(dst.mlp_pre_norm, src.post_attention_layernorm.weight)
            _fit_post_norm(dst.attn_post_norm, stats["attn"][index])
            _fit_post_norm(dst.mlp_post_norm, stats["mlp"][index])
            if hasattr(dst, "cross_attn"):
                _copy_attention(dst.cross_attn, src.self_attn)
                _pre_norm(dst.cross_pre_norm, src.input_layernorm.weight)
                dst.cross_post_norm.load_state_dict(dst.attn_post_norm.state_dict())
        # The encoder's states feed every decoder layer's cross-attention keys and values, which were the
        # decoder blocks' own (normalized) inputs in the teacher: their mean pre-norm weight.
        _pre_norm(base.encoder_norm, torch.stack([src.input_layernorm.weight for src in decoder]).mean(0))
        _pre_norm(base.decoder_norm, pruned.model.norm.weight)
    mu.tie_weights()
    return mu.eval()


__all__ = ["mu_from_teacher", "mu_shape", "teacher_rope"]
