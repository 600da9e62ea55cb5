import pytest
import torch
from factories import FAMILY_FACTORIES, tiny_gemma3, tiny_llama, tiny_tokenizer
from transformers import AutoModel, AutoModelForCausalLM

from compress.pruning.archspec import Shape, resolve
from compress.pruning.planner import keep_all_plan, select
from compress.pruning.scoring import random_scores
from compress.pruning.surgery import apply_plan, save_checkpoint


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _plan_for(model, shape, seed=0):
    spec = resolve(model)
    plan = keep_all_plan(spec, model.config)
    kept = select(spec, random_scores(spec, seed), shape)
    return spec, type(plan)(**{**plan.__dict__, "shape": shape, "kept": kept})


@pytest.mark.parametrize("family", sorted(FAMILY_FACTORIES))
def test_keep_everything_plan_leaves_outputs_unchanged(family):
    model = FAMILY_FACTORIES[family]()
    spec = resolve(model)
    student = apply_plan(model, spec, keep_all_plan(spec, model.config))
    ids = torch.randint(3, 200, (2, 12))
    assert (_outputs(model, ids) - _outputs(student, ids)).abs().max() <= 1e-5


def test_removing_an_mlp_neuron_equals_zeroing_it():
    model = tiny_llama()
    spec = resolve(model)
    plan = keep_all_plan(spec, model.config)
    neuron = 17
    kept = {**plan.kept, "mlp.1": [i for i in range(spec.mlp) if i != neuron]}
    shape = plan.shape
    # A homogeneous shape needs every layer to shrink alike: drop neuron 17 in layer 0 too, and zero both.
    kept["mlp.0"] = kept["mlp.1"]
    pruned = apply_plan(model, spec, type(plan)(**{**plan.__dict__, "kept": kept, "shape": Shape(shape.hidden, spec.mlp - 1, shape.kv_heads, shape.heads_per_group, shape.layers)}))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, neuron] = 0
    ids = torch.randint(3, 200, (2, 10))
    assert (_outputs(model, ids) - _outputs(pruned, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILY_FACTORIES))
def test_pruned_checkpoint_reloads_with_plain_from_pretrained(family, tmp_path):
    model = FAMILY_FACTORIES[family]()
    spec = resolve(model)
    shape = Shape(hidden=32, mlp=64, kv_heads=spec.kv_heads, heads_per_group=spec.group_size, layers=spec.num_layers - 1)
    if not model.config.to_dict().get("head_dim"):  # head_dim is hidden / heads: shrink heads with hidden
        shape = Shape(hidden=32, mlp=64, kv_heads=2, heads_per_group=1, layers=1)
    spec, plan = _plan_for(model, shape)
    student = apply_plan(model, spec, plan)
    save_checkpoint(student, tiny_tokenizer(), tmp_path / "pruned")
    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    reloaded, info = auto.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(reloaded) is type(model)
    assert sum(p.numel() for p in reloaded.parameters()) == spec.count_params(**shape.__dict__)
    if spec.tied_embeddings and hasattr(reloaded, "lm_head"):
        assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    ids = torch.randint(3, 200, (1, 9))
    assert torch.allclose(_outputs(student, ids), _outputs(reloaded.eval(), ids), atol=1e-5)


