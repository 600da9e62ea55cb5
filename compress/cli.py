"""The ``compress`` command: a thin face of the API. Flags map one-to-one onto CompressConfig fields.

Exit codes: 0 success, 2 a user error (bad flag, missing file, infeasible target), 1 any other failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from compress.config import (
    AXES,
    IMPORTANCE_METHODS,
    LAYER_METRICS,
    PROXIES,
    QUANT_CHOICES,
    STAGES,
    CompressConfig,
)
from compress.errors import CompressError, ConfigError
from quant.profiles import PROFILES

_HELP = {
    "teacher": "teacher: a built-in alias (smollm2-135m, gemma3-270m), a Hugging Face folder, a .gguf file or a hub id",
    "target_size": "student size: parameters (90M), a ratio of the teacher (0.67x) or a percentage (67%%)",
    "out": "run directory (default runs/<teacher>-<target-size>)",
    "data": "training data: a built-in corpus (default-mix: Debian's kernel and Python docs, LibreOffice's help and "
    "the fortunes collection; debian-docs: the docs alone), a text / jsonl / parquet file or folder, or a hub dataset",
    "axes": f"comma-separated axes the planner may shrink, of {', '.join(AXES)} (kv = whole GQA groups)",
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
    "bf16": "bf16 autocast for importance, the planner's loss check and distillation (reported perplexities are fp32)",
    "distill_tokens": "distillation budget in training tokens",
    "distill_seq_len": "tokens per distillation sequence",
    "distill_batch_size": "sequences per distillation micro-batch (per process under torchrun)",
    "distill_grad_accum": "micro-batches per optimizer step",
    "distill_lr": "peak learning rate",
    "distill_optimizer": "adamw, or muon (2-D hidden matrices; the rest stays on AdamW)",
    "distill_schedule": "wsd (warmup-stable-decay), cosine or constant",
    "distill_temperature": "softmax temperature of the KL (Minitron found 1 best)",
    "distill_kl_weight": "weight of the KL from the teacher's next-token distributions (0: plain cross-entropy training)",
    "distill_ce_weight": "weight of cross-entropy on the data next to the KL (0: logits only)",
    "distill_eval_every": "steps between validation perplexity checks and checkpoints",
    "distill_teacher_top_k": "0: KL on the full vocabulary with the teacher run every step; k > 0: KL on the teacher's "
    "top-k log-probabilities (plus one bucket for the rest), computed once over the training sequences and stored "
    "under $PDQ_CACHE/teacher-logits/ for later runs and resumes",
    "distill_parallel": "under torchrun: ddp (a whole student per process) or fsdp (weights, gradients and AdamW "
    "state sharded across processes; the teacher stays whole). Checkpoints resume under either",
    "teacher_correction_tokens": "first fine-tune the teacher on this many training tokens (Minitron's teacher "
    "correction, for data unlike the teacher's own; 0: off)",
    "teacher_correction_lr": "learning rate of the teacher correction",
    "seq_len": "static sequence length of the exported prefill graph and capacity of the decode graph's KV cache",
    "quant": f"integer recipe of the quantized graphs: {', '.join(QUANT_CHOICES)}",
    "npu_profile": f"NPU rules the graphs are made for and checked against: {', '.join(PROFILES)}",
    "quant_transforms": "comma-separated float rewrites before quantization: rotate (QuaRot-style), smooth "
    "(SmoothQuant), embed-rows (per-row embedding scales); '' for none; default: rotate,embed-rows for both "
    "recipes",
    "quant_calib_samples": "calibration sequences (of --seq-len tokens) for quantization ranges, smoothing and "
    "GPTQ's weight rounding",
    "quant_decode_calib_tokens": "decode steps the decode graph's ranges are calibrated on, spread over the positions "
    "of the calibration sequences (one token per run, so it needs many: 16x fewer cost the A16W8 decode graph "
    "+0.3%% perplexity on SmolLM2)",
    "student": "student family: minitron (the teacher pruned by importance, then distilled), mobilellm (the same, "
    "deep and thin, each block applied twice in a row: MobileLLM's block-wise weight sharing, parameters counted once) "
    "or mu (a Mu-like encoder-decoder initialized from the pruned teacher, distilled across architectures)",
    "stop_after": f"last stage to run: {', '.join(STAGES)}",
    "seed": "random seed",
    "trust_remote_code": "allow a teacher's own modelling code to run",
}

_EPILOG = """examples:
  compress --teacher smollm2-135m --target-size 0.67x       # every stage, report in runs/smollm2-135m-0.67x/
  compress --teacher smollm2-135m --target-size 0.67x --out runs/demo --stop-after prune
  compress --teacher ./my-llama --data ./corpus/ --target-size 90M --axes heads,hidden,mlp,layers
  compress fetch                       # download the built-in teachers and the default data
  compress eval runs/demo/pruned --text notes.txt
  compress --teacher smollm2-135m --target-size 0.67x --out runs/demo --stop-after distill --distill-tokens 200000
  torchrun --nproc-per-node 2 -m compress.cli distill --student runs/demo/pruned --out runs/demo/student-ddp
  compress --teacher smollm2-135m --target-size 0.67x --out runs/demo --stop-after quantize --quant a16w8 --npu-profile qnn-htp
  compress --teacher smollm2-135m --target-size 1x --out runs/teacher --stop-after quantize --quant a8w8 --npu-profile generic-a8w8
  compress inspect runs/demo/onnx/model.a16w8.onnx --npu-profile qnn-htp
  compress finetune --student runs/demo/student --data task.jsonl --out runs/demo/task   # LoRA on (input, output) pairs
  compress report runs/demo                                  # rebuild report.md / .json / plots

