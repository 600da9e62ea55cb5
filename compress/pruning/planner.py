"""The pruning decision: which shape meets the target size, and which units each axis keeps.

``plan`` enumerates homogeneous shapes (hidden size, MLP size, KV groups, query heads per group, layers)
on an NPU-aligned grid, keeps those within the tolerance of the target that the family's config accepts,
ranks them by the importance mass they keep, checks the best few with a short calibration loss, and
returns a ``PruningPlan``: a JSON-round-tripping record of the decision that can be replayed on a fresh
copy of the teacher.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.errors import ConfigError, PlanInfeasibleError
from compress.io import read_json, write_json
from compress.pruning.archspec import ArchSpec, Shape, config_for, is_valid_shape, teacher_shape
from importance import ImportanceScores

PLAN_VERSION = 1

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}


@dataclass(frozen=True)
class TargetSize:
    """A target parameter count, absolute (``90M``) or relative to the teacher (``0.67x``, ``67%``)."""

    params: int | None = None
    ratio: float | None = None

    @classmethod
    def parse(cls, text: str) -> TargetSize:
        value = str(text).strip()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([xX%]|[kKmMbBgG]?)", value)
        if not match:
            raise ConfigError(
                f"--target-size {text!r} is not a size; use a parameter count like 90M or 1.2B, "
                "a ratio like 0.67x, or a percentage like 67%"
            )
        number, unit = float(match.group(1)), match.group(2)
        if number <= 0:
            raise ConfigError(f"--target-size {text!r} must be greater than zero")
        if unit in ("x", "X"):
            return cls(ratio=number)
        if unit == "%":
            return cls(ratio=number / 100.0)
        return cls(params=int(round(number * _SUFFIXES[unit.upper()])))

    def params_for(self, teacher_params: int) -> int:
        """The absolute target for a teacher of ``teacher_params`` parameters."""
        if self.params is not None:
            return self.params
        assert self.ratio is not None
        return int(round(self.ratio * teacher_params))

    def __str__(self) -> str:
        if self.params is not None:
            return f"{self.params / 1e6:g}M"
        return f"{self.ratio:g}x"



@dataclass(frozen=True)
class Candidate:
    """One shape the planner weighed."""

    shape: Shape
    params: int
    mass: float
    loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape.to_dict(), "params": self.params, "mass": self.mass, "loss": self.loss}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Candidate:
        return cls(Shape(**values["shape"]), values["params"], values["mass"], values.get("loss"))


@dataclass(frozen=True)
class PruningPlan:
    """What to keep: sorted kept indices per axis, the shape and config they give, and why."""

    family: str
    teacher_shape: Shape
    shape: Shape
    kept: dict[str, list[int]]
    config: dict[str, Any]
    params: int
    teacher_params: int
    target_params: int
    importance: str
    axes: tuple[str, ...]
    align: int
    tolerance: float
    proxy: str
    reason: str
    candidates: tuple[Candidate, ...] = field(default_factory=tuple)
    repeats: int = 1  # MobileLLM-style block sharing: each kept layer applied this many times in a row

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["teacher_shape"] = self.teacher_shape.to_dict()
        values["shape"] = self.shape.to_dict()
        values["axes"] = list(self.axes)
        values["candidates"] = [c.to_dict() for c in self.candidates]
        return {"version": PLAN_VERSION, **values}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PruningPlan:
        values = dict(values)
        values.pop("version", None)
        values["teacher_shape"] = Shape(**values["teacher_shape"])
        values["shape"] = Shape(**values["shape"])
        values["axes"] = tuple(values["axes"])
        values["candidates"] = tuple(Candidate.from_dict(c) for c in values.get("candidates", ()))
        return cls(**values)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        return cls.from_dict(read_json(path))


def _grid(full: int, align: int, enabled: bool) -> list[int]:
    if not enabled:
        return [full]
    values = list(range(align, full + 1, align))
    return values if full in values else [*values, full]


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores.float(), k).indices.tolist())


def _mass(scores: torch.Tensor, kept: list[int]) -> float:
    positive = scores.float().clamp_min(0)
    total = float(positive.sum())
    return float(positive[kept].sum()) / total if total > 0 else len(kept) / max(len(scores), 1)


def select(spec: ArchSpec, scores: ImportanceScores, shape: Shape) -> dict[str, list[int]]:
    """Kept indices per axis for ``shape``: the highest-scoring units, heads chosen within their GQA group."""
    s = scores.scores
    kept: dict[str, list[int]] = {"hidden": _top(s["hidden"], shape.hidden)}
    kept["layers"] = _top(s["layers"], shape.layers)
    if shape.vocab is not None:
        if "vocab" not in s:
            raise ValueError("a shape with a trimmed vocabulary needs 'vocab' scores (compress.pruning.vocab.vocab_scores)")
        kept["vocab"] = _top(s["vocab"], shape.vocab)
    g = spec.group_size
    for i in range(spec.num_layers):
        heads = s[f"heads.{i}"].float().view(spec.kv_heads, g)  # (kv groups, query heads per group)
        groups = _top(heads.sum(dim=1), shape.kv_heads)
        kept[f"kv.{i}"] = groups
        kept[f"heads.{i}"] = [k * g + j for k in groups for j in _top(heads[k], shape.heads_per_group)]
        kept[f"mlp.{i}"] = _top(s[f"mlp.{i}"], shape.mlp)
    return kept


def kept_mass(spec: ArchSpec, scores: ImportanceScores, shape: Shape, kept: dict[str, list[int]]) -> float:
    """Share of importance kept, multiplied over axes (per-layer axes averaged over the kept layers)."""
    s = scores.scores
    layers = kept["layers"]
    mass = _mass(s["hidden"], kept["hidden"]) * _mass(s["layers"], layers)
    mass *= sum(_mass(s[f"mlp.{i}"], kept[f"mlp.{i}"]) for i in layers) / len(layers)
    mass *= sum(_mass(s[f"heads.{i}"], kept[f"heads.{i}"]) for i in layers) / len(layers)
    return mass


def enumerate_shapes(spec: ArchSpec, axes: Sequence[str], align: int) -> list[tuple[Shape, int]]:
    """Every homogeneous shape on the aligned grid the axes allow, with its parameter count."""
    shapes = []
    layer_options = range(max(1, spec.num_layers // 2), spec.num_layers + 1) if "layers" in axes else [spec.num_layers]
    for hidden in _grid(spec.hidden, align, "hidden" in axes):
        for mlp in _grid(spec.mlp, align, "mlp" in axes):
            for kv in range(1, spec.kv_heads + 1) if "kv" in axes else [spec.kv_heads]:
                for per_group in range(1, spec.group_size + 1) if "heads" in axes else [spec.group_size]:
                    for layers in layer_options:
                        shape = Shape(hidden, mlp, kv, per_group, layers)
                        shapes.append((shape, spec.count_params(hidden, mlp, kv, per_group, layers)))
    return shapes


def _fmt(params: int, teacher: int) -> str:
    return f"{params / 1e6:.1f}M ({params / teacher:.2f}x)"


def _with_vocab(spec: ArchSpec, shapes: list[tuple[Shape, int]], high: int, floor: int, align: int) -> list[tuple[Shape, int]]:
    """Each block shape with the largest vocabulary on the grid that keeps it under ``high`` (at least ``floor``
    tokens; the whole vocabulary when that fits): a larger vocabulary costs parameters, never quality."""
    out = []
    for shape, _ in shapes:
        base = spec.count_params(shape.hidden, shape.mlp, shape.kv_heads, shape.heads_per_group, shape.layers, vocab=0)
        per_token = spec.count_params(shape.hidden, shape.mlp, shape.kv_heads, shape.heads_per_group, shape.layers,
                                      vocab=1) - base
        if base + spec.vocab * per_token <= high:
            out.append((shape, base + spec.vocab * per_token))
            continue
        vocab = (high - base) // max(per_token, 1) // align * align
        if vocab >= floor:
            out.append((dataclasses.replace(shape, vocab=vocab), base + vocab * per_token))
    return out


def feasible_shapes(
    spec: ArchSpec,
    teacher_config: Any,
    target: TargetSize,
    axes: Sequence[str] = ("heads", "hidden", "mlp"),
    align: int = 64,
    tolerance: float = 0.05,
    vocab_floor: int | None = None,
) -> tuple[int, list[tuple[Shape, int]]]:
    """The target in parameters and every valid shape within tolerance of it. Raises PlanInfeasibleError.

    With the ``vocab`` axis each block shape takes the largest vocabulary that fits (``vocab_floor`` tokens at
    least, a multiple of ``align``)."""
    teacher_params = spec.params
    goal = target.params_for(teacher_params)
    if goal > teacher_params * (1 + tolerance):
        raise PlanInfeasibleError(
            f"--target-size {target} is {goal / 1e6:.1f}M parameters, larger than the teacher "
            f"({teacher_params / 1e6:.1f}M); choose a size at most 1x"
        )
    low, high = goal * (1 - tolerance), goal * (1 + tolerance)
    valid = [(s, p) for s, p in enumerate_shapes(spec, axes, align) if is_valid_shape(teacher_config, spec, s) is None]
    if "vocab" in axes:
        floor = -(-(vocab_floor or 0) // align) * align
        valid = _with_vocab(spec, valid, int(high), floor, align)
    within = [(s, p) for s, p in valid if low <= p <= high]
    if not within:
        below = max((p for _, p in valid if p < low), default=None)
        above = min((p for _, p in valid if p > high), default=None)
        nearest = " and ".join(_fmt(p, teacher_params) for p in (below, above) if p is not None) or "none"
        raise PlanInfeasibleError(
            f"no {align}-aligned shape over axes {','.join(axes)} lies within {tolerance:.0%} of "
            f"--target-size {target} ({goal / 1e6:.1f}M); nearest feasible sizes: {nearest}. "
            "Choose one of those, widen --tolerance, add --axes, or use --align 32"
        )
    return goal, within


def plan(
    spec: ArchSpec,
    teacher_config: Any,
    scores: ImportanceScores,
    target: TargetSize,
    axes: Sequence[str] = ("heads", "hidden", "mlp"),
    align: int = 64,
    tolerance: float = 0.05,
    proxy: str = "loss",
    search_candidates: int = 8,
    evaluate: Callable[[dict[str, list[int]], Shape], float] | None = None,
    repeats: int = 1,
    vocab_floor: int | None = None,
) -> PruningPlan:
    """Choose the shape and the kept units. ``evaluate(kept, shape)`` returns a calibration loss (proxy ``loss``).

    With ``repeats`` > 1 the student applies each kept layer that many times (MobileLLM's block sharing, see
    :mod:`compress.models.mobilellm`): parameters are counted once, and the planner goes deep and thin, choosing
    among the shapes with the most layers that fit the target.

    The ``vocab`` axis (in ``axes``) needs ``scores.scores["vocab"]`` and ``vocab_floor``
    (:func:`compress.pruning.vocab.vocab_scores`): the tokens kept are the highest-scoring ones."""
    teacher_params = spec.params
    if teacher_params <= target.params_for(teacher_params) <= teacher_params * (1 + tolerance):
        # 1x: no pruning (export or quantize the teacher itself)
        return dataclasses.replace(keep_all_plan(spec, teacher_config), reason="the target is the teacher's size: keep everything")
    goal, within = feasible_shapes(spec, teacher_config, target, axes, align, tolerance, vocab_floor)
    deep = ""
    if repeats > 1:
        depth = max(s.layers for s, _ in within)
        within = [(s, p) for s, p in within if s.layers == depth]
        deep = f"deep and thin ({depth} layers, each applied {repeats} times): "
    candidates = []
    for shape, params in within:
        kept = select(spec, scores, shape)
        candidates.append(Candidate(shape, params, kept_mass(spec, scores, shape, kept)))
    candidates.sort(key=lambda c: (-c.mass, -c.params))

    if proxy == "loss" and evaluate is not None:
        # Check the best-mass candidate of every (hidden, layers) pair first: the mass proxy cannot compare
        # hidden channels with MLP neurons, the loss can.
        best_per_pair: dict[tuple[int, int], Candidate] = {}
        for c in candidates:
            best_per_pair.setdefault((c.shape.hidden, c.shape.layers), c)
        checked = list(best_per_pair.values())[:search_candidates]
        checked += [c for c in candidates if c not in checked][: max(0, search_candidates - len(checked))]
        losses = {c.shape: evaluate(select(spec, scores, c.shape), c.shape) for c in checked}
        candidates = [dataclasses.replace(c, loss=losses.get(c.shape)) for c in candidates]
        chosen = min((c for c in candidates if c.loss is not None), key=lambda c: c.loss)
        reason = deep + (
            f"lowest calibration loss ({chosen.loss:.4f}) among {len(checked)} checked of {len(candidates)} "
            f"candidates within {tolerance:.0%} of {goal / 1e6:.1f}M"
        )
    else:
        chosen = candidates[0]
        reason = deep + f"most importance mass kept ({chosen.mass:.4f}) among {len(candidates)} candidates"

    kept = select(spec, scores, chosen.shape)
    config = config_for(teacher_config, spec, chosen.shape, kept["layers"], kept_vocab=kept.get("vocab"))
    return PruningPlan(
        family=spec.family,
        teacher_shape=teacher_shape(spec),
        shape=chosen.shape,
        kept=kept,
        config=json.loads(config.to_json_string(use_diff=False)),
        params=chosen.params,
        teacher_params=teacher_params,
        target_params=goal,
        importance=scores.method,
        axes=tuple(axes),
        align=align,
        tolerance=tolerance,
        proxy=proxy if evaluate is not None else "mass",
        reason=reason,
        candidates=tuple(candidates),
        repeats=repeats,
    )


def keep_all_plan(spec: ArchSpec, teacher_config: Any) -> PruningPlan:
    """The identity plan (every unit kept): surgery with it must leave the model's outputs unchanged."""
    shape = teacher_shape(spec)
    kept = {"hidden": list(range(spec.hidden)), "layers": list(range(spec.num_layers))}
    for i in range(spec.num_layers):
        kept[f"heads.{i}"] = list(range(spec.heads))
        kept[f"kv.{i}"] = list(range(spec.kv_heads))
        kept[f"mlp.{i}"] = list(range(spec.mlp))
    return PruningPlan(
        family=spec.family,
        teacher_shape=shape,
        shape=shape,
        kept=kept,
        config=json.loads(config_for(teacher_config, spec, shape).to_json_string(use_diff=False)),
        params=spec.params,
        teacher_params=spec.params,
        target_params=spec.params,
        importance="none",
        axes=(),
        align=1,
        tolerance=0.0,
        proxy="none",
        reason="keep everything",
    )


__all__ = ["Candidate", "PruningPlan", "enumerate_shapes", "feasible_shapes", "keep_all_plan", "kept_mass", "plan", "select"]
