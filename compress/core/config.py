"""The run's knobs: ``CompressConfig``, one section per stage that reads it, each field one CLI flag.

The sections are what the stages take: ``prune`` (:class:`PruneConfig`, the score and plan stages),
``correction`` (:class:`CorrectionConfig`), ``distill`` (a :class:`distill.DistillConfig`, handed to the trainer
as it is), ``quant`` (:class:`QuantConfig`: the export and quantize stages; its ``recipe`` names a
:class:`quant.QuantRecipe` preset) and ``eval`` (:class:`EvalConfig`). ``FLAGS`` maps each flag to its field:
``--distill-lr`` is ``distill.lr``, ``--quant`` is ``quant.recipe``, ``--axes`` is ``prune.axes``.

``CompressConfig.from_dict`` reads the nested form (``config.json`` of a run, ``--config run.yaml``) and the flat
one of earlier runs (``{"distill_lr": 3e-4, ...}``), and any mix of the two.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.core.family import family_names
from compress.deploy.outliers import TRANSFORMS
from compress.deploy.qat import QAT_LR, QAT_TABLE_LR, QAT_UNIT_LR
from compress.errors import ConfigError
from compress.pruning.planner import TargetSize
from distill import DistillConfig, DistillError
from distill.speed import cpu_has_bf16
from quant.profiles import PROFILES
from quant.qnn import DEFAULT_SOC_MODEL
from quant.quantize import PRESETS, QuantRecipe

# The rewrites each recipe was measured best with (benchmarks/results/quant_accuracy_*.md): both need the
# rotation (the first position's massive activation sets every residual range) and per-row embedding scales.
DEFAULT_TRANSFORMS = {"none": ("embed-rows",), "a16w8": ("rotate", "embed-rows"), "a8w8": ("rotate", "embed-rows"),
                      "w4a16": ("rotate", "embed-rows"),
                      # weight-only: activations stay float, so no outlier rewrite; the head gets its own weights
                      "w8": (), "w4": ()}

STAGES = ("correct", "score", "plan", "prune", "distill", "export", "quantize", "report")
"""The stages in order; ``--stop-after`` takes one of them. ``correct`` does nothing unless
``--teacher-correction-tokens`` is set; ``quantize`` does nothing with ``--quant none``."""
QUANT_CHOICES = ("none", *PRESETS)
AXES = ("heads", "kv", "hidden", "mlp", "layers", "vocab")
BLOCK_AXES = ("heads", "hidden", "mlp")
# --axes auto: BLOCK_AXES, plus "vocab" when the embedding is over this share of the teacher's parameters (and the
# student family trims vocabularies): there, cutting the blocks instead loses far more (docs/prune.md).
AUTO_VOCAB_SHARE = 0.4
IMPORTANCE_METHODS = ("activation", "magnitude", "random")
LAYER_METRICS = ("block-influence", "perplexity")
PROXIES = ("loss", "mass")
_AGGREGATIONS = ("mean", "l2", "var")


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"--{flag} {value!r}: allowed values are {', '.join(allowed)}")


def _positive(**values: int) -> None:
    for flag, value in values.items():
        if value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {value}: must be at least 1")


@dataclass(frozen=True)
class PruneConfig:
    """The score and plan stages: importance scoring and the shape search."""

    axes: tuple[str, ...] = ("auto",)  # resolved per teacher: see resolve_axes
    align: int = 64
    importance: str = "activation"
    calib_samples: int = 1024
    calib_seq_len: int = 128
    batch_aggregation: str = "l2"
    sequence_aggregation: str = "mean"
    layer_metric: str = "block-influence"
    tolerance: float = 0.05
    proxy: str = "loss"
    search_candidates: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes", tuple(self.axes))
        if self.axes != ("auto",) and ([a for a in self.axes if a not in AXES] or not self.axes):
            raise ConfigError(f"--axes {','.join(self.axes)!r}: use 'auto' or comma-separated axes of {', '.join(AXES)}")
        _choice("importance", self.importance, IMPORTANCE_METHODS)
        _choice("batch-aggregation", self.batch_aggregation, _AGGREGATIONS)
        _choice("sequence-aggregation", self.sequence_aggregation, _AGGREGATIONS)
        _choice("layer-metric", self.layer_metric, LAYER_METRICS)
        _choice("proxy", self.proxy, PROXIES)
        if self.align < 1 or self.align & (self.align - 1):
            raise ConfigError(f"--align {self.align}: use a power of two such as 32 or 64 (NPU channel multiples)")
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"--tolerance {self.tolerance}: use a fraction between 0 and 1, e.g. 0.05")
        _positive(calib_samples=self.calib_samples, calib_seq_len=self.calib_seq_len,
                  search_candidates=self.search_candidates)


@dataclass(frozen=True)
class CorrectionConfig:
    """Minitron's teacher correction: a short fine-tune of the teacher on the training split first (0 tokens: off)."""

    tokens: int = 0
    lr: float = 5e-5

    def __post_init__(self) -> None:
        if self.tokens < 0 or self.lr <= 0:
            raise ConfigError("--teacher-correction-tokens must be >= 0 and --teacher-correction-lr positive")


