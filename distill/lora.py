"""LoRA: low-rank adapters on a model's linear layers, trained while the model stays frozen, then merged.

``add_lora_(model, LoraConfig(rank=8))`` wraps every ``nn.Linear`` of the model except its output head
(the head is often tied to the input embedding, and adapting it would untie the two) in a
:class:`LoraLinear`: ``y = W x + (alpha / rank) · B A x`` with ``B`` zero at the start, so the model's
outputs are unchanged until training moves ``B``. Every other parameter is frozen, so
:func:`distill.distill` trains the adapters only. ``merge_lora_(model)`` folds ``B A`` into ``W`` and puts
the plain linear layers back: the result is the original architecture, which saves, reloads and exports
as any checkpoint does. ``lora_state_dict`` / ``load_lora_`` keep the adapters alone (safetensors).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LoraConfig:
    """Which linear layers get adapters, and their rank and scale."""

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank, so changing the rank keeps its size
    dropout: float = 0.0
    # Names (the last part of a module's dotted name, e.g. "q_proj") of the linear layers to adapt;
    # empty: every linear layer but the output head.
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank {self.rank}: must be at least 1")
        if self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("LoRA alpha must be positive and dropout in [0, 1)")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["targets"] = list(self.targets)
        return values


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``scale · B A``."""

    def __init__(self, base: nn.Linear, config: LoraConfig) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(config.rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initializes its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scale * update

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight."""
        with torch.no_grad():
            self.base.weight += (self.scale * self.lora_B @ self.lora_A).to(self.base.weight.dtype)
        return self.base


def _targets(model: nn.Module, config: LoraConfig) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every linear layer to adapt; the output head is never one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear and child is not head and (not config.targets or name in config.targets)]


def add_lora_(model: nn.Module, config: LoraConfig) -> list[str]:
    """Adapters on ``model``'s linear layers (in place), everything else frozen; the adapted layers' names.

    Linear layers that share one weight (a MobileLLM-like model's repeated blocks) share one adapter, so the
    sharing survives training and merging."""
    targets = _targets(model, config)
    if not targets:
        wanted = ", ".join(config.targets) or "any nn.Linear"
        raise ValueError(f"LoRA: no linear layer of {type(model).__name__} matches {wanted}")
    model.requires_grad_(False)
    wrapped: dict[int, LoraLinear] = {}
    for parent, name, linear in targets:
        if id(linear.weight) not in wrapped:
            wrapped[id(linear.weight)] = LoraLinear(linear, config)
        setattr(parent, name, wrapped[id(linear.weight)])
    return sorted(name for name, m in model.named_modules() if isinstance(m, LoraLinear))


def merge_lora_(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore the plain linear layers (in place)."""
    merged: dict[int, nn.Linear] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                if id(child) not in merged:
                    merged[id(child)] = child.merged()
                setattr(parent, name, merged[id(child)])
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights, ``<layer>.lora_A`` / ``<layer>.lora_B``, each shared adapter once."""
    return {name: param.detach().contiguous() for name, param in model.named_parameters() if ".lora_" in name}


def load_lora_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapters saved by :func:`lora_state_dict` into a model already given them by :func:`add_lora_`."""
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise ValueError(f"LoRA: the model has no adapter for {', '.join(missing[:3])}; add_lora_ it with the same config")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


__all__ = ["LoraConfig", "LoraLinear", "add_lora_", "load_lora_", "lora_state_dict", "merge_lora_"]
