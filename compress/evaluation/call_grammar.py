"""Decoding only the calls a settings catalog allows: the catalog's setting ids, each with a value of its type.

An app that maps requests to settings knows its catalog, so it need not accept an answer naming a setting it does
not have, or an option the setting lacks. :class:`CallGrammar` holds every call the catalog allows (a toggle's
``true`` / ``false``, an enum's options, a range's whole numbers and ``"increase"`` / ``"decrease"``, an action
without a value), each tokenized as the model was trained to write it (:func:`compress.sources.settings_agent.call_text`)
and ended by EOS, as one tree of token ids. Greedy decoding then takes, at each step, the likeliest token that keeps
the answer on a path of the tree; a step with one way forward is forced. Every answer is a valid call of the catalog.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import DataError
from compress.sources.settings_agent import call_text

_END = -1  # the key of a path's end in the tree


class CallGrammar:
    """The tree of token ids of every call a catalog allows (see the module docstring)."""

    def __init__(self, calls: list[list[int]]) -> None:
        self.root: dict[int, Any] = {}
        for tokens in calls:
            node = self.root
            for token in tokens:
                node = node.setdefault(token, {})
            node[_END] = {}
        self.calls = len(calls)

    @classmethod
    def from_catalog(cls, catalog: str | Path, tokenizer: Any) -> CallGrammar:
        """Every call of a ``catalog.json`` (as ``compress task settings-agent`` writes it), tokenized by
        ``tokenizer`` and ended by its EOS token."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError(f"--catalog {catalog}: answers cannot be constrained to its calls with a tokenizer that has "
                            "no EOS token to end a call with; leave --constrain out")
        texts = list(catalog_calls(catalog))
        ids = tokenizer(texts, add_special_tokens=False).input_ids
        return cls([[*tokens, eos] for tokens in ids])

    def choose(self, node: dict[int, Any], logits: np.ndarray) -> int:
        """The likeliest token of ``logits`` that ``node`` allows next."""
        allowed = [t for t in node if t != _END]
        if len(allowed) == 1:
            return allowed[0]
        return allowed[int(np.argmax(np.asarray(logits)[allowed]))]


def catalog_calls(catalog: str | Path) -> Iterator[str]:
    """Every call text a ``catalog.json`` allows; a DataError saying what is wrong for a file that is not one."""
    path = Path(catalog).expanduser()
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))["settings"]
        for setting in settings:
            kind, setting_id = setting["kind"], setting["id"]
            if kind == "toggle":
                values: list[Any] = [True, False]
            elif kind == "enum":
                values = list(setting["options"])
            elif kind == "range":
                values = [*range(int(setting["low"]), int(setting["high"]) + 1), "increase", "decrease"]
            elif kind == "action":
                values = [None]
            else:
                raise ValueError(f"setting {setting_id!r} has kind {kind!r}")
            for value in values:
                yield call_text(setting_id, value)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"--catalog {catalog}: cannot constrain answers to it ({error}); pass a catalog.json as "
                        "compress task settings-agent writes it: {\"settings\": [{\"id\", \"kind\": toggle, enum "
                        "(with \"options\"), range (with \"low\", \"high\") or action}]}") from error
