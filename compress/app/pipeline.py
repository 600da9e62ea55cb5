"""The run: teacher → importance → plan → prune → distill → export → quantize → report, each stage writing
into the run directory.

A stage's output is reused when it exists and was produced by the same settings (recorded in
``stages.json``); when settings change, that stage and every later one run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.core.config import AUTO_VOCAB_SHARE, BLOCK_AXES, STAGES, CompressConfig
from compress.core.family import load_model
from compress.core.state import RunState, folder_mb
from compress.errors import CompressError, ConfigError, RunDirectoryError
from compress.evaluation.quality import perplexity
from compress.families import get_family
from compress.io import project_records, read_json, write_json
from compress.pruning.planner import PruningPlan, feasible_shapes
from compress.pruning.scoring import score_importance
from compress.pruning.surgery import save_checkpoint

log = logging.getLogger(__name__)

# Fields each stage's output depends on (plus every earlier stage's fingerprint).
_STAGE_FIELDS = {
    "correct": ("teacher", "data", "student", "correction", "distill.seq_len", "distill.batch_size", "eval.samples",
                "eval.seq_len"),
    "score": ("prune.importance", "prune.calib_samples", "prune.calib_seq_len", "prune.batch_aggregation",
              "prune.sequence_aggregation", "prune.layer_metric", "bf16", "seed"),
    "plan": ("target_size", "prune.axes", "prune.align", "prune.tolerance", "prune.proxy", "prune.search_candidates"),
    "prune": ("eval.samples", "eval.seq_len", "eval.data"),
    "distill": ("distill",),  # the whole section, every default resolved: it is what the trainer takes
    "export": ("quant.seq_len", "quant.transforms", "quant.calib_samples", "quant.npu_profile"),
    "quantize": ("quant.recipe", "quant.npu_profile", "quant.gptq_samples", "quant.decode_calib_tokens", "quant.soc_model",
                 "quant.htp_eval_samples", "quant.qat_tokens", "quant.qat_lr", "quant.qat_unit_lr",
                 "quant.qat_table_lr", "quant.table_int8_rows"),
    "report": (),
}
# The source each stage's output depends on (folders or files under the project root), hashed into its
# fingerprint: after a code change the stages it touches run again, and every stage after them.
_STAGE_CODE = {
    # The corpora and teachers, not the task generators beside them (compress task runs no stage).
    "correct": ("compress/sources/corpora.py", "compress/sources/data.py", "compress/sources/teachers.py", "distill"),
    "score": ("importance", "compress/pruning/scoring.py", "compress/pruning/archspec.py", "compress/evaluation/quality.py"),
    "plan": ("compress/pruning/planner.py", "compress/pruning/vocab.py", "compress/models", "compress/families"),
    "prune": ("compress/pruning/surgery.py", "compress/core"),
    "distill": ("compress/app/distillation.py",),
    "export": ("quant/export.py", "quant/runtime.py", "compress/deploy"),
    "quantize": ("quant",),
    "report": ("compress/app/report.py",),
}
# Calibration sequences the planner's loss proxy runs each candidate on (16 x calib_seq_len tokens).
_PROXY_SEQUENCES = 16


@dataclass(frozen=True)
class StageMetrics:
    """What one stage produced and cost."""

    stage: str
    seconds: float
    reused: bool
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CompressResult:
    """Paths and metrics of a run; the pruned model is loaded on demand."""

    run_dir: Path
    config: CompressConfig
    stages: tuple[StageMetrics, ...]

    @property
    def pruned_dir(self) -> Path:
        return self.run_dir / "pruned"

    @property
    def student_dir(self) -> Path:
        return self.run_dir / "student"

    @property
    def plan(self) -> PruningPlan:
        return PruningPlan.load(self.run_dir / "plan.json")

    def load_pruned(self) -> Any:
        """The pruned model (before distillation; a Mu-like student's teacher initialization), from the run directory."""
        return load_model(self.pruned_dir)

    def load_student(self) -> Any:
        """The distilled student, loaded from the run directory (needs ``stop_after="distill"``)."""
        if not (self.student_dir / "config.json").exists():
            raise CompressError(f"{self.student_dir} holds no student yet; run with stop_after='distill'")
        return load_model(self.student_dir)

    def metrics(self) -> dict[str, Any]:
        return {s.stage: s.metrics for s in self.stages}

    @property
    def report(self) -> dict[str, Any]:
        """``report.json`` of the run (needs the report stage)."""
        path = self.run_dir / "report.json"
        if not path.exists():
            raise CompressError(f"{path} does not exist yet; run with stop_after='report' or `compress report {self.run_dir}`")
        return read_json(path)

    @property
    def graphs(self) -> dict[str, Path]:
        """The ONNX graphs the run wrote, by name (``model``, ``decode``, ``model.a16w8``...)."""
        folder = self.run_dir / "onnx"
        return {p.name.removesuffix(".onnx"): p for p in sorted(folder.glob("*.onnx"))} if folder.exists() else {}

    def _repr_markdown_(self) -> str:  # a notebook shows the report when a cell ends with the result
        path = self.run_dir / "report.md"
        return path.read_text() if path.exists() else f"run directory {self.run_dir}: {[s.stage for s in self.stages]}"


def _prepare_run_dir(config: CompressConfig) -> None:
    run_dir = config.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"--out {run_dir} is a file; choose a folder name")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / "config.json").exists():
        raise RunDirectoryError(
            f"--out {run_dir} is not empty and holds no pdq-compress run (no config.json); "
            "choose a new or empty folder"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", config.to_dict())
    except OSError as error:
        raise RunDirectoryError(f"--out {run_dir}: cannot write there ({error.strerror}); choose a writable folder") from error


def run(config: CompressConfig | None = None, progress: bool = True, **fields: Any) -> CompressResult:
    """Run every stage up to ``config.stop_after`` (by default all, ending with the report), reusing finished ones.

    ``compress.run(teacher="smollm2-135m", target_size="0.67x")`` is ``run(CompressConfig(...))``; fields
    given next to a config override it. Every stage logs to ``run.log`` in the run directory.
    If a new run directory fails before any stage produced output, it is removed again, so bad input
    leaves nothing behind; finished stages of an existing run are always kept.
    """
    if config is None or fields:
        config = CompressConfig.from_dict({**(config.to_dict() if config else {}), **fields})
    fresh = not config.run_dir.exists() or not any(config.run_dir.iterdir())
    _prepare_run_dir(config)
    handler = logging.FileHandler(config.run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    handler.addFilter(project_records)
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        log.info("run %s: %s to %s as %s", config.run_dir, config.teacher, config.target_size, config.student)
        # The whole configuration goes to run.log only: one line of a thousand characters helps no one on a terminal.
        handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, "config %s", (json.dumps(config.to_dict()),), None))
        return _run_stages(config, progress)
    except BaseException as error:
        # To run.log only: the terminal gets the CLI's one line (or Python's traceback for a failure).
        interrupted = isinstance(error, KeyboardInterrupt)
        handler.handle(log.makeRecord(
            log.name, logging.WARNING if interrupted else logging.ERROR, __file__, 0,
            "interrupted" if interrupted else f"{type(error).__name__}: {error}", (),
            None if interrupted or isinstance(error, CompressError) else (type(error), error, error.__traceback__)))
        stages_file = config.run_dir / "stages.json"
        finished = set(read_json(stages_file)) if stages_file.exists() else set()
        if fresh and finished <= {"correct"} and not (config.run_dir / "teacher").exists():
            handler.close()
            shutil.rmtree(config.run_dir, ignore_errors=True)
        raise
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def _run_stages(config: CompressConfig, progress: bool) -> CompressResult:
    state = RunState(config, progress)
    if config.prune.axes == ("auto",):
        config = state.config = _resolve_axes(config, state)
    stages_file = state.dir / "stages.json"
    done: dict[str, str] = read_json(stages_file) if stages_file.exists() else {}
    results: list[StageMetrics] = []
    fingerprints, upstream = {}, ""
    for stage in STAGES[: STAGES.index(config.stop_after) + 1]:
        own = config.fingerprint(*_STAGE_FIELDS[stage]) + _resolved(config, stage) + code_version(stage)
        upstream = hashlib.sha256((own + upstream).encode()).hexdigest()[:16]
        fingerprints[stage] = upstream
    state.teacher_fingerprint = fingerprints["correct"]
    if any(done.get(stage) != fingerprint for stage, fingerprint in fingerprints.items()):
        state.dataset  # noqa: B018 - unreadable data fails here, before any stage spends time
        state.eval_sets  # noqa: B018 - and so does a missing evaluation set
        # and a teacher the student family cannot take (or export)
        family = get_family(config.student)
        if "vocab" in config.prune.axes and not family.trims_vocab:
            raise ConfigError(f"--student {config.student} does not trim the vocabulary; drop 'vocab' from --axes")
        quantizes = config.quant.recipe != "none" and STAGES.index(config.stop_after) >= STAGES.index("quantize")
        if quantizes:
            family.check_quant(config)
        family.check_teacher(state.teacher.config, config)
    if "plan" in fingerprints and done.get("plan") != fingerprints["plan"] and get_family(config.student).prunes_teacher:
        # Refuse an infeasible target (or an untrimmable tokenizer) before the expensive scoring stage, not after it.
        floor = state.vocab_importance()[1] if "vocab" in config.prune.axes else None
        feasible_shapes(state.spec, state.teacher.config, config.target, config.prune.axes, config.prune.align,
                        config.prune.tolerance, floor)
    for stage, fingerprint in fingerprints.items():
        started = time.perf_counter()
        metrics_file = state.dir / f"{stage}.metrics.json"
        if done.get(stage) == fingerprint and metrics_file.exists():
            log.info("stage %s: reusing finished output", stage)
            results.append(StageMetrics(stage, 0.0, True, read_json(metrics_file)))
            continue
        log.info("stage %s", stage)
        state.fingerprint = fingerprint
        metrics = _STAGE_RUNNERS[stage](state)
        write_json(metrics_file, metrics)
        done[stage] = fingerprint
        for later in STAGES[STAGES.index(stage) + 1 :]:
            done.pop(later, None)
        write_json(stages_file, done)
        results.append(StageMetrics(stage, time.perf_counter() - started, False, metrics))
    return CompressResult(state.dir, config, tuple(results))