@dataclass(frozen=True)
class QuantConfig:
    """The export and quantize stages: graph length, float rewrites, integer recipe and NPU profile."""

    recipe: str = "a16w8"  # a quant.quantize.PRESETS name, or "none"
    npu_profile: str = "qnn-htp"
    transforms: tuple[str, ...] | None = None  # None: DEFAULT_TRANSFORMS[recipe]
    calib_samples: int = 8
    gptq_samples: int = 32  # calibration sequences GPTQ's Hessians come from (ranges take the first calib_samples)
    decode_calib_tokens: int = 512
    seq_len: int = 256
    soc_model: str = DEFAULT_SOC_MODEL  # the Snapdragon the qnn-htp graphs are compiled for
    htp_eval_samples: int = 4  # validation sequences run on the HTP emulator (about 30 s each); 0: none
    qat_tokens: int = 0  # quantization-aware training after GPTQ (LPBQ recipes: w4a16), on this many training tokens
    qat_lr: float = QAT_LR
    qat_unit_lr: float = QAT_UNIT_LR  # learning rate of the LPBQ channel units' logarithms in that training (0: fixed)
    qat_table_lr: float = QAT_TABLE_LR  # the tied int4 table's largest move a step in that training (0: frozen)
    table_int8_rows: int | None = None  # an int4 table's rows kept int8 (most frequent tokens); None: the recipe's

    def recipe_used(self) -> QuantRecipe | None:
        """The quant.quantize.PRESETS recipe with this config's overrides (``table_int8_rows``); None for "none"."""
        recipe = PRESETS.get(self.recipe)
        if recipe is None or self.table_int8_rows is None or recipe.embedding_bits != 4:
            return recipe
        return dataclasses.replace(recipe, embedding_wide_rows=self.table_int8_rows)

    def __post_init__(self) -> None:
        object.__setattr__(self, "soc_model", str(self.soc_model))
        if not self.soc_model.isdigit():
            raise ConfigError(f"--soc-model {self.soc_model!r}: a Qualcomm SoC model number, e.g. {DEFAULT_SOC_MODEL} "
                              "(Snapdragon X Elite)")
        if self.htp_eval_samples < 0:
            raise ConfigError(f"--htp-eval-samples {self.htp_eval_samples}: 0 or more sequences")
        _choice("quant", self.recipe, QUANT_CHOICES)
        _choice("npu-profile", self.npu_profile, tuple(PROFILES))
        transforms = DEFAULT_TRANSFORMS[self.recipe] if self.transforms is None else self.transforms
        object.__setattr__(self, "transforms", tuple(transforms))
        bad = [t for t in self.transforms if t not in TRANSFORMS]
        if bad:
            raise ConfigError(f"--quant-transforms {','.join(self.transforms)!r}: allowed are {', '.join(TRANSFORMS)} "
                              "(comma-separated, or empty for none)")
        _positive(quant_calib_samples=self.calib_samples, quant_gptq_samples=self.gptq_samples,
                  quant_decode_calib_tokens=self.decode_calib_tokens,
                  seq_len=self.seq_len)
        profile = PROFILES[self.npu_profile]
        if self.recipe != "none" and PRESETS[self.recipe].weight_only != profile.weight_only:
            fitting = [name for name, r in PRESETS.items() if r.weight_only == profile.weight_only]
            raise ConfigError(f"--quant {self.recipe} does not fit --npu-profile {self.npu_profile}: it takes "
                              f"{', '.join(fitting)} (weight-only recipes are for ort-cpu, Q/DQ recipes for NPUs)")
        recipe = PRESETS.get(self.recipe)
        if recipe is not None and not recipe.weight_only and 4 in (recipe.weight_bits, recipe.embedding_bits) \
                and "int4" not in profile.weight_types:
            takes = [p.name for p in PROFILES.values() if "int4" in p.weight_types and not p.weight_only]
            raise ConfigError(f"--quant {self.recipe} stores int4 weights, which --npu-profile {self.npu_profile} does "
                              f"not take; use --npu-profile {' or '.join(takes)}")
        if recipe is not None and recipe.embedding_bits == 4 and "embed-rows" not in self.transforms:
            raise ConfigError(f"--quant {self.recipe} stores the embedding table in int4, which needs a scale per row: "
                              "keep embed-rows in --quant-transforms (one int4 scale for the whole table loses most "
                              "rows' precision)")
        if self.qat_tokens < 0 or self.qat_lr <= 0 or self.qat_unit_lr < 0 or self.qat_table_lr < 0:
            raise ConfigError("--quant-qat-tokens must be >= 0, --quant-qat-lr positive, --quant-qat-unit-lr and "
                              "--quant-qat-table-lr >= 0")
        if self.table_int8_rows is not None and (self.table_int8_rows < 0 or recipe is None
                                                 or recipe.embedding_bits != 4):
            four = [name for name, r in PRESETS.items() if r.embedding_bits == 4]
            raise ConfigError(f"--quant-table-int8-rows {self.table_int8_rows}: 0 or more rows of an int4 embedding "
                              f"table, which --quant {' or '.join(four)} stores (--quant {self.recipe} does not)")
        if self.qat_table_lr > 0 and recipe is not None and self.recipe_used().embedding_wide_rows:
            raise ConfigError(f"--quant-qat-table-lr {self.qat_table_lr}: the table trains on one int4 grid, and --quant "
                              f"{self.recipe} keeps {self.recipe_used().embedding_wide_rows} of its rows in int8: add "
                              "--quant-table-int8-rows 0, or leave --quant-qat-table-lr at 0")
        if 0 < self.qat_tokens < 4 * self.seq_len:
            raise ConfigError(f"--quant-qat-tokens {self.qat_tokens}: one training step takes 4 sequences of --seq-len "
                              f"{self.seq_len}, so use at least {4 * self.seq_len} (or 0: off)")
        if self.qat_tokens and (recipe is None or not recipe.weight_block):
            blocks = [name for name, r in PRESETS.items() if r.weight_block]
            raise ConfigError(f"--quant-qat-tokens trains int4 LPBQ block weights, which --quant {self.recipe} does not "
                              f"store: use --quant {' or '.join(blocks)}, or leave --quant-qat-tokens at 0")
        if profile.weight_only and "embed-rows" in self.transforms:
            raise ConfigError(f"--quant-transforms embed-rows does not fit --npu-profile {self.npu_profile}: its head "
                              "has weights of its own, so the table needs no row scales; leave embed-rows out")


