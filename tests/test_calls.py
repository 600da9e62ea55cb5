import json
import re

import pytest
from factories import HAND_PAIRS, check_pairs_eval, tiny_llama, write_teacher

from compress.app.cli import main
from compress.errors import DataError
from compress.evaluation.calls import Answer, CallPair, read_pairs, score
from compress.sources import settings_agent
from compress.sources.data import load_pairs, split_pairs
from compress.sources.settings_agent import _FRAMES, _TEMPLATES, _TEST_WORDS, build_task, catalog


def _call(row: dict) -> dict:
    return json.loads(row["output"])


def test_the_settings_task_holds_out_phrasings_words_and_values_and_rebuilds_the_same(tmp_path):
    settings = {s.id: s for s in catalog()}
    assert len(settings) >= 150 and {s.kind for s in settings.values()} == {"toggle", "enum", "range", "action"}
    assert main(["task", "settings-agent", "--out", str(tmp_path / "a")]) == 0
    assert main(["task", "settings-agent", "--out", str(tmp_path / "b")]) == 0
    for name in ("train.jsonl", "test.jsonl", "catalog.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    splits = build_task()
    assert len(splits["train"]) >= 10 * len(settings) and len(splits["test"]) >= 3 * len(settings)
    train_text = {r["input"] for r in splits["train"] + splits["validation"]}
    assert not train_text & {r["input"] for r in splits["test"]}
    # The test's templates and openings each use a word of its own that no training template or opening uses.
    def words(*texts: str) -> set[str]:
        return set(re.findall(r"[a-z']+", " ".join(texts).replace("{name}", " ").replace("{value}", " ")))
    for templates in _TEMPLATES.values():
        assert all(words(t) & _TEST_WORDS for t in templates["test"]) and not set(templates["train"]) & set(templates["test"])
        assert not any(words(t) & _TEST_WORDS for t in templates["train"])
    assert all(words(*f) & _TEST_WORDS for f in _FRAMES["test"] if any(f))
    assert not any(words(*f) & _TEST_WORDS for f in _FRAMES["train"])
    # Growing the training split leaves the test split as it was: each split draws from its own generator.
    smaller, larger = build_task(train_per_setting=25), build_task(train_per_setting=60)
    assert smaller["test"] == splits["test"] == larger["test"]
    assert len(smaller["train"]) < len(splits["train"]) < len(larger["train"])
    assert main(["task", "settings-agent", "--out", str(tmp_path / "c"), "--train-per-setting", "60"]) == 0
    written = (tmp_path / "c" / "train.jsonl").read_text().splitlines()
    assert len(written) == len(larger["train"]) + len(larger["validation"])
    assert (tmp_path / "c" / "test.jsonl").read_bytes() == (tmp_path / "a" / "test.jsonl").read_bytes()
    assert main(["task", "settings-agent", "--out", str(tmp_path / "d"), "--train-per-setting", "0"]) == 2
    assert not (tmp_path / "d").exists()
    for rows in splits.values():  # every call is well formed for its setting's kind
        for row in rows:
            call = _call(row)
            setting = settings[call["setting"]]
            value = call.get("value")
            if setting.kind == "toggle":
                assert isinstance(value, bool)
            elif setting.kind == "enum":
                assert value in setting.options
            elif setting.kind == "range":
                assert value in ("increase", "decrease") or setting.low <= value <= setting.high
            else:
                assert "value" not in call
    # Words for a setting that training never uses, and enum options it never pairs with, are in the test split.
    held_out_names = [(s.id, s.names[-1]) for s in settings.values() if len(s.names) >= 3]
    in_test = [(i, n) for i, n in held_out_names
               if any(_call(r)["setting"] == i and n in r["input"] for r in splits["test"])]
    assert len(in_test) >= len(held_out_names) // 3
    assert not any(_call(r)["setting"] == i and n in r["input"] for i, n in held_out_names for r in splits["train"]
                   if all(n not in other for other in settings[i].names[:-1]))
    train_values = {(_call(r)["setting"], json.dumps(_call(r).get("value"))) for r in splits["train"]}
    unseen = [r for r in splits["test"] if (_call(r)["setting"], json.dumps(_call(r).get("value"))) not in train_values]
    assert len(unseen) >= 50
    # Relative changes, indirect needs and typos are all there.
    assert any(_call(r).get("value") == "increase" for r in splits["train"])
    assert any(r["input"] == "i can barely see the cursor" for r in splits["train"] + splits["test"])
    words = {w for s in settings.values() for n in s.names for w in n.split()}
    assert any(any(w.isalpha() and len(w) >= 4 and w not in words and w.lower() == w for w in r["input"].split())
               for r in splits["train"])
    # Each test row says what kind of request it is; the tags match the request and its call.
    for row in splits["test"]:
        setting, tags = settings[_call(row)["setting"]], row["tags"]
        assert tags[0] == setting.kind and tags[1:] and set(tags[1:]) <= set(settings_agent.TAGS)
        assert ("phrasing only" in tags) == (tags[1:] == ["phrasing only"])
        if "typo" not in tags and "indirect" not in tags:  # the name it was asked by is in the request
            names = setting.names[-1:] if "unseen name" in tags else setting.train_names()
            assert any(n in row["input"] for n in names), row
        value = _call(row).get("value")
        assert ("unseen value" in tags) == (setting.kind == "enum" and value == settings_agent._held_out_option(setting))
        assert ("relative" in tags) == (value in ("increase", "decrease"))
    assert all("tags" not in r for r in splits["train"] + splits["validation"])  # the training file is as it was
    assert {t for r in splits["test"] for t in r["tags"]} == {*settings_agent.KINDS, *settings_agent.TAGS}
    # compress finetune reads the train file, its split column included.
    pairs = load_pairs(str(tmp_path / "a" / "train.jsonl"))
    assert len(split_pairs(pairs, "validation")) == len(splits["validation"])


def test_scoring_parses_each_answer_and_counts_exact_setting_invalid_and_unknown():
    pairs = [CallPair(p["input"], json.loads(p["output"])) for p in HAND_PAIRS]
    texts = ['{"setting": "display.night_light", "value": true}',  # exact
             '{"setting": "sound.volume", "value": 40}',  # right setting, wrong value
             'lock it please']  # not JSON
    answers = [Answer(p.request, t, 5, 0.01 * (i + 1), 0.05 * (i + 1)) for i, (p, t) in enumerate(zip(pairs, texts, strict=True))]
    report = score(answers, pairs, known={p.call["setting"] for p in pairs})
    assert (report.exact_match, report.setting_accuracy, report.invalid_rate) == (1 / 3, 2 / 3, 1 / 3)
    assert report.call_ms_p50 == pytest.approx(100.0) and report.call_ms_p90 == pytest.approx(150.0)
    unknown = score([Answer("x", '{"setting": "display.warp_drive"}', 3, 0.01, 0.02)], pairs[:1], known={"display.night_light"})
    assert unknown.unknown_setting_rate == 1.0 and unknown.invalid_rate == 0.0
    assert report.by_tag == {}  # untagged pairs: no breakdown
    tagged = [CallPair(p.request, p.call, tags) for p, tags in zip(pairs, (("toggle",), ("range", "typo"), ("toggle", "typo")),
                                                                   strict=True)]
    by_tag = score(answers, tagged, known={p.call["setting"] for p in pairs}).by_tag
    assert by_tag == {"toggle": {"pairs": 2, "exact_match": 0.5}, "range": {"pairs": 1, "exact_match": 0.0},
                      "typo": {"pairs": 2, "exact_match": 0.0}}


@pytest.mark.parametrize(("text", "message"), [
    ("this is not json\n", "line 1: not JSON"),
    ('{"input": "turn on wifi"}\n', 'line 1: each line needs an "input" text and an "output" call'),
    ('{"input": "a", "output": "{\\"setting\\": \\"x\\"}"}\n{"request": "b", "output": "{}"}\n', "line 2"),
    ('{"input": "turn on wifi", "output": "wifi on"}\n', 'the "output" must be a call'),
    ("\n\n", "holds no pairs"),
    ('{"input": "a", "output": "{\\"setting\\": \\"x\\"}", "tags": "typo"}\n', '"tags", when given, must be a list'),
])
def test_a_bad_pairs_file_gets_one_clear_error(tmp_path, capsys, text, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_pairs(path)
    teacher = write_teacher(tmp_path, tiny_llama())
    assert main(["eval", str(teacher), "--pairs", str(path)]) == 2
    assert message.split(":")[0] in capsys.readouterr().err
    assert main(["eval", str(teacher), "--pairs", str(tmp_path / "missing.jsonl")]) == 2


def test_eval_pairs_answers_with_a_checkpoint_and_refuses_graph_without_a_run(tmp_path, capsys):
    teacher = write_teacher(tmp_path, tiny_llama())
    pairs = tmp_path / "hand.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in HAND_PAIRS))
    assert main(["eval", str(teacher), "--pairs", str(pairs), "--max-new-tokens", "3", "--out", str(tmp_path / "a.json")]) == 0
    result = json.loads((tmp_path / "a.json").read_text())
    assert result["pairs"] == 3 and all(a["output"] is not None for a in result["answers"])
    assert main(["eval", str(teacher), "--pairs", str(pairs), "--graph"]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_eval_pairs_on_a_run_of_the_default_family(tmp_path):
    from factories import write_corpus

    teacher = write_teacher(tmp_path, tiny_llama(layers=2))
    out = tmp_path / "run"
    args = ["--teacher", teacher, "--data", write_corpus(tmp_path), "--target-size", "0.8x", "--out", out,
            "--calib-samples", "8", "--calib-seq-len", "16", "--eval-samples", "4", "--eval-seq-len", "16", "--align", "16",
            "--batch-size", "4", "--quiet", "--distill-tokens", "128", "--distill-seq-len", "16", "--distill-batch-size",
            "4", "--seq-len", "16", "--quant", "a8w8", "--npu-profile", "generic-a8w8", "--quant-calib-samples", "2",
            "--stop-after", "quantize"]
    assert main([str(a) for a in args]) == 0
    check_pairs_eval(out, tmp_path, max_input_tokens=8, new_tokens=4)


def test_constrained_decoding_answers_only_calls_of_the_catalog(tmp_path, capsys):
    """An untrained model answers junk freely; constrained to the catalog, every answer is a call it allows, and each
    step takes the likeliest token the catalog allows."""
    import numpy as np
    from factories import TEXT, tiny_tokenizer

    from compress.evaluation.call_grammar import CallGrammar, catalog_calls

    assert main(["task", "settings-agent", "--out", str(tmp_path / "task")]) == 0
    catalog_file = tmp_path / "task" / "catalog.json"
    calls = set(catalog_calls(catalog_file))
    assert '{"setting": "display.night_light", "value": true}' in calls and '{"setting": "sound.volume", "value": 0}' in calls
    tokenizer = tiny_tokenizer(text=TEXT + "\n".join(sorted(calls)))  # one that can spell every call
    grammar = CallGrammar.from_catalog(catalog_file, tokenizer)
    assert grammar.calls == len(calls)
    node = grammar.root
    (only,) = node  # every call starts with the same tokens: the step is forced whatever the logits say
    assert grammar.choose(node, np.zeros(512)) == only
    fork = next(n for n in _walk(grammar.root) if len(n) > 2)
    favourite = sorted(fork)[-1]
    logits = np.zeros(512)
    logits[favourite] = 5.0
    logits[511] = 9.0  # likelier still, but no call goes that way
    assert grammar.choose(fork, logits) == favourite

    teacher = write_teacher(tmp_path, tiny_llama(), tokenizer)
    pairs = tmp_path / "hand.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in HAND_PAIRS))
    args = ["eval", str(teacher), "--pairs", str(pairs), "--max-new-tokens", "64", "--catalog", str(catalog_file)]
    assert main([*args, "--constrain", "--out", str(tmp_path / "c.json")]) == 0
    constrained = json.loads((tmp_path / "c.json").read_text())
    assert constrained["constrained"] and constrained["invalid_rate"] == 0 and constrained["unknown_setting_rate"] == 0
    assert all(a["output"] in calls for a in constrained["answers"])
    assert main([*args, "--out", str(tmp_path / "free.json")]) == 0
    assert json.loads((tmp_path / "free.json").read_text())["invalid_rate"] > 0
    assert main([*args[:-2], "--constrain"]) == 2
    assert "pass --catalog" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"settings": [{"id": "x.y", "kind": "slider"}]}')
    assert main([*args[:-1], str(tmp_path / "bad.json"), "--constrain"]) == 2
    assert "cannot constrain answers to it" in capsys.readouterr().err


def _walk(node: dict):
    yield node
    for child in node.values():
        yield from _walk(child)
