"""Evaluation on (request, call) pairs: greedy decoding, the call parsed as JSON, exact match and response time.

A pairs file is JSON lines, each ``{"input": request, "output": call}`` where the call is one JSON object naming a
``setting`` (and usually a ``value``): the settings-agent task's format (:mod:`compress.sources.settings_agent`), or
any hand-written file of the same shape. :func:`evaluate_calls` decodes every request greedily, from a checkpoint
(:class:`CheckpointDecoder`) or through a run's integer graphs (:class:`GraphDecoder`), and reports:

- ``exact_match``: the output parses to the reference call (same setting, same value);
- ``setting_accuracy``: the setting alone is right;
- ``invalid_rate``: the output is not one JSON object with a ``setting``; ``unknown_setting_rate``: it names a
  setting the catalog does not hold;
- ``first_token_ms`` and ``call_ms`` (median and 90th percentile): the request to its first output token, and to the
  whole call (EOS or the token limit), one request at a time, on this machine;
- ``by_tag``: exact match of the pairs that carry each tag, when rows have ``"tags"`` (the settings-agent test split's
  say what kind of request each is: a name or value training never used, a relative change, a typo, ...).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import DataError
from compress.evaluation.call_grammar import CallGrammar


@dataclass(frozen=True)
class CallPair:
    """One request and its reference call (parsed)."""

    request: str
    call: dict[str, Any]
    tags: tuple[str, ...] = ()  # what kind of request it is (the settings-agent test split's "tags"), if the file says


def read_pairs(path: str | Path) -> list[CallPair]:
    """The pairs of a JSON-lines file; one DataError naming the line and what to fix for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--pairs {path}: no such file; pass a .jsonl file of {{\"input\": request, \"output\": call}} "
                        "rows (compress task settings-agent --out DIR writes one)")
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"--pairs {path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not JSON ({error.msg}); each line must be one object "
                                '{"input": "<request>", "output": "<call as JSON>"}') from error
            if not isinstance(row, dict) or not isinstance(row.get("input"), str) or "output" not in row:
                raise DataError(f'{where}: each line needs an "input" text and an "output" call, e.g. {{"input": '
                                '"turn on night light", "output": "{\\"setting\\": \\"display.night_light\\", '
                                '\\"value\\": true}"}')
            tags = row.get("tags", [])
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise DataError(f'{where}: "tags", when given, must be a list of texts, e.g. ["toggle", "typo"]')
            call = _parse(row["output"]) if isinstance(row["output"], str) else row["output"]
            if not isinstance(call, dict) or not isinstance(call.get("setting"), str):
                raise DataError(f'{where}: the "output" must be a call, a JSON object with a "setting" (got '
                                f"{json.dumps(row['output'])[:80]})")
            pairs.append(CallPair(row["input"], call, tuple(tags)))
    if not pairs:
        raise DataError(f"--pairs {path}: the file holds no pairs")
    return pairs


def _parse(text: str) -> Any:
    """The first line of ``text`` as JSON, or None."""
    lines = text.strip().splitlines()
    try:
        return json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        return None


