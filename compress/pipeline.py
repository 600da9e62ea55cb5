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

import numpy as np
import torch

from compress.archspec import ArchSpec, resolve
from compress.config import BLOCK_REPEATS, STAGES, CompressConfig
from compress.data import GENERAL_EVAL, eval_set_name, load_corpus, token_batches
from compress.errors import CompressError, DataError, RunDirectoryError
from compress.evaluate import Perplexity, mean_nll, perplexity, quality
from compress.io import read_json, write_json
from compress.planner import PruningPlan, feasible_shapes, plan
from compress.scoring import check_scores, score_importance
from compress.surgery import apply_plan, prune, save_checkpoint
from compress.teachers import load_teacher
from importance import ImportanceScores

log = logging.getLogger(__name__)

# Fields each stage's output depends on (plus every earlier stage's fingerprint).
_STAGE_FIELDS = {
    "correct": ("teacher", "data", "student", "teacher_correction_tokens", "teacher_correction_lr", "distill_seq_len",
                "distill_batch_size", "eval_samples", "eval_seq_len"),
    "score": ("importance", "calib_samples", "calib_seq_len", "batch_aggregation",
              "sequence_aggregation", "layer_metric", "bf16", "seed"),
    "plan": ("target_size", "axes", "align", "tolerance", "proxy", "search_candidates"),
    "prune": ("eval_samples", "eval_seq_len", "eval_data"),
    "distill": ("distill_tokens", "distill_seq_len", "distill_batch_size", "distill_grad_accum", "distill_lr",
                "distill_optimizer", "distill_schedule", "distill_temperature", "distill_kl_weight",
                "distill_ce_weight",
                "distill_eval_every", "distill_teacher_top_k"),
    "export": ("seq_len", "quant_transforms", "quant_calib_samples", "npu_profile"),
    "quantize": ("quant", "npu_profile", "quant_decode_calib_tokens"),
    "report": (),
}
# The source each stage's output depends on (folders or files under the project root), hashed into its
# fingerprint: after a code change the stages it touches run again, and every stage after them.
_STAGE_CODE = {
    "correct": ("compress/data.py", "compress/corpora.py", "compress/teachers.py", "distill"),
    "score": ("importance", "compress/scoring.py", "compress/archspec.py"),
    "plan": ("compress/planner.py", "compress/mobilellm.py", "compress/mu.py", "compress/students.py"),
    "prune": ("compress/surgery.py", "compress/evaluate.py", "compress/mu_init.py"),
    "distill": ("compress/distillation.py",),
    "export": ("quant/export.py", "quant/runtime.py", "compress/export.py", "compress/mu_export.py", "compress/outliers.py",
               "compress/quantization.py"),
    "quantize": ("quant", "compress/gptq.py", "compress/mu_run.py"),
    "report": ("compress/report.py",),
}
_OURS = ("compress", "distill", "quant", "importance", "benchmarks")
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


