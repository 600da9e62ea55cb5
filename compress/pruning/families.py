"""The registry of teacher families, as data: for each family (Llama, Mistral, Qwen2/3, Gemma3, Phi-3, BERT)
the axis each dimension of each of its tensors runs along, and the config keys of its sizes.

Layout tokens:

- ``H``: hidden (embedding) channels, shared by the whole model;
- ``M``: MLP neurons of that layer;
- ``Q``: query heads of that layer (``head_dim`` elements each);
- ``K``: key/value heads (GQA groups) of that layer (``head_dim`` elements each);
- ``V``: vocabulary entries (the rows of the embedding and the output head; see :mod:`compress.pruning.vocab`);
- ``-``: a dimension no axis changes (``head_dim`` of a q/k norm, BERT's vocabulary, ...);
- ``A+B``: a fused dimension, the concatenation of segments (Phi-3's ``qkv_proj`` is ``Q+K+K``).

:func:`compress.pruning.archspec.resolve` matches a family's table against a live model. A user's own family
is one :func:`register` call with a :class:`FamilySpec`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from compress.errors import UnsupportedArchitectureError

AXIS_TOKENS = ("H", "M", "Q", "K", "V")


@dataclass(frozen=True)
class FamilySpec:
    """How one model family lays out its prunable axes. Pure data; see the module docstring."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str
    layer_tensors: Mapping[str, str]
    model_tensors: Mapping[str, str]
    attention_output: str  # module whose *input* holds every head's output (Minitron's head probe)
    mlp_output: str  # module whose *input* holds every MLP neuron's activation
    hidden_norms: tuple[str, ...]  # norm modules in a layer whose outputs score hidden channels
    model_hidden_norms: tuple[str, ...] = ()  # norm modules outside the layers (e.g. BERT's embedding norm)
    optional_tensors: frozenset[str] = frozenset()  # biases and the like that a variant may lack
    hidden_key: str = "hidden_size"
    mlp_key: str = "intermediate_size"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"
    layers_key: str = "num_hidden_layers"
    per_layer_keys: tuple[str, ...] = ()  # config lists with one entry per layer (Gemma3's layer_types)
    causal_lm: bool = True
    # Gemma scales embeddings by sqrt(hidden_size) and adds each sub-layer's output through a norm of
    # the form (1 + w). When the hidden size shrinks, those norms are rescaled so that the residual
    # stream keeps the same relative scale (see surgery.apply_plan_).
    embed_scale_follows_hidden: bool = False
    residual_output_norms: tuple[str, ...] = ()
    norm_weight_offset: float = 0.0
    # Which layer tensor plays which part of a pre-norm decoder block, for export (compress.deploy.decoder):
    # roles q k v o gate up down (weights; a ".bias" next to one is its bias), attn_norm and mlp_norm (the
    # norms before attention and MLP), optional q_norm, k_norm, attn_out_norm and mlp_out_norm (norms of the
    # sub-layers' outputs before the residual add, Gemma's sandwich). "name:i" is segment i of a fused tensor's
    # first dimension (its layout's "A+B"). Empty: the family has no export path.
    export_roles: Mapping[str, str] = field(default_factory=dict)


_LLAMA_LAYER = {
    "self_attn.q_proj.weight": "Q H",
    "self_attn.q_proj.bias": "Q",
    "self_attn.k_proj.weight": "K H",
    "self_attn.k_proj.bias": "K",
    "self_attn.v_proj.weight": "K H",
    "self_attn.v_proj.bias": "K",
    "self_attn.o_proj.weight": "H Q",
    "self_attn.o_proj.bias": "H",
    "mlp.gate_proj.weight": "M H",
    "mlp.gate_proj.bias": "M",
    "mlp.up_proj.weight": "M H",
    "mlp.up_proj.bias": "M",
    "mlp.down_proj.weight": "H M",
    "mlp.down_proj.bias": "H",
    "input_layernorm.weight": "H",
    "post_attention_layernorm.weight": "H",
}
_LLAMA_ROLES = {
    "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight", "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
}
_LLAMA_BIASES = frozenset(k for k in _LLAMA_LAYER if k.endswith(".bias"))
_DECODER_MODEL = {"model.embed_tokens.weight": "V H", "model.norm.weight": "H", "lm_head.weight": "V H"}

