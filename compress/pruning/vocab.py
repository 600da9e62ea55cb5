"""Vocabulary trimming: which tokens a student keeps, the tokenizer rewritten to match, and the teacher's token
sequences written in the student's vocabulary.

A student keeps a set of the teacher's token ids (``plan.kept["vocab"]``, sorted: student id ``i`` is teacher id
``kept[i]``). The set always holds the *floor*: the special tokens, the unknown token, the byte tokens of a
byte-fallback tokenizer (or the base alphabet of one without), every token of the data the student is trained
and calibrated on, and every token that a kept token is merged from. The trimmed tokenizer keeps exactly those
tokens and the merges between them, so any text that the teacher's tokenizer spells with kept tokens is spelled
the same way, and any other text still tokenizes, into smaller kept pieces (bytes at worst). The student loads
with plain ``from_pretrained`` and its tokenizer with ``AutoTokenizer.from_pretrained``.

The run's evaluation sets are the teacher's token sequences; :meth:`VocabMap.convert` writes them in the student's
vocabulary (a removed token becomes the pieces the trimmed tokenizer gives it) at the same length, and says how
to turn a perplexity per student token into one per teacher token of the same text, so a trimmed student's
figures stand next to the teacher's.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.errors import UnsupportedArchitectureError

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def trim_refusal(tokenizer: Any) -> str | None:
    """Why ``tokenizer`` cannot be trimmed (None: it can)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return f"vocabulary trimming rewrites a fast (tokenizers) tokenizer; {type(tokenizer).__name__} is not one"
    kind = json.loads(backend.to_str())["model"]["type"]
    return None if kind == "BPE" else f"vocabulary trimming rewrites BPE tokenizers; this teacher's is {kind}"


def _backend(tokenizer: Any) -> dict[str, Any]:
    if reason := trim_refusal(tokenizer):
        raise UnsupportedArchitectureError(f"{reason}. Drop 'vocab' from --axes")
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _merge_pair(merge: Any) -> tuple[str, str]:
    if isinstance(merge, str):
        left, right = merge.split(" ", 1)
        return left, right
    return merge[0], merge[1]


def _config_ids(*configs: Any) -> set[int]:
    """The token ids a model's configs name (bos, eos, pad, decoder start), lists included."""
    ids: set[int] = set()
    for config in configs:
        for key in TOKEN_ID_KEYS:
            value = getattr(config, key, None) if config is not None else None
            for one in value if isinstance(value, list | tuple) else [value]:
                if isinstance(one, int) and one >= 0:
                    ids.add(one)
    return ids


def floor_tokens(tokenizer: Any, *configs: Any) -> set[int]:
    """Token ids every trimmed vocabulary keeps, whatever the data: special, unknown and byte (or alphabet) tokens."""
    data = _backend(tokenizer)
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    ids = set(tokenizer.all_special_ids) | _config_ids(*configs)
    ids |= {t["id"] for t in data.get("added_tokens", []) if t.get("special") and t["content"] in tokenizer.all_special_tokens}
    if model.get("unk_token") in vocab:
        ids.add(vocab[model["unk_token"]])
    if model.get("byte_fallback"):
        ids |= {vocab[b] for b in (f"<0x{i:02X}>" for i in range(256)) if b in vocab}
    else:  # without byte fallback a character outside the vocabulary is lost: keep every unmerged token
        merged = {"".join(_merge_pair(m)) for m in model.get("merges", [])}
        ids |= {i for token, i in vocab.items() if token not in merged}
    return ids


def merge_closure(tokenizer: Any, kept: Iterable[int]) -> set[int]:
    """``kept`` and every token a kept token is merged from, recursively (so the trimmed merges still build it)."""
    model = _backend(tokenizer)["model"]
    vocab: dict[str, int] = model["vocab"]
    parents: dict[int, list[tuple[int, int]]] = {}
    for merge in model.get("merges", []):
        left, right = _merge_pair(merge)
        result = vocab.get(left + right)
        if result is not None and left in vocab and right in vocab:
            parents.setdefault(result, []).append((vocab[left], vocab[right]))
    closed, todo = set(kept), list(kept)
    while todo:
        for pair in parents.get(todo.pop(), ()):
            for parent in pair:
                if parent not in closed:
                    closed.add(parent)
                    todo.append(parent)
    return closed


