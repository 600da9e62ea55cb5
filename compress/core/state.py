"""What every stage of a run shares: the run directory, the teacher, the data and the evaluation sets (loaded
lazily, so reused stages load nothing), the teacher's reference figures on every evaluation set, and loading the
checkpoints any student family writes.

Stages get a :class:`RunState`; student families (:mod:`compress.families`) implement their stages against it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.core.config import CompressConfig
from compress.core.family import load_model
from compress.errors import DataError
from compress.evaluation.quality import Perplexity, quality
from compress.io import read_json
from compress.pruning.archspec import ArchSpec, resolve
from compress.sources.data import GENERAL_EVAL, eval_set_name, load_corpus, token_batches
from compress.sources.teachers import load_teacher

log = logging.getLogger(__name__)

# ONNX Runtime runs a 16-bit QDQ graph as float with conversions, ~1.5 s per sequence here: every family's graphs
# are scored on the first sequences of each held-out set (the in-domain set in full).
GRAPH_HELD_OUT_SEQUENCES = 16


class RunState:
    """Lazily loaded shared state of one run (teacher, data) so reused stages load nothing."""

    def __init__(self, config: CompressConfig, progress: bool) -> None:
        self.config = config
        self.progress = progress
        self.dir = config.run_dir
        self._teacher: tuple[Any, Any] | None = None
        self._spec: ArchSpec | None = None
        self._dataset: Any = None
        self._eval_sets: dict[str, tuple[Any, str]] | None = None
        self._vocab_map: tuple[float, Any] | None = None
        self._vocab_importance: tuple[torch.Tensor, int] | None = None
        self.fingerprint = ""
        self.teacher_fingerprint = ""  # of the correct stage: which teacher, data and correction

    @property
    def teacher(self) -> Any:
        """The teacher every stage uses: the corrected one (``run_dir/teacher``) when correction is on."""
        if self._teacher is None:
            corrected = self.dir / "teacher"
            source = str(corrected) if self.config.correction.tokens and (corrected / "config.json").exists() else self.config.teacher
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

    def vocab_importance(self) -> tuple[torch.Tensor, int]:
        """The ``vocab`` axis's scores and floor for this run's data (:func:`compress.pruning.vocab.vocab_importance`),
        computed once: the early feasibility check and the plan stage both need the floor."""
        if self._vocab_importance is None:
            from compress.pruning.vocab import vocab_importance

            self._vocab_importance = vocab_importance(self.dataset, self.tokenizer, self.config, self.teacher,
                                                      self.spec.vocab)
        return self._vocab_importance

    def ids(self, split: str, seq_len: int, sequences: int) -> torch.Tensor:
        return token_batches(self.dataset, self.tokenizer, split, seq_len, sequences)

    @property
    def eval_sets(self) -> dict[str, tuple[Any, str]]:
        """Every evaluation set of the run, name -> (corpus, split): the training corpus's own validation split
        (``validation``, in-domain), the general English set (``general-english``) and each ``--eval-data``."""
        if self._eval_sets is None:
            sets: dict[str, tuple[Any, str]] = {"validation": (self.dataset, "validation")}
            for data in (GENERAL_EVAL, *self.config.eval.data):
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
        ids = token_batches(corpus, self.tokenizer, split, seq_len, self.config.eval.samples)
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

    @property
    def vocab_map(self) -> Any:
        """The student's vocabulary against the teacher's when the plan trims it
        (:class:`compress.pruning.vocab.VocabMap`), else None."""
        path = self.dir / "plan.json"
        stamp = path.stat().st_mtime_ns if path.exists() else 0.0
        if self._vocab_map is None or self._vocab_map[0] != stamp:
            kept = read_json(path).get("kept", {}).get("vocab") if path.exists() else None
            vocab_map = None
            if kept is not None:
                from compress.pruning.vocab import VocabMap

                vocab_map = VocabMap(kept, self.spec.vocab, self.tokenizer)
            self._vocab_map = (stamp, vocab_map)
        return self._vocab_map[1]

    def student_references(self, seq_len: int) -> dict[str, Reference]:
        """:meth:`references` as the student reads them: in its own vocabulary when the plan trims the vocabulary
        (``Reference.converted`` then says how its figures become per teacher token), else the same."""
        vocab_map = self.vocab_map
        references = self.references(seq_len)
        if vocab_map is None:
            return references
        out = {}
        for name, reference in references.items():
            converted = vocab_map.convert(reference.ids, reference.teacher_top1)
            out[name] = Reference(converted.ids, converted.teacher_top1, reference.teacher, converted)
        return out

    def evals(self, model: Any, seq_len: int) -> dict[str, dict[str, Any]]:
        """The student's fp32 perplexity and top-1 agreement with the teacher on every evaluation set (per teacher
        token of the same text when the vocabulary is trimmed)."""
        out = {}
        for name, reference in self.student_references(seq_len).items():
            measured = quality(model, reference.ids, self.config.batch_size, reference.teacher_top1,
                               progress=self.progress)
            scale = reference.nll_scale()
            out[name] = {"perplexity": per_teacher_token(measured.perplexity.perplexity, scale),
                         "agreement": per_teacher_agreement(measured.agreement, scale),
                         "tokens": reference.teacher_tokens(), "teacher_perplexity": reference.teacher.perplexity}
        return out


@dataclass(frozen=True)
class Reference:
    """Validation sequences and the teacher's perplexity and top-1 predictions on them; ``converted``, when the
    sequences are written in a trimmed student vocabulary (:class:`compress.pruning.vocab.Converted`)."""

    ids: torch.Tensor
    teacher_top1: torch.Tensor
    teacher: Perplexity
    converted: Any = None

    def nll_scale(self, rows: int | None = None) -> float:
        """What turns a per-token NLL of the first ``rows`` sequences into one per teacher token (1 untrimmed)."""
        return 1.0 if self.converted is None else self.converted.nll_scale(rows)

    def teacher_tokens(self, rows: int | None = None) -> int:
        """Teacher tokens the first ``rows`` sequences predict."""
        rows = len(self.ids) if rows is None else rows
        if self.converted is None:
            return rows * (self.ids.shape[1] - 1)
        return int(self.converted.teacher_tokens[:rows].sum())


def per_teacher_token(perplexity: float, scale: float) -> float:
    """A perplexity per student token as one per teacher token of the same text (``scale``: ``Reference.nll_scale``)."""
    return perplexity if scale == 1.0 else math.exp(min(math.log(perplexity) * scale, 700.0))


def per_teacher_agreement(agreement: float | None, scale: float) -> float | None:
    """Agreement counted over every student position as agreement over the positions that start a teacher token."""
    return agreement if agreement is None or scale == 1.0 else min(1.0, agreement * scale)


def folder_mb(path: Path) -> float:
    """Size on disk of a checkpoint's weight files, in MB."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6


def final_model(state: RunState) -> tuple[Path, Any]:
    """The model the graphs are made of: the distilled student, or the pruned (for Mu, the initialized) one when
    distillation was skipped; any student family."""
    source = state.dir / "student"
    if not (source / "config.json").exists():
        source = state.dir / "pruned"
    return source, load_model(source, dtype=torch.float32).eval()
