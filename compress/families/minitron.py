"""The Minitron-like family (the teacher pruned by importance, then distilled) and the MobileLLM-like one (the
same, deep and thin, each kept block applied twice): their plan, prune, export and quantize stages.

plan: :func:`compress.pruning.planner.plan` picks the NPU-aligned shape nearest the target from the importance scores
(with the loss proxy on calibration sequences); prune: :func:`compress.pruning.surgery.apply_plan` slices the teacher;
export / quantize: static-shape prefill and decode graphs (:mod:`compress.deploy.quantization`), measured on every
evaluation set.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.core.config import AUTO_VOCAB_SHARE
from compress.core.family import StudentFamily, register
from compress.core.state import (
    GRAPH_HELD_OUT_SEQUENCES,
    Reference,
    RunState,
    final_model,
    folder_mb,
    per_teacher_agreement,
    per_teacher_token,
)
from compress.evaluation.quality import mean_nll
from compress.pruning.planner import PruningPlan, plan
from compress.pruning.scoring import check_scores
from compress.pruning.surgery import apply_plan, prune, save_checkpoint
from compress.pruning.vocab import trim_refusal
from importance import ImportanceScores

log = logging.getLogger(__name__)

# Calibration sequences the planner's loss proxy runs each candidate on (16 x calib_seq_len tokens).
_PROXY_SEQUENCES = 16


def _prepared(state: RunState) -> tuple[Path, Any, torch.Tensor]:
    from compress.deploy.quantization import prepare
    from quant.profiles import get_profile
    from quant.quantize import PRESETS

    c = state.config
    source, model = final_model(state)
    calib = state.ids("calibration", c.quant.seq_len, c.quant.calib_samples)
    if state.vocab_map is not None:
        calib = state.vocab_map.student_ids(calib)  # the plan kept every calibration token
    profile = get_profile(c.quant.npu_profile)
    conv = PRESETS[c.quant.recipe].linears_as_conv(profile) if c.quant.recipe in PRESETS else profile.linear_as_conv
    return source, prepare(model, c.quant.seq_len, c.quant.transforms, calib, seed=c.seed, conv=conv,
                           separate_head=profile.weight_only), calib


def _per_teacher_token(metrics: dict[str, Any], references: dict[str, Reference], agreement: bool = True,
                       decode_samples: int = 4) -> dict[str, Any]:
    """A trimmed-vocabulary student's graph figures per teacher token (see ``RunState.student_references``):
    perplexities, and agreements with the teacher when ``agreement`` (not those with the float graph)."""
    valid = references["validation"]
    if valid.converted is None:
        return metrics
    scale = valid.nll_scale()
    metrics["perplexity"] = per_teacher_token(metrics["perplexity"], scale)
    metrics["validation_tokens"] = valid.teacher_tokens()
    if agreement:
        metrics["agreement"] = per_teacher_agreement(metrics["agreement"], scale)
    if "decode_perplexity" in metrics:
        half = valid.nll_scale(decode_samples)  # the decode rows' second halves, approximately
        metrics["decode_perplexity"] = per_teacher_token(metrics["decode_perplexity"], half)
        if agreement and "decode_agreement" in metrics:
            metrics["decode_agreement"] = per_teacher_agreement(metrics["decode_agreement"], half)
    for name, measured in metrics.get("evals", {}).items():
        rows = min(GRAPH_HELD_OUT_SEQUENCES, len(references[name].ids))
        scale = references[name].nll_scale(rows)
        measured["perplexity"] = per_teacher_token(measured["perplexity"], scale)
        measured["agreement"] = per_teacher_agreement(measured["agreement"], scale)
        measured["tokens"] = references[name].teacher_tokens(rows)
    return metrics


def _graph_sets(references: dict[str, Reference]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The evaluation sets other than the in-domain one, for the graphs (agreement with the teacher's top-1)."""
    n = GRAPH_HELD_OUT_SEQUENCES
    return {k: (r.ids[:n].numpy(), r.teacher_top1[:n].numpy()) for k, r in references.items() if k != "validation"}


