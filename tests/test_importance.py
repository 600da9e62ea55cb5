import pytest
import torch
from factories import tiny_llama
from torch import nn

from compress.pruning.archspec import resolve
from compress.pruning.scoring import activation_scores, magnitude_scores, probes_for
from importance import (
    BatchStatistic,
    ImportanceScores,
    Probe,
    block_influence,
    collect,
    head_norms,
    reduce_sequence,
)


def test_reduce_sequence_and_batch_aggregations():
    x = torch.tensor([[[1.0, 2.0], [3.0, 2.0]]])  # (batch 1, seq 2, channels 2)
    assert torch.allclose(reduce_sequence(x, "mean"), torch.tensor([[2.0, 2.0]]))
    assert torch.allclose(reduce_sequence(x, "l2"), torch.tensor([[10**0.5, 8**0.5]]))
    assert torch.allclose(reduce_sequence(x, "var"), torch.tensor([[1.0, 0.0]]))
    stat = BatchStatistic()
    stat.update(torch.tensor([[1.0, 4.0], [3.0, 0.0]]))
    assert torch.allclose(stat.result("mean"), torch.tensor([2.0, 2.0]))
    assert torch.allclose(stat.result("l2"), torch.tensor([10**0.5, 4.0]))
    assert torch.allclose(stat.result("var"), torch.tensor([1.0, 4.0]))
    with pytest.raises(ValueError, match="allowed"):
        reduce_sequence(x, "median")


def test_head_norms_and_block_influence():
    x = torch.tensor([[[3.0, 4.0, 0.0, 1.0]]])
    assert torch.allclose(head_norms(x, 2), torch.tensor([[[5.0, 1.0]]]))
    same = torch.randn(2, 3, 8)
    assert torch.allclose(block_influence(same, 2 * same), torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(block_influence(same, -same), torch.full((2, 3), 2.0), atol=1e-6)


def test_hooks_are_removed_even_on_error():
    layer = nn.Linear(4, 4)
    with pytest.raises(RuntimeError), collect([Probe(layer, "output", "x")]):
        raise RuntimeError("boom")
    assert not layer._forward_hooks


def test_channel_probe_scores_follow_a_permutation_of_mlp_neurons():
    model = tiny_llama()
    spec = resolve(model)
    ids = torch.randint(3, 200, (6, 16))
    before = activation_scores(model, spec, ids, batch_size=3, bf16=False, progress=False)
    perm = torch.randperm(spec.mlp)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.copy_(layer.mlp.gate_proj.weight[perm])
            layer.mlp.up_proj.weight.copy_(layer.mlp.up_proj.weight[perm])
            layer.mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight[:, perm])
    after = activation_scores(model, spec, ids, batch_size=3, bf16=False, progress=False)
    assert torch.allclose(after.scores["mlp.0"], before.scores["mlp.0"][perm], rtol=1e-4, atol=1e-6)
    assert torch.allclose(after.scores["hidden"], before.scores["hidden"], rtol=1e-4)


def test_activation_scores_cover_every_axis_and_hidden_sums_every_norm():
    model = tiny_llama(layers=3)
    spec = resolve(model)
    ids = torch.randint(3, 200, (4, 8))
    scores = activation_scores(model, spec, ids, batch_size=2, bf16=False, progress=False)
    assert scores.scores["hidden"].shape == (spec.hidden,)
    assert scores.scores["layers"].shape == (3,)
    assert all(scores.scores[f"heads.{i}"].shape == (spec.heads,) for i in range(3))
    assert all((v >= 0).all() for v in scores.scores.values())
    assert sum(p.axis == "hidden" for p in probes_for(model, spec)) == 2 * 3
    assert scores.samples == 4 and scores.tokens == 32


def test_zero_neuron_scores_zero():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[5] = 0
    spec = resolve(model)
    scores = activation_scores(model, spec, torch.randint(3, 200, (2, 8)), bf16=False, progress=False)
    assert scores.scores["mlp.0"][5] == 0
    assert (scores.scores["mlp.0"] > 0).sum() == spec.mlp - 1


def test_magnitude_scores_see_a_zeroed_neuron():
    model = tiny_llama()
    with torch.no_grad():
        for proj in ("gate_proj", "up_proj"):
            getattr(model.model.layers[1].mlp, proj).weight[7] = 0
        model.model.layers[1].mlp.down_proj.weight[:, 7] = 0
    scores = magnitude_scores(model, resolve(model))
    assert scores.scores["mlp.1"][7] == 0 and scores.scores["mlp.1"].min() == 0


def test_scores_round_trip_through_safetensors(tmp_path):
    scores = ImportanceScores({"hidden": torch.rand(8), "mlp.0": torch.rand(4)}, "activation", "l2", "mean", 3, 24, {"bf16": True})
    scores.save(tmp_path / "s.safetensors")
    loaded = ImportanceScores.load(tmp_path / "s.safetensors")
    assert loaded.method == "activation" and loaded.tokens == 24 and dict(loaded.extra) == {"bf16": True}
    assert all(torch.equal(loaded.scores[k], scores.scores[k]) for k in scores.scores)
