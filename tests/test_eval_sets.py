import json

import pytest
from factories import tiny_llama, write_corpus, write_teacher

from compress.app.cli import main
from compress.errors import DataError
from compress.sources.corpora import CORPORA, GENERAL_EVAL, SOURCES
from compress.sources.data import eval_set_name, load_corpus, pack, split_texts, token_batches


def _run(*argv):
    return main([str(a) for a in argv])


def test_the_general_set_shares_no_source_with_any_training_corpus():
    general = set(CORPORA[GENERAL_EVAL].sources)
    assert CORPORA[GENERAL_EVAL].evaluation_only
    for corpus in CORPORA.values():
        if not corpus.evaluation_only:
            assert not general & set(corpus.sources), corpus.name
            assert not {SOURCES[s].package for s in general} & {SOURCES[s].package for s in corpus.sources}
    assert sum(CORPORA["default-mix"].shares.values()) == pytest.approx(1.0)


def test_training_on_the_general_set_is_refused():
    with pytest.raises(DataError, match="held-out general evaluation set"):
        load_corpus(GENERAL_EVAL)


def test_a_mix_gives_each_source_its_share_of_the_sequences(tmp_path):
    from factories import tiny_tokenizer

    from compress.sources.data import Corpus

    rows = [{"text": f"{source} document {i}. " + "words of prose here. " * 40, "source": source}
            for source in ("a", "b") for i in range(60)]
    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = load_corpus(str(tmp_path / "mix.jsonl"))
    mix = Corpus("mix", plain.dataset, {"a": 0.75, "b": 0.25})
    tokenizer = tiny_tokenizer()
    ids = token_batches(mix, tokenizer, "train", 32, 16)
    assert ids.shape == (16, 32)
    rows = [tuple(r.tolist()) for r in ids]
    from_a = [tuple(r.tolist()) for r in pack(split_texts(mix, "train", "a"), tokenizer, 32, 12)]
    from_b = [tuple(r.tolist()) for r in pack(split_texts(mix, "train", "b"), tokenizer, 32, 4)]
    assert sorted(rows) == sorted(from_a + from_b)
    where_b = [rows.index(r) for r in from_b]
    assert max(where_b) - min(where_b) >= 8  # spread through the batch, not appended


def test_eval_data_names_and_the_in_domain_name_is_reserved(tmp_path):
    assert eval_set_name("general-english") == "general-english"
    assert eval_set_name(str(tmp_path / "tickets.jsonl")) == "tickets"
    with pytest.raises(DataError, match="in-domain"):
        eval_set_name(str(tmp_path / "validation.txt"))


SMALL = ["--calib-samples", "8", "--calib-seq-len", "16", "--eval-samples", "4", "--eval-seq-len", "16",
         "--align", "16", "--tolerance", "0.15", "--search-candidates", "3", "--batch-size", "4", "--quiet"]


def test_every_stage_reports_the_general_set_and_each_eval_data_set(tmp_path, capsys):
    teacher = write_teacher(tmp_path, tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=3))
    corpus = write_corpus(tmp_path)
    mine = tmp_path / "tickets.txt"
    mine.write_text("My printer will not print and the screen stays dark after I press the button. " * 40)
    out = tmp_path / "run"
    assert _run("--teacher", teacher, "--data", corpus, "--target-size", "0.7x", "--out", out, *SMALL,
                "--eval-data", mine, "--distill-tokens", "256", "--distill-seq-len", "16", "--distill-batch-size", "4",
                "--distill-eval-every", "2", "--seq-len", "16", "--quant-calib-samples", "2",
                "--npu-profile", "generic-a8w8", "--stop-after", "report") == 0
    summary = capsys.readouterr().out
    assert "general-english" in summary and "tickets" in summary
    sets = {"validation", GENERAL_EVAL, "tickets"}
    prune = json.loads((out / "prune.metrics.json").read_text())
    assert set(prune["evals"]) == sets
    assert all(v["perplexity"] > 1 and v["teacher_perplexity"] > 1 and v["tokens"] == 4 * 15
               for v in prune["evals"].values())
    distill = json.loads((out / "distill.metrics.json").read_text())
    assert set(distill["evals"]) == set(distill["evals_before"]) == sets
    assert all(set(h["val_perplexities"]) == sets for h in distill["history"] if "val_perplexity" in h)
    export = json.loads((out / "export.metrics.json").read_text())
    quant = json.loads((out / "quantize.metrics.json").read_text())
    assert set(export["fp32"]["evals"]) == set(quant["a16w8"]["evals"]) == {GENERAL_EVAL, "tickets"}
    report = json.loads((out / "report.json").read_text())
    for row in report["rows"]:
        assert set(row["evals"]) == {GENERAL_EVAL, "tickets"}, row["name"]
    assert GENERAL_EVAL in report["verdict"]
    markdown = (out / "report.md").read_text()
    assert f"{GENERAL_EVAL} perplexity (x teacher)" in markdown and "tickets perplexity" in markdown
    teacher_row = next(r for r in report["rows"] if r["name"] == "teacher")
    assert teacher_row["evals"][GENERAL_EVAL]["perplexity"] == prune["evals"][GENERAL_EVAL]["teacher_perplexity"]


def test_compress_eval_reports_in_domain_and_general(tmp_path, capsys):
    teacher = write_teacher(tmp_path, tiny_llama())
    corpus = write_corpus(tmp_path)
    assert _run("eval", teacher, "--data", corpus, "--seq-len", "16", "--samples", "4") == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["evals"]) == {"validation", GENERAL_EVAL}
    assert all(v["perplexity"] > 1 and v["tokens"] == 4 * 15 for v in result["evals"].values())


def test_lm_eval_runs_a_local_task_offline(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    teacher = write_teacher(tmp_path, tiny_llama())
    rows = [{"question": f"The kernel schedules tasks on every {w}", "choices": ["processor.", "banana."], "label": 0}
            for w in ("day", "core", "machine", "node")]
    (tmp_path / "tiny_choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: pdq_tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tiny_choice.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    assert _run("eval", teacher, "--lm-eval", tmp_path / "tiny_choice.yaml", "--batch-size", "2") == 0
    result = json.loads(capsys.readouterr().out)
    acc = result["tasks"]["pdq_tiny_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert _run("eval", teacher, "--lm-eval", tmp_path / "missing.yaml") == 2


@pytest.mark.real_teacher
def test_the_fetched_general_set_shares_no_document_with_training():
    general = load_corpus(GENERAL_EVAL, evaluation=True)
    assert set(general["source"]) == set(CORPORA[GENERAL_EVAL].sources)
    general_texts = set(general["text"])
    for name in ("default-mix", "debian-docs"):
        training = load_corpus(name)
        assert not general_texts & set(training["text"]), name
        assert not set(general["source"]) & set(training["source"]), name
        packages = {i.split("/")[0] for i in training["id"]}
        assert not packages & {i.split("/")[0] for i in general["id"]}, name


def test_a_missing_eval_data_set_fails_before_any_stage_and_leaves_nothing(tmp_path, capsys):
    teacher = write_teacher(tmp_path, tiny_llama())
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    capsys.readouterr()
    assert _run("--teacher", teacher, "--data", corpus, "--target-size", "0.7x", "--out", out, *SMALL,
                "--eval-data", tmp_path / "missing.txt") == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--eval-data" in error and "missing.txt" in error
    assert not out.exists()
