"""MobileLLM-like students: a deep-and-thin Llama whose blocks are each applied twice in a row.

MobileLLM (Liu et al., 2024) found that at ~100M parameters depth beats width, and that *immediate
block-wise weight sharing* (block i computed twice before block i+1, so its weights stay in cache) adds
accuracy at no parameter cost. Here a student of that family is a Llama checkpoint with one more config
key, ``share_repeats``: the model has ``num_hidden_layers`` = unique blocks × repeats decoder layers, and
layer j uses the weights of layer j - j % repeats. Each layer keeps its own module (its own KV-cache
slot), only the parameters are shared, so ``generate`` and every Llama code path work unchanged.

The checkpoint is ``save_pretrained`` output: ``config.json`` (model_type ``pdq_mobilellm``, a
``LlamaConfig`` with ``share_repeats``) and safetensors holding each unique block once. Importing this
module (or calling ``compress.register_students()``, as every loader in ``compress`` does) registers the
classes with ``AutoConfig`` and ``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained``
reloads it shared. ``unshare`` gives a plain
``LlamaForCausalLM`` (the same function, every block stored) for tools that know only Llama.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from compress.errors import UnsupportedArchitectureError


class MobileLLMConfig(LlamaConfig):
    """A ``LlamaConfig`` whose decoder layers share weights in runs of ``share_repeats``."""

    model_type = "pdq_mobilellm"

    def __init__(self, share_repeats: int = 2, **kwargs: Any) -> None:
        self.share_repeats = int(share_repeats)
        super().__init__(**kwargs)
        if self.share_repeats < 1 or self.num_hidden_layers % self.share_repeats:
            raise ValueError(f"num_hidden_layers ({self.num_hidden_layers}) must be a multiple of share_repeats "
                             f"({self.share_repeats})")

    @property
    def unique_layers(self) -> int:
        return self.num_hidden_layers // self.share_repeats


class MobileLLMForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with immediate block-wise weight sharing (see the module docstring)."""

    config_class = MobileLLMConfig

    def __init__(self, config: MobileLLMConfig) -> None:
        super().__init__(config)
        # save_pretrained drops a shared tensor's copies only when its name is declared tied
        self._tied_weights_keys = {**(type(self)._tied_weights_keys or {}), **_shared_keys(self)}

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # Block sharing rides on transformers' weight tying: tie_weights() shares the tensors after init and
        # after loading, and save_pretrained stores each shared tensor once.
        mapping = super().get_expanded_tied_weights_keys(all_submodels)
        if not all_submodels:
            mapping.update(_shared_keys(self))
        return mapping


def _shared_keys(model: nn.Module) -> dict[str, str]:
    repeats = model.config.share_repeats
    names = [name for name, _ in model.model.layers[0].named_parameters()]
    return {f"model.layers.{j}.{name}": f"model.layers.{j - j % repeats}.{name}"
            for j in range(model.config.num_hidden_layers) if j % repeats for name in names}


AutoConfig.register(MobileLLMConfig.model_type, MobileLLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MobileLLMConfig, MobileLLMForCausalLM, exist_ok=True)


def _llama_fields(config: LlamaConfig) -> dict[str, Any]:
    """The Llama fields of ``config``, without what names its class or its sharing."""
    values = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "share_repeats"):
        values.pop(key, None)
    return values


def check_shareable(config: Any) -> None:
    """Raise UnsupportedArchitectureError unless a model of ``config`` is a Llama in all but name, the only kind
    :func:`share_blocks` carries over whole (a MobileLLM-like student is a ``LlamaConfig``)."""
    model_type = getattr(config, "model_type", None)
    plain = model_type == "llama" or (model_type == "mistral" and getattr(config, "sliding_window", None) is None)
    if not plain:
        raise UnsupportedArchitectureError(
            f"a MobileLLM-like student is a Llama with shared blocks; the {model_type!r} teacher's layers are not "
            "Llama layers (biases, q/k norms, extra norms, fused projections or a sliding window would be lost). "
            "Use --student minitron or --student mu for this teacher")


def share_blocks(model: LlamaForCausalLM, repeats: int = 2) -> MobileLLMForCausalLM:
    """A MobileLLM-like model that applies each decoder layer of ``model`` ``repeats`` times in a row.

    The weights are copied from ``model`` (which is left untouched); the result has ``repeats`` times its
    depth and the same number of unique parameters.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    check_shareable(model.config)
    values = _llama_fields(model.config)
    layers = len(model.model.layers)
    values["num_hidden_layers"] = layers * repeats
    config = MobileLLMConfig(share_repeats=repeats, **values)
    config.architectures = [MobileLLMForCausalLM.__name__]
    source = model.state_dict()
    state = {}
    for key, tensor in source.items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            key = f"model.layers.{int(index) * repeats}.{rest}"
        state[key] = tensor.detach().clone()
    dtype = next(model.parameters()).dtype
    student = MobileLLMForCausalLM(config).to(dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)
    shared = set(_shared_keys(student))
    tied_head = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - shared - tied_head:
        raise RuntimeError(f"block sharing: unexpected {unexpected}, missing {sorted(set(missing) - shared - tied_head)}")
    student.tie_weights()
    return student.eval()


def unshare(model: MobileLLMForCausalLM) -> LlamaForCausalLM:
    """The same function as a plain ``LlamaForCausalLM``: every layer stores its own copy of the weights."""
    values = _llama_fields(model.config)
    plain = LlamaForCausalLM(LlamaConfig(**values)).to(next(model.parameters()).dtype)
    plain.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    return plain.eval()


def unique_parameters(model: nn.Module) -> int:
    """Parameters counted once however many layers share them (``model.parameters()`` already dedups)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def is_block_shared(model: nn.Module) -> bool:
    return int(getattr(getattr(model, "config", None), "share_repeats", 1) or 1) > 1


__all__ = ["MobileLLMConfig", "MobileLLMForCausalLM", "is_block_shared", "share_blocks", "unique_parameters", "unshare"]

