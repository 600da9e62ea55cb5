import pytest
import torch
from factories import tiny_tokenizer, write_corpus

from compress.errors import DataError
from compress.sources.data import load_corpus, pack, split_texts


def test_splits_are_disjoint_deterministic_and_cover_the_corpus(tmp_path):
    dataset = load_corpus(str(write_corpus(tmp_path, 300)))
    splits = {name: split_texts(dataset, name) for name in ("calibration", "train", "validation")}
    assert sum(len(v) for v in splits.values()) == 300
    assert not set(splits["validation"]) & set(splits["train"])
    assert not set(splits["calibration"]) & set(splits["train"])
    assert split_texts(dataset, "validation") == splits["validation"]
    assert splits["validation"] and splits["calibration"]


def test_jsonl_needs_a_text_column(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "hello"}\n')
    with pytest.raises(DataError, match="no 'text' column"):
        load_corpus(str(tmp_path / "d.jsonl"))


def test_missing_and_unreadable_data_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "x.bin").write_bytes(b"\0\1")
    with pytest.raises(DataError, match="no .txt"):
        load_corpus(str(tmp_path))


@pytest.mark.parametrize("add_bos", [False, True])
def test_pack_makes_fixed_length_sequences_with_bos_when_wanted(add_bos):
    tokenizer = tiny_tokenizer(add_bos=add_bos)
    ids = pack(["The kernel schedules tasks. " * 30, "Python reads the source file. " * 30], tokenizer, 16, 5)
    assert ids.shape == (5, 16) and ids.dtype == torch.long
    assert bool((ids[:, 0] == tokenizer.bos_token_id).all()) == add_bos


def test_too_little_text_is_an_error():
    with pytest.raises(DataError, match="fewer than one sequence"):
        pack(["hi"], tiny_tokenizer(), 64, 4)
