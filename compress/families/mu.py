"""The Mu-like family (``--student mu``): a small encoder-decoder (:mod:`compress.models.mu`) initialized from the
teacher instead of a pruned teacher, and its stages.

- plan: :func:`compress.models.mu.mu_config` sizes the student for the target (aligned widths, about two thirds
  of the layer parameters in the encoder) with the teacher's vocabulary and RoPE base; ``plan.json`` holds
  its config (``family: "mu"``).
- prune: :func:`compress.families.mu_init.mu_from_teacher` initializes it from the teacher (``pruned/``).
- distill: the shared distillation stage, across architectures (see :mod:`distill.trainer`).
- export / quantize: ``onnx/encoder.onnx`` and ``onnx/decoder.onnx`` (+ ``.<quant>.onnx``), see
  :mod:`compress.deploy.mu_export`.

An encoder-decoder is scored on continuations: the encoder (or, for the teacher, the context) reads the
first half of each validation sequence, and perplexity and top-1 agreement are taken on the second half.
Every row of a Mu run's report, the teacher's included, is measured that way on the same tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.core.family import StudentFamily, register
from compress.core.state import GRAPH_HELD_OUT_SEQUENCES, final_model, folder_mb
from compress.errors import PlanInfeasibleError
from compress.evaluation.quality import ENCODER_DECODER, continuation_quality
from compress.io import read_json, write_json
from distill.students import EncoderDecoderStudent

log = logging.getLogger(__name__)

ENCODER, DECODER = "encoder.onnx", "decoder.onnx"


def cut_of(length: int) -> int:
    """Where validation sequences of ``length`` tokens are split into prefix and continuation."""
    return length // 2


def _mu_config(state: Any) -> Any:
    from compress.models.mu import MuConfig

    return MuConfig.from_dict(read_json(state.dir / "plan.json")["mu_config"])


def student_config(teacher: Any, tokenizer: Any, spec: Any, target: int, align: int) -> Any:
    """The Mu config for ``target`` parameters that :func:`compress.families.mu_init.mu_from_teacher` can fill from
    ``teacher``: its vocabulary, tokens, head size, GQA group size and RoPE base, within its widths and depth."""
    from compress.families.mu_init import teacher_rope
    from compress.models.mu import mu_config

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0}
    try:
        return mu_config(teacher.config.vocab_size, target, align=align, head_dim=spec.head_dim,
                         heads_per_kv=spec.group_size, max_hidden=spec.hidden, max_mlp=spec.mlp,
                         max_layers=spec.num_layers, rope_theta=teacher_rope(teacher.config)["rope_theta"],
                         max_position_embeddings=int(getattr(teacher.config, "max_position_embeddings", 2048)), **special)
    except ValueError as error:
        raise PlanInfeasibleError(f"--student mu: {error} (the student is initialized from the teacher, so it must "
                                  "also fit within the teacher's widths and depth)") from error


def plan_stage(state: Any) -> dict[str, Any]:
    from compress.models.mu import MuForConditionalGeneration

    c, teacher = state.config, state.teacher
    teacher_params = sum(p.numel() for p in teacher.parameters())
    target = c.target.params_for(teacher_params)
    config = student_config(teacher, state.tokenizer, state.spec, target, c.prune.align)
    with torch.device("meta"):
        params = sum(p.numel() for p in MuForConditionalGeneration(config).parameters())
    shape = {"hidden": config.hidden_size, "mlp": config.intermediate_size, "kv_heads": config.num_key_value_heads,
             "heads_per_group": config.num_attention_heads // config.num_key_value_heads,
             "encoder_layers": config.encoder_layers, "decoder_layers": config.decoder_layers}
    reason = (f"the widest Mu-like shape (hidden multiple of {c.prune.align}, at least 3 decoder layers, about 2/3 of the "
              f"layer parameters in the encoder) within {target / 1e6:.1f}M: {params / 1e6:.1f}M "
              f"({params / teacher_params:.2f}x the teacher)")
    write_json(state.dir / "plan.json", {"version": 1, "family": "mu", "shape": shape, "params": params,
                                         "teacher_params": teacher_params, "target_params": target, "reason": reason,
                                         "candidates": [], "mu_config": config.to_dict()})
    return {"shape": shape, "params": params, "teacher_params": teacher_params, "target_params": target,
            "candidates": 0, "reason": reason}


def _continuation(state: Any, model: Any, reference: Any, name: str = "validation") -> tuple[Any, Any]:
    """A model's continuation quality on one evaluation set's sequences, agreement with the teacher's."""
    cut = cut_of(reference.ids.shape[1])
    teacher_cont = teacher_continuation(state, reference, name)
    return continuation_quality(model, reference.ids, cut, state.config.batch_size, teacher_cont["top1"],
                                reader=ENCODER_DECODER)[0], teacher_cont


