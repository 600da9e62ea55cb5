"""(input, output) token pairs for task training, packed into one right-padded tensor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# A batch is cut to its own longest row, rounded up to a multiple of this: compiled layers (torch.compile with
# static shapes) then see a handful of widths instead of one per batch.
WIDTH_MULTIPLE = 8


@dataclass(frozen=True)
class Pairs:
    """Rows of input tokens followed by their output tokens, right-padded to one length.

    ``ids[i, :cuts[i]]`` is input ``i``, ``ids[i, cuts[i]:lengths[i]]`` its output, the rest ``pad_id``.
    Indexing with a tensor of rows gives a smaller ``Pairs``, cut to the width its own rows need (rounded up to
    a multiple of ``WIDTH_MULTIPLE``), so the trainer batches it as it batches a token tensor and a batch of short
    pairs costs what it holds, not what the longest pair of the whole set would. The loss is taken on output
    tokens only: a causal student reads input and output as one sequence, an encoder-decoder student encodes the
    input and decodes the output.
    """

    ids: torch.Tensor  # (pairs, length) int64
    cuts: torch.Tensor  # (pairs,) where each output starts (= the input's length, at least 1)
    lengths: torch.Tensor  # (pairs,) input + output length
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.ids.ndim != 2 or self.cuts.shape != self.ids.shape[:1] or self.lengths.shape != self.ids.shape[:1]:
            raise ValueError("Pairs: ids must be (pairs, length), cuts and lengths (pairs,)")
        if len(self.cuts) and (int(self.cuts.min()) < 1 or bool((self.lengths <= self.cuts).any())
                               or int(self.lengths.max()) > self.ids.shape[1]):
            raise ValueError("Pairs: every pair needs at least one input and one output token within the row")

    @classmethod
    def from_lists(cls, inputs: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], pad_id: int = 0) -> Pairs:
        """Pack token lists: ``inputs[i]`` then ``outputs[i]`` in row ``i``."""
        if len(inputs) != len(outputs) or not inputs:
            raise ValueError("Pairs.from_lists: give as many outputs as inputs, at least one")
        length = max(len(a) + len(b) for a, b in zip(inputs, outputs, strict=True))
        ids = torch.full((len(inputs), length), pad_id, dtype=torch.long)
        for row, (a, b) in enumerate(zip(inputs, outputs, strict=True)):
            ids[row, : len(a) + len(b)] = torch.tensor([*a, *b], dtype=torch.long)
        return cls(ids, torch.tensor([len(a) for a in inputs]), torch.tensor([len(a) + len(b) for a, b in
                                                                              zip(inputs, outputs, strict=True)]), pad_id)

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows: torch.Tensor | slice) -> Pairs:
        lengths = self.lengths[rows]
        need = int(lengths.max()) if len(lengths) else 1
        width = min(self.ids.shape[1], -(-need // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
        return Pairs(self.ids[rows][:, :width], self.cuts[rows], lengths, self.pad_id)

    def to(self, device: torch.device | str) -> Pairs:
        return Pairs(self.ids.to(device), self.cuts.to(device), self.lengths.to(device), self.pad_id)

    @property
    def output_tokens(self) -> int:
        return int((self.lengths - self.cuts).sum())

    def attention_mask(self) -> torch.Tensor:
        """(pairs, length): 1 on input and output tokens, 0 on padding."""
        return (torch.arange(self.ids.shape[1], device=self.ids.device)[None] < self.lengths[:, None]).long()

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs alone, right-padded to the longest: ids and 0/1 mask, (pairs, max input length)."""
        width = int(self.cuts.max())
        mask = torch.arange(width, device=self.ids.device)[None] < self.cuts[:, None]
        return torch.where(mask, self.ids[:, :width], self.pad_id), mask.long()

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs alone, right-padded to the longest: ids and a boolean mask, (pairs, max output length)."""
        width = int((self.lengths - self.cuts).max())
        offsets = torch.arange(width, device=self.ids.device)[None]
        index = (self.cuts[:, None] + offsets).clamp(max=self.ids.shape[1] - 1)
        mask = offsets < (self.lengths - self.cuts)[:, None]
        return torch.where(mask, self.ids.gather(1, index), self.pad_id), mask

    def decoder_input_ids(self, start_token: int) -> torch.Tensor:
        """An encoder-decoder's decoder inputs: the start token, then the outputs shifted right (pairs, max output)."""
        outputs, _ = self.outputs()
        return torch.cat((torch.full_like(outputs[:, :1], start_token), outputs[:, :-1]), dim=1)

    def predicting_outputs(self) -> torch.Tensor:
        """(pairs, length - 1) boolean: the causal positions whose next token is an output token."""
        positions = torch.arange(1, self.ids.shape[1], device=self.ids.device)[None]
        return (positions >= self.cuts[:, None]) & (positions < self.lengths[:, None])
