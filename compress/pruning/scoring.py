"""Importance of every prunable unit of a resolved model: activation-based (Minitron) or a baseline."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.evaluation.quality import mean_nll
from compress.pruning.archspec import ArchSpec
from importance import ImportanceScores, Probe, collect, removal_scores, weight_slice_norms

log = logging.getLogger(__name__)


def probes_for(model: nn.Module, spec: ArchSpec) -> list[Probe]:
    """Minitron's probe points: head outputs, MLP activations, every norm's output, each layer's in/out."""
    probes = [
        Probe(model.get_submodule(path), "input", f"heads.{i}", "heads", unit=spec.head_dim)
        for i, path in enumerate(spec.attention_output_paths)
    ]
    probes += [Probe(model.get_submodule(p), "input", f"mlp.{i}") for i, p in enumerate(spec.mlp_output_paths)]
    probes += [Probe(model.get_submodule(p), "output", "hidden") for p in spec.hidden_norm_paths]
    probes += [
        Probe(model.get_submodule(p), "output", "layers", "block", index=i) for i, p in enumerate(spec.layer_paths)
    ]
    return probes


def _autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def activation_scores(
    model: nn.Module,
    spec: ArchSpec,
    ids: torch.Tensor,
    batch_size: int = 8,
    batch_aggregation: str = "l2",
    sequence_aggregation: str = "mean",
    bf16: bool = True,
    layer_metric: str = "block-influence",
    progress: bool = True,
) -> ImportanceScores:
    """Score heads, MLP neurons, hidden channels and layers from forward activations on ``ids`` (samples, seq).

    Only the backbone runs (no LM head: its logits are not needed), in bf16 autocast when ``bf16``; the
    statistics are accumulated in float64.
    """
    backbone = model.base_model
    with (
        collect(probes_for(model, spec), batch_aggregation, sequence_aggregation) as stats,
        torch.inference_mode(),
        _autocast(bf16),
    ):
        for start in tqdm(range(0, len(ids), batch_size), desc="importance", unit="batch", disable=not progress):
            backbone(input_ids=ids[start : start + batch_size])
    scores = stats.scores()
    extra = {"layer_metric": "block-influence", "bf16": bf16}
    if layer_metric == "perplexity":
        # Removing one of 30 layers at a time is 30 extra passes: a 64-sequence subset keeps it cheap.
        subset = ids[:64]
        layers = [model.get_submodule(p) for p in spec.layer_paths]
        with tqdm(total=len(layers) + 1, desc="layer removal", disable=not progress) as bar:

            def evaluate() -> float:
                bar.update(1)
                return mean_nll(model, subset, batch_size=batch_size, bf16=bf16)

            scores["layers"] = removal_scores(layers, evaluate)
        extra["layer_metric"] = "perplexity"
    return ImportanceScores(
        scores=scores,
        method="activation",
        batch_aggregation=batch_aggregation,
        sequence_aggregation=sequence_aggregation,
        samples=int(ids.shape[0]),
        tokens=int(ids.numel()),
        extra=extra,
    )


def magnitude_scores(model: nn.Module, spec: ArchSpec) -> ImportanceScores:
    """Baseline: the L2 norm of every weight slice each unit owns, over all coupled tensors."""
    state = model.state_dict()
    squares: dict[str, torch.Tensor] = {}
    layer_sq = torch.zeros(spec.num_layers, dtype=torch.float64)
    for tensor in spec.tensors:
        weight = state[tensor.name]
        if tensor.layer is not None:
            layer_sq[tensor.layer] += weight.double().pow(2).sum()
        for dim, segments in enumerate(tensor.dims):
            offset = 0
            for seg in segments:
                if seg.axis is not None:
                    norms = weight_slice_norms(weight, dim, offset, seg.count, seg.unit).double().pow(2)
                    squares[seg.axis] = squares[seg.axis] + norms if seg.axis in squares else norms
                offset += seg.count * seg.unit
    scores = {axis: value.sqrt().float() for axis, value in squares.items()}
    scores["layers"] = layer_sq.sqrt().float()
    return ImportanceScores(scores=scores, method="magnitude", batch_aggregation="", sequence_aggregation="")


def random_scores(spec: ArchSpec, seed: int = 0) -> ImportanceScores:
    """Baseline: uniform random scores for every unit (reproducible by ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    scores = {"hidden": torch.rand(spec.hidden, generator=generator)}
    for i in range(spec.num_layers):
        scores[f"heads.{i}"] = torch.rand(spec.heads, generator=generator)
        scores[f"mlp.{i}"] = torch.rand(spec.mlp, generator=generator)
    scores["layers"] = torch.rand(spec.num_layers, generator=generator)
    return ImportanceScores(
        scores=scores, method="random", batch_aggregation="", sequence_aggregation="", extra={"seed": seed}
    )


def score_importance(
    model: nn.Module,
    spec: ArchSpec,
    method: str,
    ids: torch.Tensor | None = None,
    seed: int = 0,
    **activation_options: object,
) -> ImportanceScores:
    """Dispatch to one importance method: ``activation`` (needs ``ids``), ``magnitude`` or ``random``."""
    if method == "activation":
        if ids is None:
            raise ValueError("activation importance needs calibration token ids")
        return activation_scores(model, spec, ids, **activation_options)  # type: ignore[arg-type]
    if method == "magnitude":
        return magnitude_scores(model, spec)
    if method == "random":
        return random_scores(spec, seed)
    raise ValueError(f"unknown importance method {method!r}")


def check_scores(scores: ImportanceScores, spec: ArchSpec, axes: Sequence[str] = ()) -> None:
    """Raise if the scores do not fit the model (e.g. a scores file from another teacher)."""
    expected = {"hidden": spec.hidden, "layers": spec.num_layers}
    for i in range(spec.num_layers):
        expected[f"heads.{i}"] = spec.heads
        expected[f"mlp.{i}"] = spec.mlp
    for axis, size in expected.items():
        value = scores.scores.get(axis)
        if value is None or value.numel() != size:
            got = "missing" if value is None else f"{value.numel()} values"
            raise ValueError(f"importance scores for '{axis}' are {got}, the model has {size}")
