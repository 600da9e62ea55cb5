"""A tied embedding table stored in two precisions: the rows of the most frequent tokens wide (int8), the rest
narrow (int4), for the lookup and the tied output head alike.

An int4 table costs a small model about 5% perplexity even GPTQ-rounded, an int8 one almost nothing but twice the
bytes (SmolLM2-135M: +14 MB, over a W4A16 graph's size budget). Text is mostly its frequent tokens, so int8 rows
for a few thousand of them take back most of that cost for a few MB (docs/quantize.md).

The graph keeps only operators an NPU compiler takes whole: each token id is mapped by two constant index tables
to a row of each table (the other table's index points at a zero row), and the two rows are added; the head
multiplies by both tables, concatenates, and a constant Gather puts the logits back in token order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SplitTable", "frequent_rows"]


def frequent_rows(ids: np.ndarray | torch.Tensor, vocab: int, rows: int) -> torch.Tensor:
    """The ``rows`` token ids most frequent in ``ids`` (ties: the lower id first), in increasing order; at most a
    quarter of the vocabulary, so a small vocabulary keeps most of its table narrow."""
    counts = torch.bincount(torch.as_tensor(np.asarray(ids)).reshape(-1).long(), minlength=vocab)[:vocab]
    order = torch.argsort(counts, descending=True, stable=True)  # stable: equal counts keep id order
    return torch.sort(order[: min(rows, vocab // 4)]).values


class SplitTable(nn.Module):
    """``table`` [vocab, hidden] split by row: ``wide`` holds the rows of ``rows`` (token ids), then zero rows,
    ``narrow`` a zero row, every other row, then zero rows, both in token order; each table's rows a multiple of
    ALIGN (an NPU's matmul tiles), with at least the one zero row the other table's tokens look up."""

    ALIGN = 32

    def __init__(self, table: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__()
        vocab, hidden = table.shape
        is_wide = torch.zeros(vocab, dtype=torch.bool)
        is_wide[rows] = True
        wide, narrow = torch.nonzero(is_wide)[:, 0], torch.nonzero(~is_wide)[:, 0]

        def padded(parts: list[torch.Tensor]) -> nn.Parameter:
            size = sum(len(p) for p in parts)
            zeros = table.new_zeros(-(-(size + 1) // self.ALIGN) * self.ALIGN - size, hidden)
            return nn.Parameter(torch.cat([*parts, zeros]).detach().clone())

        self.wide = padded([table[wide]])
        self.narrow = padded([table.new_zeros(1, hidden), table[narrow]])
        k = len(wide)
        # int32 indices: half of int64's bytes in the graph, and the type the HTP takes.
        wide_index = torch.full((vocab,), k, dtype=torch.int32)  # row k: a zero row
        wide_index[wide] = torch.arange(k, dtype=torch.int32)
        narrow_index = torch.zeros(vocab, dtype=torch.int32)  # row 0: the zero row
        narrow_index[narrow] = torch.arange(1, len(narrow) + 1, dtype=torch.int32)
        # The head's concatenated logits hold both tables' rows, zero rows included: the wide table's, then the narrow.
        head_index = torch.where(is_wide, wide_index, narrow_index + self.wide.shape[0])
        self.rows = k
        self.register_buffer("wide_index", wide_index, persistent=False)
        self.register_buffer("narrow_index", narrow_index, persistent=False)
        self.register_buffer("head_index", head_index, persistent=False)

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``input_ids``, [..., hidden]."""
        flat = input_ids.reshape(-1)  # index_select: a Gather (indexing by a 2-D tensor would be a GatherND)
        wide = F.embedding(self.wide_index.index_select(0, flat), self.wide)
        narrow = F.embedding(self.narrow_index.index_select(0, flat), self.narrow)
        return (wide + narrow).reshape(*input_ids.shape, -1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [t, vocab] in token order for ``h`` [t, hidden]."""
        return torch.cat([F.linear(h, self.wide), F.linear(h, self.narrow)], -1).index_select(-1, self.head_index)
