"""The flags of the ``compress`` command: one per field of :class:`compress.core.config.CompressConfig`
(sections included, named as in ``FLAGS``), their help, and the config they give."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

from compress.core.config import (
    AUTO_VOCAB_SHARE,
    AXES,
    BLOCK_AXES,
    FLAGS,
    IMPORTANCE_METHODS,
    LAYER_METRICS,
    PROXIES,
    QUANT_CHOICES,
    SECTIONS,
    STAGES,
    CompressConfig,
)
from compress.errors import ConfigError
from compress.io import project_records
from quant.profiles import PROFILES

_HELP = {
    "teacher": "teacher: a built-in alias (smollm2-135m, gemma3-270m), a Hugging Face folder, a .gguf file or a hub id",
    "target_size": "student size: parameters (90M), a ratio of the teacher (0.67x) or a percentage (67%%)",
    "out": "run directory (default runs/<teacher>-<target-size>)",
    "data": "training data: a built-in corpus (default-mix: Debian's kernel and Python docs, LibreOffice's help and "
    "the fortunes collection; debian-docs: the docs alone), a text / jsonl / parquet file or folder, or a hub dataset",
    "axes": f"comma-separated axes the planner may shrink, of {', '.join(AXES)} (kv = whole GQA groups; vocab = tokens the training and calibration data never use, the tokenizer trimmed to match); auto: {','.join(BLOCK_AXES)}, plus vocab where the embedding is over {100 * AUTO_VOCAB_SHARE:.0f}%% of the teacher",
    "align": "every pruned dimension is a multiple of this (NPU channel alignment; 32 or 64)",
    "importance": f"how units are scored: {', '.join(IMPORTANCE_METHODS)}",
    "calib_samples": "calibration sequences for importance (Minitron used 1024)",
    "calib_seq_len": "tokens per calibration sequence",
    "batch_size": "sequences per forward pass",
    "batch_aggregation": "how per-sample scores combine over the batch: mean, l2, var",
    "sequence_aggregation": "how per-token scores combine over a sequence: mean, l2, var",
    "layer_metric": f"layer importance: {', '.join(LAYER_METRICS)}",
    "tolerance": "accept shapes within this fraction of the target size",
    "proxy": f"how the planner ranks shapes: {', '.join(PROXIES)} (loss runs the best few on calibration text)",
    "search_candidates": "how many shapes the loss proxy checks",
    "eval_samples": "validation sequences for perplexity and top-1 agreement with the teacher (the graphs use "
    "as many, of --seq-len tokens)",
    "eval_seq_len": "tokens per validation sequence",
    "eval_data": "comma-separated extra evaluation sets (text / jsonl / parquet files or folders, or built-in corpus "
    "names), each reported under its file name next to the in-domain validation split and general-english (general "
    "English held out of every training corpus)",
    "bf16": "bf16 autocast for importance, the planner's loss check and distillation (reported perplexities are fp32); "
    "by default on where the CPU computes bf16 natively (AVX-512 BF16 or AMX), off where it would be emulated, far slower "
    "than fp32; the default shown is this machine's",
    "distill_tokens": "distillation budget in training tokens",
    "distill_seq_len": "tokens per distillation sequence",
    "distill_batch_size": "sequences per distillation micro-batch (per process under torchrun)",
    "distill_grad_accum": "micro-batches per optimizer step",
    "distill_lr": "peak learning rate",
    "distill_lr_backoffs": "times the peak may drop 10x when the validation perplexity right after warmup is above "
    "the start's (the student restarts from its initial weights; 0: use --distill-lr as given)",
    "distill_optimizer": "adamw, or muon (2-D hidden matrices; the rest stays on AdamW)",
    "distill_schedule": "wsd (warmup-stable-decay), cosine or constant",
    "distill_temperature": "softmax temperature of the KL (Minitron found 1 best)",
    "distill_kl_weight": "weight of the KL from the teacher's next-token distributions (0: plain cross-entropy training)",
    "distill_ce_weight": "weight of cross-entropy on the data next to the KL (0: logits only)",
    "distill_eval_every": "steps between validation perplexity checks (0: only at the end)",
    "distill_checkpoint_every": "steps between resumable checkpoints (0: only at the end; given --distill-eval-every "
    "alone, the same)",
    "distill_keep_checkpoints": "how many of the latest checkpoints are kept",
    "distill_steps": "optimizer steps (overrides --distill-tokens)",
    "distill_min_lr_ratio": "the schedule's floor as a fraction of the peak learning rate",
    "distill_warmup_steps": "steps of linear warmup (at most a quarter of the run)",
    "distill_decay_fraction": "share of steps in warmup-stable-decay's final decay",
    "distill_weight_decay": "AdamW (and Muon) weight decay on matrices",
    "distill_hidden_weight": "weight of a hidden-state loss between paired layers (pairs from a config file's "
    "distill.hidden_pairs)",
    "distill_hidden_loss": "hidden-state loss: cosine or mse",
    "distill_kl_chunk_elements": "memory bound of the logit loss: positions per chunk = this / vocabulary size",
    "distill_clip": "gradient-norm clip",
    "distill_attention": "attention kernel while training: auto (eager on CPU up to 512 tokens), eager, sdpa, or "
    "model (the model's own)",
    "distill_fused_loss": "KL and cross-entropy with their gradients in one pass (--no-distill-fused-loss: autograd)",
    "distill_compile": "torch.compile each decoder layer for training: auto (CPU with a C++ compiler, 50+ steps, "
    "10M+ parameters), on or off",
    "distill_teacher_top_k": "0: KL on the full vocabulary with the teacher run every step; k > 0: KL on the teacher's "
    "top-k log-probabilities (plus one bucket for the rest), computed once over the training sequences and stored "
    "under $PDQ_CACHE/teacher-logits/ for later runs and resumes",
    "distill_parallel": "under torchrun: ddp (a whole student per process) or fsdp (weights, gradients and AdamW "
    "state sharded across processes; the teacher stays whole). Checkpoints resume under either",
    "teacher_correction_tokens": "first fine-tune the teacher on this many training tokens (Minitron's teacher "
    "correction, for data unlike the teacher's own; 0: off)",
    "teacher_correction_lr": "learning rate of the teacher correction",
    "seq_len": "static sequence length of the exported prefill graph and capacity of the decode graph's KV cache",
    "quant": f"integer recipe of the quantized graphs: {', '.join(QUANT_CHOICES)} (a16w8 / a8w8: Q/DQ graphs for "
    "an NPU profile; w4a16: int4 weights, 16-bit activations, for qnn-htp; w8 / w4: weight-only int8 / int4 blocks for --npu-profile ort-cpu)",
    "npu_profile": f"rules the graphs are made for and checked against: {', '.join(PROFILES)} (ort-cpu: ONNX Runtime "
    "on a CPU without an NPU)",
    "quant_transforms": "comma-separated float rewrites before quantization: rotate (QuaRot-style), smooth "
    "(SmoothQuant), embed-rows (per-row embedding scales); '' for none; default: rotate,embed-rows for a16w8 and "
    "a8w8, none for w8 and w4",
    "quant_calib_samples": "calibration sequences (of --seq-len tokens) for quantization ranges and smoothing",
    "quant_gptq_samples": "calibration sequences (of --seq-len tokens) GPTQ's weight rounding takes its input "
    "statistics from: more make a slower quantize stage and a better rounding, at 4 bits most",
    "quant_decode_calib_tokens": "decode steps the decode graph's ranges are calibrated on, spread over the positions "
    "of the calibration sequences (one token per run, so it needs many: 16x fewer cost the A16W8 decode graph "
    "+0.3%% perplexity on SmolLM2)",
    "quant_qat_tokens": "quantization-aware training after GPTQ for int4 LPBQ recipes (w4a16): the block weights "
    "train on their int4 grids to match the float model's next-token distributions, on this many training-split "
    "tokens (0: off; the 0.67x SmolLM2 student trained at about 160 tokens/s on two CPU cores)",
    "quant_qat_lr": "peak learning rate of that training (AdamW, cosine)",
    "quant_qat_unit_lr": "peak learning rate of each output channel's LPBQ step unit in that training, on its "
    "logarithm (LSQ-style: the steps train with the weights; the block integers stay GPTQ's; 0: the units stay "
    "GPTQ's)",
    "quant_qat_table_lr": "how far the tied int4 embedding table's largest entry moves per step at that training's "
    "peak, on its int4 grid (rows of largest value 1, steps of 1/7; every other entry moves in proportion to its "
    "gradient; the lookup and the output head read the table; 0: it stays as GPTQ rounded it)",
    "quant_table_int8_rows": "rows of an int4 embedding table (w4a16) kept in int8: those of the most frequent "
    "tokens of 131,072 training-split tokens, in a second table the lookup and the tied head also read (0: one int4 "
    "table; default: the recipe's, 8,192 for w4a16)",
    "soc_model": "Qualcomm SoC the qnn-htp graphs are compiled for by Qualcomm's HTP compiler (onnxruntime-qnn), "
    "which writes onnx/*.qnn.onnx and each graph's op trace: 60 is the Snapdragon X Elite",
    "htp_eval_samples": "validation sequences the compiled prefill graph runs on the HTP emulator, next to ONNX "
    "Runtime's CPU on the same sequences (about 30 s each for a 100M-parameter graph; 0: none)",
    "student": "student family: minitron (the teacher pruned by importance, then distilled), mobilellm (the same, "
    "deep and thin, each block applied twice in a row: MobileLLM's block-wise weight sharing, parameters counted once) "
    "or mu (a Mu-like encoder-decoder initialized from the pruned teacher, distilled across architectures)",
    "stop_after": f"last stage to run: {', '.join(STAGES)}",
    "seed": "random seed",
    "trust_remote_code": "allow a teacher's own modelling code to run",
}



def flag_names() -> list[str]:
    """Every config flag, underscored (``distill_lr``), the run's own fields first."""
    top = [f.name for f in dataclasses.fields(CompressConfig) if f.name not in SECTIONS]
    return top + list(FLAGS)