def teacher_continuation(state: Any, reference: Any, name: str = "validation") -> dict[str, Any]:
    """The teacher's continuation perplexity and top-1 on one evaluation set's sequences (computed once per run)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    stem = "validation" if name == "validation" else f"eval.{name}"
    path = state.dir / f"{stem}.{reference.ids.shape[1]}.continuation.safetensors"
    cut = cut_of(reference.ids.shape[1])
    if path.exists():
        with safe_open(str(path), "pt") as handle:
            same_teacher = (handle.metadata() or {}).get("teacher") == state.teacher_fingerprint
        stored = load_file(str(path))
        if same_teacher and torch.equal(stored["ids"], reference.ids) and int(stored["cut"]) == cut:
            return {"top1": stored["top1"], "perplexity": float(stored["perplexity"]), "tokens": int(stored["top1"].numel())}
    measured, top1 = continuation_quality(state.teacher, reference.ids, cut, state.config.batch_size)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"ids": reference.ids.contiguous(), "top1": top1.contiguous(), "cut": torch.tensor(cut),
               "perplexity": torch.tensor(measured.perplexity, dtype=torch.float64)}, str(tmp),
              metadata={"teacher": state.teacher_fingerprint})
    tmp.replace(path)
    return {"top1": top1, "perplexity": measured.perplexity, "tokens": measured.tokens}


def prune_stage(state: Any) -> dict[str, Any]:
    from compress.families.mu_init import mu_from_teacher
    from compress.pruning.surgery import save_checkpoint
    from importance import ImportanceScores

    c = state.config
    plan = read_json(state.dir / "plan.json")
    scores = ImportanceScores.load(state.dir / "scores.safetensors")
    calib = state.ids("calibration", c.prune.calib_seq_len, min(c.prune.calib_samples, 16))
    student = mu_from_teacher(state.teacher, state.spec, scores, _mu_config(state), calib, batch_size=c.batch_size)
    save_checkpoint(student, state.tokenizer, state.dir / "pruned")
    references = state.references(c.eval.seq_len)
    evals = {}
    for name, reference in references.items():
        scored, teacher = _continuation(state, student, reference, name)
        evals[name] = {"perplexity": scored.perplexity, "agreement": scored.agreement, "tokens": scored.tokens,
                       "teacher_perplexity": teacher["perplexity"]}
    valid = evals["validation"]
    return {"params": plan["params"], "teacher_params": plan["teacher_params"], "pruned_mb": folder_mb(state.dir / "pruned"),
            "metric": "continuation", "continuation_cut": cut_of(references["validation"].ids.shape[1]),
            "teacher_perplexity": valid["teacher_perplexity"], "pruned_perplexity": valid["perplexity"],
            "pruned_agreement": valid["agreement"], "validation_tokens": valid["tokens"],
            "validation_seq_len": int(references["validation"].ids.shape[1]), "evals": evals}


def _forced_logits(encoder: Any, decoder: Any, row: np.ndarray, cut: int, start_token: int) -> np.ndarray:
    """Logits predicting ``row[cut:]``: the encoder graph reads ``row[:cut]``, the decoder step graph is fed the
    start token and then the continuation one token at a time (teacher forcing)."""
    from compress.deploy.mu_export import decoder_cache, encoder_feed

    cache = decoder_cache(encoder, decoder, encoder_feed(encoder, row[:cut]))
    return np.stack([cache.step(t) for t in [start_token, *(int(t) for t in row[cut:-1])]])


def _speed(encoder: Any, decoder: Any, prompt: list[int], new_tokens: int, start_token: int) -> dict[str, float]:
    """Median first-token latency (encoder + first decoder step) and decode tokens/s of greedy generation."""
    from compress.deploy.mu_export import generate

    firsts = []
    for _ in range(5):
        started = time.perf_counter()
        generate(encoder, decoder, prompt, 1, start_token)
        firsts.append(time.perf_counter() - started)
    first = statistics.median(firsts)
    started = time.perf_counter()
    generate(encoder, decoder, prompt, new_tokens + 1, start_token)
    per_token = (time.perf_counter() - started - first) / new_tokens
    return {"first_token_latency_ms": first * 1000, "decode_tokens_per_second": 1.0 / per_token}


def _graph_continuations(encoder: Any, decoder: Any, ids: np.ndarray, start_token: int,
                         reference_top1: np.ndarray | None) -> tuple[dict[str, Any], np.ndarray]:
    """Continuation perplexity, agreement with ``reference_top1`` and tokens of a Mu graph pair on ``ids``, and
    its top-1 predictions."""
    cut = cut_of(ids.shape[1])
    total, top1 = 0.0, []
    for row in ids:
        logits = _forced_logits(encoder, decoder, row, cut, start_token).astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        total -= float(logp[np.arange(len(logits)), row[cut:]].sum())
        top1.append(logits.argmax(-1))
    predictions = np.stack(top1)
    scored = {"perplexity": float(np.exp(min(total / predictions.size, 700.0))), "tokens": int(predictions.size),
              "agreement": None if reference_top1 is None else float((predictions == reference_top1).mean())}
    return scored, predictions


def measure_graphs(folder: Path, encoder_name: str, decoder_name: str, ids: np.ndarray, start_token: int,
                   reference_top1: np.ndarray | None, new_tokens: int = 64,
                   others: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Continuation perplexity and agreement with ``reference_top1`` [n, L - cut], sizes, first-token latency
    and decode speed of a Mu graph pair, and the graphs' top-1 predictions. The keys follow the decoder-only
    graphs' metrics (``prefill_*`` is the encoder's side) so one report reads both. ``others`` (name ->
    sequences and the teacher's continuation top-1) are more evaluation sets, scored into ``evals``."""
    from quant import runtime

    encoder, decoder = runtime.session(folder / encoder_name), runtime.session(folder / decoder_name)
    cut = cut_of(ids.shape[1])
    scored, predictions = _graph_continuations(encoder, decoder, ids, start_token, reference_top1)
    evals = {name: _graph_continuations(encoder, decoder, rows, start_token, top1)[0]
             for name, (rows, top1) in (others or {}).items()}
    prompt = [int(t) for t in ids[0, : min(128, cut)]]
    speed = _speed(encoder, decoder, prompt, new_tokens, start_token)
    metrics = {"perplexity": scored["perplexity"], "validation_tokens": scored["tokens"], "agreement": scored["agreement"],
               "path": f"onnx/{encoder_name}", "decode_path": f"onnx/{decoder_name}",
               "prefill_mb": (folder / encoder_name).stat().st_size / 1e6,
               "decode_mb": (folder / decoder_name).stat().st_size / 1e6,
               "total_mb": sum((folder / name).stat().st_size for name in (encoder_name, decoder_name)) / 1e6,
               "prefill_latency_ms": speed["first_token_latency_ms"], **speed, "metric": "continuation",
               "continuation_cut": cut, "first_token_prompt_tokens": len(prompt), "decode_new_tokens": new_tokens}
    if evals:
        metrics["evals"] = evals
    return metrics, predictions


