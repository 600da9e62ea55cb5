import json

import pytest
from factories import tiny_llama

from compress.core.config import TargetSize
from compress.errors import PlanInfeasibleError
from compress.pruning.archspec import resolve
from compress.pruning.planner import PruningPlan, plan
from compress.pruning.scoring import random_scores


def _setup(**kw):
    model = tiny_llama(hidden=128, heads=4, kv_heads=2, mlp=256, layers=4, **kw)
    spec = resolve(model)
    return model, spec, random_scores(spec, 1)


def test_plan_meets_target_with_aligned_valid_dimensions():
    model, spec, scores = _setup()
    chosen = plan(spec, model.config, scores, TargetSize.parse("0.7x"), align=32, tolerance=0.1, proxy="mass")
    assert abs(chosen.params - 0.7 * spec.params) <= 0.1 * 0.7 * spec.params
    assert chosen.shape.hidden % 32 == 0 and chosen.shape.mlp % 32 == 0
    assert chosen.shape.hidden % chosen.shape.heads == 0
    assert len(chosen.kept["hidden"]) == chosen.shape.hidden
    assert chosen.kept["hidden"] == sorted(chosen.kept["hidden"])
    assert chosen.candidates and all(abs(c.params - chosen.target_params) <= 0.1 * chosen.target_params for c in chosen.candidates)


def test_loss_proxy_picks_the_lowest_loss_checked_candidate():
    model, spec, scores = _setup()
    calls = []

    def evaluate(kept, shape):
        calls.append(shape)
        return float(shape.mlp)  # pretend a smaller MLP is better

    chosen = plan(spec, model.config, scores, TargetSize.parse("0.7x"), align=32, tolerance=0.1, search_candidates=4, evaluate=evaluate)
    checked = [c for c in chosen.candidates if c.loss is not None]
    assert 1 <= len(checked) <= 4 and len(calls) == len(checked)
    assert chosen.shape.mlp == min(c.shape.mlp for c in checked)
    assert "calibration loss" in chosen.reason


def test_plan_round_trips_through_json(tmp_path):
    model, spec, scores = _setup()
    chosen = plan(spec, model.config, scores, TargetSize.parse("60%"), align=32, tolerance=0.1, proxy="mass")
    chosen.save(tmp_path / "plan.json")
    again = PruningPlan.load(tmp_path / "plan.json")
    assert again == chosen
    assert json.loads((tmp_path / "plan.json").read_text())["version"] == 1


def test_target_larger_than_teacher_is_infeasible():
    model, spec, scores = _setup()
    with pytest.raises(PlanInfeasibleError, match="larger than the teacher"):
        plan(spec, model.config, scores, TargetSize.parse("2x"))


def test_target_below_every_shape_names_the_nearest_sizes():
    model, spec, scores = _setup()
    with pytest.raises(PlanInfeasibleError, match="nearest feasible sizes: .*M"):
        plan(spec, model.config, scores, TargetSize.parse("1K"), align=32)


def test_layer_axis_drops_the_least_important_layers():
    model, spec, scores = _setup()
    scores.scores["layers"][:] = __import__("torch").tensor([4.0, 1.0, 3.0, 2.0])
    chosen = plan(spec, model.config, scores, TargetSize.parse("0.5x"), axes=("layers",), tolerance=0.2, proxy="mass")
    assert chosen.shape.layers == 2 and chosen.kept["layers"] == [0, 2]
    assert chosen.config["num_hidden_layers"] == 2