@dataclass(frozen=True)
class EvalConfig:
    """What every stage measures on: the in-domain validation split, general English, and ``data`` beside them."""

    samples: int = 64
    seq_len: int = 256
    data: tuple[str, ...] = ()  # more evaluation sets (files, folders or built-in corpus names)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(self.data))
        _positive(eval_samples=self.samples, eval_seq_len=self.seq_len)


# KD and cross-entropy half and half: best on general English of the recipes measured at the default budget
# (benchmarks/results/distill_recovery_2.md, 2026-12-01). The peak 3e-4 recovers a heavily pruned student; one that
# starts near its teacher wants 3e-5 or less (distill_recovery_gemma3-270m-vocab.md), which the learning-rate
# guard finds by backing off (distill.backoff).
DISTILL_DEFAULTS = DistillConfig(tokens=200_000, seq_len=256, kl_weight=0.5, ce_weight=0.5, lr_backoffs=2)

# Section name -> (type, flag prefix, fields whose flag differs from prefix + field, fields without a flag).
# The distillation section's bf16 and seed are the run's own (--bf16, --seed); hidden_pairs lives in config files.
SECTIONS: dict[str, tuple[type, str, dict[str, str], tuple[str, ...]]] = {
    "prune": (PruneConfig, "", {}, ()),
    "correction": (CorrectionConfig, "teacher_correction_", {}, ()),
    "distill": (DistillConfig, "distill_", {}, ("bf16", "seed", "hidden_pairs")),
    "quant": (QuantConfig, "quant_", {"recipe": "quant", "npu_profile": "npu_profile", "seq_len": "seq_len",
                                      "soc_model": "soc_model", "htp_eval_samples": "htp_eval_samples"}, ()),
    "eval": (EvalConfig, "eval_", {}, ()),
}