def _held_out(state: Any, seq_len: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The held-out evaluation sets for the graphs: their first sequences and the teacher's continuation top-1."""
    n = GRAPH_HELD_OUT_SEQUENCES
    return {name: (reference.ids[:n].numpy(), teacher_continuation(state, reference, name)["top1"][:n].numpy())
            for name, reference in state.references(seq_len).items() if name != "validation"}


def export_stage(state: Any) -> dict[str, Any]:
    from safetensors.numpy import save_file

    from compress.deploy.mu_export import write_mu_graphs
    from quant import runtime

    c = state.config
    source, model = final_model(state)
    folder = state.dir / "onnx"
    shutil.rmtree(folder, ignore_errors=True)
    write_mu_graphs(model, folder, length=c.quant.seq_len, capacity=c.quant.seq_len)
    reference = state.validation(c.quant.seq_len)
    ids = reference.ids.numpy()
    cut, start = cut_of(ids.shape[1]), model.config.decoder_start_token_id
    teacher = teacher_continuation(state, reference)
    metrics, top1 = measure_graphs(folder, ENCODER, DECODER, ids, start, teacher["top1"].numpy(),
                                   others=_held_out(state, c.quant.seq_len))
    save_file({"top1": top1}, str(folder / "continuation.top1.safetensors"))  # the reference of the integer graphs
    got = _forced_logits(runtime.session(folder / ENCODER), runtime.session(folder / DECODER), ids[0], cut, start)
    with torch.no_grad():
        expected = ENCODER_DECODER.continuation_logits(model, reference.ids[:1], cut)[0].numpy()
    return {"source": str(source), "seq_len": c.quant.seq_len, "transforms": [], "student": "mu",
            "max_abs_diff_vs_torch": float(np.abs(got - expected).max()), "teacher_perplexity": teacher["perplexity"],
            "fp32": metrics}


def calibration_feeds(encoder: Any, decoder: Any, ids: np.ndarray, start_token: int,
                      decoder_tokens: int) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Encoder feeds (each calibration sequence cut at a quarter, a half or three quarters, as distillation
    cuts them) and about ``decoder_tokens`` decoder feeds from teacher-forced steps over the continuations."""
    from compress.deploy.mu_export import decoder_cache, encoder_feed

    encoder_feeds, decoder_feeds = [], []
    per_sequence = max(1, -(-decoder_tokens // max(1, len(ids))))
    for n, row in enumerate(ids):
        cut = max(1, min(len(row) - 1, (len(row) * (1 + n % 3)) // 4))
        feed = encoder_feed(encoder, row[:cut])
        encoder_feeds.append(feed)
        cache = decoder_cache(encoder, decoder, feed, record=decoder_feeds)
        for token in [start_token, *(int(t) for t in row[cut:-1])][:per_sequence]:
            cache.step(token)
    return encoder_feeds, decoder_feeds


def quantize_stage(state: Any) -> dict[str, Any]:
    import onnx
    from safetensors.numpy import load_file

    from compress.deploy.groups import quantize_graph
    from compress.deploy.htp import compile_graphs
    from quant import runtime
    from quant.profiles import check, get_profile
    from quant.quantize import PRESETS

    c = state.config
    folder = state.dir / "onnx"
    _, model = final_model(state)
    start = model.config.decoder_start_token_id
    calib = state.ids("calibration", c.quant.seq_len, c.quant.calib_samples).numpy()
    encoder_feeds, decoder_feeds = calibration_feeds(runtime.session(folder / ENCODER), runtime.session(folder / DECODER),
                                                     calib, start, c.quant.decode_calib_tokens)
    # GPTQ rounding (the recipes' default) is built for the decoder-only export (compress.deploy.gptq); Mu's graphs
    # round each weight to its nearest step, and the report says so.
    profile, recipe = get_profile(c.quant.npu_profile), dataclasses.replace(PRESETS[c.quant.recipe], weight_rounding="nearest")
    names = {"encoder": f"encoder.{c.quant.recipe}.onnx", "decoder": f"decoder.{c.quant.recipe}.onnx"}
    reports = {part: quantize_graph(folder / (ENCODER if part == "encoder" else DECODER), folder / name,
                              encoder_feeds if part == "encoder" else decoder_feeds, recipe, profile, state.progress)
               for part, name in names.items()}
    violations = [str(v) for name in names.values() for v in check(onnx.load(folder / name), profile)]
    reference = state.validation(c.quant.seq_len)
    float_top1 = load_file(str(folder / "continuation.top1.safetensors"))["top1"]
    metrics, top1 = measure_graphs(folder, names["encoder"], names["decoder"], reference.ids.numpy(), start, float_top1,
                                   others=_held_out(state, c.quant.seq_len))
    metrics["agreement_with_float"] = metrics.pop("agreement")
    metrics["agreement"] = float((top1 == teacher_continuation(state, reference)["top1"].numpy()).mean())
    if violations:
        log.warning("%d violations of the %s profile; see `compress inspect %s --npu-profile %s`",
                    len(violations), c.quant.npu_profile, folder / names["encoder"], c.quant.npu_profile)
    # Compiled, not emulated: the emulator's accuracy check runs a decoder-only prefill graph.
    htp = compile_graphs({part: folder / name for part, name in names.items()}, profile, c.quant.soc_model)
    return {"quant": c.quant.recipe, "npu_profile": c.quant.npu_profile, c.quant.recipe: metrics, "violations": violations,
            "reports": {k: v.to_dict() for k, v in reports.items()}, "student": "mu", "htp": htp}


class Mu(StudentFamily):
    """A Mu-like encoder-decoder initialized from the pruned teacher, distilled across architectures."""

    name = "mu"
    description = "a Mu-like encoder-decoder initialized from the teacher and distilled across architectures"
    prunes_teacher = False  # it is sized by compress.models.mu.mu_config, not by pruning the teacher's shape
    calibration_hint = "more `--quant-calib-samples` or `--quant-decode-calib-tokens`"  # no float rewrites for Mu yet
    model_types = ("pdq_mu",)  # compress.models.mu.MuConfig.model_type (its import costs seconds)
    auto_class = "AutoModelForSeq2SeqLM"
    student_io = EncoderDecoderStudent()
    reader = ENCODER_DECODER
    weight_only_graphs = False  # its encoder and decoder graphs have no weight-only (ort-cpu) form yet
    block_graphs = False  # nor LPBQ int4 blocks (w4a16): GPTQ rounds the decoder-only export's linears only

    def score_set(self, model: Any, ids: torch.Tensor, top1: torch.Tensor | None, batch_size: int) -> tuple[float | None, float]:
        """Scored on continuations after :func:`cut_of`, like every row of a Mu-like run."""
        cut = cut_of(ids.shape[1])
        scored, _ = continuation_quality(model, ids, cut, batch_size, None if top1 is None else top1[:, cut - 1 :],
                                         reader=ENCODER_DECODER)
        return scored.agreement, scored.perplexity

    def generation_graphs(self, model: Any, folder: Path, prompt_tokens: int, new_tokens: int, calib: Any,
                          recipe: Any, profile: Any, decode_calib_tokens: int) -> dict[str, dict[str, Path]]:
        from compress.deploy.groups import quantize_graph
        from compress.deploy.mu_export import write_mu_graphs
        from quant import runtime

        # The decoder's own cache holds the generated tokens only: new_tokens slots.
        write_mu_graphs(model, folder, length=prompt_tokens, capacity=new_tokens)
        # Calibration sequences of prompt + new tokens: encoder on prefixes, decoder on teacher-forced steps.
        # calibration_feeds cuts each sequence at 1/4, 1/2 or 3/4 of its length for the encoder: sequences of
        # 4/3 of the prompt keep every cut within the encoder graph's length.
        feeds = calibration_feeds(runtime.session(folder / ENCODER), runtime.session(folder / DECODER),
                                  calib[:, : prompt_tokens * 4 // 3], model.config.decoder_start_token_id,
                                  decode_calib_tokens)
        graphs = {}
        for kind, name, part_feeds in (("first", ENCODER, feeds[0]), ("step", DECODER, feeds[1])):
            quantized = folder / name.replace(".onnx", f".{recipe.name}.onnx")
            quantize_graph(folder / name, quantized, part_feeds, recipe, profile)
            graphs[kind] = {"float": folder / name, "quantized": quantized}
        return graphs

    @torch.no_grad()
    def begin_checkpoint_generation(self, model: Any, prompt: list[int]) -> tuple[Any, Any]:
        """Encode once; each step decodes the whole answer so far (Mu's torch model keeps no cache)."""
        encoded = model.model.encode(torch.tensor([prompt]), None)
        answer = [model.config.decoder_start_token_id]

        @torch.no_grad()
        def step(token: int | None = None) -> Any:
            if token is not None:
                answer.append(token)
            result = model(decoder_input_ids=torch.tensor([answer]), encoder_outputs=encoded)
            return result.logits[0, -1].float().numpy()

        return step(), step

    def run_graphs(self, run_dir: Path, recipe: str) -> tuple[Path, Path]:
        suffix = "" if recipe == "none" else f".{recipe}"
        return run_dir / "onnx" / ENCODER.replace(".onnx", f"{suffix}.onnx"), run_dir / "onnx" / DECODER.replace(".onnx", f"{suffix}.onnx")

    def begin_generation(self, first: Any, step: Any, prompt: list[int], model_config: Any) -> tuple[Any, Any]:
        from compress.deploy.mu_export import decoder_cache, encoder_feed

        cache = decoder_cache(first, step, encoder_feed(first, prompt))
        return cache, cache.step(model_config.decoder_start_token_id)

    def plan(self, state: Any) -> dict[str, Any]:
        return plan_stage(state)

    def prune(self, state: Any) -> dict[str, Any]:
        return prune_stage(state)

    def export(self, state: Any) -> dict[str, Any]:
        return export_stage(state)

    def quantize(self, state: Any) -> dict[str, Any]:
        return quantize_stage(state)


register(Mu())