def test_gqa_head_pruning_keeps_each_query_head_with_its_kv_group():
    model = tiny_llama(hidden=96, heads=6, kv_heads=2, mlp=64)
    spec = resolve(model)
    shape = Shape(hidden=96, mlp=64, kv_heads=2, heads_per_group=2, layers=2)
    spec, plan = _plan_for(model, shape, seed=3)
    for i in range(2):
        groups = [h // spec.group_size for h in plan.kept[f"heads.{i}"]]
        assert groups == [0, 0, 1, 1]
    student = apply_plan(model, spec, plan)
    q = model.model.layers[0].self_attn.q_proj.weight.view(6, 16, 96)
    kept = plan.kept["heads.0"]
    assert torch.equal(student.model.layers[0].self_attn.q_proj.weight.view(4, 16, 96), q[kept])
    assert student.config.num_attention_heads == 4 and student.config.num_key_value_heads == 2


def test_gemma_hidden_pruning_rescales_residual_norms_for_the_embedding_scale():
    model = tiny_gemma3()
    spec = resolve(model)
    shape = Shape(hidden=32, mlp=128, kv_heads=1, heads_per_group=4, layers=3)
    spec, plan = _plan_for(model, shape)
    student = apply_plan(model, spec, plan)
    factor = (32 / 64) ** 0.5
    kept = plan.kept["hidden"]
    before = model.model.layers[0].post_attention_layernorm.weight[kept]
    after = student.model.layers[0].post_attention_layernorm.weight
    assert torch.allclose(after, (before + 1) * factor - 1)
    assert torch.equal(student.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight[kept])
    assert student.model.embed_tokens.embed_scale.item() == pytest.approx(32**0.5)


def test_teacher_is_left_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec, plan = _plan_for(model, Shape(32, 64, 1, 2, 1))
    apply_plan(model, spec, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", sorted(FAMILY_FACTORIES))
def test_removing_an_mlp_neuron_equals_zeroing_its_activation_in_every_family(family):
    model = FAMILY_FACTORIES[family]()
    spec = resolve(model)
    plan = keep_all_plan(spec, model.config)
    neuron = 5
    kept = dict(plan.kept)
    for i in range(spec.num_layers):
        kept[f"mlp.{i}"] = [j for j in range(spec.mlp) if j != neuron]
    shape = Shape(spec.hidden, spec.mlp - 1, spec.kv_heads, spec.group_size, spec.num_layers)
    pruned = apply_plan(model, spec, type(plan)(**{**plan.__dict__, "kept": kept, "shape": shape}))

    def zero(module, args):
        x = args[0].clone()
        x[..., neuron] = 0
        return (x,)

    for path in spec.mlp_output_paths:  # the input of the down projection is the neuron's activation
        model.get_submodule(path).register_forward_pre_hook(zero)
    ids = torch.randint(3, 200, (2, 10))
    assert (_outputs(model, ids) - _outputs(pruned, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILY_FACTORIES))
def test_scores_follow_a_permutation_of_channels_in_every_family(family):
    from compress.pruning.scoring import activation_scores

    model = FAMILY_FACTORIES[family]()
    spec = resolve(model)
    plan = keep_all_plan(spec, model.config)
    generator = torch.Generator().manual_seed(0)
    kept = dict(plan.kept)
    kept["hidden"] = torch.randperm(spec.hidden, generator=generator).tolist()
    for i in range(spec.num_layers):
        kept[f"mlp.{i}"] = torch.randperm(spec.mlp, generator=generator).tolist()
    permuted = apply_plan(model, spec, type(plan)(**{**plan.__dict__, "kept": kept}))  # same function, channels reordered
    ids = torch.randint(3, 200, (4, 12))
    expected = _outputs(model, ids)
    if not spec.causal_lm:  # an encoder outputs hidden states, whose channels are permuted too
        expected = expected[..., kept["hidden"]]
    assert (expected - _outputs(permuted, ids)).abs().max() <= 1e-4
    before = activation_scores(model, spec, ids, batch_size=2, bf16=False, progress=False).scores
    after = activation_scores(permuted, resolve(permuted), ids, batch_size=2, bf16=False, progress=False).scores
    assert torch.allclose(after["hidden"], before["hidden"][kept["hidden"]], rtol=1e-3, atol=1e-6)
    assert torch.allclose(after["mlp.1"], before["mlp.1"][kept["mlp.1"]], rtol=1e-3, atol=1e-6)
    assert torch.allclose(after["heads.0"], before["heads.0"], rtol=1e-3, atol=1e-6)
