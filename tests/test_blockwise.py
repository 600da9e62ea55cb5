"""Block-wise reconstruction of W4A16's int4 block weights (compress.deploy.qat.blockwise_): each block trained on its
LPBQ grids to its float block's output leaves the model closer to its float model than GPTQ alone, on sequences it
did not train on, with every weight still on its grid."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from factories import static_kl, tiny_llama, token_ids
from torch import nn
from torch.nn.utils import parametrize

from compress.deploy.qat import _relative_error, blockwise_
from compress.deploy.quantization import _rounded, prepare
from quant.profiles import get_profile
from quant.quantize import PRESETS

CAPACITY = 32


def test_blockwise_reconstruction_brings_the_int4_model_closer_to_its_float_model_on_its_grids():
    model = tiny_llama()
    recipe = dataclasses.replace(PRESETS["w4a16"], embedding_wide_rows=0)
    calib, train, held_out = (token_ids(model, n, CAPACITY, seed) for n, seed in ((1, 2), (32, 4), (4, 3)))
    lm = prepare(model, CAPACITY, ("rotate", "embed-rows"), calib, conv=False)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    rounded = _rounded(lm, recipe, get_profile("qnn-htp"), calib, None)
    gptq_units = {name: scales.channel.clone() for name, (_, scales) in rounded.weight_blocks.items()}
    trained = copy.deepcopy(rounded)
    result = blockwise_(trained, lm, train, epochs=4, lr=1e-3, unit_lr=5e-3)

    assert result.steps == 4 * (32 // 4) * len(lm.blocks) and result.tokens == 4 * 32 * CAPACITY
    tables = lm.prefill_tables(CAPACITY)
    with torch.no_grad():  # the first block's error on the training sequences: GPTQ's, against the trained one's
        gptq_error = sum(float(_relative_error(rounded.blocks[0].prefill(rounded.embedding(row[None]), tables)[0],
                                               lm.blocks[0].prefill(lm.embedding(row[None]), tables)[0]))
                         for row in train) / len(train)
    assert result.first_kl < gptq_error
    # most of this tiny model's KL is its int4 table's, which the blocks after it learn to make up for in part
    assert static_kl(lm, trained, held_out) < 0.85 * static_kl(lm, rounded, held_out)
    for block in trained.unique_blocks:
        assert not any(parametrize.is_parametrized(getattr(block, n)) for n in ("q", "down"))
    for name, (weight, scales) in trained.weight_blocks.items():  # on the grids the graph writer stores exactly
        q = weight.double() / scales.steps()
        assert torch.allclose(q, q.round(), atol=1e-4) and q.round().abs().max() <= 7, name
    assert not all(torch.equal(trained.weight_blocks[n][1].channel, u) for n, u in gptq_units.items())
    assert torch.equal(trained.embed, rounded.embed), "the table stays as GPTQ rounded it"
    assert all(torch.equal(p, before[n]) for n, p in lm.named_parameters()), "the float model is the reference"
    assert trained.fused_norm and all(b.fused_norm for b in trained.blocks)


def test_blockwise_reconstruction_refuses_a_model_it_cannot_train():
    model = tiny_llama()
    ids = token_ids(model, 8, CAPACITY, 1)
    lm = prepare(model, CAPACITY, ("rotate", "embed-rows"), ids[:1], conv=False)
    with pytest.raises(ValueError, match="gptq_"):
        blockwise_(copy.deepcopy(lm), lm, ids)
    rounded = _rounded(lm, dataclasses.replace(PRESETS["w4a16"], embedding_wide_rows=0), get_profile("qnn-htp"),
                       ids[:1], None)
    with pytest.raises(ValueError, match="at least 4 sequences"):
        blockwise_(copy.deepcopy(rounded), lm, ids[:3])
    shared = copy.deepcopy(rounded)
    shared.blocks = nn.ModuleList([shared.blocks[0]] * len(shared.blocks))
    with pytest.raises(ValueError, match="shared blocks"):
        blockwise_(shared, lm, ids)
