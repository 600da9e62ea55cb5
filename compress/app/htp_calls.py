"""Request-to-call accuracy on Qualcomm's HTP emulator: a model's compiled integer graphs answering (request, call)
pairs through its family's host loop, as :func:`compress.evaluation.calls.evaluate_calls` does on the CPU.

The emulator runs the compiled graph in the NPU's own integer arithmetic, so its answers can differ from ONNX
Runtime CPU's on the same QDQ graphs. It is slow (seconds per decode step for a 60M-parameter model), so callers
size the sample. The QNN libraries load into a child process (``python -m compress.app.htp_calls``), as
every other use of the emulator here (:mod:`quant.qnn`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quant.qnn import DEFAULT_SOC_MODEL, run_child


def emulated_calls(first: Path, step: Path, model_dir: Path, pairs: Path, limit: int, max_new_tokens: int = 48,
                   max_input_tokens: int = 256, soc_model: str = DEFAULT_SOC_MODEL, timeout: float = 7200,
                   catalog: Path | None = None) -> dict[str, Any]:
    """The first ``limit`` pairs of ``pairs`` answered by the ``first`` and ``step`` graphs (prefill and decode, or
    encoder and decoder) on the HTP emulator; ``model_dir`` gives the tokenizer and the family; with ``catalog``,
    only the calls it allows (:mod:`compress.evaluation.call_grammar`). Returns
    :class:`~compress.evaluation.calls.CallReport`'s dictionary with every answer."""
    return run_child("compress.app.htp_calls", [str(first), str(step), str(model_dir), str(pairs), "--limit", str(limit),
                     "--max-new-tokens", str(max_new_tokens), "--max-input-tokens", str(max_input_tokens),
                     "--soc-model", str(soc_model), *(["--catalog", str(catalog)] if catalog else [])], timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compress.app.htp_calls",
                                     description="Answer (request, call) pairs with compiled graphs on the HTP "
                                     "emulator; prints the report as JSON.")
    parser.add_argument("first", type=Path, help="prefill (or encoder) graph")
    parser.add_argument("step", type=Path, help="decode (or decoder) graph")
    parser.add_argument("model_dir", type=Path, help="the checkpoint the graphs came from (tokenizer, family)")
    parser.add_argument("pairs", type=Path)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-input-tokens", type=int, default=256)
    parser.add_argument("--soc-model", default=DEFAULT_SOC_MODEL)
    parser.add_argument("--catalog", type=Path, help="answer only calls of this catalog.json")
    args = parser.parse_args(argv)

    from transformers import AutoConfig, AutoTokenizer

    from compress.evaluation.call_grammar import CallGrammar
    from compress.evaluation.calls import GraphDecoder, evaluate_calls, read_pairs, stop_tokens
    from compress.families import family_of  # registers the built-in families
    from compress.models import register as register_models
    from quant.qnn import emulator_session, unavailable

    reason = unavailable()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    register_models()  # the student families' configs, with AutoConfig
    config = AutoConfig.from_pretrained(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    pairs = read_pairs(args.pairs)[: args.limit]
    grammar = CallGrammar.from_catalog(args.catalog, tokenizer) if args.catalog else None
    with tempfile.TemporaryDirectory(prefix=".qnn.") as work:
        decoder = GraphDecoder(family_of(config), args.first, args.step, config, stop_tokens(tokenizer, config),
                               open_session=lambda graph: emulator_session(graph, args.soc_model, work))
        report = evaluate_calls(decoder, tokenizer, pairs, {p.call["setting"] for p in pairs},
                                max_new_tokens=args.max_new_tokens, max_input_tokens=args.max_input_tokens,
                                grammar=grammar)
    sys.stdout.write(json.dumps(report.to_dict(answers=True)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
