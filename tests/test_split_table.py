"""The tied table in two precisions: the split reads exactly as the whole table did."""

from __future__ import annotations

import copy

import torch
from factories import tiny_llama

from compress.deploy.quantization import prepare
from compress.deploy.split_table import SplitTable, frequent_rows


def test_frequent_rows_are_the_most_counted_ids_at_most_a_quarter_of_the_vocabulary():
    ids = torch.tensor([[5, 5, 5, 9, 9, 2, 7, 7, 7, 7]])
    assert frequent_rows(ids, 40, 3).tolist() == [5, 7, 9]
    assert frequent_rows(ids, 40, 100).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # 10 of 40; ties: the lower id
    assert frequent_rows(ids, 16, 100).tolist() == [2, 5, 7, 9]


def test_split_table_looks_up_and_scores_every_token_as_the_whole_table_did():
    table = torch.randn(100, 8)
    rows = torch.tensor([3, 50, 99, 0])
    split = SplitTable(table, rows)
    assert split.rows == 4 and split.wide.shape == (32, 8) and split.narrow.shape == (128, 8)  # zero rows to 32
    assert torch.equal(split.wide[:4], table[[0, 3, 50, 99]])  # token order
    ids = torch.tensor([[0, 1, 3, 50, 98, 99]])
    assert torch.equal(split.lookup(ids), table[ids])
    h = torch.randn(5, 8)
    assert torch.allclose(split.head(h), h @ table.T, atol=1e-6)
    assert torch.equal(split.lookup(torch.arange(100)), table)  # every row, each from one of the two tables


def test_a_split_table_leaves_the_models_logits_as_they_were():
    model = tiny_llama()
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    lm = prepare(model, 16, ("rotate", "embed-rows"), ids)
    split = copy.deepcopy(lm)
    split.split = SplitTable(split.embed.detach(), frequent_rows(ids, model.config.vocab_size, 20))
    with torch.no_grad():
        assert torch.allclose(split.prefill(ids[:1])[0], lm.prefill(ids[:1])[0], atol=1e-5)
