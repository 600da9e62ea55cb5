import pytest
import torch
from factories import FAMILY_FACTORIES, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from compress.errors import UnsupportedArchitectureError
from compress.pruning.archspec import Shape, config_for, is_valid_shape, resolve


@pytest.mark.parametrize("family", sorted(FAMILY_FACTORIES))
def test_resolved_parameter_count_matches_the_model(family):
    model = FAMILY_FACTORIES[family]()
    spec = resolve(model)
    assert spec.params == sum(p.numel() for p in model.parameters())


def test_count_params_of_a_smaller_shape_matches_a_model_built_with_it():
    model = tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=3)
    spec = resolve(model)
    shape = Shape(hidden=32, mlp=64, kv_heads=1, heads_per_group=2, layers=2)
    smaller = type(model)(config_for(model.config, spec, shape))
    assert spec.count_params(32, 64, 1, 2, 2) == sum(p.numel() for p in smaller.parameters())


def test_unregistered_family_names_its_model_type():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        resolve(model)


def test_missing_module_is_named():
    model = tiny_llama()
    del model.model.layers[0].mlp.down_proj
    with pytest.raises(UnsupportedArchitectureError, match="down_proj"):
        resolve(model)


def test_family_validation_rejects_hidden_not_divisible_by_heads():
    model = tiny_llama(hidden=64, heads=4, kv_heads=2)
    spec = resolve(model)
    assert is_valid_shape(model.config, spec, Shape(48, 128, 2, 2, 2)) is None
    assert is_valid_shape(model.config, spec, Shape(50, 128, 2, 2, 2)) is not None


def test_gqa_group_size():
    spec = resolve(tiny_llama(heads=6, kv_heads=2, hidden=96))
    assert (spec.heads, spec.kv_heads, spec.group_size, spec.head_dim) == (6, 2, 3, 16)
    assert torch.Size([6 * 16, 96]) == torch.Size([spec.heads * spec.head_dim, spec.hidden])
