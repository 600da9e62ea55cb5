"""Architecture specs: which tensors belong to which prunable axis, per model family, as data.

A family is described once, in ``FAMILIES``, by a table of *tensor layouts*: for every parameter of a
decoder layer (and of the model outside the layers) the axis each of its dimensions runs along.
Layout tokens:

- ``H``: hidden (embedding) channels, shared by the whole model;
- ``M``: MLP neurons of that layer;
- ``Q``: query heads of that layer (``head_dim`` elements each);
- ``K``: key/value heads (GQA groups) of that layer (``head_dim`` elements each);
- ``-``: a dimension no axis changes (vocabulary, ``head_dim`` of a q/k norm, ...);
- ``A+B``: a fused dimension, the concatenation of segments (Phi-3's ``qkv_proj`` is ``Q+K+K``).

``resolve(model)`` matches that table against a live model once and returns an :class:`ArchSpec`:
every state-dict tensor with its layout, the modules the importance probes attach to, and the sizes of
each axis. Pruning algorithms work on the resolved spec and never look at module names.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import UnsupportedArchitectureError

AXIS_TOKENS = ("H", "M", "Q", "K")


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
_LLAMA_BIASES = frozenset(k for k in _LLAMA_LAYER if k.endswith(".bias"))
_DECODER_MODEL = {"model.embed_tokens.weight": "- H", "model.norm.weight": "H", "lm_head.weight": "- H"}

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


@dataclass(frozen=True)
class Segment:
    """A run of one tensor dimension: ``count`` axis indices of ``unit`` elements each (axis None: fixed)."""

    axis: str | None
    count: int
    unit: int = 1


@dataclass(frozen=True)
class TensorLayout:
    """One state-dict tensor: per dimension, the segments it is made of; ``layer`` is its layer index."""

    name: str
    dims: tuple[tuple[Segment, ...], ...]
    layer: int | None


@dataclass(frozen=True)
class ArchSpec:
    """A model family's prunable axes, resolved against one model. No modules inside: paths only."""

    family: str
    num_layers: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    tensors: tuple[TensorLayout, ...]
    layer_paths: tuple[str, ...]
    attention_output_paths: tuple[str, ...]
    mlp_output_paths: tuple[str, ...]
    hidden_norm_paths: tuple[str, ...]
    tied_embeddings: bool
    causal_lm: bool = True

    @property
    def family_spec(self) -> FamilySpec:
        return FAMILIES[self.family]

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    def count_params(self, hidden: int, mlp: int, kv_heads: int, heads_per_group: int, layers: int) -> int:
        """Parameters of a homogeneous shape, counting tied tensors once."""
        sizes = {"hidden": hidden, "mlp": mlp, "heads": kv_heads * heads_per_group, "kv": kv_heads}
        total = 0
        for tensor in self.tensors:
            if tensor.layer is not None and tensor.layer >= layers:
                continue  # layers are homogeneous: which ones are dropped does not change the count
            numel = 1
            for dim in tensor.dims:
                numel *= sum(
                    (sizes[seg.axis.split(".")[0]] if seg.axis else seg.count) * seg.unit for seg in dim
                )
            total += numel
        return total

    @property
    def params(self) -> int:
        return self.count_params(self.hidden, self.mlp, self.kv_heads, self.group_size, self.num_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _axis_name(token: str, layer: int | None) -> str | None:
    if token == "-":
        return None
    if token == "H":
        return "hidden"
    prefix = {"M": "mlp", "Q": "heads", "K": "kv"}[token]
    return f"{prefix}.{layer}"


def _parse_layout(
    name: str, layout: str, shape: torch.Size, layer: int | None, head_dim: int, sizes: dict[str, int]
) -> TensorLayout:
    dims_text = layout.split()
    if len(dims_text) != len(shape):
        raise UnsupportedArchitectureError(
            f"tensor {name} has shape {tuple(shape)} but the registry describes it as '{layout}'; "
            "the model's family differs from the registered one: register a FamilySpec for it"
        )
    dims = []
    for text, length in zip(dims_text, shape, strict=True):
        segments = []
        for token in text.split("+"):
            if token == "-":
                if "+" in text:
                    raise UnsupportedArchitectureError(f"layout '{layout}' of {name}: '-' cannot be fused")
                segments.append(Segment(None, int(length), 1))
                continue
            unit = head_dim if token in ("Q", "K") else 1
            segments.append(Segment(_axis_name(token, layer), sizes[token], unit))
        expected = sum(s.count * s.unit for s in segments)
        if expected != length:
            raise UnsupportedArchitectureError(
                f"tensor {name} has a dimension of {length} where the registry's layout '{layout}' "
                f"implies {expected}; register a FamilySpec that matches this model"
            )
        dims.append(tuple(segments))
    return TensorLayout(name=name, dims=tuple(dims), layer=layer)


def family_of(config: Any) -> FamilySpec:
    """The registered family whose model types include ``config.model_type``."""
    model_type = getattr(config, "model_type", None)
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    known = sorted(t for s in FAMILIES.values() for t in s.model_types)
    raise UnsupportedArchitectureError(
        f"model_type '{model_type}' is not in the architecture registry (known: {', '.join(known)}); "
        "register a compress.archspec.FamilySpec describing its tensors"
    )


def head_dim_of(config: Any, family: FamilySpec) -> int:
    """The per-head width a config implies (explicit ``head_dim`` or hidden / heads)."""
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    return getattr(config, family.hidden_key) // getattr(config, family.heads_key)


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as error:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no module '{path}' that the registry expects; "
            "the model differs from its registered family: register a FamilySpec that matches it"
        ) from error