exit codes: 0 done, 1 a failure (or inspect found violations), 2 a usage error (bad flag, missing file,
unusable run directory), 130 interrupted (rerun the same command to continue)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compress",
        description="Prune a teacher language model to a target size with activation-based importance, distill it, "
        "and export static-shape float and integer (QDQ) ONNX graphs for an NPU.",
        epilog=_EPILOG + "\nsubcommands: compress fetch --help, compress eval --help, compress distill --help, "
        "compress inspect --help, compress report --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_flags(parser, [f.name for f in dataclasses.fields(CompressConfig)])
    parser.add_argument("--config", help="a YAML (.yaml, .yml) or JSON file of config fields, e.g. the config.json of "
                        "an earlier run; flags given here override it")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines, only the summary")
    return parser


def _add_config_flags(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """One flag per named CompressConfig field (``--distill-lr`` for ``distill_lr``); unset flags stay None."""
    defaults = CompressConfig()
    for name in names:
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_HELP[name] + f" (default {default})")
        elif isinstance(default, tuple):
            parser.add_argument(flag, default=None, help=_HELP[name] + f" (default {','.join(default)})")
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=None, help=_HELP[name] + f" (default {default})")


def _config_from(args: argparse.Namespace) -> CompressConfig:
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        kind = "YAML" if Path(args.config).suffix.lower() in (".yaml", ".yml") else "JSON"
        try:
            text = Path(args.config).read_text()
            values = yaml.safe_load(text) if kind == "YAML" else json.loads(text)
        except (OSError, json.JSONDecodeError, yaml.YAMLError) as error:
            reason = error.strerror if isinstance(error, OSError) else str(error).splitlines()[0]
            raise ConfigError(f"--config {args.config}: cannot read it as {kind} ({reason}); pass a file of "
                              "field: value pairs") from error
        if not isinstance(values, dict):
            raise ConfigError(f"--config {args.config}: expected field: value pairs, found {type(values).__name__}")
    for f in dataclasses.fields(CompressConfig):
        value = getattr(args, f.name)
        if value is not None:
            is_list = f.name in ("axes", "quant_transforms", "eval_data")
            values[f.name] = tuple(a.strip() for a in value.split(",") if a.strip()) if is_list else value
    return CompressConfig.from_dict(values)


