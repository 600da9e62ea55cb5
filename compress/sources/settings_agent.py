"""The settings-agent task: natural-language requests paired with the settings call each means.

A request such as "make the mouse pointer bigger" maps to one call, written as one line of JSON:
``{"setting": "mouse.pointer_size", "value": "increase"}`` (``value`` omitted for an action). Values are
``true`` / ``false`` for toggles, an option's text for enums, a whole number or ``"increase"`` / ``"decrease"``
for ranges. The catalog is :mod:`compress.sources.settings_catalog`.

:func:`build_task` makes three splits, the same for the same seed:

- ``train`` and ``validation`` (a tenth, same phrasings) in ``train.jsonl``, rows ``{"input", "output", "split"}``,
  the format ``compress finetune --data`` reads;
- ``test`` in ``test.jsonl``: requests phrased with templates, openings and words for settings that never occur in
  training, and for some settings values they are never trained with (an enum option, range values); each row's
  ``tags`` say what kind of request it is (the setting's kind and TAGS), so a score can be read by kind.

Requests vary: short and long, with values, relative changes ("a bit brighter"), indirect needs ("i can
barely see the cursor") and typos.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import ConfigError
from compress.io import write_json, write_text
from compress.sources.settings_catalog import INDIRECT, ROWS

KINDS = ("toggle", "enum", "range", "action")
# What a test request's "tags" hold besides its setting's kind: the name training never used for the setting, an
# enum option training never paired with it, a relative change ("a bit louder"), a typo, an indirect need; or, when
# none of those, "phrasing only" (only its template and opening are the test split's own, as every test request's are).
TAGS = ("phrasing only", "unseen name", "unseen value", "relative", "typo", "indirect")


@dataclass(frozen=True)
class Setting:
    """One setting of the catalog (see :mod:`compress.sources.settings_catalog`)."""

    id: str
    kind: str
    names: tuple[str, ...]
    description: str
    options: tuple[str, ...] = ()  # enum
    low: int = 0  # range
    high: int = 0
    unit: str = ""

    def train_names(self) -> tuple[str, ...]:
        """The names training uses: all but the last when there are three or more (that one is the test's)."""
        return self.names[:-1] if len(self.names) >= 3 else self.names

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "names": list(self.names),
                               "description": self.description}
        if self.kind == "enum":
            out["options"] = list(self.options)
        if self.kind == "range":
            out.update(low=self.low, high=self.high, unit=self.unit)
        return out


def catalog() -> list[Setting]:
    """Every setting of the catalog."""
    settings = []
    for setting_id, kind, names, description, values in ROWS:
        extra: dict[str, Any] = {}
        if kind == "enum":
            extra["options"] = tuple(values)
        elif kind == "range":
            extra.update(low=values[0], high=values[1], unit=values[2])
        settings.append(Setting(setting_id, kind, tuple(names), description, **extra))
    return settings


def call_text(setting_id: str, value: Any = None) -> str:
    """The call as the one line of JSON a model should answer with."""
    call: dict[str, Any] = {"setting": setting_id}
    if value is not None:
        call["value"] = value
    return json.dumps(call, ensure_ascii=False)