class Minitron(StudentFamily):
    """The teacher pruned by importance (Minitron-style), then distilled."""

    name = "minitron"
    description = "the teacher pruned by importance along heads, hidden channels, MLP neurons and layers"
    block_repeats = 1  # how many times in a row each kept block is applied
    calibration_hint = "other `--quant-transforms` or more `--quant-calib-samples`"
    trims_vocab = True

    def check_teacher(self, teacher_config: Any, config: Any) -> None:
        from compress.core.config import STAGES
        from compress.deploy.decoder import check_exportable

        # A run that ends before the export may prune any registered family (BERT included).
        if STAGES.index(config.stop_after) >= STAGES.index("export"):
            check_exportable(teacher_config)

    def plan(self, state: RunState) -> dict[str, Any]:
        c = state.config
        scores = ImportanceScores.load(state.dir / "scores.safetensors")
        check_scores(scores, state.spec)
        calib = state.ids("calibration", c.prune.calib_seq_len, _PROXY_SEQUENCES) if c.prune.proxy == "loss" else None
        teacher, spec = state.teacher, state.spec
        vocab_floor = None
        if "vocab" in c.prune.axes:
            scores.scores["vocab"], vocab_floor = state.vocab_importance()
        elif (share := spec.embedding_share()) > AUTO_VOCAB_SHARE and trim_refusal(state.tokenizer) is None:
            log.warning("the embedding is %.0f%% of the teacher's parameters: adding 'vocab' to --axes (or --axes auto, "
                        "the default) would drop the tokens the training data never uses instead of cutting the blocks "
                        "(docs/prune.md)", 100 * share)

        repeats = self.block_repeats

        def evaluate(kept: dict[str, list[int]], shape: Any) -> float:
            candidate = prune(teacher, spec, shape, kept)
            if repeats > 1:
                from compress.models.mobilellm import share_blocks

                candidate = share_blocks(candidate, repeats)
            ids = calib
            if shape.vocab is not None:
                from compress.pruning.vocab import kept_ids

                ids = kept_ids(calib, kept["vocab"], spec.vocab)
            return mean_nll(candidate, ids, batch_size=c.batch_size, bf16=c.bf16)

        chosen = plan(
            spec,
            teacher.config,
            scores,
            c.target,
            axes=c.prune.axes,
            align=c.prune.align,
            tolerance=c.prune.tolerance,
            proxy=c.prune.proxy,
            search_candidates=c.prune.search_candidates,
            evaluate=evaluate if spec.causal_lm and c.prune.proxy == "loss" else None,
            repeats=repeats,
            vocab_floor=vocab_floor,
        )
        chosen.save(state.dir / "plan.json")
        return {
            "shape": chosen.shape.to_dict(),
            "params": chosen.params,
            "teacher_params": chosen.teacher_params,
            "target_params": chosen.target_params,
            "candidates": len(chosen.candidates),
            "reason": chosen.reason,
            **({"vocab_floor": vocab_floor, "vocab": chosen.shape.vocab or spec.vocab, "teacher_vocab": spec.vocab}
               if vocab_floor is not None else {}),
        }

    def prune(self, state: RunState) -> dict[str, Any]:
        c = state.config
        chosen = PruningPlan.load(state.dir / "plan.json")
        student = apply_plan(state.teacher, state.spec, chosen)
        vocab_map = state.vocab_map
        save_checkpoint(student, vocab_map.tokenizer if vocab_map is not None else state.tokenizer, state.dir / "pruned")
        metrics: dict[str, Any] = {"params": chosen.params, "teacher_params": chosen.teacher_params,
                                   "pruned_mb": folder_mb(state.dir / "pruned")}
        if state.spec.causal_lm:
            evals = state.evals(student, c.eval.seq_len)
            valid = evals["validation"]
            metrics.update(
                teacher_perplexity=valid["teacher_perplexity"],
                pruned_perplexity=valid["perplexity"],
                pruned_agreement=valid["agreement"],
                validation_tokens=valid["tokens"],
                validation_seq_len=c.eval.seq_len,
                evals=evals,
            )
        return metrics

    def generation_graphs(self, model: Any, folder: Path, prompt_tokens: int, new_tokens: int, calib: Any,
                          recipe: Any, profile: Any, decode_calib_tokens: int) -> dict[str, dict[str, Path]]:
        from compress.core.config import DEFAULT_TRANSFORMS
        from compress.deploy.quantization import export_graphs, prepare, quantize_graphs

        # The cache holds the prompt and every generated token; the prefill graph reads the prompt only.
        lm = prepare(model, prompt_tokens + new_tokens, DEFAULT_TRANSFORMS[recipe.name], torch.as_tensor(calib),
                     conv=recipe.linears_as_conv(profile), separate_head=profile.weight_only)
        export_graphs(lm, folder, prefill_length=prompt_tokens)
        quantize_graphs(lm, folder, recipe, profile, calib, decode_calib_tokens=decode_calib_tokens)
        return {kind: {"float": folder / f"{name}.onnx", "quantized": folder / f"{name}.{recipe.name}.onnx"}
                for kind, name in (("first", "model"), ("step", "decode"))}

    def begin_generation(self, first: Any, step: Any, prompt: list[int], model_config: Any) -> tuple[Any, Any]:
        from quant.runtime import DecodeCache

        cache = DecodeCache(step)
        return cache, cache.prefill(first, prompt)

    def export(self, state: RunState) -> dict[str, Any]:
        from safetensors.numpy import save_file

        from compress.deploy.quantization import export_graphs, measure
        from quant import runtime

        c = state.config
        source, lm, _ = _prepared(state)
        folder = state.dir / "onnx"
        shutil.rmtree(folder, ignore_errors=True)  # graphs of other settings (and their quantized copies) go
        prefill, decode = export_graphs(lm, folder)
        references = state.student_references(c.quant.seq_len)
        reference = references["validation"]
        valid = reference.ids
        with torch.no_grad():
            expected = lm.prefill(valid[:1])[0].numpy()
        got = runtime.prefill_logits(runtime.session(prefill), valid[:1].numpy())
        metrics, top1 = measure(prefill, decode, valid.numpy(), reference.teacher_top1.numpy(), progress=state.progress,
                                others=_graph_sets(references))
        metrics = _per_teacher_token(metrics, references)
        save_file({"top1": top1}, str(folder / "model.top1.safetensors"))  # the reference of the integer graphs
        return {"source": str(source), "seq_len": c.quant.seq_len, "transforms": list(lm.transforms),
                "max_abs_diff_vs_torch": float(np.abs(got - expected).max()), "teacher_perplexity": reference.teacher.perplexity,
                "fp32": metrics}

    def quantize(self, state: RunState) -> dict[str, Any]:
        from safetensors.numpy import load_file

        from compress.deploy.htp import compile_graphs, emulate
        from compress.deploy.quantization import FREQUENCY_TOKENS, QatSettings, measure, quantize_graphs
        from quant.profiles import get_profile

        c = state.config
        _, lm, calib = _prepared(state)
        folder = state.dir / "onnx"
        references = state.student_references(c.quant.seq_len)
        reference = references["validation"]
        float_top1 = load_file(str(folder / "model.top1.safetensors"))["top1"]
        profile = get_profile(c.quant.npu_profile)
        gptq_ids = state.ids("calibration", c.quant.seq_len, c.quant.gptq_samples)
        recipe = c.quant.recipe_used()
        # The tokens whose table rows stay int8 (a recipe's embedding_wide_rows): the most frequent in training text.
        counted = state.ids("train", c.quant.seq_len, FREQUENCY_TOKENS // c.quant.seq_len) if recipe.embedding_wide_rows else None
        qat_ids = state.ids("train", c.quant.seq_len, -(-c.quant.qat_tokens // c.quant.seq_len)) if c.quant.qat_tokens else None
        if state.vocab_map is not None:  # a token the trimmed vocabulary lost is spelled by those it kept
            gptq_ids, counted, qat_ids = (None if t is None else state.vocab_map.convert(t).ids
                                          for t in (gptq_ids, counted, qat_ids))
        qat = None if qat_ids is None else QatSettings(qat_ids.numpy(), c.quant.qat_lr, c.quant.qat_unit_lr,
                                                       c.quant.qat_table_lr)
        graphs = quantize_graphs(lm, folder, recipe, profile, calib.numpy(),
                                 decode_calib_tokens=c.quant.decode_calib_tokens, progress=state.progress, qat=qat,
                                 gptq_ids=gptq_ids.numpy(), frequency_ids=counted.numpy() if counted is not None else None)
        metrics, top1 = measure(graphs.prefill, graphs.decode, reference.ids.numpy(), float_top1, progress=state.progress,
                                others=_graph_sets(references))
        metrics["agreement_with_float"] = metrics.pop("agreement")
        if "decode_agreement" in metrics:
            metrics["decode_agreement_with_float"] = metrics.pop("decode_agreement")
        metrics["agreement"] = float((top1 == reference.teacher_top1.numpy()).mean())
        metrics = _per_teacher_token(metrics, references, agreement=False)
        metrics["agreement"] = per_teacher_agreement(metrics["agreement"], reference.nll_scale())
        violations = graphs.violations["prefill"] + graphs.violations["decode"]
        if violations:
            log.warning("%d violations of the %s profile; see `compress inspect %s --npu-profile %s`",
                        len(violations), c.quant.npu_profile, graphs.prefill, c.quant.npu_profile)
        htp = compile_graphs({"prefill": graphs.prefill, "decode": graphs.decode}, profile, c.quant.soc_model)
        if htp.get("graphs", {}).get("prefill", {}).get("whole"):
            htp["emulated"] = emulate(graphs.prefill, reference.ids.numpy(), c.quant.soc_model, c.quant.htp_eval_samples)
        return {"quant": c.quant.recipe, "npu_profile": c.quant.npu_profile, c.quant.recipe: metrics, "violations": violations,
                "reports": {k: v.to_dict() for k, v in graphs.reports.items()}, "htp": htp,
                **({"qat": graphs.qat} if graphs.qat else {})}


class MobileLLM(Minitron):
    """Deep and thin: the pruned teacher's kept blocks each applied twice (MobileLLM's block-wise weight sharing)."""

    name = "mobilellm"
    description = "the pruned teacher, deep and thin, each kept block applied twice (block-wise weight sharing)"
    block_repeats = 2
    model_types = ("pdq_mobilellm",)  # compress.models.mobilellm.MobileLLMConfig.model_type

    def check_teacher(self, teacher_config: Any, config: Any) -> None:
        from compress.models.mobilellm import check_shareable

        check_shareable(teacher_config)
        super().check_teacher(teacher_config, config)


register(Minitron())
register(MobileLLM())
