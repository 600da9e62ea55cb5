"""Run exported graphs with ONNX Runtime: perplexity, top-1 agreement, prefill latency, decode tokens/s.

Graph contract (what ``compress.deploy.export`` emits):

- prefill: ``input_ids`` int64 [1, L] → ``logits`` [1, L, V] (+ ``present.<i>.key|value`` [1, KV, L, D]);
- decode step: ``input_ids`` [1, 1], ``position_ids`` [1, 1], ``attention_mask`` float [1, C] (1 = slot
  holds a token), for each sliding window W shorter than the cache ``window_mask.<W>`` [1, C] (1 = slot holds
  one of the last W - 1 positions), ``past.<i>.key`` [1, KV, D, C] (transposed, as the score matmul reads it)
  and ``past.<i>.value`` [1, KV, C, D] → ``logits`` [1, 1, V] and
  ``present.<i>.key|value`` [1, KV, 1, D], the token's own key and value, which the host writes into slot
  ``position mod C`` (:class:`DecodeCache`). Slot order does not matter to attention.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


def session(path: str | Path, threads: int | None = None):  # noqa: ANN201 - onnxruntime.InferenceSession
    """A CPU InferenceSession with every graph optimization and ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@dataclass(frozen=True)
class GraphQuality:
    perplexity: float
    nll: float
    tokens: int
    agreement: float | None  # top-1 agreement with the reference predictions, when given

    def to_dict(self) -> dict:
        return asdict(self)