# Templates per kind and split: {name} the setting's name, {value} the value's words. Train and test share none, and
# no training template or opening uses a word of _TEST_WORDS, the test's own word choices.
_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "on": {
        "train": ("turn on {name}", "enable {name}", "switch {name} on", "please turn {name} on", "can you enable {name}",
                  "i want {name} on", "activate {name}", "{name} on", "turn {name} on", "switch on {name}",
                  "please enable {name}", "can you turn on {name}", "would you activate {name}", "i need {name} on",
                  "keep {name} on", "set {name} to on", "{name}: on", "start using {name}", "let me use {name}",
                  "allow {name}", "{name} on now", "i want to use {name}", "enable {name} now", "{name} needs to be on",
                  "i want {name} switched on", "{name} back on"),
        "test": ("could you switch on {name} for me", "i'd like {name} enabled", "make sure {name} is turned on",
                 "get {name} going"),
    },
    "off": {
        "train": ("turn off {name}", "disable {name}", "switch {name} off", "please turn {name} off", "can you disable {name}",
                  "i want {name} off", "deactivate {name}", "{name} off", "turn {name} off", "switch off {name}",
                  "please disable {name}", "can you turn off {name}", "would you deactivate {name}", "i need {name} off",
                  "keep {name} off", "set {name} to off", "{name}: off", "no more {name}", "i don't want {name}",
                  "get rid of {name}", "{name} off now", "disable {name} now", "{name} needs to be off",
                  "i want {name} switched off", "shut off {name}", "don't use {name}"),
        "test": ("could you switch off {name} for me", "i'd like {name} disabled", "make sure {name} is turned off",
                 "stop {name}"),
    },
    "set": {
        "train": ("set {name} to {value}", "change {name} to {value}", "switch {name} to {value}", "use {value} for {name}",
                  "i want {name} set to {value}", "{name} {value}", "please make {name} {value}", "make {name} {value}",
                  "{name} to {value}", "{name}: {value}", "i want {value} for {name}", "can you set {name} to {value}",
                  "would you change {name} to {value}", "adjust {name} to {value}", "pick {value} for {name}",
                  "choose {value} as the {name}", "i need {name} at {value}", "let {name} be {value}",
                  "update {name} to {value}", "{value} for {name} please", "i want {name} to be {value}"),
        "test": ("could you put {name} on {value}", "i'd prefer {value} as my {name}", "{name} should be {value}",
                 "go with {value} for {name}"),
    },
    "increase": {
        "train": ("increase {name}", "turn up {name}", "raise {name} a bit", "more {name}", "make {name} higher",
                  "{name} up", "turn {name} up", "boost {name}", "{name} higher please", "increase {name} slightly",
                  "i need more {name}", "crank up {name}", "{name} up a notch", "{name} needs to go up",
                  "can you raise {name}", "a bit more {name}", "{name} is lower than i want"),
        "test": ("bump {name} up a little", "could you give me a bit more {name}", "{name} is too low"),
    },
    "decrease": {
        "train": ("decrease {name}", "turn down {name}", "lower {name} a bit", "less {name}", "make {name} lower",
                  "{name} down", "turn {name} down", "reduce {name}", "{name} lower please", "decrease {name} slightly",
                  "i need less {name}", "dial down {name}", "{name} down a notch", "{name} needs to go down",
                  "can you lower {name}", "a bit less {name}", "{name} is higher than i want"),
        "test": ("bring {name} down a little", "could you give me a bit less {name}", "{name} is too high"),
    },
    "action": {
        "train": ("{name}", "{name} please", "i need {name}", "take me to {name}", "can you do {name}", "start {name}",
                  "open {name}", "run {name}", "go to {name}", "show me {name}", "i want {name}", "do {name}",
                  "{name} now", "please {name}", "launch {name}"),
        "test": ("could you help me with {name}", "{name} right now", "i'd like to get {name} done"),
    },
}
# Openings and endings that make a request long; the test split has its own.
_FRAMES = {
    "train": (("", ""), ("", ""), ("", ""), ("hey, ", ""), ("", " please"), ("quick one: ", ""),
              ("i'm working late tonight, ", ""), ("", " thanks"), ("for my presentation, ", ""), ("ok, ", ""),
              ("", " now"), ("listen, ", ""), ("one more thing: ", ""), ("", " on this laptop"), ("real quick, ", ""),
              ("", " asap"), ("at home tonight, ", ""), ("", ", cheers")),
    "test": (("", ""), ("", ""), ("hi there, ", ""), ("", " if you can"), ("sorry to bother you, ", ""),
             ("before my meeting starts, ", " thank you")),
}
# The test split's own word choices: each of its templates and openings has one, and training's never do.
_TEST_WORDS = frozenset({"could", "i'd", "enabled", "disabled", "sure", "turned", "going", "stop", "put", "prefer",
                         "should", "with", "bump", "little", "give", "too", "bring", "help", "right", "done", "hi",
                         "if", "sorry", "bother", "before", "meeting", "thank"})
TRAIN_PER_SETTING = 40  # training requests drawn per setting unless asked for more or fewer
_TEST_PER_SETTING = 4


