"""Weight surgery: apply a PruningPlan to a teacher and produce a normal Hugging Face model of the same class."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from compress.io import atomic_dir
from compress.pruning.archspec import ArchSpec, Shape, config_for
from compress.pruning.planner import PruningPlan

log = logging.getLogger(__name__)


def _dim_index(segments: tuple, kept: dict[str, list[int]]) -> torch.Tensor:
    """Element indices to keep along one tensor dimension made of ``segments``."""
    parts, offset = [], 0
    for seg in segments:
        if seg.axis is None or seg.axis not in kept:  # an axis the plan does not prune (e.g. a whole vocabulary)
            parts.append(torch.arange(offset, offset + seg.count))
        else:
            units = torch.tensor(kept[seg.axis], dtype=torch.long)
            parts.append((offset + units[:, None] * seg.unit + torch.arange(seg.unit)[None, :]).reshape(-1))
        offset += seg.count * seg.unit
    return torch.cat(parts)


def pruned_state_dict(model: nn.Module, spec: ArchSpec, shape: Shape, kept: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The teacher's state dict sliced to the kept indices, with layers renumbered. Tied tensors stay one tensor."""
    state = model.state_dict()
    layout = {t.name: t for t in spec.tensors}
    renumber = {old: new for new, old in enumerate(kept["layers"])}
    prefix = spec.family_spec.layers_path + "."
    by_source: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        source = layout.get(name)
        if source is None:  # a tied alias of a described tensor (lm_head.weight -> embeddings)
            source = next(t for t in spec.tensors if state[t.name].data_ptr() == tensor.data_ptr())
        if source.layer is not None and source.layer not in renumber:
            continue
        key = id(source)
        if key not in by_source:
            sliced = state[source.name]
            for dim, segments in enumerate(source.dims):
                index = _dim_index(segments, kept)
                if index.numel() != sliced.shape[dim] or not torch.equal(index, torch.arange(sliced.shape[dim])):
                    sliced = sliced.index_select(dim, index)
            by_source[key] = sliced.clone() if sliced.data_ptr() == state[source.name].data_ptr() else sliced
        new_name = name
        if source.layer is not None:
            rest = name[len(prefix) :].split(".", 1)[1]
            new_name = f"{prefix}{renumber[source.layer]}.{rest}"
        out[new_name] = by_source[key]
    _compensate_embedding_scale(out, spec, shape)
    return out


def _compensate_embedding_scale(state: dict[str, torch.Tensor], spec: ArchSpec, shape: Shape) -> None:
    """Gemma multiplies embeddings by sqrt(hidden_size), which a smaller hidden size changes. Scaling every
    residual-output norm by the same factor scales the whole residual stream uniformly, which the
    pre-norms and the final norm cancel: the pruned model computes what the sliced teacher computes."""
    family = spec.family_spec
    if not family.embed_scale_follows_hidden or shape.hidden == spec.hidden:
        return
    factor = (shape.hidden / spec.hidden) ** 0.5
    offset = family.norm_weight_offset
    suffixes = tuple(f".{norm}.weight" for norm in family.residual_output_norms)
    for name, tensor in state.items():
        if name.endswith(suffixes):
            state[name] = (tensor + offset) * factor - offset


def apply_plan(model: nn.Module, spec: ArchSpec, plan: PruningPlan) -> nn.Module:
    """A new model of the teacher's class with the plan applied (a MobileLLM-like block-shared model when the
    plan repeats layers); the teacher is left untouched."""
    student = prune(model, spec, plan.shape, plan.kept)
    if plan.repeats > 1:
        from compress.models.mobilellm import share_blocks

        student = share_blocks(student, plan.repeats)
    return student


def prune(model: nn.Module, spec: ArchSpec, shape: Shape, kept: dict[str, list[int]], validate: bool = True) -> nn.Module:
    """A new model of the teacher's class of ``shape``, keeping the units ``kept`` lists per axis (``validate``:
    see :func:`compress.pruning.archspec.config_for`)."""
    kept_vocab = kept.get("vocab") if shape.vocab is not None else None
    config = config_for(model.config, spec, shape, kept["layers"], validate=validate, kept_vocab=kept_vocab)
    state = pruned_state_dict(model, spec, shape, kept)
    with init_empty_weights(include_buffers=False):  # no random init: every weight comes from the teacher
        student = type(model)(config)
    student.load_state_dict(state, strict=True, assign=True)
    if kept_vocab is not None and getattr(model, "generation_config", None) is not None:
        from compress.pruning.vocab import TOKEN_ID_KEYS, remapped_token_ids

        student.generation_config = copy.deepcopy(model.generation_config)
        values = {key: getattr(student.generation_config, key, None) for key in TOKEN_ID_KEYS}
        for key, value in remapped_token_ids(values, kept_vocab).items():
            setattr(student.generation_config, key, value)
    if spec.tied_embeddings:
        student.tie_weights()
    student.eval()
    return student


def save_checkpoint(model: nn.Module, tokenizer: Any, path: str | Path) -> Path:
    """``save_pretrained`` (safetensors) plus the tokenizer, written atomically."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)