def _setup_logging(quiet: bool) -> None:
    # The root logger passes INFO on (a run's run.log takes it all); the terminal shows WARNING and up with --quiet.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING if quiet else logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if quiet:
            hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _summary(result: Any) -> str:  # noqa: C901 - one branch per stage
    rows = [("stage", "seconds", "result")]
    for stage in result.stages:
        m = stage.metrics
        if stage.stage == "correct":
            if not m.get("tokens"):
                continue
            text = (f"{result.run_dir / 'teacher'}  teacher perplexity {m['perplexity_before']:.2f} -> "
                    f"{m['perplexity_after']:.2f} after {m['tokens']:,} tokens")
        elif stage.stage == "score":
            text = f"{m['method']} importance, {m['samples']} samples, {m['tokens']} tokens"
        elif stage.stage == "plan":
            s = m["shape"]
            layers = (f"layers {s['layers']}" if "layers" in s else
                      f"encoder {s['encoder_layers']} + decoder {s['decoder_layers']} layers")
            text = (
                f"hidden {s['hidden']}, mlp {s['mlp']}, heads {s['kv_heads']}x{s['heads_per_group']}, "
                f"{layers}: {m['params'] / 1e6:.1f}M params ({m['params'] / m['teacher_params']:.2f}x)"
            )
        elif stage.stage == "distill" and "skipped" not in m:
            text = (
                f"{result.student_dir}  perplexity {m['student_perplexity_before']:.2f} -> {m['student_perplexity']:.2f} "
                f"after {m['tokens']:,} tokens ({m['tokens_per_second']:,.0f} tokens/s)"
                + _others(m.get("evals"), m.get("evals_before"))
            )
        elif stage.stage == "export":
            g = m["fp32"]
            first = "first token" if g.get("metric") == "continuation" else "prefill"
            text = (f"{result.run_dir / g.get('path', 'onnx/model.onnx')}, {Path(g.get('decode_path', 'decode.onnx')).name}  "
                    f"fp32 perplexity {g['perplexity']:.2f}, {g.get('total_mb', g['prefill_mb']):.0f} MB, {first} {g['prefill_latency_ms']:.0f} ms, "
                    f"decode {g['decode_tokens_per_second']:.1f} tokens/s" + _others(g.get("evals")))
        elif stage.stage == "quantize":
            if m["quant"] == "none":
                continue
            g = m[m["quant"]]
            first = "first token" if g.get("metric") == "continuation" else "prefill"
            graph = Path(g.get("path", f"model.{m['quant']}.onnx")).name
            text = (f"{graph} ({m['npu_profile']})  perplexity "
                    f"{g['perplexity']:.2f}, agreement {g['agreement']:.3f}, {g.get('total_mb', g['prefill_mb']):.0f} MB, {first} "
                    f"{g['prefill_latency_ms']:.0f} ms, decode "
                    f"{g['decode_tokens_per_second']:.1f} tokens/s, {len(m['violations'])} profile violations"
                    + _others(g.get("evals")))
        elif stage.stage == "distill" and "skipped" in m:
            text = m["skipped"]
        elif stage.stage == "report":
            text = f"{result.run_dir / 'report.md'}  {m['verdict']}"
        else:
            text = f"{result.pruned_dir}"
            if "pruned_perplexity" in m:
                text += (
                    f"  perplexity {m['teacher_perplexity']:.2f} (teacher) -> {m['pruned_perplexity']:.2f} "
                    f"on {m['validation_tokens']} validation tokens"
                    + _others(m.get("evals"), teacher=True)
                )
        rows.append((stage.stage, "reused" if stage.reused else f"{stage.seconds:.1f}", text))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]}" for r in rows)


