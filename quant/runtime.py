"""Run exported graphs with ONNX Runtime: perplexity, top-1 agreement, prefill latency, decode tokens/s.

Graph contract (what ``compress.export`` emits):

- prefill: ``input_ids`` int64 [1, L] → ``logits`` [1, L, V] (+ ``present.<i>.key|value`` [1, KV, L, D]);
- decode step: ``input_ids`` [1, 1], ``position_ids`` [1, 1], ``attention_mask`` float [1, C] (1 = slot
  holds a token), ``past.<i>.key|value`` [1, KV, C, D] → ``logits`` [1, 1, V] and ``present.*``, the
  cache shifted left by one slot with the new token's key/value last.
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
    """Zero cache inputs and an all-zero mask for a decode graph, from its declared input shapes."""
    feeds = {}
    for arg in sess.get_inputs():
        if arg.name.startswith("past.") or arg.name == "attention_mask":
            feeds[arg.name] = np.zeros(arg.shape, dtype=np.float32)
    return feeds


def decode(sess, prompt: Sequence[int], steps: int, prefill_sess=None) -> tuple[list[int], list[np.ndarray], float]:  # noqa: ANN001
    """Greedy decoding: feed ``prompt`` token by token (or seed the cache with ``prefill_sess``), then
    generate ``steps`` tokens. Returns the generated tokens, the logits of every decode step, and the
    median seconds per generated token."""
    state = empty_cache(sess)
    capacity = state["attention_mask"].shape[1]
    outputs = [o.name for o in sess.get_outputs()]
    presents = [name for name in outputs if name.startswith("present.")]
    position = 0
    logits_seen: list[np.ndarray] = []

    def step(token: int) -> np.ndarray:
        nonlocal position, state
        feeds = {"input_ids": np.array([[token]], dtype=np.int64),
                 "position_ids": np.array([[position]], dtype=np.int64), **state}
        result = dict(zip(outputs, sess.run(outputs, feeds), strict=True))
        mask = np.concatenate([state["attention_mask"][:, 1:], np.ones((1, 1), np.float32)], axis=1)
        state = {"attention_mask": mask, **{p.replace("present.", "past."): result[p] for p in presents}}
        position += 1
        return result["logits"][0, -1]

    if prefill_sess is not None and prompt:
        length = prefill_sess.get_inputs()[0].shape[1]
        padded = np.zeros((1, length), dtype=np.int64)
        padded[0, : len(prompt)] = prompt
        result = dict(zip([o.name for o in prefill_sess.get_outputs()], prefill_sess.run(None, {"input_ids": padded}),
                          strict=True))
        for name in presents:  # prefill slots [0, len) hold the prompt; place them at the cache's end
            past = result[name][:, :, : len(prompt)]
            cache = np.zeros(state[name.replace("present.", "past.")].shape, np.float32)
            cache[:, :, capacity - len(prompt):] = past
            state[name.replace("present.", "past.")] = cache
        state["attention_mask"][0, capacity - len(prompt):] = 1.0
        position = len(prompt)
        last = result["logits"][0, len(prompt) - 1]
    else:
        last = None
        for token in prompt:
            last = step(int(token))
    generated, times = [], []
    for _ in range(steps):
        token = int(np.argmax(last))
        generated.append(token)
        start = time.perf_counter()
        last = step(token)
        times.append(time.perf_counter() - start)
        logits_seen.append(last)
    return generated, logits_seen, statistics.median(times) if times else float("nan")
