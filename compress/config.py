"""The run's knobs: ``CompressConfig`` is exactly the CLI's schema; ``TargetSize`` is parsed once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import ConfigError
from distill import DistillConfig
from distill.config import OPTIMIZERS, PARALLEL, SCHEDULES
from quant.profiles import PROFILES
from quant.quantize import PRESETS

TRANSFORMS = ("rotate", "smooth", "embed-rows")  # compress.outliers rewrites, in the order they apply
# The rewrites each recipe was measured best with (benchmarks/results/quant_accuracy_*.md): both need the
# rotation (the first position's massive activation sets every residual range) and per-row embedding scales.
DEFAULT_TRANSFORMS = {"none": ("embed-rows",), "a16w8": ("rotate", "embed-rows"), "a8w8": ("rotate", "embed-rows")}

STAGES = ("correct", "score", "plan", "prune", "distill", "export", "quantize", "report")
"""The stages in order; ``--stop-after`` takes one of them. ``correct`` does nothing unless
``--teacher-correction-tokens`` is set; ``quantize`` does nothing with ``--quant none``."""
QUANT_CHOICES = ("none", *PRESETS)
AXES = ("heads", "kv", "hidden", "mlp", "layers")
IMPORTANCE_METHODS = ("activation", "magnitude", "random")
LAYER_METRICS = ("block-influence", "perplexity")
PROXIES = ("loss", "mass")
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
class CompressConfig:
    """Every knob of a run; each field is one CLI flag (``target_size`` is ``--target-size``)."""

    teacher: str = "smollm2-135m"
    target_size: str = "0.67x"
    out: str | None = None
    data: str | None = None
    axes: tuple[str, ...] = ("heads", "hidden", "mlp")
    align: int = 64
    importance: str = "activation"
    calib_samples: int = 1024
    calib_seq_len: int = 128
    batch_size: int = 8
    batch_aggregation: str = "l2"
    sequence_aggregation: str = "mean"
    layer_metric: str = "block-influence"
    tolerance: float = 0.05
    proxy: str = "loss"
    search_candidates: int = 8
    eval_samples: int = 64
    eval_seq_len: int = 256
    eval_data: tuple[str, ...] = ()  # more evaluation sets, beside the in-domain validation and general-english
    bf16: bool = True
    distill_tokens: int = 200_000
    distill_seq_len: int = 256
    distill_batch_size: int = 8
    distill_grad_accum: int = 1
    distill_lr: float = 3e-4
    distill_optimizer: str = "adamw"
    distill_schedule: str = "wsd"
    distill_temperature: float = 1.0
    # KD and cross-entropy half and half: best on general English of the recipes measured at the default budget
    # (benchmarks/results/distill_recovery_2.md, 2026-12-01).
    distill_kl_weight: float = 0.5
    distill_ce_weight: float = 0.5
    distill_eval_every: int = 50
    distill_teacher_top_k: int = 0
    distill_parallel: str = "ddp"
    teacher_correction_tokens: int = 0
    teacher_correction_lr: float = 5e-5
    seq_len: int = 256
    quant: str = "a16w8"
    npu_profile: str = "qnn-htp"
    quant_transforms: tuple[str, ...] | None = None  # None: DEFAULT_TRANSFORMS[quant]
    quant_calib_samples: int = 8
    quant_decode_calib_tokens: int = 512
    student: str = "minitron"
    stop_after: str = "report"
    seed: int = 0
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        TargetSize.parse(self.target_size)
        object.__setattr__(self, "axes", tuple(self.axes))
        object.__setattr__(self, "eval_data", tuple(self.eval_data))
        unknown = [a for a in self.axes if a not in AXES]
        if unknown or not self.axes:
            raise ConfigError(f"--axes {','.join(self.axes)!r}: allowed axes are {', '.join(AXES)}")
        _choice("importance", self.importance, IMPORTANCE_METHODS)
        _choice("batch-aggregation", self.batch_aggregation, ("mean", "l2", "var"))
        _choice("sequence-aggregation", self.sequence_aggregation, ("mean", "l2", "var"))
        _choice("layer-metric", self.layer_metric, LAYER_METRICS)
        _choice("proxy", self.proxy, PROXIES)
        _choice("stop-after", self.stop_after, STAGES)
        from compress.families import (
            family_names,  # the families import the run's machinery, which imports this
        )

        if self.student not in family_names():
            raise ConfigError(f"--student {self.student!r}: choose one of {', '.join(family_names())}")
        _choice("quant", self.quant, QUANT_CHOICES)
        _choice("npu-profile", self.npu_profile, tuple(PROFILES))
        transforms = DEFAULT_TRANSFORMS[self.quant] if self.quant_transforms is None else self.quant_transforms
        object.__setattr__(self, "quant_transforms", tuple(transforms))
        bad = [t for t in self.quant_transforms if t not in TRANSFORMS]
        if bad:
            raise ConfigError(f"--quant-transforms {','.join(self.quant_transforms)!r}: allowed are {', '.join(TRANSFORMS)} "
                              "(comma-separated, or empty for none)")
        if self.align < 1 or self.align & (self.align - 1):
            raise ConfigError(f"--align {self.align}: use a power of two such as 32 or 64 (NPU channel multiples)")
        _choice("distill-optimizer", self.distill_optimizer, OPTIMIZERS)
        _choice("distill-schedule", self.distill_schedule, SCHEDULES)
        _choice("distill-parallel", self.distill_parallel, PARALLEL)
        if self.distill_parallel == "fsdp" and self.distill_optimizer == "muon":
            raise ConfigError("--distill-optimizer muon needs whole matrices, which FSDP shards: "
                              "use --distill-optimizer adamw with --distill-parallel fsdp")
        if self.teacher_correction_tokens < 0 or self.teacher_correction_lr <= 0:
            raise ConfigError("--teacher-correction-tokens must be >= 0 and --teacher-correction-lr positive")
        if self.distill_lr <= 0 or self.distill_temperature <= 0:
            raise ConfigError("--distill-lr and --distill-temperature must be positive")
        if self.distill_kl_weight < 0 or self.distill_ce_weight < 0 or not (self.distill_kl_weight or self.distill_ce_weight):
            raise ConfigError("--distill-kl-weight and --distill-ce-weight must be >= 0 and not both 0")
        for name in ("calib_samples", "calib_seq_len", "batch_size", "search_candidates", "eval_samples", "eval_seq_len",
                     "distill_tokens", "distill_seq_len", "distill_batch_size", "distill_grad_accum", "seq_len",
                     "quant_calib_samples", "quant_decode_calib_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"--tolerance {self.tolerance}: use a fraction between 0 and 1, e.g. 0.05")

    @property
    def target(self) -> TargetSize:
        return TargetSize.parse(self.target_size)

    def distill_config(self) -> DistillConfig:
        """The distillation stage's knobs."""
        return DistillConfig(
            tokens=self.distill_tokens,
            batch_size=self.distill_batch_size,
            grad_accum=self.distill_grad_accum,
            lr=self.distill_lr,
            optimizer=self.distill_optimizer,
            schedule=self.distill_schedule,
            temperature=self.distill_temperature,
            kl_weight=self.distill_kl_weight,
            ce_weight=self.distill_ce_weight,
            eval_every=self.distill_eval_every,
            teacher_top_k=self.distill_teacher_top_k,
            checkpoint_every=self.distill_eval_every,
            bf16=self.bf16,
            seed=self.seed,
            parallel=self.distill_parallel,
        )

    @property
    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(self.teacher).name or self.teacher)
        return Path("runs") / f"{name}-{self.target_size}"

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["axes"] = list(self.axes)
        values["eval_data"] = list(self.eval_data)
        values["quant_transforms"] = list(self.quant_transforms)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompressConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def fingerprint(self, *names: str) -> str:
        """A short hash of the named fields: a stage's output is reused only if its fingerprint matches."""
        blob = json.dumps({n: self.to_dict()[n] for n in names}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"--{flag} {value!r}: allowed values are {', '.join(allowed)}")
