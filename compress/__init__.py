"""pdq-compress: prune, distill and quantize a teacher language model into a small NPU-ready student.

All at once, as the command line does: ``result = compress.run(teacher="smollm2-135m", target_size="0.67x")``.
Or the steps one by one on in-memory objects::

    model, tokenizer = compress.load_teacher("smollm2-135m")
    spec = compress.resolve(model)
    scores = compress.score_importance(model, spec, "activation", ids=calibration_ids)
    chosen = compress.plan(spec, model.config, scores, compress.TargetSize.parse("0.67x"))
    student = compress.apply_plan(model, spec, chosen)
    compress.distill(student, model, train_ids, compress.DistillConfig(tokens=200_000))
    lm = compress.prepare(student, seq_len=256, transforms=("rotate", "embed-rows"), calibration_ids=calib)
    prefill, decode = compress.export_graphs(lm, "onnx/")
    graphs = compress.quantize_graphs(lm, "onnx/", compress.PRESETS["a16w8"], compress.get_profile("qnn-htp"), calib)
    # int4 weights: GPTQ, then quantization-aware training on training text (w4a16 is for MatMul linears: conv=False)
    graphs = compress.quantize_graphs(lm, "onnx/", compress.PRESETS["w4a16"], compress.get_profile("qnn-htp"), calib,
                                      qat=compress.QatSettings(train_ids, lr=1e-4))
    compress.quality(student, valid_ids).perplexity
    compress.finetune(compress.FinetuneConfig(student="runs/demo/student", data="task.jsonl", out="runs/demo/task"))
"""

from compress.app.finetune import FinetuneConfig, finetune
from compress.app.pipeline import CompressResult, StageMetrics, run
from compress.app.report import write_report
from compress.core.config import CompressConfig, TargetSize
from compress.errors import (
    CompressError,
    ConfigError,
    DataError,
    PlanInfeasibleError,
    RunDirectoryError,
    TeacherNotFoundError,
    UnsupportedArchitectureError,
)
from compress.evaluation.quality import PairQuality, Quality, pair_quality, perplexity, quality
from compress.families import StudentFamily, family_names, get_family
from compress.families import register as register_family
from compress.models import register as register_students
from compress.pruning.archspec import ArchSpec, Shape, resolve
from compress.pruning.families import FamilySpec, register
from compress.pruning.planner import PruningPlan, keep_all_plan, plan
from compress.pruning.scoring import score_importance
from compress.pruning.surgery import apply_plan, save_checkpoint
from compress.sources.data import load_corpus, load_pairs, pair_batches, token_batches
from compress.sources.teachers import load_teacher
from distill import DistillConfig, DistillResult, Pairs, distill
from quant.profiles import NpuProfile, get_profile
from quant.quantize import PRESETS, QuantRecipe

# The export and quantization steps load onnx, onnxscript and onnxruntime (about a second): only on first use.
_LAZY = {name: "compress.deploy.quantization" for name in ("QatSettings", "export_graphs", "measure", "prepare",
                                                          "quantize_graphs")}
# The student families' modeling code costs seconds of import; their classes load on first use too.
_LAZY |= {name: "compress.models.mobilellm" for name in ("MobileLLMConfig", "MobileLLMForCausalLM", "share_blocks",
                                                  "unique_parameters", "unshare")}
_LAZY |= {name: "compress.models.mu" for name in ("MuConfig", "MuForConditionalGeneration")}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


__all__ = [
    "ArchSpec",
    "CompressConfig",
    "CompressError",
    "CompressResult",
    "ConfigError",
    "DataError",
    "DistillConfig",
    "DistillResult",
    "FinetuneConfig",
    "FamilySpec",
    "MobileLLMConfig",
    "MobileLLMForCausalLM",
    "MuConfig",
    "MuForConditionalGeneration",
    "NpuProfile",
    "PairQuality",
    "Pairs",
    "PlanInfeasibleError",
    "PRESETS",
    "PruningPlan",
    "Quality",
    "QatSettings",
    "QuantRecipe",
    "RunDirectoryError",
    "Shape",
    "StageMetrics",
    "StudentFamily",
    "TargetSize",
    "TeacherNotFoundError",
    "UnsupportedArchitectureError",
    "apply_plan",
    "distill",
    "export_graphs",
    "family_names",
    "finetune",
    "get_family",
    "get_profile",
    "keep_all_plan",
    "load_corpus",
    "load_pairs",
    "load_teacher",
    "measure",
    "pair_batches",
    "pair_quality",
    "perplexity",
    "plan",
    "prepare",
    "quality",
    "quantize_graphs",
    "register",
    "register_family",
    "register_students",
    "resolve",
    "run",
    "save_checkpoint",
    "score_importance",
    "share_blocks",
    "token_batches",
    "unique_parameters",
    "unshare",
    "write_report",
]