def vocab_scores(tokenizer: Any, vocab_size: int, data: Sequence[torch.Tensor], *configs: Any) -> tuple[torch.Tensor, int]:
    """Importance of every teacher token id for the ``vocab`` axis, and the floor's size.

    The floor (:func:`floor_tokens`, the tokens of ``data`` and what they are merged from) scores above everything;
    the other tokens rank by their count in ``data`` (zero for most), then by id (a BPE vocabulary lists its
    tokens in the order they were learned, the most frequent first)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in data:
        counts += torch.bincount(ids.reshape(-1), minlength=vocab_size)[:vocab_size].double()
    seen = set(torch.nonzero(counts).reshape(-1).tolist())
    floor = merge_closure(tokenizer, seen | floor_tokens(tokenizer, *configs))
    floor = {i for i in floor if i < vocab_size}
    # Rank: floor first, then count, then the tokenizer's own order. Scores are positive and strictly ordered.
    rank = torch.arange(vocab_size, dtype=torch.float64)
    scores = 1.0 + (vocab_size - rank) / (vocab_size + 1) + counts  # count, then id
    index = torch.tensor(sorted(floor), dtype=torch.long)
    scores[index] += float(scores.max()) + 1.0
    return scores.float(), len(floor)


def _renumber_post_processor(node: Any, new_id: dict[int, int]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                out[key] = [new_id[i] for i in value]
            elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2:
                out[key] = [value[0], new_id[value[1]]]
            else:
                out[key] = _renumber_post_processor(value, new_id)
        return out
    if isinstance(node, list):
        return [_renumber_post_processor(v, new_id) for v in node]
    return node


def trim_tokenizer(tokenizer: Any, kept: Sequence[int]) -> Any:
    """The teacher's tokenizer with only the ``kept`` token ids (sorted), renumbered 0..len-1, and the merges
    between them; same class and settings, loaded back through ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    data = _backend(tokenizer)
    model = data["model"]
    new_id = {old: new for new, old in enumerate(kept)}
    vocab = {token: new_id[i] for token, i in model["vocab"].items() if i in new_id}
    model["vocab"] = vocab
    model["merges"] = [m for m in model.get("merges", [])
                       if (pair := _merge_pair(m))[0] in vocab and pair[1] in vocab and pair[0] + pair[1] in vocab]
    data["added_tokens"] = [{**t, "id": new_id[t["id"]]} for t in data.get("added_tokens", []) if t["id"] in new_id]
    missing = [tokenizer.convert_ids_to_tokens(i) for i in tokenizer.all_special_ids if i not in new_id]
    if missing:
        raise ValueError(f"the kept vocabulary lacks the special tokens {missing}")
    if data.get("post_processor") is not None:
        data["post_processor"] = _renumber_post_processor(data["post_processor"], new_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        for name in ("tokenizer.model", "vocab.json", "merges.txt", "spiece.model"):  # formats of the old vocabulary
            (folder / name).unlink(missing_ok=True)
        (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
        settings = folder / "tokenizer_config.json"
        if settings.exists():
            values = json.loads(settings.read_text())
            if "added_tokens_decoder" in values:
                values["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in values["added_tokens_decoder"].items()
                                                  if int(k) in new_id}
            settings.write_text(json.dumps(values, ensure_ascii=False, indent=2))
        trimmed = AutoTokenizer.from_pretrained(folder)
        trimmed.name_or_path = tokenizer.name_or_path
    return trimmed


def remapped_token_ids(values: dict[str, Any], kept: Sequence[int]) -> dict[str, Any]:
    """The token ids of a config's ``values`` (bos, eos, pad, decoder start; ints or lists) renumbered into the
    kept vocabulary: only the keys present and set."""
    new_id = {old: new for new, old in enumerate(kept)}
    out: dict[str, Any] = {}
    for key in TOKEN_ID_KEYS:
        value = values.get(key)
        if isinstance(value, int) and value >= 0:
            out[key] = new_id[value]
        elif isinstance(value, list | tuple):
            out[key] = [new_id[v] for v in value]
    return out


def kept_ids(ids: torch.Tensor, kept: Sequence[int], teacher_vocab: int) -> torch.Tensor:
    """Teacher ids that are all in ``kept`` (sorted teacher ids), renumbered into the kept vocabulary."""
    to_student = torch.full((teacher_vocab,), -1, dtype=torch.long)
    to_student[torch.as_tensor(list(kept), dtype=torch.long)] = torch.arange(len(kept))
    return to_student[ids]


@dataclass(frozen=True)
class Converted:
    """Teacher sequences written in a student's vocabulary, at the same length.

    ``ids`` [n, L] feed the student; ``teacher_top1`` [n, L-1] is the teacher's next-token choice at the student
    positions that predict the start of a teacher token (its first piece), -1 elsewhere. ``teacher_tokens[i]``
    counts the teacher tokens whose start row ``i`` predicts (the positions ``teacher_top1`` is set at)."""

    ids: torch.Tensor
    teacher_top1: torch.Tensor | None
    teacher_tokens: torch.Tensor

    def nll_scale(self, rows: int | None = None) -> float:
        """Student-token NLL of the first ``rows`` rows times this is the NLL per teacher token of the same text
        (to within a token at each end of a row); agreement counted over every student position times this is
        agreement over the positions that start a teacher token."""
        rows = len(self.ids) if rows is None else rows
        return rows * (self.ids.shape[1] - 1) / max(int(self.teacher_tokens[:rows].sum()), 1)


class VocabMap:
    """A trimmed student's vocabulary against its teacher's: ``kept[i]`` is the teacher id of student id ``i``."""

    def __init__(self, kept: Sequence[int], teacher_vocab: int, teacher_tokenizer: Any,
                 trimmed_tokenizer: Any | None = None) -> None:
        self.kept = torch.tensor(list(kept), dtype=torch.long)
        self.teacher_vocab = teacher_vocab
        self.to_student = kept_ids(torch.arange(teacher_vocab), kept, teacher_vocab)
        self.tokenizer = trimmed_tokenizer if trimmed_tokenizer is not None else trim_tokenizer(teacher_tokenizer, kept)
        data = _backend(teacher_tokenizer)
        # A removed token's pieces are found from its string, which only the teacher's vocabulary still has.
        self._strings = {i: t for t, i in data["model"]["vocab"].items()}
        for added in data.get("added_tokens", []):
            self._strings.setdefault(added["id"], added["content"])
        self._pieces: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.kept)

    def pieces(self, teacher_id: int) -> list[int]:
        """The student ids that spell one teacher token (itself when kept)."""
        student = int(self.to_student[teacher_id])
        if student >= 0:
            return [student]
        if teacher_id not in self._pieces:
            token = self._strings.get(teacher_id)
            spelled = [t.id for t in self.tokenizer.backend_tokenizer.model.tokenize(token)] if token else []
            # An embedding row no tokenizer entry names (padding rows) is spelled as the unknown/first token.
            self._pieces[teacher_id] = spelled or [0]
        return self._pieces[teacher_id]

    def student_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Teacher ids that are all kept, as student ids (ValueError naming a removed one otherwise)."""
        mapped = self.to_student[ids]
        if bool((mapped < 0).any()):
            removed = int(ids[mapped < 0][0])
            raise ValueError(f"teacher token {removed} is not in the trimmed vocabulary")
        return mapped

    def convert(self, ids: torch.Tensor, teacher_top1: torch.Tensor | None = None) -> Converted:
        """``ids`` [n, L] (teacher ids) in the student's vocabulary: see :class:`Converted`."""
        rows, length = ids.shape
        out = torch.empty_like(ids)
        top1 = None if teacher_top1 is None else torch.full_like(teacher_top1, -1)
        counted = torch.zeros(rows, dtype=torch.long)
        mapped = self.to_student[ids]
        for r in range(rows):
            if bool((mapped[r] >= 0).all()):  # the common case: every token kept
                out[r] = mapped[r]
                if top1 is not None:
                    top1[r] = torch.tensor([self.pieces(int(t))[0] for t in teacher_top1[r]])
                counted[r] = length - 1
                continue
            row: list[int] = []
            starts: list[int] = []
            for token in ids[r].tolist():
                starts.append(len(row))
                row.extend(self.pieces(token))
                if len(row) >= length:
                    break
            out[r] = torch.tensor(row[:length])
            # Teacher token i (i >= 1) starting at student position s is predicted at position s - 1.
            predicted = [(i, s) for i, s in enumerate(starts) if i >= 1 and s <= length - 1]
            counted[r] = len(predicted)
            if top1 is not None:
                for i, s in predicted:
                    top1[r, s - 1] = self.pieces(int(teacher_top1[r, i - 1]))[0]
        return Converted(out, top1, counted)


__all__ = ["Converted", "VocabMap", "floor_tokens", "kept_ids", "merge_closure",
           "remapped_token_ids", "trim_tokenizer", "vocab_scores"]


def vocab_importance(dataset: Any, tokenizer: Any, config: Any, teacher: Any, vocab_size: int) -> tuple[torch.Tensor, int]:
    """The ``vocab`` axis's scores and floor (:func:`vocab_scores`) from the tokens a run with ``config`` trains and
    calibrates on: the distillation's training sequences and both calibration sets."""
    from compress.sources.data import token_batches

    c = config
    data = [token_batches(dataset, tokenizer, "train", c.distill.seq_len, c.training_sequences()),
            token_batches(dataset, tokenizer, "calibration", c.prune.calib_seq_len, c.prune.calib_samples),
            token_batches(dataset, tokenizer, "calibration", c.quant.seq_len, c.quant.calib_samples)]
    return vocab_scores(tokenizer, vocab_size, data, teacher.config, getattr(teacher, "generation_config", None))
