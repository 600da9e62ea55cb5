import json

from benchmarks import __main__ as index


def test_the_results_index_refuses_a_result_without_its_commit_and_command(tmp_path, monkeypatch):
    monkeypatch.setattr(index, "RESULTS", tmp_path)
    target = index.TARGETS[0]
    json_name = next(n for n in target.outputs if n.endswith(".json"))
    md_name = next(n for n in target.outputs if n.endswith(".md"))
    (tmp_path / md_name).write_text("# A result\n\nperplexity 12.3\n")
    (tmp_path / json_name).write_text(json.dumps({"date": "2026-12-01", "perplexity": 12.3}))
    text = index.readme().read_text()
    assert "Refused" in text and "records no commit and command" in text and "perplexity 12.3" not in text

    (tmp_path / json_name).write_text(json.dumps({"perplexity": 12.3, "commit": "abc123", "command": "python -m x"}))
    text = index.readme().read_text()
    assert "perplexity 12.3" in text and "commit `abc123`" in text and "Refused" not in text.split("## ")[1]


def test_every_committed_result_records_its_commit_and_command():
    for target in index.TARGETS:
        for name in target.outputs:
            path = index.RESULTS / name
            if name.endswith(".json") and path.exists():
                assert isinstance(index.provenance_of(path), dict), name
