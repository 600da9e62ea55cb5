"""The ``compress`` subcommands: fetch, eval, task, distill, finetune, inspect, report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compress.app.flags import add_config_flags, config_from, flag_names
from compress.core.config import CompressConfig
from compress.errors import CompressError, ConfigError
from distill.speed import cpu_has_bf16
from quant.profiles import PROFILES
from quant.qnn import DEFAULT_SOC_MODEL


def fetch(argv: list[str]) -> int:
    from compress.sources.data import fetch_default_corpus
    from compress.sources.teachers import BUILTIN_TEACHERS, fetch_teacher

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


def evaluate(argv: list[str]) -> int:
    from compress.evaluation.quality import perplexity
    from compress.sources.corpora import GENERAL_EVAL
    from compress.sources.data import eval_set_name, load_corpus, text_file_ids, token_batches
    from compress.sources.teachers import load_teacher

    parser = argparse.ArgumentParser(
        prog="compress eval",
        description="Perplexity of a model on the in-domain validation split of --data and on general-english (general "
        "English held out of every training corpus), or on a text file; or lm-eval tasks with --lm-eval.")
    parser.add_argument("model", help="a checkpoint folder, .gguf file or built-in teacher alias; with --pairs also a "
                        "run folder (its student, or its graphs with --graph)")
    parser.add_argument("--text", help="a UTF-8 text file to measure instead of the evaluation sets")
    parser.add_argument("--data", help="corpus whose validation split is the in-domain set (default: default-mix)")
    parser.add_argument("--eval-data", help="comma-separated extra evaluation sets (files, folders or corpus names), "
                        "each used whole")
    parser.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-eval task names (or task YAML files) to run "
                        "through lm-eval's Hugging Face model wrapper instead of perplexity")
    parser.add_argument("--lm-eval-limit", type=int, help="at most this many examples per lm-eval task")
    parser.add_argument("--pairs", help="a .jsonl file of {\"input\": request, \"output\": call as JSON} rows: decode "
                        "each request greedily and report exact-match accuracy, invalid outputs and response time")
    parser.add_argument("--graph", nargs="?", const="quantized", choices=("quantized", "float"),
                        help="with --pairs and a run folder: answer through the run's integer graphs (or its float "
                        "ones) and its host loop, as an app would, instead of the torch checkpoint")
    parser.add_argument("--catalog", help="with --pairs: the catalog.json of known settings (default: the settings "
                        "the pairs name)")
    parser.add_argument("--constrain", action="store_true", help="with --pairs and --catalog: decode only calls the "
                        "catalog allows (its setting ids, each with a value of its type), as an app that knows its "
                        "settings would; every answer is then a valid call")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="with --pairs: the longest answer (default 48)")
    parser.add_argument("--max-input-tokens", type=int, default=256, help="with --pairs: requests keep their last N "
                        "tokens, as compress finetune reads them (default 256; a graph takes at most its length)")
    parser.add_argument("--limit", type=int, help="with --pairs: only the first N pairs")
    parser.add_argument("--out", help="with --pairs: write the report and every answer to this JSON file")
    parser.add_argument("--samples", type=int, default=64, help="sequences per evaluation set (default 64)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if args.pairs:
        return _evaluate_pairs(args)
    if args.graph or args.constrain:
        parser.error("--graph and --constrain are for answering requests: they need --pairs FILE")
    if args.lm_eval:
        from compress.evaluation.harness import run_lm_eval

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


def _evaluate_pairs(args: argparse.Namespace) -> int:
    """``compress eval MODEL_OR_RUN --pairs FILE``: see :mod:`compress.evaluation.calls`."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from compress.core.family import family_of, get_family, load_model
    from compress.evaluation.call_grammar import CallGrammar
    from compress.evaluation.calls import (
        CheckpointDecoder,
        GraphDecoder,
        evaluate_calls,
        known_settings,
        read_pairs,
        stop_tokens,
    )
    from compress.io import read_json, write_json
    from compress.models import register as register_models
    from compress.sources.teachers import load_teacher

    if args.max_new_tokens < 1 or args.max_input_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise ConfigError("--max-new-tokens, --max-input-tokens and --limit must be at least 1")
    if args.constrain and not args.catalog:
        raise ConfigError("--constrain decodes only the calls of a catalog: pass --catalog catalog.json (compress task "
                          "settings-agent writes one), or leave --constrain out")
    pairs = read_pairs(args.pairs)[: args.limit]
    known = known_settings(args.catalog, pairs)
    target = Path(args.model)
    run = (target / "student" / "config.json").exists() and (target / "config.json").exists()
    if args.graph and not run:
        raise CompressError(f"--graph: {args.model} is not a run folder (no student/ beside a config.json); pass the "
                            "--out folder of a compress run, or leave --graph out to answer with the checkpoint")
    checkpoint = target / "student" if run else target
    if args.graph:
        register_models()
        settings = read_json(target / "config.json")
        recipe = "none" if args.graph == "float" else settings["quant"]["recipe"]
        family = get_family(settings["student"])
        first, step = family.run_graphs(target, recipe)
        if not first.exists() or not step.exists():
            raise CompressError(f"--graph {args.graph}: {first.name} and {step.name} are not both in {target / 'onnx'}; "
                                "run the export and quantize stages first (compress ... --out " f"{target})")
        model_config = AutoConfig.from_pretrained(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        decoder = GraphDecoder(family, first, step, model_config, stop_tokens(tokenizer, model_config))
        what = f"{first.relative_to(target)} + {step.name}"
    else:
        if run or (target / "config.json").exists():
            model = load_model(checkpoint, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        else:
            model, tokenizer = load_teacher(args.model)
        decoder = CheckpointDecoder(family_of(model.config), model, stop_tokens(tokenizer, model.config))
        what = str(checkpoint)
    grammar = CallGrammar.from_catalog(args.catalog, tokenizer) if args.constrain else None
    report = evaluate_calls(decoder, tokenizer, pairs, known, max_new_tokens=args.max_new_tokens,
                            max_input_tokens=args.max_input_tokens, progress=True, grammar=grammar)
    summary = {"model": args.model, "answered_by": what, "pairs_file": args.pairs, "constrained": args.constrain,
               **report.to_dict()}
    if args.out:
        write_json(args.out, {**summary, "answers": report.answers})
    print(json.dumps(summary, indent=2))
    return 0


def task(argv: list[str]) -> int:
    from compress.sources.settings_agent import TRAIN_PER_SETTING, write_task

    parser = argparse.ArgumentParser(
        prog="compress task",
        description="Write a task's data. settings-agent: requests to a desktop's settings paired with the call each "
        "means (one line of JSON); train.jsonl (train and validation rows, for compress finetune --data), test.jsonl "
        "(phrasings and values never seen in training, for compress eval --pairs) and catalog.json.")
    parser.add_argument("name", choices=("settings-agent",), help="the task")
    parser.add_argument("--out", required=True, help="folder for the files")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same files (default 0)")
    parser.add_argument("--train-per-setting", type=int, default=TRAIN_PER_SETTING, metavar="N",
                        help=f"requests drawn per setting for train.jsonl (default {TRAIN_PER_SETTING}; about a tenth "
                        "become validation rows); test.jsonl is the same whatever N is")
    args = parser.parse_args(argv)
    counts = write_task(args.out, args.seed, args.train_per_setting)
    print(f"{args.out}: {counts['settings']} settings; {counts['train']} train, {counts['validation']} validation, "
          f"{counts['test']} test pairs")
    return 0


# The run's fields compress distill reads besides the distillation section's (--student is a folder there).
_DISTILL_FLAGS = ("teacher", "data", "eval_samples", "eval_seq_len", "batch_size", "bf16", "seed", "trust_remote_code")


def distill(argv: list[str]) -> int:
    import torch.distributed as dist

    from compress.app.distillation import distill_student
    from compress.sources.data import load_corpus
    from compress.sources.teachers import load_teacher

    parser = argparse.ArgumentParser(
        prog="compress distill",
        description="Distill a student checkpoint from a teacher. Runs under torchrun for several processes: "
        "torchrun --nproc-per-node 2 -m compress distill --student DIR --out DIR",
    )
    parser.add_argument("--student", required=True, help="the student's Hugging Face checkpoint folder")
    parser.add_argument("--out", required=True, help="folder for the distilled student; resumable checkpoints go in OUT.checkpoints/ beside it")
    parser.add_argument("--no-resume", action="store_true", help="start over instead of resuming from OUT.checkpoints/")
    parser.add_argument("--quiet", action="store_true")
    names = [n for n in flag_names() if n in _DISTILL_FLAGS or n.startswith("distill_")]
    add_config_flags(parser, names)
    args = parser.parse_args(argv)
    config: CompressConfig = config_from(args, names)
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
        # Every collective finished and the sharded model's references to it gone before the group is destroyed:
        # gloo work still alive at interpreter exit aborts the process ("terminate called without an active
        # exception") after a finished run, now and then on a loaded machine.
        import gc

        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
    return 0


def finetune(argv: list[str]) -> int:
    from compress.app.finetune import FinetuneConfig, finetune

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
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=cpu_has_bf16(),
                        help="bf16 autocast (default: where the CPU computes bf16 natively; emulated it is far slower "
                        "than fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--no-resume", action="store_true", help="start over instead of resuming an interrupted run "
                        "from OUT.checkpoints/ (kept beside --out until the fine-tuned model is written)")
    parser.add_argument("--quiet", action="store_true")
    args = vars(parser.parse_args(argv))
    quiet, resume = args.pop("quiet"), not args.pop("no_resume")
    args["lora_targets"] = tuple(t for t in args["lora_targets"].split(",") if t)
    metrics = finetune(FinetuneConfig(**args), progress=not quiet, resume=resume)
    before, after = metrics["before"], metrics["after"]
    print(f"{args['out']}: held-out output perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}, "
          f"token accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} on {after['tokens']:,} tokens of "
          f"{metrics['validation_pairs']} pairs; {metrics['trainable_params']:,} of {metrics['params']:,} parameters "
          f"trained for {metrics['steps']} steps ({metrics['seconds']:.0f} s)")
    return 0


def inspect(argv: list[str]) -> int:
    import onnx

    from quant.profiles import check, get_profile

    parser = argparse.ArgumentParser(
        prog="compress inspect",
        description="Check an ONNX graph against an NPU profile: dynamic dimensions, control flow, operators "
        "outside the profile's set, float islands, weight types and channel alignment; with --compile, also compile "
        "it with the NPU's own compiler. Exits 1 on any violation or refused node.",
    )
    parser.add_argument("model", help="an .onnx file")
    parser.add_argument("--npu-profile", default="qnn-htp", help=f"one of {', '.join(PROFILES)} (default qnn-htp)")
    parser.add_argument("--float", action="store_true", help="the graph is a float graph: check shapes and operators only")
    parser.add_argument("--compile", choices=("qnn-htp",), help="also compile the graph with Qualcomm's HTP compiler "
                        "(onnxruntime-qnn), CPU fallback disabled, and list every node it refuses; exits 1 on any")
    parser.add_argument("--soc-model", default=DEFAULT_SOC_MODEL, help=f"with --compile: the Qualcomm SoC to compile for "
                        f"(default {DEFAULT_SOC_MODEL}, the Snapdragon X Elite)")
    parser.add_argument("--trace", help="with --compile: keep the compiler's op trace (every node's QNN mapping) in this "
                        "JSON file")
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
    if not args.compile:
        return 1 if violations else 0
    from quant import qnn

    if not args.soc_model.isdigit():
        raise ConfigError(f"--soc-model {args.soc_model!r}: a Qualcomm SoC model number, e.g. {DEFAULT_SOC_MODEL}")
    reason = qnn.unavailable()
    if reason:
        raise ConfigError(f"--compile qnn-htp: {reason}")
    result = qnn.compile_graph(path, args.soc_model, trace=args.trace)
    for node in result.unsupported:
        print(f"refused: {node}")
    if result.whole:
        print(f"{path}: Qualcomm's HTP compiler (SoC {args.soc_model}) takes all {result.nodes} nodes as one QNN graph "
              f"({sum(result.qnn_ops.values())} QNN ops, {result.seconds:.1f} s)")
    else:
        print(f"{path}: Qualcomm's HTP compiler (SoC {args.soc_model}) refuses {len(result.unsupported)} of {result.nodes} "
              f"nodes and splits the rest into {result.qnn_graphs} QNN graphs"
              + (f" ({result.error})" if result.error and not result.unsupported else ""))
    return 1 if violations or not result.whole else 0


def report(argv: list[str]) -> int:
    from compress.app.report import write_report

    parser = argparse.ArgumentParser(prog="compress report", description="Rebuild report.md, report.json and the "
                                     "report_*.png plots of a run directory from what its stages measured.")
    parser.add_argument("run_dir", help="a run directory (the --out of a compress run)")
    parser.add_argument("--quiet", action="store_true", help="print only the report's path")
    args = parser.parse_args(argv)
    report = write_report(args.run_dir)
    path = Path(args.run_dir) / "report.md"
    print(path if args.quiet else f"{path}\n{report['verdict']}")
    return 0