@dataclass(frozen=True)
class CompressConfig:
    """Every knob of a run: the run's own fields, then one section per stage (see the module docstring)."""

    teacher: str = "smollm2-135m"
    target_size: str = "0.67x"
    student: str = "minitron"
    out: str | None = None
    data: str | None = None
    batch_size: int = 8
    bf16: bool | None = None  # None: where the CPU computes bf16 natively (cpu_has_bf16)
    seed: int = 0
    stop_after: str = "report"
    trust_remote_code: bool = False
    prune: PruneConfig = field(default_factory=PruneConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    distill: DistillConfig = DISTILL_DEFAULTS
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        TargetSize.parse(self.target_size)
        _choice("stop-after", self.stop_after, STAGES)
        if self.student not in family_names():
            raise ConfigError(f"--student {self.student!r}: choose one of {', '.join(family_names())}")
        _positive(batch_size=self.batch_size)
        if self.bf16 is None:  # emulated bf16 (an AVX2-only EPYC) distilled at 6 tokens/s
            object.__setattr__(self, "bf16", cpu_has_bf16())
        d = self.distill
        if d.bf16 != self.bf16 or d.seed != self.seed:  # the run's --bf16 and --seed hold for distillation too
            object.__setattr__(self, "distill", dataclasses.replace(d, bf16=self.bf16, seed=self.seed))
        if d.lr <= 0:
            raise ConfigError("--distill-lr must be positive")
        if d.kl_weight < 0 or d.ce_weight < 0 or not (d.kl_weight or d.ce_weight):
            raise ConfigError("--distill-kl-weight and --distill-ce-weight must be >= 0 and not both 0")
        if (d.steps is None and (not d.tokens or d.tokens < 1)) or d.seq_len is None:
            raise ConfigError("--distill-tokens (or --distill-steps) must be at least 1 and --distill-seq-len set")
        if "vocab" in self.prune.axes and d.teacher_top_k:
            raise ConfigError("--distill-teacher-top-k stores the teacher's top-k over its whole vocabulary; with "
                              "'vocab' in --axes use --distill-teacher-top-k 0")

    @property
    def target(self) -> TargetSize:
        return TargetSize.parse(self.target_size)

    @property
    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(self.teacher).name or self.teacher)
        return Path("runs") / f"{name}-{self.target_size}"

    def to_dict(self) -> dict[str, Any]:
        """The nested form, JSON-ready (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompressConfig:
        """A config from its nested form, the flat form of earlier runs (one key per flag), or a mix of both."""
        top = {f.name for f in dataclasses.fields(cls)} - set(SECTIONS)
        given: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        unknown = []
        for key, value in values.items():
            if key in SECTIONS and (isinstance(value, dict) or key not in FLAGS):  # "quant" is a flag too
                if not isinstance(value, dict):
                    raise ConfigError(f"config section {key!r} must be a mapping of its fields, got {value!r}")
                sections[key].update(value)
            elif key in top:
                given[key] = value
            elif key in FLAGS:
                section, name = FLAGS[key]
                sections[section][name] = value
            else:
                unknown.append(key)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(sorted(top | set(FLAGS) | set(SECTIONS)))}")
        distill = sections["distill"]
        if "eval_every" in distill and "checkpoint_every" not in distill:  # a checkpoint at every validation, as before
            distill["checkpoint_every"] = distill["eval_every"]
        defaults = cls()
        for name, (kind, _, _, _) in SECTIONS.items():
            if sections[name]:
                given[name] = _section(kind, name, getattr(defaults, name), sections[name])
        return cls(**given)

    def resolve_axes(self, embedding_share: float, trims_vocab: bool) -> CompressConfig:
        """This config with ``--axes auto`` made concrete for a teacher whose embedding is ``embedding_share`` of
        its parameters, for a family that can (``trims_vocab``) or cannot trim the vocabulary."""
        if self.prune.axes != ("auto",):
            return self
        vocab = trims_vocab and not self.distill.teacher_top_k and embedding_share > AUTO_VOCAB_SHARE
        axes = (*BLOCK_AXES, "vocab") if vocab else BLOCK_AXES
        return dataclasses.replace(self, prune=dataclasses.replace(self.prune, axes=axes))

    def training_sequences(self) -> int:
        """How many training sequences of ``distill.seq_len`` tokens the distillation budget reads."""
        d = self.distill
        budget = d.tokens if d.steps is None else d.steps * d.global_batch() * d.seq_len
        return math.ceil(budget / d.seq_len)

    def fingerprint(self, *paths: str) -> str:
        """A short hash of the named fields or sections (``"distill"``, ``"prune.axes"``): a stage's output is
        reused only if its fingerprint matches."""
        values = self.to_dict()

        def pick(path: str) -> Any:
            value: Any = values
            for part in path.split("."):
                value = value[part]
            return value

        blob = json.dumps({p: pick(p) for p in paths}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _section(kind: type, name: str, default: Any, values: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)} in config section {name!r}; known: {', '.join(sorted(known))}")
    if kind is DistillConfig and "hidden_pairs" in values:
        values = {**values, "hidden_pairs": tuple(tuple(p) for p in values["hidden_pairs"])}
    if kind is QuantConfig and "transforms" not in values:
        values = {**values, "transforms": None}  # the given recipe's default, not the default recipe's
    try:
        return dataclasses.replace(default, **values)
    except DistillError as error:  # the trainer's own checks, named by the flags a user gives
        raise ConfigError(f"distillation settings (--distill-*): {error}") from error
    except TypeError as error:
        raise ConfigError(f"config section {name!r}: {error}") from error


def _flags() -> dict[str, tuple[str, str]]:
    """Flag name (underscored) -> (section, field) for every section field that has a flag."""
    out = {}
    for section, (kind, prefix, renamed, hidden) in SECTIONS.items():
        for f in dataclasses.fields(kind):
            if f.name not in hidden:
                out[renamed.get(f.name, prefix + f.name)] = (section, f.name)
    return out


FLAGS = _flags()