def resolve(model: nn.Module) -> ArchSpec:
    """Match the model against its family's table once. Raises UnsupportedArchitectureError on any mismatch."""
    config = model.config
    family = family_of(config)
    hidden = getattr(config, family.hidden_key)
    mlp = getattr(config, family.mlp_key)
    heads = getattr(config, family.heads_key)
    kv_heads = getattr(config, family.kv_heads_key) if family.kv_heads_key else heads
    kv_heads = kv_heads or heads
    num_layers = getattr(config, family.layers_key)
    head_dim = head_dim_of(config, family)
    sizes = {"H": hidden, "M": mlp, "Q": heads, "K": kv_heads}

    layer_re = re.compile(rf"^{re.escape(family.layers_path)}\.(\d+)\.(.+)$")
    state = model.state_dict(keep_vars=True)
    seen: dict[int, str] = {}
    tensors: list[TensorLayout] = []
    found_layer_keys: dict[int, set[str]] = {}
    for name, tensor in state.items():
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            continue  # a tied tensor (lm_head ↔ embeddings) is described once
        seen[tensor.data_ptr()] = name
        match = layer_re.match(name)
        if match:
            layer, rest = int(match.group(1)), match.group(2)
            layout = family.layer_tensors.get(rest)
            found_layer_keys.setdefault(layer, set()).add(rest)
        else:
            layer, rest = None, name
            layout = family.model_tensors.get(name)
        if layout is None:
            raise UnsupportedArchitectureError(
                f"tensor '{name}' of {type(model).__name__} is not described by the '{family.name}' "
                "family spec; add it to the FamilySpec's layer_tensors or model_tensors"
            )
        tensors.append(_parse_layout(name, layout, tensor.shape, layer, head_dim, sizes))

    required = set(family.layer_tensors) - family.optional_tensors
    for layer in range(num_layers):
        missing = required - found_layer_keys.get(layer, set())
        if missing:
            raise UnsupportedArchitectureError(
                f"layer {layer} of {type(model).__name__} lacks {sorted(missing)} that the "
                f"'{family.name}' family spec expects; register a FamilySpec that matches this model"
            )

    layer_paths = tuple(f"{family.layers_path}.{i}" for i in range(num_layers))
    for path in layer_paths:
        _module(model, path)
    attention = tuple(f"{p}.{family.attention_output}" for p in layer_paths)
    mlp_out = tuple(f"{p}.{family.mlp_output}" for p in layer_paths)
    norms = tuple(f"{p}.{n}" for p in layer_paths for n in family.hidden_norms) + family.model_hidden_norms
    for path in attention + mlp_out + norms:
        _module(model, path)

    tied = bool(getattr(config, "tie_word_embeddings", False)) and not any(
        t.name == "lm_head.weight" for t in tensors
    )
    return ArchSpec(
        family=family.name,
        num_layers=num_layers,
        hidden=hidden,
        mlp=mlp,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        tensors=tuple(tensors),
        layer_paths=layer_paths,
        attention_output_paths=attention,
        mlp_output_paths=mlp_out,
        hidden_norm_paths=norms,
        tied_embeddings=tied,
        causal_lm=family.causal_lm,
    )


