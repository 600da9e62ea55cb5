"""What the export needs to know of a decoder family, read from the family's data and the live model.

A registered teacher family (:mod:`compress.pruning.families`) names, in ``export_roles``, which of its layer
tensors plays which part of a pre-norm decoder block (fused tensors split by their layout's segments, Phi-3's
``qkv_proj`` and ``gate_up_proj``); the rest is read off the loaded model: the attention's scaling (Gemma3's
``query_pre_attn_scalar``), the sliding window of each layer, the RoPE tables of each layer type (Gemma3's local
and global bases), the MLP's activation, the embedding multiplier (Gemma's sqrt(hidden)), soft-capping. So one
export (:class:`compress.deploy.export.StaticLM`) serves Llama, Mistral, Qwen2/3, Gemma3, Phi-3 and a user's
family registered with roles, without a forward written per family.

:func:`check_exportable` answers from a config alone, before any stage runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import UnsupportedArchitectureError
from compress.pruning.families import FAMILIES, FamilySpec, head_dim_of

REQUIRED_ROLES = ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm")
OPTIONAL_ROLES = ("q_norm", "k_norm", "attn_out_norm", "mlp_out_norm")
TRANSFORMS = ("rotate", "smooth", "embed-rows")  # compress.deploy.outliers' rewrites, in the order they apply


def export_family(config: Any) -> FamilySpec:
    """The registered family whose export roles fit ``config`` (a config class derived from a family's, like the
    MobileLLM-like student's ``LlamaConfig``, counts as that family); raises UnsupportedArchitectureError naming
    what is missing."""
    types = [getattr(cls, "model_type", None) for cls in type(config).__mro__]
    types.insert(0, getattr(config, "model_type", None))
    for model_type in types:
        for spec in FAMILIES.values():
            if model_type in spec.model_types:
                if not spec.causal_lm or not spec.export_roles:
                    raise UnsupportedArchitectureError(
                        f"{config.model_type!r} ({spec.name}) has no export path: the export writes causal decoders "
                        "whose family names its export_roles (compress.pruning.families.FamilySpec)")
                missing = [r for r in REQUIRED_ROLES if r not in spec.export_roles]
                if missing:
                    raise UnsupportedArchitectureError(
                        f"family {spec.name!r} does not name the export roles {', '.join(missing)}")
                return spec
    exportable = sorted(t for s in FAMILIES.values() if s.export_roles for t in s.model_types)
    raise UnsupportedArchitectureError(
        f"export supports the model types {', '.join(exportable)}, not {getattr(config, 'model_type', None)!r}; "
        "register a compress.pruning.families.FamilySpec with export_roles for it")


def check_exportable(config: Any, transforms: tuple[str, ...] = ()) -> list[str]:
    """Raise UnsupportedArchitectureError if a model of ``config`` cannot be exported; returns the ``transforms``
    its family does not allow (they are skipped, see :func:`allowed_transforms`)."""
    spec = export_family(config)
    return [t for t in transforms if t not in allowed_transforms(spec)]


def allowed_transforms(spec: FamilySpec) -> tuple[str, ...]:
    """The outlier rewrites (TRANSFORMS) a family's blocks allow: every one, for every family registered so far
    (Gemma's norms on the sub-layers' outputs keep their weights as matrices after the rotation)."""
    del spec
    return TRANSFORMS


@dataclass
class BlockTensors:
    """One decoder layer's tensors by role (float32 copies) and the attention facts read off the layer."""

    linears: dict[str, nn.Linear]  # q k v o gate up down
    norms: dict[str, torch.Tensor | None]  # attn_norm mlp_norm q_norm k_norm attn_out_norm mlp_out_norm, offset applied
    scaling: float
    window: int | None  # keys a query sees (itself included), None: every earlier one
    rope_kind: str | None  # the layer type whose RoPE table the layer reads (Gemma3), None: the model's one table
    softcap: float | None
    activation: nn.Module


def _sizes(config: Any, spec: FamilySpec) -> dict[str, int]:
    heads = getattr(config, spec.heads_key)
    kv = getattr(config, spec.kv_heads_key, None) if spec.kv_heads_key else None
    head_dim = head_dim_of(config, spec)
    return {"Q": heads * head_dim, "K": (kv or heads) * head_dim, "M": getattr(config, spec.mlp_key),
            "H": getattr(config, spec.hidden_key)}


def _tensor(state: dict[str, torch.Tensor], spec: FamilySpec, role_name: str | None,
            sizes: dict[str, int]) -> torch.Tensor | None:
    """The tensor a role names ("name" or "name:segment"), None where the layer has none."""
    if role_name is None:
        return None
    name, _, segment = role_name.partition(":")
    tensor = state.get(name)
    if tensor is None or not segment:
        return tensor
    first = spec.layer_tensors[name.replace(".bias", ".weight")].split()[0].split("+")
    start = sum(sizes[t] for t in first[: int(segment)])
    return tensor[start: start + sizes[first[int(segment)]]]


def block_tensors(layer: nn.Module, spec: FamilySpec, config: Any) -> BlockTensors:
    """``layer``'s tensors by the roles of ``spec`` (see the module docstring)."""
    state = {k: v.detach().float() for k, v in layer.state_dict().items()}
    sizes = _sizes(config, spec)
    linears = {}
    for role in ("q", "k", "v", "o", "gate", "up", "down"):
        weight = _tensor(state, spec, spec.export_roles[role], sizes)
        bias = _tensor(state, spec, spec.export_roles[role].replace(".weight", ".bias"), sizes)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.weight = nn.Parameter(weight.clone())
        if bias is not None:
            linear.bias = nn.Parameter(bias.clone())
        linears[role] = linear
    norms = {}
    for role in ("attn_norm", "mlp_norm", *OPTIONAL_ROLES):
        weight = _tensor(state, spec, spec.export_roles.get(role), sizes)
        norms[role] = None if weight is None else weight + spec.norm_weight_offset
    attn = layer.self_attn
    window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
    # imported here: transformers at module level would cost every CLI start seconds
    from transformers.activations import ACT2FN

    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    return BlockTensors(
        linears=linears, norms=norms,
        scaling=float(getattr(attn, "scaling", head_dim_of(config, spec) ** -0.5)),
        window=int(window) if window else None,
        rope_kind=getattr(attn, "layer_type", None),
        softcap=getattr(config, "attn_logit_softcapping", None),
        activation=ACT2FN[act],
    )


def rope_tables(base: nn.Module, kinds: list[str | None], positions: int) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin) tables [positions, rotary_dim] of each RoPE kind the layers read (by layer type where the
    model's rotary embedding takes one, e.g. Gemma3's local and global bases)."""
    rotary = base.rotary_emb
    takes_kind = "layer_type" in inspect.signature(rotary.forward).parameters
    probe = torch.zeros(1, dtype=torch.float32)
    ids = torch.arange(positions)[None]
    tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
    for kind in dict.fromkeys(kinds):
        cos, sin = rotary(probe, ids, kind) if takes_kind and kind is not None else rotary(probe, ids)
        tables[kind if takes_kind else None] = (cos[0].float().clone(), sin[0].float().clone())
    return tables


def embedding_multiplier(base: nn.Module) -> float:
    """The factor the model's embedding lookup multiplies rows by (Gemma: sqrt(hidden)), 1 for most families."""
    scale = getattr(base.embed_tokens, "embed_scale", None)
    return 1.0 if scale is None else float(scale)