def known_settings(catalog: str | Path | None, pairs: Sequence[CallPair]) -> set[str]:
    """Setting ids a model may name: a catalog.json's (``{"settings": [{"id": ...}]}``), else those the pairs name."""
    if catalog is None:
        return {p.call["setting"] for p in pairs}
    try:
        return {s["id"] for s in json.loads(Path(catalog).read_text())["settings"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"--catalog {catalog}: not a catalog ({error}); pass the catalog.json that compress task "
                        "settings-agent writes, or leave --catalog out to take the settings the pairs name") from error


@dataclass
class Answer:
    """What a model answered to one request, and how long it took."""

    request: str
    text: str
    tokens: int
    first_token_s: float
    call_s: float


def stop_tokens(tokenizer: Any, model_config: Any) -> set[int]:
    """The token ids that end an answer: the tokenizer's EOS and the model config's."""
    return {t for t in (tokenizer.eos_token_id, getattr(model_config, "eos_token_id", None)) if isinstance(t, int)}


class Decoder:
    """Greedy decoding of one request: ``begin(prompt ids)`` gives the first output token's logits and a step function
    for the next ones."""

    eos: set[int]

    def begin(self, prompt: list[int]) -> tuple[np.ndarray, Callable[[int], np.ndarray]]:
        raise NotImplementedError

    def answer(self, request: str, prompt: list[int], max_new_tokens: int, tokenizer: Any,
               grammar: CallGrammar | None = None) -> Answer:
        """The greedy answer to ``prompt``; with ``grammar``, the likeliest call it allows."""
        started = time.perf_counter()
        logits, step = self.begin(prompt)
        node = grammar.root if grammar else None
        token, node = _pick(logits, grammar, node)
        first = time.perf_counter() - started
        tokens = [token]
        while token not in self.eos and len(tokens) < max_new_tokens:
            token, node = _pick(step(token), grammar, node)
            tokens.append(token)
        total = time.perf_counter() - started
        text = tokenizer.decode([t for t in tokens if t not in self.eos], skip_special_tokens=True)
        return Answer(request, text, len(tokens), first, total)


def _pick(logits: np.ndarray, grammar: CallGrammar | None, node: dict | None) -> tuple[int, dict | None]:
    """The next token (greedy, or the likeliest the grammar allows at ``node``) and the grammar's node after it."""
    if grammar is None or node is None:
        return int(np.argmax(logits)), None
    token = grammar.choose(node, logits)
    return token, node[token]


class CheckpointDecoder(Decoder):
    """A torch checkpoint, decoded as its family decodes one (:meth:`StudentFamily.begin_checkpoint_generation`)."""

    def __init__(self, family: Any, model: Any, eos: set[int]) -> None:
        self.family, self.model, self.eos = family, model.eval(), eos

    def begin(self, prompt: list[int]) -> tuple[np.ndarray, Callable[[int], np.ndarray]]:
        return self.family.begin_checkpoint_generation(self.model, prompt)


class GraphDecoder(Decoder):
    """A run's ONNX graphs through its family's host loop (prefill + decode, or encoder + decoder)."""

    def __init__(self, family: Any, first: Path, step: Path, model_config: Any, eos: set[int],
                 open_session: Callable[[Path], Any] | None = None) -> None:
        """``open_session`` opens each graph (default: ONNX Runtime on this CPU; the HTP emulator's session in
        :mod:`compress.app.htp_calls`)."""
        from quant import runtime

        self.family, self.model_config, self.eos = family, model_config, eos
        opened = open_session or runtime.session
        self.first, self.step = opened(first), opened(step)
        self.prompt_limit = int(self.first.get_inputs()[0].shape[1])

    def begin(self, prompt: list[int]) -> tuple[np.ndarray, Callable[[int], np.ndarray]]:
        cache, logits = self.family.begin_generation(self.first, self.step, prompt, self.model_config)
        return np.asarray(logits), cache.step


@dataclass
class CallReport:
    """Accuracy and response time on a pairs file (see the module docstring)."""

    pairs: int
    exact_match: float
    setting_accuracy: float
    invalid_rate: float
    unknown_setting_rate: float
    first_token_ms_p50: float
    first_token_ms_p90: float
    call_ms_p50: float
    call_ms_p90: float
    output_tokens_p50: float
    by_tag: dict[str, dict[str, float]] = field(default_factory=dict)  # tag -> pairs, exact_match (tagged pairs only)
    answers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, answers: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not answers:
            out.pop("answers")
        return out


def _p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def score(answers: Sequence[Answer], pairs: Sequence[CallPair], known: set[str]) -> CallReport:
    """Exact match, setting accuracy, invalid and unknown-setting rates and times of ``answers`` to ``pairs``."""
    exact = setting = invalid = unknown = 0
    rows = []
    for answer, pair in zip(answers, pairs, strict=True):
        call = _parse(answer.text)
        valid = isinstance(call, dict) and isinstance(call.get("setting"), str)
        invalid += not valid
        unknown += valid and call["setting"] not in known
        setting += valid and call["setting"] == pair.call["setting"]
        exact += valid and call == pair.call
        rows.append({"input": pair.request, "expected": pair.call, "output": answer.text, "exact": valid and call == pair.call,
                     "first_token_ms": answer.first_token_s * 1000, "call_ms": answer.call_s * 1000,
                     **({"tags": list(pair.tags)} if pair.tags else {})})
    by_tag: dict[str, dict[str, float]] = {}
    for tag in sorted({t for p in pairs for t in p.tags}):
        tagged = [row["exact"] for row, pair in zip(rows, pairs, strict=True) if tag in pair.tags]
        by_tag[tag] = {"pairs": len(tagged), "exact_match": sum(tagged) / len(tagged)}
    n = len(pairs)
    first = [a.first_token_s * 1000 for a in answers]
    whole = [a.call_s * 1000 for a in answers]
    return CallReport(pairs=n, exact_match=exact / n, setting_accuracy=setting / n, invalid_rate=invalid / n,
                      unknown_setting_rate=unknown / n, first_token_ms_p50=statistics.median(first),
                      first_token_ms_p90=_p90(first), call_ms_p50=statistics.median(whole), call_ms_p90=_p90(whole),
                      output_tokens_p50=statistics.median(a.tokens for a in answers), by_tag=by_tag, answers=rows)


def evaluate_calls(decoder: Decoder, tokenizer: Any, pairs: Sequence[CallPair], known: set[str],
                   max_new_tokens: int = 48, max_input_tokens: int = 256, progress: bool = False,
                   grammar: CallGrammar | None = None) -> CallReport:
    """Decode every request of ``pairs`` greedily with ``decoder`` (only the calls ``grammar`` allows, when given)
    and score the calls (see the module docstring). Requests are tokenized as ``compress finetune`` trained on them
    (BOS when the tokenizer wants it, the last ``max_input_tokens``)."""
    from tqdm.auto import tqdm

    from compress.sources.data import pair_inputs

    limit = min(max_input_tokens, getattr(decoder, "prompt_limit", max_input_tokens))
    prompts = pair_inputs(tokenizer, [p.request for p in pairs], limit)
    answers = [decoder.answer(pair.request, prompt, max_new_tokens, tokenizer, grammar)
               for pair, prompt in tqdm(list(zip(pairs, prompts, strict=True)), desc="answer requests", unit="request",
                                        disable=not progress)]
    return score(answers, pairs, known)