def _resolve_axes(config: CompressConfig, state: RunState) -> CompressConfig:
    """``--axes auto`` made concrete for this teacher and family, logged, and written to the run's config.json."""
    from compress.pruning.vocab import trim_refusal

    family = get_family(config.student)
    if not family.prunes_teacher:
        resolved = config.resolve_axes(0.0, family.trims_vocab)
    else:
        share = state.spec.embedding_share()
        refusal = trim_refusal(state.tokenizer) if family.trims_vocab and share > AUTO_VOCAB_SHARE else None
        resolved = config.resolve_axes(share, family.trims_vocab and refusal is None)
        if "vocab" in resolved.prune.axes:
            log.info("--axes auto: %s (the embedding is %.0f%% of the teacher's parameters; --axes %s keeps the "
                     "whole vocabulary)", ",".join(resolved.prune.axes), 100 * share, ",".join(BLOCK_AXES))
        elif refusal:
            log.warning("--axes auto: %s, though the embedding is %.0f%% of the teacher's parameters (%s)",
                        ",".join(resolved.prune.axes), 100 * share, refusal)
    write_json(config.run_dir / "config.json", resolved.to_dict())
    return resolved


def _resolved(config: CompressConfig, stage: str) -> str:
    """What a stage reads beyond its config fields, every default resolved: the quantization recipe and the NPU
    profile, as JSON (so a changed default reruns the stage)."""
    from dataclasses import asdict

    from quant import qnn
    from quant.profiles import get_profile

    if stage == "plan" and "vocab" in config.prune.axes:
        # The kept vocabulary is chosen from the training and calibration tokens: their amounts are the plan's input.
        return config.fingerprint("distill.tokens", "distill.steps", "distill.seq_len", "distill.batch_size",
                                  "distill.grad_accum", "quant.seq_len", "quant.calib_samples")
    if stage == "export":
        return json.dumps(asdict(get_profile(config.quant.npu_profile)), sort_keys=True, default=str)
    if stage == "quantize" and config.quant.recipe != "none":
        # The HTP compiler's version too: installing or upgrading onnxruntime-qnn compiles the graphs again.
        return json.dumps({**config.quant.recipe_used().to_dict(), "htp_compiler": qnn.version()}, sort_keys=True,
                          default=str)
    return ""