def _stable(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _held_out_option(setting: Setting) -> str | None:
    """The enum option training never pairs with this setting (settings with four or more options)."""
    if setting.kind != "enum" or len(setting.options) < 4:
        return None
    return setting.options[_stable(setting.id) % len(setting.options)]


def _range_value(setting: Setting, split: str, rng: random.Random) -> int:
    """A value of the range; training and test draw from disjoint sets of each setting's values."""
    values = [v for v in range(setting.low, setting.high + 1) if (_stable(f"{setting.id}:{v}") % 4 == 0) == (split == "test")]
    return rng.choice(values or list(range(setting.low, setting.high + 1)))


def _value_words(setting: Setting, value: int, rng: random.Random) -> str:
    unit = {"percent": ("percent", "%"), "minutes": ("minutes", " min"), "pixels": ("pixels", " px")}.get(
        setting.unit, (setting.unit,))
    choice = rng.choice(unit)
    return f"{value}{choice}" if choice.startswith(("%", " ")) else f"{value} {choice}"


def _typo(text: str, rng: random.Random) -> str:
    """One slip of the keyboard in a word of four or more letters: two letters swapped, one dropped or doubled."""
    words = text.split(" ")
    long_words = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not long_words:
        return text
    i = rng.choice(long_words)
    w = words[i]
    j = rng.randrange(1, len(w) - 1)
    kind = rng.randrange(3)
    words[i] = (w[:j] + w[j + 1] + w[j] + w[j + 2:]) if kind == 0 else (w[:j] + w[j + 1:]) if kind == 1 else (w[:j] + w[j] + w[j:])
    return " ".join(words)


def _request(setting: Setting, split: str, rng: random.Random) -> tuple[str, Any, list[str]]:
    """One (request text, value, tags) for ``setting`` in ``split``; the tags say what kind of request it is (TAGS)."""
    names = setting.train_names() if split == "train" else setting.names
    if split == "test" and len(setting.names) >= 3 and rng.random() < 0.5:
        names = setting.names[-1:]  # the word training never used for this setting
    name = rng.choice(names)
    tags = ["unseen name"] if split == "test" and name not in setting.train_names() else []
    value: Any = None
    if setting.kind == "toggle":
        value = rng.random() < 0.5
        template = rng.choice(_TEMPLATES["on" if value else "off"][split])
        text = template.format(name=name)
    elif setting.kind == "enum":
        held_out = _held_out_option(setting)
        options = [o for o in setting.options if o != held_out] if split == "train" else list(setting.options)
        if split == "test" and held_out is not None and rng.random() < 0.5:
            options = [held_out]
        value = rng.choice(options)
        text = rng.choice(_TEMPLATES["set"][split]).format(name=name, value=value)
        if value == held_out:
            tags.append("unseen value")
    elif setting.kind == "range":
        if rng.random() < 0.4:
            value = rng.choice(("increase", "decrease"))
            text = rng.choice(_TEMPLATES[value][split]).format(name=name)
            tags.append("relative")
        else:
            value = _range_value(setting, split, rng)
            text = rng.choice(_TEMPLATES["set"][split]).format(name=name, value=_value_words(setting, value, rng))
    else:
        text = rng.choice(_TEMPLATES["action"][split]).format(name=name)
    start, end = rng.choice(_FRAMES[split])
    text = start + text + end
    if rng.random() < 0.15:
        typed = _typo(text, rng)
        if typed != text:
            tags.append("typo")
        text = typed
    return text, value, [setting.kind, *(tags or ["phrasing only"])]


def _indirect_value(setting: Setting, value: Any) -> Any:
    return {"on": True, "off": False}.get(value, value) if setting.kind == "toggle" else value


def build_task(seed: int = 0, train_per_setting: int = TRAIN_PER_SETTING) -> dict[str, list[dict[str, str]]]:
    """The task's pairs: ``{"train": [...], "validation": [...], "test": [...]}``, rows ``{"input", "output"}``.

    ``train_per_setting`` requests drawn per setting for training and validation (settings with few phrasings run
    out sooner); the test split is the same whatever it is."""
    if train_per_setting < 1:
        raise ConfigError(f"--train-per-setting must be at least 1, not {train_per_setting}")
    per_setting = {"train": train_per_setting, "test": _TEST_PER_SETTING}
    settings = {s.id: s for s in catalog()}
    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    seen: set[str] = set()
    for setting in settings.values():
        for split in ("train", "test"):
            # One generator per setting and split: the training split can grow without moving the test split.
            rng = random.Random(f"{seed}:{setting.id}:{split}")
            made = 0
            for _ in range(per_setting[split] * 20):  # duplicates are skipped; small settings run out early
                if made == per_setting[split]:
                    break
                text, value, tags = _request(setting, split, rng)
                if text in seen or (split == "train" and setting.train_names() != setting.names
                                    and setting.names[-1] in text):  # a name and a value can spell the test's word
                    continue
                seen.add(text)
                made += 1
                row = {"input": text, "output": call_text(setting.id, value)}
                target = split if split == "test" else ("validation" if _stable(text) % 10 == 0 else "train")
                splits[target].append({**row, "tags": tags} if target == "test" else row)
    # Indirect requests: most train, every fourth held out for the test split.
    for i, (setting_id, text, value) in enumerate(INDIRECT):
        row = {"input": text, "output": call_text(setting_id, _indirect_value(settings[setting_id], value))}
        if i % 4 == 3:
            relative = ["relative"] if value in ("increase", "decrease") else []
            splits["test"].append({**row, "tags": [settings[setting_id].kind, *relative, "indirect"]})
        else:
            splits["train"].append(row)
    for split, rows in splits.items():
        random.Random(f"{seed}:{split}:order").shuffle(rows)
    return splits


def write_task(out: str | Path, seed: int = 0, train_per_setting: int = TRAIN_PER_SETTING) -> dict[str, Any]:
    """Write ``train.jsonl`` (train and validation rows, with a ``split`` column), ``test.jsonl`` and
    ``catalog.json`` into ``out``; returns the counts (see :func:`build_task` for ``train_per_setting``)."""
    out = Path(out)
    splits = build_task(seed, train_per_setting)
    train = [{**row, "split": split} for split in ("train", "validation") for row in splits[split]]
    write_text(out / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))
    write_text(out / "test.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in splits["test"]))
    write_json(out / "catalog.json", {"seed": seed, "settings": [s.to_dict() for s in catalog()]})
    return {"settings": len(catalog()), **{split: len(rows) for split, rows in splits.items()}}