def _field_of(name: str, defaults: CompressConfig) -> tuple[Any, type]:
    """The default value behind flag ``name`` in ``defaults`` and the type its text parses to."""
    owner, field_name = (getattr(defaults, FLAGS[name][0]), FLAGS[name][1]) if name in FLAGS else (defaults, name)
    default = getattr(owner, field_name)
    if default is not None:
        return default, type(default)
    hint = typing.get_type_hints(type(owner))[field_name]  # e.g. int | None
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    return default, kinds[0] if kinds and isinstance(kinds[0], type) else str


def add_config_flags(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """One flag per named config field (``--distill-lr`` for ``distill_lr``); unset flags stay None."""
    defaults = CompressConfig()
    for name in names:
        flag = "--" + name.replace("_", "-")
        default, kind = _field_of(name, defaults)
        text = _HELP[name]
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"{text} (default {default})")
        elif isinstance(default, tuple) or name == "quant_transforms":
            shown = ",".join(default) if default else "''"
            parser.add_argument(flag, default=None, help=f"{text} (default {shown})")
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"{text} (default {default})")


_LISTS = ("axes", "quant_transforms", "eval_data")


def config_from(args: argparse.Namespace, names: list[str] | None = None, base: dict[str, Any] | None = None) -> CompressConfig:
    """The config of ``--config FILE`` (if the parser has it), ``base``, then every flag given."""
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    for name in names or flag_names():
        value = getattr(args, name, None)
        if value is not None:
            values[name] = tuple(a.strip() for a in value.split(",") if a.strip()) if name in _LISTS else value
    return CompressConfig.from_dict(values)


def read_config_file(path: str) -> dict[str, Any]:
    """The fields of a YAML (.yaml, .yml) or JSON config file, nested or flat."""
    import yaml

    kind = "YAML" if Path(path).suffix.lower() in (".yaml", ".yml") else "JSON"
    try:
        text = Path(path).read_text()
        values = yaml.safe_load(text) if kind == "YAML" else json.loads(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error).splitlines()[0]
        raise ConfigError(f"--config {path}: cannot read it as {kind} ({reason}); pass a file of "
                          "field: value pairs") from error
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected field: value pairs, found {type(values).__name__}")
    return values


def setup_logging(quiet: bool) -> None:
    """INFO on the root logger (a run's run.log takes it all); the terminal shows the project's INFO lines and
    everyone's warnings, only warnings with --quiet."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING if quiet else logging.INFO)
        if project_records not in handler.filters:
            handler.addFilter(project_records)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if quiet:
            hf_logging.disable_progress_bar()
    except ImportError:
        pass