def _others(evals: dict[str, Any] | None, before: dict[str, Any] | None = None, teacher: bool = False) -> str:
    """The evaluation sets other than the in-domain one, as "; general-english 417.20 (teacher 39.87)"."""
    parts = []
    for name, e in (evals or {}).items():
        if name == "validation":
            continue
        start = f"{before[name]['perplexity']:.2f} -> " if before and name in before else ""
        known = f" (teacher {e['teacher_perplexity']:.2f})" if teacher and "teacher_perplexity" in e else ""
        tokens = f" on {e['tokens']:,} tokens" if "tokens" in e else ""
        parts.append(f"{name} {start}{e['perplexity']:.2f}{known}{tokens}")
    return "; " + "; ".join(parts) if parts else ""


def _fetch(argv: list[str]) -> int:
    from compress.data import fetch_default_corpus
    from compress.teachers import BUILTIN_TEACHERS, fetch_teacher

    parser = argparse.ArgumentParser(prog="compress fetch", description="Download built-in teachers and the default data into the cache ($PDQ_CACHE).")
    parser.add_argument("teachers", nargs="*", default=["smollm2-135m"], help=f"aliases of {', '.join(BUILTIN_TEACHERS)} (default smollm2-135m)")
    parser.add_argument("--no-data", action="store_true", help="skip the default corpus and the general evaluation set")
    parser.add_argument("--quiet", action="store_true", help="print only the paths")
    args = parser.parse_args(argv)
    for alias in args.teachers:
        if alias not in BUILTIN_TEACHERS:
            raise ConfigError(f"compress fetch {alias}: unknown alias; known: {', '.join(BUILTIN_TEACHERS)}")
        print(f"{alias}: {fetch_teacher(alias)}")
    if not args.no_data:
        for path in fetch_default_corpus():
            print(f"data: {path}")
    return 0