@dataclass(frozen=True)
class Shape:
    """A homogeneous model shape: the numbers a planner chooses."""

    hidden: int
    mlp: int
    kv_heads: int
    heads_per_group: int
    layers: int

    @property
    def heads(self) -> int:
        return self.kv_heads * self.heads_per_group

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def teacher_shape(spec: ArchSpec) -> Shape:
    return Shape(spec.hidden, spec.mlp, spec.kv_heads, spec.group_size, spec.num_layers)


def config_for(config: Any, spec: ArchSpec, shape: Shape, kept_layers: list[int] | None = None,
               validate: bool = True) -> Any:
    """The teacher's config changed to ``shape``, validated by the family's own config class.

    Raises ValueError when the family's config rejects the shape or would change ``head_dim``. With
    ``validate=False`` the family's own checks are skipped (the fields are assigned to a copy): for an
    intermediate model that is never saved, e.g. a teacher pruned to a Mu-like student's widths, whose
    attention width need not equal its hidden size.
    """
    family = spec.family_spec
    values = config.to_dict()
    values[family.hidden_key] = shape.hidden
    values[family.mlp_key] = shape.mlp
    values[family.heads_key] = shape.heads
    if family.kv_heads_key:
        values[family.kv_heads_key] = shape.kv_heads
    values[family.layers_key] = shape.layers
    if kept_layers is None:
        kept_layers = list(range(shape.layers))
    for key in family.per_layer_keys:
        if isinstance(values.get(key), list) and len(values[key]) == spec.num_layers:
            values[key] = [values[key][i] for i in kept_layers]
    if "head_dim" in values and values["head_dim"]:
        values["head_dim"] = spec.head_dim
    values.pop("quantization_config", None)
    if validate:
        new = type(config).from_dict(values)
    else:
        new = copy.deepcopy(config)
        for key, value in values.items():
            if getattr(new, key, None) != value:
                setattr(new, key, value)
    if head_dim_of(new, family) != spec.head_dim:
        raise ValueError(
            f"head_dim would become {head_dim_of(new, family)} instead of {spec.head_dim} "
            f"(hidden {shape.hidden} / heads {shape.heads})"
        )
    return new


def is_valid_shape(config: Any, spec: ArchSpec, shape: Shape) -> str | None:
    """None if the family accepts the shape, else the reason it does not."""
    try:
        config_for(config, spec, shape)
    except (ValueError, TypeError) as error:
        return str(error).strip().splitlines()[-1]
    except Exception as error:  # huggingface_hub's strict validation errors
        return str(error).strip().splitlines()[-1]
    return None


__all__ = [
    "FAMILIES",
    "ArchSpec",
    "FamilySpec",
    "Segment",
    "Shape",
    "TensorLayout",
    "config_for",
    "family_of",
    "head_dim_of",
    "is_valid_shape",
    "register",
    "resolve",
    "teacher_shape",
]
