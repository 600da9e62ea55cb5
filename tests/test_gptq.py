"""GPTQ rounding: lower output error than nearest rounding, weights on the grid the integer graph keeps."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from factories import int8_weights, static_kl, tiny_llama, token_ids
from onnx import TensorProto, numpy_helper
from torch.nn.utils import parametrize

from compress.deploy.gptq import block_op, gptq_, gptq_table_, input_hessians
from compress.deploy.groups import quantize_graph
from compress.deploy.quantization import QatSettings, _rounded, export_graphs, prepare, quantize_graphs
from compress.deploy.split_table import frequent_rows
from quant import runtime
from quant.gptq import block_scales, gptq_round, owq_columns
from quant.profiles import get_profile
from quant.quantize import PRESETS
from quant.weight_ranges import mse_range

CAPACITY = 32


def _nearest(weight: torch.Tensor, step: torch.Tensor, top: int = 127) -> torch.Tensor:
    return torch.clamp(torch.round(weight / step), -top, top) * step


@pytest.mark.parametrize(("per_channel", "bits"), [(True, 8), (False, 8), (True, 4)])
def test_gptq_rounds_onto_the_grid_with_less_output_error_than_nearest(per_channel, bits):
    top = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(0)
    # Correlated inputs with a few large channels, as a norm's outputs are: where error feedback pays.
    mix = torch.randn(96, 96, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, 96, dtype=torch.float64)
    x = torch.randn(2048, 96, generator=g, dtype=torch.float64) @ mix
    calib, held_out = x[:1024], x[1024:]
    weight = torch.randn(48, 96, generator=g)
    q = gptq_round(weight, calib.T @ calib / len(calib), per_channel=per_channel, weight_range="minmax", bits=bits)
    peak = weight.abs().amax(1, keepdim=True) if per_channel else weight.abs().max()
    step = (peak / top).double()
    on_grid = q.double() / step
    assert torch.allclose(on_grid, on_grid.round(), atol=1e-3), f"GPTQ output must lie on the int{bits} grid"
    assert on_grid.abs().max() <= top + 1e-3
    # ORT's MinMax reads the step back from the largest |value| of each channel (of the tensor): pinned at the top.
    assert torch.allclose(q.abs().amax(1) if per_channel else q.abs().max(), peak.squeeze(), rtol=1e-6)
    error = lambda w: ((held_out @ (w.double() - weight.double()).T) ** 2).sum().item()  # noqa: E731
    assert error(q) < 0.7 * error(_nearest(weight.double(), step, top))


def test_owq_keeps_the_massive_input_columns_float_and_rounds_the_rest_closer_than_gptq_alone():
    g = torch.Generator().manual_seed(1)
    massive = torch.tensor([5, 70])
    x = torch.randn(4096, 128, generator=g, dtype=torch.float64)
    x[:, massive] *= 200.0  # two input channels far above the others, as a down projection's input has
    calib, held_out = x[:2048], x[2048:]
    hessian = calib.T @ calib / len(calib)
    weight = torch.randn(32, 128, generator=g)
    scales = block_scales(weight, 32, bits=4)
    keep = owq_columns(weight, hessian, scales, bits=4, count=2)
    assert sorted(keep.tolist()) == massive.tolist()
    rest = weight.clone()
    rest[:, keep] = 0.0
    kept_scales = block_scales(rest, 32, bits=4)
    q = gptq_round(weight, hessian, bits=4, scales=kept_scales, keep=keep)
    grid = torch.ones(128, dtype=torch.bool)
    grid[keep] = False
    on_grid = q.double()[:, grid] / kept_scales.steps()[:, grid]
    assert torch.allclose(on_grid, on_grid.round(), atol=1e-3), "every column but the kept ones lies on its grid"
    assert not torch.equal(q[:, keep], weight[:, keep]), "the kept columns take up the others' error"
    error = lambda w: ((held_out @ (w.double() - weight.double()).T) ** 2).sum().item()  # noqa: E731
    assert error(q) < 0.5 * error(gptq_round(weight, hessian, bits=4, scales=scales))
    with pytest.raises(ValueError, match="block scales"):
        gptq_round(weight, hessian, bits=4, keep=keep)


@pytest.mark.parametrize("weight_range", ["minmax", "mse"])
def test_lpbq_block_steps_keep_minmax_blocks_whole_and_sit_nearest_the_mse_step(weight_range):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 128, generator=g) * torch.rand(16, 128, generator=g) ** 3  # blocks of unlike ranges
    scales = block_scales(weight, 32, bits=4, weight_range=weight_range)
    step = scales.steps()[:, ::32].double()  # one per block
    blocks = weight.double().reshape(16, 4, 32)
    assert ((scales.ints >= 1) & (scales.ints <= 15)).all()
    if weight_range == "minmax":
        assert (blocks.abs().amax(-1) <= 7 * step * (1 + 1e-6)).all(), "a MinMax block keeps its largest value whole"
    else:
        ideal = torch.from_numpy(mse_range(blocks.reshape(64, 32).float().numpy(), 0, 7)).double().reshape(16, 4) / 7
        unit = scales.channel.double()[:, None]
        inside = (ideal / unit > 0.5) & (ideal / unit < 15)  # where a multiple of the unit can come that near
        assert ((step - ideal).abs()[inside] <= 0.5 * unit.expand_as(step)[inside] + 1e-9).all()


def test_input_hessians_are_one_per_input_symmetric_and_positive():
    model = tiny_llama()
    lm = prepare(model, CAPACITY, ())
    ids = token_ids(model, 2, CAPACITY, 1)
    hessians = input_hessians(lm, ids)
    block = lm.unique_blocks[0]
    assert torch.allclose(hessians[block.q], hessians[block.k]) and torch.allclose(hessians[block.gate], hessians[block.up])
    # One block's, from prefills that stop after it: the same matrices.
    first = input_hessians(lm, ids, [block])
    assert set(first) == {getattr(block, n) for n in ("q", "k", "v", "o", "gate", "up", "down")}
    assert all(torch.equal(first[m], hessians[m]) for m in first)
    n, d = hessians[block.q].shape
    assert n == d == model.config.hidden_size
    assert torch.allclose(hessians[block.q], hessians[block.q].T)
    assert torch.all(torch.linalg.eigvalsh(hessians[block.q]) > -1e-8)


@pytest.mark.parametrize(("profile", "weight_range"), [("qnn-htp", "minmax"), ("generic-a8w8", "mse")])
def test_the_quantized_graph_keeps_gptq_weights_exactly(tmp_path, profile, weight_range):
    model = tiny_llama()
    npu = get_profile(profile)
    calib = token_ids(model, 4, CAPACITY, 2)
    lm = prepare(model, CAPACITY, ("rotate", "embed-rows"), calib, conv=npu.linear_as_conv)
    rounded = gptq_(copy.deepcopy(lm), calib, per_channel=block_op(lm) in npu.per_channel_ops, weight_range=weight_range)
    export_graphs(rounded, tmp_path, decode=False)
    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "model.onnx").graph.initializer}
    # With MSE ranges the quantizer searches each channel's range again: an on-grid channel must keep its own.
    recipe = dataclasses.replace(PRESETS["a16w8" if profile == "qnn-htp" else "a8w8"], weight_range=weight_range)
    quantize_graph(tmp_path / "model.onnx", tmp_path / "q.onnx", [{"input_ids": r[None].numpy()} for r in calib], recipe, npu)
    kept = 0
    for source, weight, _, axis, restored in int8_weights(onnx.load(tmp_path / "q.onnx"), floats):
        if axis is None:
            continue  # the per-tensor embedding/head: rounded by the quantizer, not by GPTQ
        assert np.abs(restored - weight).max() <= 1e-5 * np.abs(weight).max(), source
        kept += 1
    assert kept == 7 * model.config.num_hidden_layers  # every block linear, per output channel


def test_gptq_recipe_tracks_the_float_model_closer_than_nearest_rounding(tmp_path):
    model = tiny_llama()
    npu = get_profile("qnn-htp")
    calib, held_out = token_ids(model, 8, CAPACITY, 2), token_ids(model, 4, CAPACITY, 3)
    lm = prepare(model, CAPACITY, ("rotate", "embed-rows"), calib, conv=True)
    export_graphs(lm, tmp_path, decode=False)
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=held_out).logits.double(), -1)
    kl = {}
    for rounding in ("nearest", "gptq"):
        recipe = dataclasses.replace(PRESETS["a16w8"], weight_rounding=rounding)
        graphs = quantize_graphs(lm, tmp_path, recipe, npu, calib.numpy(), decode=False)
        assert graphs.violations["prefill"] == []
        got = torch.log_softmax(torch.from_numpy(runtime.prefill_logits(runtime.session(graphs.prefill),
                                                                         held_out.numpy())).double(), -1)
        kl[rounding] = (expected.exp() * (expected - got)).sum(-1).mean().item()
    assert not list(tmp_path.glob(".rounded.*")), "the rounded float graphs are removed"
    assert kl["gptq"] < kl["nearest"]


def test_w4a16_graph_holds_the_gptq_lpbq_blocks_and_table_exactly_and_runs_on_cpu(tmp_path):
    model = tiny_llama()
    npu = get_profile("qnn-htp")
    recipe = PRESETS["w4a16"]
    calib, hessian_ids = token_ids(model, 4, CAPACITY, 2), token_ids(model, 8, CAPACITY, 5)
    lm = prepare(model, CAPACITY, ("rotate", "embed-rows"), calib, conv=recipe.linears_as_conv(npu))
    export_graphs(lm, tmp_path, decode=False)
    graphs = quantize_graphs(lm, tmp_path, recipe, npu, calib.numpy(), decode=False, gptq_ids=hessian_ids.numpy())
    assert graphs.reports["prefill"].block_weights == 7 * model.config.num_hidden_layers
    assert graphs.violations["prefill"] == []
    # The same rounding, in torch, its Hessians from gptq_ids (not the range calibration's): the graph must hold
    # exactly these values.
    wide = frequent_rows(hessian_ids, model.config.vocab_size, recipe.embedding_wide_rows)  # counted in GPTQ's text
    rounded = gptq_table_(gptq_(copy.deepcopy(lm), hessian_ids, bits=4, block_size=recipe.weight_block,
                                weight_range=recipe.weight_range, sequential=True), hessian_ids, 4, wide)
    graph = onnx.load(graphs.prefill).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    for name, (weight, scales) in rounded.weight_blocks.items():
        steps = values[f"{name}_block_ints"].astype(np.float64) * values[f"{name}_channel_scale"][None, :]
        restored = values[f"{name}_int4"] * np.repeat(steps, scales.size, axis=0)  # (in, out)
        assert np.abs(restored - weight.numpy().T).max() <= 1e-6 * np.abs(weight.numpy()).max(), name
    # The tied table in two: the frequent tokens' rows int8, the rest int4, each read by the lookup and the head.
    tables = [producers[n.input[1]] for n in graph.node if n.op_type == "Gemm"]
    looked_up = {producers[n.input[0]].input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in producers}
    initializers = {t.name: t for t in graph.initializer}
    assert [initializers[dq.input[0]].data_type for dq in tables] == [TensorProto.INT8, TensorProto.INT4]
    assert {dq.input[0] for dq in tables} <= looked_up
    parts = [values[dq.input[0]].astype(np.float64) * values[dq.input[1]] for dq in tables]
    assert len(parts[0]) == 64 + 32 and len(wide) == 64  # a quarter of the 256 tokens, zero rows up to 32's multiple
    (reorder,) = [n for n in graph.node if n.op_type == "Gather" and n.input[1] in values]  # logits back in token order
    whole = np.concatenate(parts)[values[reorder.input[1]]]
    assert np.abs(whole - rounded.embed.detach().numpy()).max() <= 1e-6  # rows of max |value| 1
    for dq, top in zip(tables, (127, 7), strict=True):  # on steps of 1/127 and 1/7
        assert values[dq.input[1]] == pytest.approx(1 / top)
    steps = rounded.embed.detach()[wide].double() * 7
    assert (steps - steps.round()).abs().max() > 0.1  # the wide rows were not rounded to the int4 grid first
    quality, _ = runtime.quality(runtime.session(graphs.prefill), token_ids(model, 2, CAPACITY, 3).numpy())
    assert np.isfinite(quality.perplexity)


def test_qat_brings_the_w4a16_model_closer_to_its_float_model_and_the_graph_keeps_its_weights(tmp_path):
    model = tiny_llama()
    npu = get_profile("qnn-htp")
    recipe = dataclasses.replace(PRESETS["w4a16"], embedding_wide_rows=0)  # one int4 table: the grid it trains on
    # GPTQ's Hessians from one sequence: on more, its rounding of so small a model leaves QAT little to mend.
    calib, train = token_ids(model, 1, CAPACITY, 2), token_ids(model, 64, CAPACITY, 4)
    held_out = token_ids(model, 4, CAPACITY, 3)
    lm = prepare(model, CAPACITY, ("rotate", "embed-rows"), calib, conv=False)
    with pytest.raises(ValueError, match="two precisions.*--quant-qat-table-lr 0"):
        _rounded(lm, PRESETS["w4a16"], npu, calib, QatSettings(train.numpy(), table_lr=0.2))
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    export_graphs(lm, tmp_path, decode=False)
    kl, units, tables = {}, {}, {}
    with_table = QatSettings(train.numpy(), lr=5e-4, unit_lr=5e-3, table_lr=0.2)  # its largest entry: 0.2 a step
    arms = (("gptq", None), ("fixed units", QatSettings(train.numpy(), lr=5e-4, unit_lr=0.0)),
            ("qat", QatSettings(train.numpy(), lr=5e-4, unit_lr=5e-3)), ("table", with_table))
    for arm, qat in arms:
        rounded = _rounded(lm, recipe, npu, calib, qat)
        units[arm] = {name: scales for name, (_, scales) in rounded.weight_blocks.items()}
        tables[arm] = rounded.embed.detach().clone()
        assert rounded.tied and rounded.table_grid is None
        steps = tables[arm].double() * 7  # rows of max |value| 1 on steps of 1/7, one entry still at the end
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max().round() == 7, arm
        kl[arm] = static_kl(lm, rounded, held_out)
        for block in rounded.unique_blocks:  # every block weight back on its grid, a plain parameter again
            assert not parametrize.is_parametrized(block.q)
        for name, (weight, scales) in rounded.weight_blocks.items():
            q = weight.double() / scales.steps()
            assert torch.allclose(q, q.round(), atol=1e-4) and q.round().abs().max() <= 7, name
    assert rounded.qat["steps"] == 16 and rounded.qat["tokens"] == 64 * CAPACITY
    assert kl["qat"] < 0.95 * kl["gptq"] and kl["table"] < 0.95 * kl["gptq"], kl  # on sequences it did not train on
    assert torch.equal(tables["qat"], tables["gptq"])
    moved = ((tables["table"] * 7).round() != (tables["gptq"] * 7).round()).sum().item()  # in whole grid steps
    assert 0 < moved < tables["gptq"].numel() // 10, moved  # gradient steps move the entries that matter, not all
    for name, scales in units["gptq"].items():  # the block integers are GPTQ's; the units train only when asked to
        assert torch.equal(units["fixed units"][name].channel, scales.channel), name
        assert torch.equal(units["qat"][name].ints, scales.ints), name
    assert not all(torch.equal(units["qat"][n].channel, s.channel) for n, s in units["gptq"].items())
    assert all(torch.equal(p, before[n]) for n, p in lm.named_parameters()), "the float model is the reference, untouched"
    assert lm.fused_norm and all(b.fused_norm for b in lm.blocks)
    graphs = quantize_graphs(lm, tmp_path, recipe, npu, calib.numpy(), decode=False, qat=with_table)
    assert graphs.qat["steps"] == 16
    assert graphs.reports["prefill"].block_weights == 7 * model.config.num_hidden_layers
    graph = onnx.load(graphs.prefill).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    (gemm,) = [n for n in graph.node if n.op_type == "Gemm"]  # the same training: its trained table, exactly
    table_dq = producers[gemm.input[1]]
    assert np.abs(values[table_dq.input[0]] * values[table_dq.input[1]] - tables["table"].numpy()).max() <= 1e-6
    for name, (weight, scales) in rounded.weight_blocks.items():  # and its trained units, exactly
        assert np.array_equal(values[f"{name}_channel_scale"], scales.channel.numpy()), name
        steps = values[f"{name}_block_ints"].astype(np.float64) * values[f"{name}_channel_scale"][None, :]
        restored = values[f"{name}_int4"] * np.repeat(steps, scales.size, axis=0)  # (in, out)
        assert np.abs(restored - weight.numpy().T).max() <= 1e-6 * np.abs(weight.numpy()).max(), name
    quality, _ = runtime.quality(runtime.session(graphs.prefill), held_out.numpy())
    assert np.isfinite(quality.perplexity)
    with pytest.raises(ValueError, match="LPBQ"):
        _rounded(lm, PRESETS["a16w8"], npu, calib, QatSettings(train.numpy()))