class _Run:
    """Lazily loaded shared state of one run (teacher, data) so reused stages load nothing."""

    def __init__(self, config: CompressConfig, progress: bool) -> None:
        self.config = config
        self.progress = progress
        self.dir = config.run_dir
        self._teacher: tuple[Any, Any] | None = None
        self._spec: ArchSpec | None = None
        self._dataset: Any = None
        self._eval_sets: dict[str, tuple[Any, str]] | None = None
        self.fingerprint = ""
        self.teacher_fingerprint = ""  # of the correct stage: which teacher, data and correction

    @property
    def teacher(self) -> Any:
        """The teacher every stage uses: the corrected one (``run_dir/teacher``) when correction is on."""
        if self._teacher is None:
            corrected = self.dir / "teacher"
            source = str(corrected) if self.config.teacher_correction_tokens and (corrected / "config.json").exists() else self.config.teacher
            log.info("loading teacher %s", source)
            self._teacher = load_teacher(source, self.config.trust_remote_code)
        return self._teacher[0]

    @property
    def tokenizer(self) -> Any:
        self.teacher  # noqa: B018 - loads both
        assert self._teacher is not None
        return self._teacher[1]

    @property
    def spec(self) -> ArchSpec:
        if self._spec is None:
            self._spec = resolve(self.teacher)
        return self._spec

    @property
    def dataset(self) -> Any:
        if self._dataset is None:
            self._dataset = load_corpus(self.config.data)
        return self._dataset

    def ids(self, split: str, seq_len: int, sequences: int) -> torch.Tensor:
        return token_batches(self.dataset, self.tokenizer, split, seq_len, sequences)

    @property
    def eval_sets(self) -> dict[str, tuple[Any, str]]:
        """Every evaluation set of the run, name -> (corpus, split): the training corpus's own validation split
        (``validation``, in-domain), the general English set (``general-english``) and each ``--eval-data``."""
        if self._eval_sets is None:
            sets: dict[str, tuple[Any, str]] = {"validation": (self.dataset, "validation")}
            for data in (GENERAL_EVAL, *self.config.eval_data):
                try:
                    sets[eval_set_name(data)] = (load_corpus(data, evaluation=True), "all")
                except DataError as error:  # load_corpus speaks of --data
                    raise DataError(str(error).replace("--data ", "--eval-data ", 1)) from error
            self._eval_sets = sets
        return self._eval_sets

    def validation(self, seq_len: int) -> Reference:
        """The run's in-domain validation sequences with the teacher's perplexity and top-1 (see :meth:`reference`)."""
        return self.reference("validation", seq_len)

    def references(self, seq_len: int) -> dict[str, Reference]:
        """:meth:`reference` of every evaluation set, the in-domain validation first."""
        return {name: self.reference(name, seq_len) for name in self.eval_sets}

    def reference(self, name: str, seq_len: int) -> Reference:
        """One evaluation set's sequences of ``seq_len`` tokens with the teacher's perplexity and top-1 on them.

        Every model and graph of the run is measured on these, so their numbers compare. The teacher's part
        is computed once per set and length and kept in ``validation.<seq_len>.safetensors`` (the in-domain
        set) or ``eval.<name>.<seq_len>.safetensors``.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        corpus, split = self.eval_sets[name]
        ids = token_batches(corpus, self.tokenizer, split, seq_len, self.config.eval_samples)
        path = self.dir / (f"validation.{seq_len}.safetensors" if name == "validation" else f"eval.{name}.{seq_len}.safetensors")
        if path.exists():
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
            stored = load_file(str(path))
            if meta.get("teacher") == self.teacher_fingerprint and torch.equal(stored["ids"], ids):
                return Reference(ids, stored["teacher_top1"], Perplexity(**json.loads(meta["perplexity"])))
        measured = quality(self.teacher, ids, self.config.batch_size, progress=self.progress)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"ids": ids.contiguous(), "teacher_top1": measured.top1.contiguous()}, str(tmp),
                  metadata={"teacher": self.teacher_fingerprint, "perplexity": json.dumps(measured.perplexity.to_dict())})
        tmp.replace(path)
        return Reference(ids, measured.top1, measured.perplexity)

    def evals(self, model: Any, seq_len: int) -> dict[str, dict[str, Any]]:
        """The model's fp32 perplexity and top-1 agreement with the teacher on every evaluation set."""
        out = {}
        for name, reference in self.references(seq_len).items():
            measured = quality(model, reference.ids, self.config.batch_size, reference.teacher_top1,
                               progress=self.progress)
            out[name] = {"perplexity": measured.perplexity.perplexity, "agreement": measured.agreement,
                         "tokens": measured.perplexity.tokens, "teacher_perplexity": reference.teacher.perplexity}
        return out


@dataclass(frozen=True)
class Reference:
    """Validation sequences and the teacher's perplexity and top-1 predictions on them."""

    ids: torch.Tensor
    teacher_top1: torch.Tensor
    teacher: Perplexity


