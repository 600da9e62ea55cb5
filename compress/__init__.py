"""pdq-compress: prune, distill and quantize a teacher language model into a small NPU-ready student.

The steps, usable one by one on in-memory objects::

    model, tokenizer = compress.load_teacher("smollm2-135m")
    spec = compress.resolve(model)
    scores = compress.score_importance(model, spec, "activation", ids=calibration_ids)
    chosen = compress.plan(spec, model.config, scores, compress.TargetSize.parse("0.67x"))
    student = compress.apply_plan(model, spec, chosen)

or all at once: ``compress.run(compress.CompressConfig(teacher=..., target_size=...))``.
"""

from compress.archspec import ArchSpec, FamilySpec, Shape, register, resolve
from compress.config import CompressConfig, TargetSize
from compress.data import load_corpus, token_batches
from compress.errors import (
    CompressError,
    ConfigError,
    DataError,
    PlanInfeasibleError,
    RunDirectoryError,
    TeacherNotFoundError,
    UnsupportedArchitectureError,
)
from compress.evaluate import perplexity
from compress.pipeline import CompressResult, StageMetrics, run
from compress.planner import PruningPlan, keep_all_plan, plan
from compress.scoring import score_importance
from compress.surgery import apply_plan, save_checkpoint
from compress.teachers import load_teacher

__all__ = [
    "ArchSpec",
    "CompressConfig",
    "CompressError",
    "CompressResult",
    "ConfigError",
    "DataError",
    "FamilySpec",
    "PlanInfeasibleError",
    "PruningPlan",
    "RunDirectoryError",
    "Shape",
    "StageMetrics",
    "TargetSize",
    "TeacherNotFoundError",
    "UnsupportedArchitectureError",
    "apply_plan",
    "keep_all_plan",
    "load_corpus",
    "load_teacher",
    "perplexity",
    "plan",
    "register",
    "resolve",
    "run",
    "save_checkpoint",
    "score_importance",
    "token_batches",
]