def code_version(stage: str) -> str:
    """A hash of the source files a stage's output depends on (``_STAGE_CODE``)."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for entry in _STAGE_CODE[stage]:
        path = root / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if file.exists():
                digest.update(file.relative_to(root).as_posix().encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _correct(state: RunState) -> dict[str, Any]:
    """Minitron's teacher correction: a short cross-entropy fine-tune of the teacher on the training split."""
    c = state.config
    corrected = state.dir / "teacher"
    if not c.correction.tokens:
        shutil.rmtree(corrected, ignore_errors=True)
        return {"tokens": 0}
    from distill import DistillConfig, distill

    teacher = state.teacher
    if (corrected / "config.json").exists():  # settings changed: start again from the original teacher
        shutil.rmtree(corrected)
        state._teacher = None
        teacher = state.teacher
    train = state.ids("train", c.distill.seq_len, -(-c.correction.tokens // c.distill.seq_len))
    valid = state.ids("validation", c.eval.seq_len, c.eval.samples)
    before = perplexity(teacher, valid, c.batch_size).perplexity
    settings = DistillConfig(tokens=c.correction.tokens, batch_size=c.distill.batch_size,
                             lr=c.correction.lr, kl_weight=0.0, ce_weight=1.0, eval_every=0,
                             checkpoint_every=0, bf16=c.bf16, seed=c.seed)
    teacher.requires_grad_(True)
    result = distill(teacher, None, train, settings, progress=state.progress)
    teacher.requires_grad_(False).eval()
    after = perplexity(teacher, valid, c.batch_size).perplexity
    save_checkpoint(teacher, state.tokenizer, corrected)
    return {"tokens": result.tokens, "steps": result.steps, "perplexity_before": before, "perplexity_after": after,
            "tokens_per_second": result.tokens_per_second}


def _score(state: RunState) -> dict[str, Any]:
    c = state.config
    ids = state.ids("calibration", c.prune.calib_seq_len, c.prune.calib_samples) if c.prune.importance == "activation" else None
    scores = score_importance(
        state.teacher,
        state.spec,
        c.prune.importance,
        ids=ids,
        seed=c.seed,
        **(
            {
                "batch_size": c.batch_size,
                "batch_aggregation": c.prune.batch_aggregation,
                "sequence_aggregation": c.prune.sequence_aggregation,
                "bf16": c.bf16,
                "layer_metric": c.prune.layer_metric,
                "progress": state.progress,
            }
            if c.prune.importance == "activation"
            else {}
        ),
    )
    scores.save(state.dir / "scores.safetensors")
    return {"method": scores.method, "samples": scores.samples, "tokens": scores.tokens}


def _distill(state: RunState) -> dict[str, Any]:
    from compress.app.distillation import distill_student

    # Checkpoints resume only a run with the same settings and the same pruned student: the folder is
    # named after the stage's fingerprint, and folders of other settings are removed.
    checkpoints = state.dir / "checkpoints" / state.fingerprint
    for other in (state.dir / "checkpoints").glob("*"):
        if other != checkpoints:
            shutil.rmtree(other, ignore_errors=True)
    chosen = read_json(state.dir / "plan.json")
    if chosen["params"] >= chosen["teacher_params"]:
        shutil.rmtree(state.dir / "student", ignore_errors=True)
        return {"skipped": "the plan keeps every parameter: the student is the teacher"}
    references = state.student_references(state.config.eval.seq_len)
    metrics = distill_student(state.dir / "pruned", state.teacher, state.tokenizer, state.dataset, state.config,
                              state.dir / "student", checkpoints, progress=state.progress,
                              reference=references["validation"].teacher_top1,
                              others={k: (r.ids, r.teacher_top1) for k, r in references.items() if k != "validation"},
                              vocab_map=state.vocab_map, scales={k: r.nll_scale() for k, r in references.items()})
    return {**metrics, "student_mb": folder_mb(state.dir / "student")}


def _report(state: RunState) -> dict[str, Any]:
    from compress.app.report import write_report

    report = write_report(state.dir)
    return {"files": report["files"], "verdict": report["verdict"]}


def _plan(state: RunState) -> dict[str, Any]:
    return get_family(state.config.student).plan(state)


def _prune(state: RunState) -> dict[str, Any]:
    return get_family(state.config.student).prune(state)


def _export(state: RunState) -> dict[str, Any]:
    return get_family(state.config.student).export(state)


def _quantize(state: RunState) -> dict[str, Any]:
    if state.config.quant.recipe == "none":
        return {"quant": "none"}
    return get_family(state.config.student).quantize(state)


_STAGE_RUNNERS = {"correct": _correct, "score": _score, "plan": _plan, "prune": _prune, "distill": _distill,
                  "export": _export, "quantize": _quantize, "report": _report}