FAMILIES: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add a family to the registry (also usable by users for their own families)."""
    FAMILIES[spec.name] = spec
    return spec


register(
    FamilySpec(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        layers_path="model.layers",
        layer_tensors={
            **_LLAMA_LAYER,
            # Qwen3 normalizes q and k per head; those weights are head_dim long and never shrink.
            "self_attn.q_norm.weight": "-",
            "self_attn.k_norm.weight": "-",
        },
        model_tensors=_DECODER_MODEL,
        attention_output="self_attn.o_proj",
        mlp_output="mlp.down_proj",
        hidden_norms=("input_layernorm", "post_attention_layernorm"),
        optional_tensors=_LLAMA_BIASES | {"self_attn.q_norm.weight", "self_attn.k_norm.weight"},
        per_layer_keys=("layer_types",),
        export_roles=_LLAMA_ROLES,
    )
)

register(
    FamilySpec(
        name="gemma3",
        model_types=("gemma3_text",),
        layers_path="model.layers",
        layer_tensors={
            **_LLAMA_LAYER,
            "self_attn.q_norm.weight": "-",
            "self_attn.k_norm.weight": "-",
            "pre_feedforward_layernorm.weight": "H",
            "post_feedforward_layernorm.weight": "H",
        },
        model_tensors=_DECODER_MODEL,
        attention_output="self_attn.o_proj",
        mlp_output="mlp.down_proj",
        hidden_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        optional_tensors=_LLAMA_BIASES,
        per_layer_keys=("layer_types",),
        embed_scale_follows_hidden=True,
        residual_output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        norm_weight_offset=1.0,
        export_roles={**_LLAMA_ROLES, "mlp_norm": "pre_feedforward_layernorm.weight",
                      "attn_out_norm": "post_attention_layernorm.weight",
                      "mlp_out_norm": "post_feedforward_layernorm.weight"},
    )
)

register(
    FamilySpec(
        name="phi3",
        model_types=("phi3",),
        layers_path="model.layers",
        layer_tensors={
            "self_attn.qkv_proj.weight": "Q+K+K H",
            "self_attn.o_proj.weight": "H Q",
            "mlp.gate_up_proj.weight": "M+M H",
            "mlp.down_proj.weight": "H M",
            "input_layernorm.weight": "H",
            "post_attention_layernorm.weight": "H",
        },
        model_tensors=_DECODER_MODEL,
        attention_output="self_attn.o_proj",
        mlp_output="mlp.down_proj",
        hidden_norms=("input_layernorm", "post_attention_layernorm"),
        export_roles={**_LLAMA_ROLES, "q": "self_attn.qkv_proj.weight:0", "k": "self_attn.qkv_proj.weight:1",
                      "v": "self_attn.qkv_proj.weight:2", "gate": "mlp.gate_up_proj.weight:0",
                      "up": "mlp.gate_up_proj.weight:1"},
    )
)

_BERT_LAYER = {
    "attention.self.query.weight": "Q H",
    "attention.self.query.bias": "Q",
    "attention.self.key.weight": "K H",
    "attention.self.key.bias": "K",
    "attention.self.value.weight": "K H",
    "attention.self.value.bias": "K",
    "attention.output.dense.weight": "H Q",
    "attention.output.dense.bias": "H",
    "attention.output.LayerNorm.weight": "H",
    "attention.output.LayerNorm.bias": "H",
    "intermediate.dense.weight": "M H",
    "intermediate.dense.bias": "M",
    "output.dense.weight": "H M",
    "output.dense.bias": "H",
    "output.LayerNorm.weight": "H",
    "output.LayerNorm.bias": "H",
}
register(
    FamilySpec(
        name="bert",
        model_types=("bert",),
        layers_path="encoder.layer",
        layer_tensors=_BERT_LAYER,
        model_tensors={
            "embeddings.word_embeddings.weight": "- H",
            "embeddings.position_embeddings.weight": "- H",
            "embeddings.token_type_embeddings.weight": "- H",
            "embeddings.LayerNorm.weight": "H",
            "embeddings.LayerNorm.bias": "H",
            "pooler.dense.weight": "H H",
            "pooler.dense.bias": "H",
        },
        attention_output="attention.output.dense",
        mlp_output="output.dense",
        hidden_norms=("attention.output.LayerNorm", "output.LayerNorm"),
        model_hidden_norms=("embeddings.LayerNorm",),
        optional_tensors=frozenset({"pooler.dense.weight", "pooler.dense.bias"}),
        kv_heads_key=None,
        causal_lm=False,
    )
)


def family_of(config: Any) -> FamilySpec:
    """The registered family whose model types include ``config.model_type``."""
    model_type = getattr(config, "model_type", None)
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    known = sorted(t for s in FAMILIES.values() for t in s.model_types)
    raise UnsupportedArchitectureError(
        f"model_type '{model_type}' is not in the architecture registry (known: {', '.join(known)}); "
        "register a compress.pruning.families.FamilySpec (compress.register) describing its tensors"
    )


def head_dim_of(config: Any, family: FamilySpec) -> int:
    """The per-head width a config implies (explicit ``head_dim`` or hidden / heads)."""
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    return getattr(config, family.hidden_key) // getattr(config, family.heads_key)