def folder_mb(path: Path) -> float:
    """Size on disk of a checkpoint's weight files, in MB."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6


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
    # Our INFO lines, and everyone's warnings (onnxscript's optimizer alone logs hundreds of INFO lines).
    handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.split(".")[0] in _OURS)
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        log.info("run %s: %s", config.run_dir, json.dumps(config.to_dict()))
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
    state = _Run(config, progress)
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
    if "plan" in fingerprints and done.get("plan") != fingerprints["plan"] and config.student != "mu":
        # Refuse an infeasible target before the expensive scoring stage, not after it.
        feasible_shapes(state.spec, state.teacher.config, config.target, config.axes, config.align, config.tolerance)
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


def _resolved(config: CompressConfig, stage: str) -> str:
    """What a stage reads beyond its config fields, every default resolved: the distillation settings, the
    quantization recipe and the NPU profile, as JSON (so a changed default reruns the stage)."""
    from dataclasses import asdict

    from quant.profiles import get_profile
    from quant.quantize import PRESETS

    if stage == "distill":
        return json.dumps(config.distill_config().to_dict(), sort_keys=True)
    if stage == "export":
        return json.dumps(asdict(get_profile(config.npu_profile)), sort_keys=True, default=str)
    if stage == "quantize" and config.quant != "none":
        return json.dumps(PRESETS[config.quant].to_dict(), sort_keys=True, default=str)
    return ""


def code_version(stage: str) -> str:
    """A hash of the source files a stage's output depends on (``_STAGE_CODE``)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for entry in _STAGE_CODE[stage]:
        path = root / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if file.exists():
                digest.update(file.relative_to(root).as_posix().encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _correct(state: _Run) -> dict[str, Any]:
    """Minitron's teacher correction: a short cross-entropy fine-tune of the teacher on the training split."""
    c = state.config
    corrected = state.dir / "teacher"
    if not c.teacher_correction_tokens:
        shutil.rmtree(corrected, ignore_errors=True)
        return {"tokens": 0}
    from distill import DistillConfig, distill

    teacher = state.teacher
    if (corrected / "config.json").exists():  # settings changed: start again from the original teacher
        shutil.rmtree(corrected)
        state._teacher = None
        teacher = state.teacher
    train = state.ids("train", c.distill_seq_len, -(-c.teacher_correction_tokens // c.distill_seq_len))
    valid = state.ids("validation", c.eval_seq_len, c.eval_samples)
    before = perplexity(teacher, valid, c.batch_size).perplexity
    settings = DistillConfig(tokens=c.teacher_correction_tokens, batch_size=c.distill_batch_size,
                             lr=c.teacher_correction_lr, kl_weight=0.0, ce_weight=1.0, eval_every=0,
                             checkpoint_every=0, bf16=c.bf16, seed=c.seed)
    teacher.requires_grad_(True)
    result = distill(teacher, None, train, settings, progress=state.progress)
    teacher.requires_grad_(False).eval()
    after = perplexity(teacher, valid, c.batch_size).perplexity
    save_checkpoint(teacher, state.tokenizer, corrected)
    return {"tokens": result.tokens, "steps": result.steps, "perplexity_before": before, "perplexity_after": after,
            "tokens_per_second": result.tokens_per_second}


def _score(state: _Run) -> dict[str, Any]:
    c = state.config
    ids = state.ids("calibration", c.calib_seq_len, c.calib_samples) if c.importance == "activation" else None
    scores = score_importance(
        state.teacher,
        state.spec,
        c.importance,
        ids=ids,
        seed=c.seed,
        **(
            {
                "batch_size": c.batch_size,
                "batch_aggregation": c.batch_aggregation,
                "sequence_aggregation": c.sequence_aggregation,
                "bf16": c.bf16,
                "layer_metric": c.layer_metric,
                "progress": state.progress,
            }
            if c.importance == "activation"
            else {}
        ),
    )
    scores.save(state.dir / "scores.safetensors")
    return {"method": scores.method, "samples": scores.samples, "tokens": scores.tokens}


def _plan(state: _Run) -> dict[str, Any]:
    c = state.config
    if c.student == "mu":
        from compress import mu_run

        return mu_run.plan_stage(state)
    scores = ImportanceScores.load(state.dir / "scores.safetensors")
    check_scores(scores, state.spec)
    calib = state.ids("calibration", c.calib_seq_len, _PROXY_SEQUENCES) if c.proxy == "loss" else None
    teacher, spec = state.teacher, state.spec

    repeats = BLOCK_REPEATS[c.student]

    def evaluate(kept: dict[str, list[int]], shape: Any) -> float:
        candidate = prune(teacher, spec, shape, kept)
        if repeats > 1:
            from compress.mobilellm import share_blocks

            candidate = share_blocks(candidate, repeats)
        return mean_nll(candidate, calib, batch_size=c.batch_size, bf16=c.bf16)

    chosen = plan(
        spec,
        teacher.config,
        scores,
        c.target,
        axes=c.axes,
        align=c.align,
        tolerance=c.tolerance,
        proxy=c.proxy,
        search_candidates=c.search_candidates,
        evaluate=evaluate if spec.causal_lm and c.proxy == "loss" else None,
        repeats=repeats,
    )
    chosen.save(state.dir / "plan.json")
    return {
        "shape": chosen.shape.to_dict(),
        "params": chosen.params,
        "teacher_params": chosen.teacher_params,
        "target_params": chosen.target_params,
        "candidates": len(chosen.candidates),
        "reason": chosen.reason,
    }


def _prune(state: _Run) -> dict[str, Any]:
    c = state.config
    if c.student == "mu":
        from compress import mu_run

        return mu_run.prune_stage(state)
    chosen = PruningPlan.load(state.dir / "plan.json")
    student = apply_plan(state.teacher, state.spec, chosen)
    save_checkpoint(student, state.tokenizer, state.dir / "pruned")
    metrics: dict[str, Any] = {"params": chosen.params, "teacher_params": chosen.teacher_params,
                               "pruned_mb": folder_mb(state.dir / "pruned")}
    if state.spec.causal_lm:
        evals = state.evals(student, c.eval_seq_len)
        valid = evals["validation"]
        metrics.update(
            teacher_perplexity=valid["teacher_perplexity"],
            pruned_perplexity=valid["perplexity"],
            pruned_agreement=valid["agreement"],
            validation_tokens=valid["tokens"],
            validation_seq_len=c.eval_seq_len,
            evals=evals,
        )
    return metrics


def _distill(state: _Run) -> dict[str, Any]:
    from compress.distillation import distill_student

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
    references = state.references(state.config.eval_seq_len)
    metrics = distill_student(state.dir / "pruned", state.teacher, state.tokenizer, state.dataset, state.config,
                              state.dir / "student", checkpoints, progress=state.progress,
                              reference=references["validation"].teacher_top1,
                              others={k: (r.ids, r.teacher_top1) for k, r in references.items() if k != "validation"})
    return {**metrics, "student_mb": folder_mb(state.dir / "student")}


def load_model(path: Path, **kwargs: Any) -> Any:
    """A checkpoint of any student family: a causal LM, or an encoder-decoder (Mu-like) one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = _registered(AutoConfig).from_pretrained(path)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return auto.from_pretrained(path, **kwargs)


def _registered(auto: Any) -> Any:
    """``auto`` after the student families' classes are registered with it (see compress.students)."""
    from compress.students import register

    register()
    return auto


def final_model(state: _Run) -> tuple[Path, Any]:
    """The model the graphs are made of: the distilled student, or the pruned (for Mu, the initialized) one when
    distillation was skipped; any student family."""
    source = state.dir / "student"
    if not (source / "config.json").exists():
        source = state.dir / "pruned"
    return source, load_model(source, dtype=torch.float32).eval()


def _prepared(state: _Run) -> tuple[Path, Any, torch.Tensor]:
    from compress.quantization import prepare
    from quant.profiles import get_profile

    c = state.config
    source, model = final_model(state)
    calib = state.ids("calibration", c.seq_len, c.quant_calib_samples)
    conv = get_profile(c.npu_profile).linear_as_conv
    return source, prepare(model, c.seq_len, c.quant_transforms, calib, seed=c.seed, conv=conv), calib


def _export(state: _Run) -> dict[str, Any]:
    from safetensors.numpy import save_file

    from compress.quantization import export_graphs, measure
    from quant import runtime

    c = state.config
    if c.student == "mu":
        from compress import mu_run

        return mu_run.export_stage(state)
    source, lm, _ = _prepared(state)
    folder = state.dir / "onnx"
    shutil.rmtree(folder, ignore_errors=True)  # graphs of other settings (and their quantized copies) go
    prefill, decode = export_graphs(lm, folder)
    references = state.references(c.seq_len)
    reference = references["validation"]
    valid = reference.ids
    with torch.no_grad():
        expected = lm.prefill(valid[:1])[0].numpy()
    got = runtime.prefill_logits(runtime.session(prefill), valid[:1].numpy())
    metrics, top1 = measure(prefill, decode, valid.numpy(), reference.teacher_top1.numpy(), progress=state.progress,
                            others=_graph_sets(references))
    save_file({"top1": top1}, str(folder / "model.top1.safetensors"))  # the reference of the integer graphs
    return {"source": str(source), "seq_len": c.seq_len, "transforms": list(c.quant_transforms),
            "max_abs_diff_vs_torch": float(np.abs(got - expected).max()), "teacher_perplexity": reference.teacher.perplexity,
            "fp32": metrics}


# ONNX Runtime runs a 16-bit QDQ graph as float with conversions, ~1.5 s per sequence here: the graphs are
# scored on the first sequences of each held-out set (the in-domain set in full).
GRAPH_HELD_OUT_SEQUENCES = 16


def _graph_sets(references: dict[str, Reference]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The evaluation sets other than the in-domain one, for the graphs (agreement with the teacher's top-1)."""
    n = GRAPH_HELD_OUT_SEQUENCES
    return {k: (r.ids[:n].numpy(), r.teacher_top1[:n].numpy()) for k, r in references.items() if k != "validation"}


def _quantize(state: _Run) -> dict[str, Any]:
    from safetensors.numpy import load_file

    from compress.quantization import measure, quantize_graphs
    from quant.profiles import get_profile
    from quant.quantize import PRESETS

    c = state.config
    if c.quant == "none":
        return {"quant": "none"}
    if c.student == "mu":
        from compress import mu_run

        return mu_run.quantize_stage(state)
    _, lm, calib = _prepared(state)
    folder = state.dir / "onnx"
    references = state.references(c.seq_len)
    reference = references["validation"]
    float_top1 = load_file(str(folder / "model.top1.safetensors"))["top1"]
    graphs = quantize_graphs(lm, folder, PRESETS[c.quant], get_profile(c.npu_profile), calib.numpy(),
                             decode_calib_tokens=c.quant_decode_calib_tokens,
                             progress=state.progress)
    metrics, top1 = measure(graphs.prefill, graphs.decode, reference.ids.numpy(), float_top1, progress=state.progress,
                            others=_graph_sets(references))
    metrics["agreement_with_float"] = metrics.pop("agreement")
    if "decode_agreement" in metrics:
        metrics["decode_agreement_with_float"] = metrics.pop("decode_agreement")
    metrics["agreement"] = float((top1 == reference.teacher_top1.numpy()).mean())
    violations = graphs.violations["prefill"] + graphs.violations["decode"]
    if violations:
        log.warning("%d violations of the %s profile; see `compress inspect %s --npu-profile %s`",
                    len(violations), c.npu_profile, graphs.prefill, c.npu_profile)
    return {"quant": c.quant, "npu_profile": c.npu_profile, c.quant: metrics, "violations": violations,
            "reports": {k: v.to_dict() for k, v in graphs.reports.items()}}


def _report(state: _Run) -> dict[str, Any]:
    from compress.report import write_report

    report = write_report(state.dir)
    return {"files": report["files"], "verdict": report["verdict"]}


_STAGE_RUNNERS = {"correct": _correct, "score": _score, "plan": _plan, "prune": _prune, "distill": _distill,
                  "export": _export, "quantize": _quantize, "report": _report}