def prefill_logits(sess, ids: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """Logits [n, L, V] for token sequences ``ids`` [n, L], one graph run per sequence."""
    return np.stack([sess.run(["logits"], {"input_ids": row[None].astype(np.int64)})[0][0] for row in ids])


def quality(sess, ids: np.ndarray, reference_top1: np.ndarray | None = None, progress: bool = False,  # noqa: ANN001
            label: str = "graph") -> tuple[GraphQuality, np.ndarray]:
    """Next-token perplexity over ``ids`` [n, L] and agreement with ``reference_top1`` [n, L-1].

    Returns the quality and this graph's own top-1 predictions (to serve as a reference).
    """
    from tqdm.auto import tqdm

    total, count, agree = 0.0, 0, 0
    top1 = np.zeros((ids.shape[0], ids.shape[1] - 1), dtype=np.int64)
    for n, row in enumerate(tqdm(ids, desc=f"evaluate {label}", unit="seq", disable=not progress)):
        logits = sess.run(["logits"], {"input_ids": row[None].astype(np.int64)})[0][0, :-1].astype(np.float64)
        logp = _log_softmax(logits)
        total -= float(logp[np.arange(len(row) - 1), row[1:]].sum())
        count += len(row) - 1
        top1[n] = logits.argmax(-1)
        if reference_top1 is not None:
            agree += int((top1[n] == reference_top1[n]).sum())
    nll = total / count
    agreement = agree / count if reference_top1 is not None else None
    return GraphQuality(perplexity=math.exp(nll), nll=nll, tokens=count, agreement=agreement), top1


def prefill_latency(sess, length: int, repeats: int = 10, warmup: int = 2) -> float:  # noqa: ANN001
    """Median seconds of one prefill run over a [1, length] input."""
    feed = {"input_ids": np.ones((1, length), dtype=np.int64)}
    for _ in range(warmup):
        sess.run(["logits"], feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(["logits"], feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def empty_cache(sess) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Zero cache inputs and all-zero masks for a decode graph, from its declared input shapes."""
    feeds = {}
    for arg in sess.get_inputs():
        if arg.name.startswith(("past.", "window_mask.")) or arg.name == "attention_mask":
            feeds[arg.name] = np.zeros(arg.shape, dtype=np.float32)
    return feeds


class DecodeCache:
    """A decode graph's host loop: the static cache as a ring of slots (position mod capacity) and its masks,
    optionally seeded by a prefill run. Each step writes the token's key and value into its slot, in place; the
    oldest token is overwritten once the cache is full (a sliding window of capacity + 1 tokens).

    ``constants`` are inputs fed unchanged at every step (an encoder-decoder's cross-attention keys and
    values and its encoder mask); ``record``, when given, collects a copy of every step's feeds (calibration
    data)."""

    def __init__(self, sess, constants: dict[str, np.ndarray] | None = None,  # noqa: ANN001
                 record: list[dict[str, np.ndarray]] | None = None) -> None:
        self.sess = sess
        self.state = empty_cache(sess)
        self.capacity = self.state["attention_mask"].shape[1]
        self.windows = {name: int(name.split(".", 1)[1]) for name in self.state if name.startswith("window_mask.")}
        self.slot_positions = np.full(self.capacity, -1, dtype=np.int64)
        self.outputs = [o.name for o in sess.get_outputs()]
        self.presents = [name for name in self.outputs if name.startswith("present.")]
        old = [o for o in sess.get_outputs() if o.name in self.presents and o.shape[2] != 1]
        if old:
            raise ValueError(f"{old[0].name} holds {old[0].shape[2]} slots: this decode graph returns its whole "
                             "cache (exported before 2026-12-05), which this host loop no longer keeps; export it again "
                             "(rerun the run's command: its export and quantize stages run again)")
        self.position = 0
        self.constants = constants or {}
        self.record = record

    def step(self, token: int) -> np.ndarray:
        """Feed one token; the logits of the next."""
        for name, window in self.windows.items():
            self.state[name][0] = self.state["attention_mask"][0] * (self.position - self.slot_positions < window)
        feeds = {"input_ids": np.array([[token]], dtype=np.int64),
                 "position_ids": np.array([[self.position]], dtype=np.int64), **self.constants, **self.state}
        if self.record is not None:
            self.record.append({k: v.copy() for k, v in feeds.items()})  # the state changes in place
        result = dict(zip(self.outputs, self.sess.run(self.outputs, feeds), strict=True))
        self._write(result, 1)
        return result["logits"][0, -1]

    def _write(self, presents: dict[str, np.ndarray], tokens: int) -> None:
        """Store the first ``tokens`` keys/values of ``presents`` (positions from :attr:`position` on) in their
        slots and advance."""
        for t in range(tokens):
            slot = (self.position + t) % self.capacity
            for name in self.presents:
                past = self.state[name.replace("present.", "past.")]
                if name.endswith(".key"):  # keys are cached transposed
                    past[:, :, :, slot] = presents[name][:, :, t]
                else:
                    past[:, :, slot] = presents[name][:, :, t]
            self.state["attention_mask"][0, slot] = 1.0
            self.slot_positions[slot] = self.position + t
        self.position += tokens

    def prefill(self, prefill_sess, prompt: Sequence[int]) -> np.ndarray:  # noqa: ANN001
        """Seed the cache with a prefill run over ``prompt``; the logits after its last token."""
        length = prefill_sess.get_inputs()[0].shape[1]
        if not 0 < len(prompt) <= min(length, self.capacity):
            raise ValueError(f"prefill takes 1 to {min(length, self.capacity)} tokens, got {len(prompt)}")
        padded = np.zeros((1, length), dtype=np.int64)
        padded[0, : len(prompt)] = prompt
        result = dict(zip([o.name for o in prefill_sess.get_outputs()], prefill_sess.run(None, {"input_ids": padded}),
                          strict=True))
        self._write(result, len(prompt))
        return result["logits"][0, len(prompt) - 1]


def decode(sess, prompt: Sequence[int], steps: int, prefill_sess=None) -> tuple[list[int], list[np.ndarray], float]:  # noqa: ANN001
    """Greedy decoding: feed ``prompt`` token by token (or seed the cache with ``prefill_sess``), then
    generate ``steps`` tokens. Returns the generated tokens, the logits of every decode step, and the
    median seconds per generated token."""
    cache = DecodeCache(sess)
    if prefill_sess is not None and prompt:
        last = cache.prefill(prefill_sess, prompt)
    else:
        last = None
        for token in prompt:
            last = cache.step(int(token))
    generated, logits_seen, times = [], [], []
    for _ in range(steps):
        token = int(np.argmax(last))
        generated.append(token)
        start = time.perf_counter()
        last = cache.step(token)
        times.append(time.perf_counter() - start)
        logits_seen.append(last)
    return generated, logits_seen, statistics.median(times) if times else float("nan")


def decode_quality(sess, prefill_sess, ids: np.ndarray, prompt_tokens: int,  # noqa: ANN001
                   reference_top1: np.ndarray | None = None, progress: bool = False,
                   label: str = "decode graph") -> GraphQuality:
    """Perplexity of the decode graph on the continuations of ``ids`` [n, L]: the prefill graph reads the
    first ``prompt_tokens``, then the decode graph is fed the rest one token at a time (teacher forcing)
    and scored on each next token. Agreement compares with ``reference_top1`` [n, L-1] at those positions."""
    from tqdm.auto import tqdm

    length = ids.shape[1]
    if not 0 < prompt_tokens < length:
        raise ValueError(f"prompt_tokens must be in (0, {length}), got {prompt_tokens}")
    total, count, agree = 0.0, 0, 0
    for n, row in enumerate(tqdm(ids, desc=f"evaluate {label}", unit="seq", disable=not progress)):
        cache = DecodeCache(sess)
        logits = [cache.prefill(prefill_sess, [int(t) for t in row[:prompt_tokens]])]
        logits += [cache.step(int(t)) for t in row[prompt_tokens:-1]]
        scored = np.stack(logits).astype(np.float64)  # predictions of row[prompt_tokens:]
        total -= float(_log_softmax(scored)[np.arange(len(scored)), row[prompt_tokens:]].sum())
        count += len(scored)
        if reference_top1 is not None:
            agree += int((scored.argmax(-1) == reference_top1[n, prompt_tokens - 1:]).sum())
    nll = total / count
    return GraphQuality(perplexity=math.exp(nll), nll=nll, tokens=count,
                        agreement=agree / count if reference_top1 is not None else None)