def _eval(argv: list[str]) -> int:
    from compress.corpora import GENERAL_EVAL
    from compress.data import eval_set_name, load_corpus, text_file_ids, token_batches
    from compress.evaluate import perplexity
    from compress.teachers import load_teacher

    parser = argparse.ArgumentParser(
        prog="compress eval",
        description="Perplexity of a model on the in-domain validation split of --data and on general-english (general "
        "English held out of every training corpus), or on a text file; or lm-eval tasks with --lm-eval.")
    parser.add_argument("model", help="a checkpoint folder, .gguf file or built-in teacher alias")
    parser.add_argument("--text", help="a UTF-8 text file to measure instead of the evaluation sets")
    parser.add_argument("--data", help="corpus whose validation split is the in-domain set (default: default-mix)")
    parser.add_argument("--eval-data", help="comma-separated extra evaluation sets (files, folders or corpus names), "
                        "each used whole")
    parser.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-eval task names (or task YAML files) to run "
                        "through lm-eval's Hugging Face model wrapper instead of perplexity")
    parser.add_argument("--lm-eval-limit", type=int, help="at most this many examples per lm-eval task")
    parser.add_argument("--samples", type=int, default=64, help="sequences per evaluation set (default 64)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if args.lm_eval:
        from compress.harness import run_lm_eval

        tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
        print(json.dumps({"model": args.model, **run_lm_eval(args.model, tasks, args.batch_size, args.lm_eval_limit)},
                         indent=2))
        return 0
    model, tokenizer = load_teacher(args.model)
    if args.text:
        ids = text_file_ids(args.text, tokenizer, args.seq_len)
        result = perplexity(model, ids, args.batch_size, progress=True)
        print(json.dumps({"model": args.model, "data": args.text, **result.to_dict()}, indent=2))
        return 0
    corpus = load_corpus(args.data)
    sets = {"validation": (corpus, "validation", f"validation split of {corpus.name}")}
    for data in [GENERAL_EVAL, *(d.strip() for d in (args.eval_data or "").split(",") if d.strip())]:
        sets[eval_set_name(data)] = (load_corpus(data, evaluation=True), "all", data)
    out = {}
    for name, (source, split, label) in sets.items():
        ids = token_batches(source, tokenizer, split, args.seq_len, args.samples)
        out[name] = {"data": label, **perplexity(model, ids, args.batch_size, progress=True).to_dict()}
    print(json.dumps({"model": args.model, "evals": out}, indent=2))
    return 0


_DISTILL_FLAGS = ("teacher", "data", "eval_samples", "eval_seq_len", "batch_size", "bf16", "seed")


def _distill(argv: list[str]) -> int:
    import torch.distributed as dist

    from compress.data import load_corpus
    from compress.distillation import distill_student
    from compress.teachers import load_teacher

    parser = argparse.ArgumentParser(
        prog="compress distill",
        description="Distill a student checkpoint from a teacher. Runs under torchrun for several processes: "
        "torchrun --nproc-per-node 2 -m compress.cli distill --student DIR --out DIR",
    )
    parser.add_argument("--student", required=True, help="the student's Hugging Face checkpoint folder")
    parser.add_argument("--out", required=True, help="folder for the distilled student; resumable checkpoints go in OUT.checkpoints/ beside it")
    parser.add_argument("--no-resume", action="store_true", help="start over instead of resuming from OUT.checkpoints/")
    parser.add_argument("--quiet", action="store_true")
    _add_config_flags(parser, [f.name for f in dataclasses.fields(CompressConfig)
                               if f.name in _DISTILL_FLAGS or f.name.startswith("distill_")])
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(CompressConfig)} - {"student"}  # here --student is a folder
    config = CompressConfig.from_dict({k: v for k, v in vars(args).items() if k in fields and v is not None})
    out = Path(args.out)
    checkpoints = out.with_name(out.name + ".checkpoints")
    if args.no_resume and checkpoints.exists():
        import shutil

        shutil.rmtree(checkpoints)
    teacher, tokenizer = load_teacher(config.teacher, config.trust_remote_code)
    metrics = distill_student(Path(args.student), teacher, tokenizer, load_corpus(config.data), config, out,
                              checkpoints, progress=not args.quiet)
    if not dist.is_initialized() or dist.get_rank() == 0:
        summary = {k: v for k, v in metrics.items() if k != "history"}
        print(json.dumps(summary, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _finetune(argv: list[str]) -> int:
    from compress.finetune import FinetuneConfig, finetune

    parser = argparse.ArgumentParser(
        prog="compress finetune",
        description="Fine-tune a student for a task on (input, output) pairs: LoRA adapters (default) or every "
        "weight, cross-entropy on the output tokens and optionally KL from a teacher. Writes the fine-tuned "
        "checkpoint (adapters merged) to --out, the adapters alone to OUT/adapter/, and OUT/finetune.json.",
    )
    parser.add_argument("--student", required=True, help="the student's checkpoint folder (e.g. runs/demo/student); "
                        "causal or encoder-decoder (Mu-like)")
    parser.add_argument("--data", required=True, help='.jsonl/.json or .parquet rows with "input" and "output" text '
                        "(a tenth is held out, chosen by a hash of each pair)")
    parser.add_argument("--out", required=True, help="folder for the fine-tuned checkpoint")
    parser.add_argument("--teacher", help="teacher for the KL term (with --kl-weight): alias, folder or .gguf")
    parser.add_argument("--lora-rank", type=int, default=8, help="adapter rank (default 8); 0 trains every weight")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale numerator: updates are scaled "
                        "by alpha / rank (default 16)")
    parser.add_argument("--lora-targets", default="", help="comma-separated linear layer names to adapt, e.g. "
                        "q_proj,v_proj (default: every linear layer but the output head)")
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over the training pairs (default 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 with LoRA, 5e-5 without)")
    parser.add_argument("--kl-weight", type=float, default=0.0, help="weight of KL from --teacher on the outputs")
    parser.add_argument("--ce-weight", type=float, default=1.0, help="weight of cross-entropy on the outputs")
    parser.add_argument("--max-input-tokens", type=int, default=256, help="inputs keep their last N tokens")
    parser.add_argument("--max-output-tokens", type=int, default=128, help="outputs keep their first N tokens")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 instead of bf16 autocast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = vars(parser.parse_args(argv))
    quiet = args.pop("quiet")
    args["lora_targets"] = tuple(t for t in args["lora_targets"].split(",") if t)
    metrics = finetune(FinetuneConfig(**args), progress=not quiet)
    before, after = metrics["before"], metrics["after"]
    print(f"{args['out']}: held-out output perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}, "
          f"token accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} on {after['tokens']:,} tokens of "
          f"{metrics['validation_pairs']} pairs; {metrics['trainable_params']:,} of {metrics['params']:,} parameters "
          f"trained for {metrics['steps']} steps ({metrics['seconds']:.0f} s)")
    return 0


def _inspect(argv: list[str]) -> int:
    import onnx

    from quant.profiles import check, get_profile

    parser = argparse.ArgumentParser(
        prog="compress inspect",
        description="Check an ONNX graph against an NPU profile: dynamic dimensions, control flow, operators "
        "outside the profile's set, float islands, weight types and channel alignment. Exits 1 on any violation.",
    )
    parser.add_argument("model", help="an .onnx file")
    parser.add_argument("--npu-profile", default="qnn-htp", help=f"one of {', '.join(PROFILES)} (default qnn-htp)")
    parser.add_argument("--float", action="store_true", help="the graph is a float graph: check shapes and operators only")
    args = parser.parse_args(argv)
    if args.npu_profile not in PROFILES:
        raise ConfigError(f"--npu-profile {args.npu_profile!r}: known profiles are {', '.join(PROFILES)}")
    path = Path(args.model)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; pass the path of an .onnx graph")
    try:
        model = onnx.load(path)
    except Exception as error:  # noqa: BLE001 - any parse failure is the user's file
        raise ConfigError(f"{path}: not a readable ONNX model ({error})") from error
    violations = check(model, get_profile(args.npu_profile), quantized=not args.float)
    for v in violations:
        print(v)
    nodes = len(model.graph.node)
    verdict = "passes" if not violations else f"has {len(violations)} violation(s) of"
    print(f"{path}: {nodes} nodes, {verdict} the {args.npu_profile} profile")
    return 1 if violations else 0


def _report(argv: list[str]) -> int:
    from compress.report import write_report

    parser = argparse.ArgumentParser(prog="compress report", description="Rebuild report.md, report.json and the "
                                     "report_*.png plots of a run directory from what its stages measured.")
    parser.add_argument("run_dir", help="a run directory (the --out of a compress run)")
    parser.add_argument("--quiet", action="store_true", help="print only the report's path")
    args = parser.parse_args(argv)
    report = write_report(args.run_dir)
    path = Path(args.run_dir) / "report.md"
    print(path if args.quiet else f"{path}\n{report['verdict']}")
    return 0


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run like Ctrl-C: cleanup runs, finished stages stay


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    quiet = "--quiet" in argv
    _setup_logging(quiet)
    from distill.trainer import keep_freed_memory

    keep_freed_memory()  # every stage allocates and frees large tensors: scoring, evaluation, distillation
    try:
        if argv and argv[0] == "fetch":
            return _fetch(argv[1:])
        if argv and argv[0] == "eval":
            return _eval(argv[1:])
        if argv and argv[0] == "distill":
            return _distill(argv[1:])
        if argv and argv[0] == "finetune":
            return _finetune(argv[1:])
        if argv and argv[0] == "inspect":
            return _inspect(argv[1:])
        if argv and argv[0] == "report":
            return _report(argv[1:])
        args = _parser().parse_args(argv)
        config = _config_from(args)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        from compress.pipeline import run

        result = run(config, progress=not args.quiet)
        print(_summary(result))
        return 0
    except CompressError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue from the last finished stage", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
