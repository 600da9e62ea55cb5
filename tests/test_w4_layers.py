"""The W4A16 layer map (benchmarks/w4_layers.py): a row with layers given back holds exactly their float weights and
leaves the rest rounded, and a massive input channel is found where it enters."""

from __future__ import annotations

import copy

import torch
from factories import tiny_llama, token_ids

from benchmarks.w4_layers import input_peaks, perplexity, with_float
from compress.deploy.export import LINEARS
from compress.deploy.gptq import gptq_
from compress.deploy.quantization import prepare

CAPACITY = 24


def test_layers_given_back_hold_the_float_weights_and_all_of_them_score_as_the_float_model():
    model = tiny_llama()
    ids = token_ids(model, 4, CAPACITY, 1)
    lm = prepare(model, CAPACITY, ("rotate", "embed-rows"), ids, conv=False)
    rounded = gptq_(copy.deepcopy(lm), ids, bits=4, block_size=32, weight_range="mse", sequential=True)
    row = with_float(rounded, lm, [(0, "down")])
    assert torch.equal(row.blocks[0].down.weight, lm.blocks[0].down.weight)
    assert not torch.equal(row.blocks[0].up.weight, lm.blocks[0].up.weight)
    assert torch.equal(row.blocks[0].up.weight, rounded.blocks[0].up.weight)
    assert not torch.equal(rounded.blocks[0].down.weight, lm.blocks[0].down.weight)  # the copy, not the source, changed
    everything = with_float(rounded, lm, [(i, n) for i in range(len(lm.blocks)) for n in LINEARS])
    assert perplexity(everything, ids) == perplexity(lm, ids)
    assert perplexity(rounded, ids) != perplexity(lm, ids)


def test_input_peaks_name_the_channel_that_carries_a_massive_activation():
    model = tiny_llama()
    lm = prepare(model, CAPACITY, (), conv=False)
    channel = 7
    with torch.no_grad():  # one of block 1's MLP channels made a hundred times larger: the down projection reads it
        lm.blocks[1].up.weight[:, channel] *= 100.0  # MatMul layout: (in, out)
    peaks = {(p["block"], p["layer"]): p for p in input_peaks(lm, token_ids(model, 2, CAPACITY, 3))}
    assert peaks[1, "down"]["channel"] == channel
    assert peaks[1, "down"]["ratio"] > 10 * max(p["ratio"] for key, p in peaks.items() if key != (1, "down"))


def test_owq_rows_keep_the_named_columns_of_each_down_projection_float_and_the_rest_on_the_int4_grid():
    model = tiny_llama()
    ids = token_ids(model, 4, CAPACITY, 1)
    lm = prepare(model, CAPACITY, ("rotate", "embed-rows"), ids, conv=False)
    rounded = gptq_(copy.deepcopy(lm), ids, bits=4, block_size=32, weight_range="mse", sequential=True,
                    keep_columns={"down": 2})
    name = next(n for n in rounded.kept_columns if ".down." in n)
    assert all(".down." in n for n in rounded.kept_columns)
    matrix, scales = rounded.weight_blocks[name]
    keep = rounded.kept_columns[name]
    grid = torch.ones(matrix.shape[1], dtype=torch.bool)
    grid[keep] = False
    steps = matrix.double()[:, grid] / scales.steps()[:, grid]
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    off = matrix.double()[:, keep] / scales.steps()[:, keep]
    assert not torch.allclose(off, off.round(), atol=1e-3), "the kept columns are float, off the grid"
