"""Architecture specs: a teacher family's table of tensor layouts (:mod:`compress.pruning.families`) matched
against a live model.

``resolve(model)`` matches the table once and returns an :class:`ArchSpec`: every state-dict tensor with its
layout, the modules the importance probes attach to, and the sizes of each axis. Pruning algorithms work on the
resolved spec and never look at module names. :class:`Shape` is a student's size along every axis.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import UnsupportedArchitectureError
from compress.pruning.families import FAMILIES, FamilySpec, family_of, head_dim_of


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
    vocab: int = 0  # rows of the embedding (the ``vocab`` axis)

    @property
    def family_spec(self) -> FamilySpec:
        return FAMILIES[self.family]

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    def count_params(self, hidden: int, mlp: int, kv_heads: int, heads_per_group: int, layers: int,
                     vocab: int | None = None) -> int:
        """Parameters of a homogeneous shape, counting tied tensors once (``vocab`` None: the whole vocabulary)."""
        sizes = {"hidden": hidden, "mlp": mlp, "heads": kv_heads * heads_per_group, "kv": kv_heads,
                 "vocab": self.vocab if vocab is None else vocab}
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

    def embedding_share(self) -> float:
        """The share of the parameters outside the blocks: the embedding, an untied head and the final norm."""
        return self.count_params(self.hidden, self.mlp, self.kv_heads, self.group_size, 0) / self.params

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _axis_name(token: str, layer: int | None) -> str | None:
    if token == "-":
        return None
    if token == "H":
        return "hidden"
    if token == "V":
        return "vocab"
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
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    sizes = {"H": hidden, "M": mlp, "Q": heads, "K": kv_heads, "V": vocab}

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
        vocab=vocab,
    )


@dataclass(frozen=True)
class Shape:
    """A homogeneous model shape: the numbers a planner chooses."""

    hidden: int
    mlp: int
    kv_heads: int
    heads_per_group: int
    layers: int
    vocab: int | None = None  # vocabulary entries kept (None: the teacher's whole vocabulary)

    @property
    def heads(self) -> int:
        return self.kv_heads * self.heads_per_group

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def teacher_shape(spec: ArchSpec) -> Shape:
    return Shape(spec.hidden, spec.mlp, spec.kv_heads, spec.group_size, spec.num_layers)


def config_for(config: Any, spec: ArchSpec, shape: Shape, kept_layers: list[int] | None = None,
               validate: bool = True, kept_vocab: list[int] | None = None) -> Any:
    """The teacher's config changed to ``shape``, validated by the family's own config class.

    A trimmed vocabulary (``shape.vocab``) renumbers the token ids the config names to the ``kept_vocab`` order.

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
    if shape.vocab is not None:
        from compress.pruning.vocab import remapped_token_ids

        values["vocab_size"] = shape.vocab
        if kept_vocab is not None:
            values.update(remapped_token_ids(values, kept_vocab))
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

