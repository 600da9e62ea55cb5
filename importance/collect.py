"""Forward hooks that feed activation statistics to the reducers, and the scores they produce.

The lifecycle (attach, run, always detach) lives in the ``collect`` context manager; the math lives in
``importance.reducers``. Statistics live in the collector, never on the modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from importance.reducers import (
    Aggregation,
    BatchStatistic,
    block_influence,
    channel_magnitudes,
    head_norms,
    reduce_sequence,
)

ProbeKind = Literal["channels", "heads", "block"]


@dataclass(frozen=True)
class Probe:
    """Where one statistic is read: a module, which side of it, and the axis the values score.

    kind ``channels``: each channel of the tensor scores one index of ``axis`` (several probes may
    share an axis, their scores add up: hidden channels are summed over every norm layer);
    kind ``heads``: the last dimension is split into heads of ``unit`` elements, each scored by its norm;
    kind ``block``: the module's input and output score the module itself (Block Influence), at index
    ``index`` of ``axis``.
    """

    module: nn.Module
    side: Literal["input", "output"]
    axis: str
    kind: ProbeKind = "channels"
    unit: int = 1
    index: int = 0


@dataclass(frozen=True)
class ImportanceScores:
    """Axis name -> 1-D scores (higher = more important), plus how they were computed."""

    scores: Mapping[str, torch.Tensor]
    method: str
    batch_aggregation: str = "l2"
    sequence_aggregation: str = "mean"
    samples: int = 0
    tokens: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "scores"}
        return {"provenance": json.dumps(fields, sort_keys=True)}

    def save(self, path: str | Path) -> None:
        """Write atomically to a safetensors file with the provenance in its metadata."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous().float() for k, v in self.scores.items()}, str(tmp), self.metadata())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ImportanceScores:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            provenance = json.loads((handle.metadata() or {}).get("provenance", "{}"))
        return cls(scores=load_file(str(path)), **provenance)


class _Collector:
    def __init__(self, batch_aggregation: Aggregation, sequence_aggregation: Aggregation) -> None:
        self.batch_aggregation = batch_aggregation
        self.sequence_aggregation = sequence_aggregation
        self.stats: dict[str, BatchStatistic] = {}
        self.blocks: dict[str, dict[int, list[float]]] = {}
        self.samples = 0
        self.tokens = 0

    def _add(self, key: str, per_token: torch.Tensor) -> None:
        # per_token: (batch, seq, channels) of non-negative values
        per_sample = reduce_sequence(per_token, self.sequence_aggregation)  # (batch, channels)
        self.stats.setdefault(key, BatchStatistic()).update(per_sample)

    def hook(self, probe: Probe, key: str) -> Callable[..., None]:
        def on_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if probe.kind == "block":
                inputs = args[0] if args else kwargs["hidden_states"]
                outputs = output[0] if isinstance(output, tuple) else output
                influence = block_influence(inputs, outputs)  # (batch, seq)
                bucket = self.blocks.setdefault(probe.axis, {}).setdefault(probe.index, [0.0, 0.0])
                bucket[0] += float(influence.double().sum())
                bucket[1] += influence.numel()
                return
            value = (args[0] if args else next(iter(kwargs.values()))) if probe.side == "input" else output
            if isinstance(value, tuple):
                value = value[0]
            if probe.kind == "heads":
                self._add(key, head_norms(value, probe.unit))
            else:
                self._add(key, channel_magnitudes(value))

        return on_forward

    def scores(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, stat in self.stats.items():
            axis = key.split("#")[0]
            value = stat.result(self.batch_aggregation)
            out[axis] = out[axis] + value if axis in out else value
        for axis, blocks in self.blocks.items():
            size = max(blocks) + 1
            values = torch.zeros(size)
            for index, (total, count) in blocks.items():
                values[index] = total / max(count, 1)
            out[axis] = values
        return out


@contextlib.contextmanager
def collect(
    probes: Sequence[Probe],
    batch_aggregation: Aggregation = "l2",
    sequence_aggregation: Aggregation = "mean",
) -> Iterator[_Collector]:
    """Attach hooks for ``probes``; always remove them on exit. Run forwards inside, read ``.scores()`` after."""
    collector = _Collector(batch_aggregation, sequence_aggregation)
    handles = []
    try:
        for number, probe in enumerate(probes):
            handles.append(
                probe.module.register_forward_hook(collector.hook(probe, f"{probe.axis}#{number}"), with_kwargs=True)
            )
        yield collector
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def skipped(module: nn.Module) -> Iterator[None]:
    """Make ``module`` return its first input unchanged (a residual block removed), for the duration."""

    def identity(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = module.register_forward_hook(identity, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def removal_scores(modules: Sequence[nn.Module], evaluate: Callable[[], float]) -> torch.Tensor:
    """Loss increase when each module is skipped in turn (higher = removing it hurts more)."""
    base = evaluate()
    increases = []
    for module in modules:
        with skipped(module):
            increases.append(evaluate() - base)
    return torch.tensor(increases, dtype=torch.float32)
