"""Export, outlier rewrites, QDQ quantization and graph inspection on tiny real architectures."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from factories import int8_weights, tiny_gemma3, tiny_llama, tiny_qwen2, token_ids
from onnx import TensorProto, helper

from compress.deploy.export import StaticLM
from compress.deploy.groups import find_groups, find_weight_groups
from compress.deploy.outliers import fold_norms, rotate, smooth
from compress.deploy.quantization import DecodeFeeds, export_graphs, prepare, quantize_graphs
from quant import runtime
from quant.profiles import check, get_profile
from quant.quantize import PRESETS, QuantRecipe, quantize
from quant.weight_ranges import mse_range

CAPACITY = 32


def _ids(model, n: int = 6, length: int = CAPACITY, seed: int = 1) -> torch.Tensor:
    return token_ids(model, n, length, seed)


@pytest.fixture(scope="module")
def llama_graphs(tmp_path_factory):
    model = tiny_llama()
    lm = prepare(model, CAPACITY, ())
    folder = tmp_path_factory.mktemp("llama")
    export_graphs(lm, folder)
    return model, lm, folder


def test_float_prefill_graph_matches_torch_and_is_static(llama_graphs):
    model, _, folder = llama_graphs
    ids = _ids(model, 2)
    graph = onnx.load(folder / "model.onnx")
    sess = runtime.session(folder / "model.onnx")
    with torch.no_grad():
        expected = model(input_ids=ids).logits.numpy()
    got = runtime.prefill_logits(sess, ids.numpy())
    assert np.abs(got - expected).max() <= 1e-4
    problems = check(graph, get_profile("qnn-htp"), quantized=False)
    assert problems == []
    table = [t for t in graph.graph.initializer if list(t.dims) == [model.config.vocab_size, model.config.hidden_size]]
    assert len(table) == 1, "the tied embedding must be stored once"
    assert sum(n.op_type == "RMSNormalization" for n in graph.graph.node) == 2 * model.config.num_hidden_layers + 1


def test_decode_graph_continues_prefill_like_torch(llama_graphs):
    model, _, folder = llama_graphs
    ids = _ids(model, 1)[0]
    prefill, step = runtime.session(folder / "model.onnx"), runtime.session(folder / "decode.onnx")
    prompt = [int(t) for t in ids[:10]]
    tokens, logits, _ = runtime.decode(step, prompt, 5, prefill_sess=prefill)
    # the same tokens fed one at a time through the decode graph alone
    tokens_alone, logits_alone, _ = runtime.decode(step, prompt, 5)
    assert tokens == tokens_alone
    full = torch.tensor([prompt + tokens])
    with torch.no_grad():
        expected = model(input_ids=full).logits[0].numpy()
    for i in range(4):  # logits after generated token i predict position len(prompt) + i + 1
        assert np.abs(logits[i] - expected[len(prompt) + i]).max() <= 1e-4
        assert np.abs(logits_alone[i] - expected[len(prompt) + i]).max() <= 1e-4


def test_a_prefill_graph_shorter_than_the_cache_quantizes_whole_and_continues_like_torch(tmp_path):
    model = tiny_llama()
    # 96 slots: a causal bias of 96 x 96 is past the exporter's constant-folding size limit (8,192), as real
    # ones are, so a Slice of it would stay in the graph.
    capacity, length = 96, 64
    calib = _ids(model, 4, length=capacity, seed=2)
    lm = prepare(model, capacity, ("rotate", "embed-rows"), calib)
    prefill, decode = export_graphs(lm, tmp_path, prefill_length=length)
    assert [d.dim_value for d in onnx.load(prefill).graph.input[0].type.tensor_type.shape.dim] == [1, length]
    # The causal bias and RoPE tables are cut to the graph's length at export: no Slice of a float constant,
    # which would stay a float island in the quantized graph.
    graphs = quantize_graphs(lm, tmp_path, PRESETS["a8w8"], get_profile("generic-a8w8"), calib.numpy(),
                             decode_calib_tokens=16)
    assert graphs.violations == {"prefill": [], "decode": []}
    prompt = [int(t) for t in _ids(model, 1, seed=3)[0, :length]]
    tokens, logits, _ = runtime.decode(runtime.session(decode), prompt, 8, prefill_sess=runtime.session(prefill))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([prompt + tokens])).logits[0].numpy()
    for i in range(7):  # the cache holds the whole prompt and every generated token
        assert np.abs(logits[i] - expected[len(prompt) + i]).max() <= 1e-4


def test_decode_graph_scores_continuations_like_the_prefill_graph(llama_graphs):
    model, _, folder = llama_graphs
    ids = _ids(model, 2).numpy()
    prefill, step = runtime.session(folder / "model.onnx"), runtime.session(folder / "decode.onnx")
    logits = runtime.prefill_logits(prefill, ids)[:, :-1].astype(np.float64)
    half = CAPACITY // 2
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, half - 1:], ids[:, half:, None], -1).mean()
    top1 = logits.argmax(-1)
    scored = runtime.decode_quality(step, prefill, ids, half, reference_top1=top1)
    assert scored.tokens == 2 * (CAPACITY - half)
    assert abs(scored.nll - nll) <= 1e-5 and scored.agreement == 1.0
    wrong = (top1 + 1) % model.config.vocab_size
    assert runtime.decode_quality(step, prefill, ids, half, reference_top1=wrong).agreement == 0.0
    with pytest.raises(ValueError, match="prompt_tokens"):
        runtime.decode_quality(step, prefill, ids, CAPACITY)


def test_a_full_cache_keeps_the_last_tokens_in_its_ring_of_slots(llama_graphs):
    model, lm, folder = llama_graphs
    ids = _ids(model, 1, length=CAPACITY + 12)[0]
    step = runtime.session(folder / "decode.onnx")
    cache = runtime.DecodeCache(step)
    got = [cache.step(int(t)) for t in ids]
    assert sorted(cache.slot_positions) == list(range(12, CAPACITY + 12)) and cache.state["attention_mask"].all()
    # The same steps in torch with the cache kept in age order, the oldest token dropped once it is full: slot
    # order does not matter to attention, so the logits agree.
    layers = 2 * len(lm.blocks)
    seen: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    with torch.no_grad():
        for position, token in enumerate(ids):
            cache_in, count = [], min(position, CAPACITY)
            for i, shape in enumerate(lm.cache_shapes() * len(lm.blocks)):
                tensor = torch.zeros(shape)
                recent = seen[i][position - count:]
                if recent and i % 2 == 0:
                    tensor[..., :count] = torch.cat(recent, dim=2).transpose(-1, -2)
                elif recent:
                    tensor[:, :, :count] = torch.cat(recent, dim=2)
                cache_in.append(tensor)
            mask = (torch.arange(CAPACITY) < count).float()[None]
            logits, new = lm.decode(token.reshape(1, 1), torch.tensor([[position]]), mask, cache_in)
            for i in range(layers):
                seen[i].append(new[i])
            assert np.abs(got[position] - logits[0, -1].numpy()).max() <= 1e-4, position


def test_a_decode_graph_that_returns_its_whole_cache_is_refused_with_what_to_do(tmp_path):
    from onnx import TensorProto, helper

    past = helper.make_tensor_value_info("past.0.key", TensorProto.FLOAT, [1, 2, 8, 4])
    present = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, [1, 2, 8, 4])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, [1, 8])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["past.0.key"], ["present.0.key"]),
                               helper.make_node("Identity", ["attention_mask"], ["logits"])],
                              "old", [mask, past], [logits, present])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "old.onnx")
    with pytest.raises(ValueError, match="returns its whole cache.*export it again"):
        runtime.DecodeCache(runtime.session(tmp_path / "old.onnx"))


def test_decode_calibration_feeds_are_what_the_host_loop_feeds(llama_graphs):
    model, lm, folder = llama_graphs
    ids = _ids(model, 2).numpy()
    feeds = DecodeFeeds(lm, ids, tokens=14)
    positions = [cut for row, cut in feeds.steps if row == 0]
    assert len(feeds) == 14 and len(positions) == 7 and positions[:2] == [0, 1] and positions[-1] == CAPACITY - 1
    prefill, step = runtime.session(folder / "model.onnx"), runtime.session(folder / "decode.onnx")
    for index in range(len(feeds)):
        row, cut = feeds.steps[index]
        feed = feeds[index]
        cache = runtime.DecodeCache(step)
        if cut:
            cache.prefill(prefill, [int(t) for t in ids[row, :cut]])
        assert int(feed["input_ids"][0, 0]) == ids[row, cut] and int(feed["position_ids"][0, 0]) == cut == cache.position
        assert set(feed) == {i.name for i in step.get_inputs()}
        for name, value in cache.state.items():
            assert np.abs(feed[name] - value).max() <= 1e-5, (index, name)
    with pytest.raises(IndexError):
        feeds[len(feeds)]


def test_decode_calibration_steps_include_every_token_with_a_massive_activation():
    # A token whose residual stream is tens of times the others' (Gemma3's apostrophe after "I", like its first
    # token) must be among the decode graph's calibration steps, wherever it falls.
    model = tiny_llama()
    ids = _ids(model, 2).numpy()
    spread = {cut for row, cut in DecodeFeeds(prepare(model, CAPACITY, ()), ids, tokens=8).steps if row == 1}
    position = next(p for p in range(2, CAPACITY) if p not in spread)
    token = int(ids[1, position])
    ids[0, :] = np.where(ids[0] == token, (token + 1) % model.config.vocab_size, ids[0])  # the token only in row 1
    ids[1, :position] = np.where(ids[1, :position] == token, (token + 1) % model.config.vocab_size, ids[1, :position])
    with torch.no_grad():
        model.model.embed_tokens.weight[token] *= 200.0
    feeds = DecodeFeeds(prepare(model, CAPACITY, ()), ids, tokens=8)
    assert (1, position) in feeds.steps and (0, 0) in feeds.steps
    assert len(feeds.steps) <= 8 + 2 * DecodeFeeds.MAX_MASSIVE


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama-tied", "qwen2-biases-untied"])
def test_outlier_rewrites_keep_float_outputs(make):
    model = make()
    with torch.no_grad():  # non-trivial norm weights, so folding them is exercised
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
        model.model.norm.weight.uniform_(0.5, 2.0)
    ids = _ids(model, 3)
    with torch.no_grad():
        expected = model(input_ids=ids[:1]).logits
        for rewrite in (fold_norms, rotate, lambda lm: smooth(rotate(lm), ids)):
            lm = rewrite(StaticLM(model, CAPACITY))
            assert torch.allclose(lm.prefill(ids[:1])[0], expected, atol=1e-5)
    rotated = rotate(StaticLM(model, CAPACITY))
    assert rotated.tied == model.config.tie_word_embeddings


@pytest.mark.parametrize(("quant", "profile", "tolerance"), [("a16w8", "qnn-htp", 0.05), ("a8w8", "generic-a8w8", 0.15)])
def test_quantized_graphs_pass_inspection_and_track_torch(tmp_path, quant, profile, tolerance):
    model = tiny_llama()
    calib = _ids(model, 6, seed=2)
    lm = prepare(model, CAPACITY, ("rotate", "smooth", "embed-rows"), calib, conv=get_profile(profile).linear_as_conv)
    export_graphs(lm, tmp_path)
    graphs = quantize_graphs(lm, tmp_path, PRESETS[quant], get_profile(profile), calib.numpy())
    assert graphs.violations == {"prefill": [], "decode": []}
    ids = _ids(model, 2, seed=3)
    with torch.no_grad():
        expected = model(input_ids=ids).logits.numpy()
    got = runtime.prefill_logits(runtime.session(graphs.prefill), ids.numpy())
    # Relative error of the logits, against their spread: the stated tolerance of each recipe.
    error = np.sqrt(((got - expected) ** 2).mean()) / expected.std()
    assert error <= tolerance, f"{quant}: relative logit error {error:.4f}"
    quantized = onnx.load(graphs.prefill)
    types = {t.name: t.data_type for t in quantized.graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    weights = {dequantized[n.input[1]] for n in quantized.graph.node
               if n.op_type in ("MatMul", "Gemm", "Conv") and dequantized.get(n.input[1]) in types}
    # The tied, rotated model's head mix (Qᵀ·diag(g)·Q) is the one int16 weight, and the report names it.
    mixes = graphs.reports["prefill"].sixteen_bit_weights
    assert len(mixes) == 1 and len(weights) == 7 * model.config.num_hidden_layers + 2
    assert {types[w] for w in weights if not w.startswith(mixes[0])} == {TensorProto.INT8}
    assert [types[w] for w in weights if w.startswith(mixes[0])] == [TensorProto.INT16]
    step = runtime.session(graphs.decode)
    tokens, _, _ = runtime.decode(step, [int(t) for t in ids[0, :8]], 3)
    assert len(tokens) == 3


def _rounding_error(weight: np.ndarray, limit: np.ndarray, levels: int = 127) -> np.ndarray:
    step = limit[:, None] / levels
    return np.square(np.clip(np.round(weight / step), -levels, levels) * step - weight).sum(1)


def test_mse_range_rounds_better_than_minmax_and_never_widens():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 256)).astype(np.float32)
    limit = mse_range(weight, 0)
    peak = np.abs(weight).max(1)
    assert limit.shape == (64,) and np.all(limit <= peak) and np.all(limit >= 0.5 * peak - 1e-6)
    mse, minmax = _rounding_error(weight, limit), _rounding_error(weight, peak)
    assert np.all(mse <= minmax) and mse.sum() < minmax.sum()
    # With few levels the best range is well inside the largest weight (Gaussian, 4 bits: about 2.5 sigma).
    coarse = mse_range(weight, 0, levels=7)
    assert coarse.mean() < 0.9 * peak.mean()
    assert _rounding_error(weight, coarse, 7).sum() < 0.8 * _rounding_error(weight, peak, 7).sum()
    assert np.allclose(mse_range(weight.T, 1), limit)  # the channel axis is the one asked for
    assert mse_range(weight, None).shape == (1,)
    assert np.all(mse_range(np.zeros((3, 5), np.float32), 0) == 0)


@pytest.mark.parametrize("profile", ["qnn-htp", "generic-a8w8"])
def test_mse_weight_ranges_are_the_ranges_the_graph_quantizes_with(tmp_path, profile):
    """Every int8 weight's scale in the quantized graph is its MSE range / 127 along the axis ORT quantized
    it on (per output channel for the profile's per-channel operators, else per tensor), and rounds the
    weights no worse than MinMax."""
    model = tiny_llama()
    calib = _ids(model, 4, seed=2)
    npu = get_profile(profile)
    lm = prepare(model, CAPACITY, ("rotate", "embed-rows"), calib, conv=npu.linear_as_conv)
    export_graphs(lm, tmp_path, decode=False)
    floats = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "model.onnx").graph.initializer}
    errors, per_channel = {}, 0
    for weight_range in ("minmax", "mse"):
        recipe = QuantRecipe("a8w8", 8, sixteen_bit=("residual", "softmax"), weight_range=weight_range)
        graphs = quantize_graphs(lm, tmp_path, recipe, npu, calib.numpy(), decode=False)
        assert graphs.violations["prefill"] == []
        total = 0.0
        for source, weight, scale, axis, restored in int8_weights(onnx.load(graphs.prefill), floats):
            if axis is not None:
                per_channel += weight_range == "mse"
            total += float(np.square(restored - weight).sum())
            if weight_range == "mse":
                expected = mse_range(weight, axis) / 127
                assert np.allclose(scale.reshape(-1), expected, rtol=1e-5), source
        errors[weight_range] = total
        if weight_range == "mse":
            assert graphs.reports["prefill"].clipped_weights > 0
    assert per_channel >= 7 * model.config.num_hidden_layers
    assert errors["mse"] < errors["minmax"]


def test_a8w8_keeps_the_named_groups_in_16_bits(tmp_path):
    model = tiny_llama()
    lm = prepare(model, CAPACITY, ())
    export_graphs(lm, tmp_path)
    groups = find_groups(onnx.load(tmp_path / "model.onnx"))
    assert len(groups["residual"]) >= 2 * model.config.num_hidden_layers
    assert len(groups["softmax"]) == 4 * model.config.num_hidden_layers  # scores, scaled, masked, probabilities
    assert len(groups["swiglu"]) >= 4 * model.config.num_hidden_layers
    recipe = QuantRecipe("a8w8", 8, sixteen_bit=("residual",))
    graphs = quantize_graphs(lm, tmp_path, recipe, get_profile("generic-a8w8"), _ids(model, 4).numpy(), decode=False)
    assert graphs.reports["prefill"].sixteen_bit_groups == {"residual": len(set(groups["residual"]))}
    quantized = onnx.load(graphs.prefill)
    zero_points = {t.name: t.data_type for t in quantized.graph.initializer}
    uint16_points = {n.input[2] for n in quantized.graph.node if n.op_type == "QuantizeLinear"
                     and len(n.input) > 2 and zero_points.get(n.input[2]) == TensorProto.UINT16}
    assert len(uint16_points) >= len(set(groups["residual"])) // 2, "the residual stream must be quantized to 16 bits"
    # quant knows no model: a recipe naming a group needs a finder for it.
    feeds = [{"input_ids": _ids(model, 1).numpy()}]
    with pytest.raises(ValueError, match="residual.*groups="):
        quantize(tmp_path / "model.onnx", tmp_path / "none.onnx", feeds, recipe, get_profile("generic-a8w8"))


@pytest.mark.parametrize("conv", [False, True])
def test_the_residual_group_reaches_the_linear_layers_that_write_into_the_stream(tmp_path, conv):
    # The output and down projections write the stream's addends (the MLP's massive activations among them). As
    # 1x1 Convs (the QNN layout) they reach the Add through a Squeeze and a Transpose; 8 bits there cost the
    # distilled 0.67x SmolLM2 student +19% perplexity under A8W8, against +2% in the MatMul layout.
    model = tiny_llama()
    export_graphs(prepare(model, CAPACITY, (), conv=conv), tmp_path, decode=False)
    graph = onnx.load(tmp_path / "model.onnx")
    residual = set(find_groups(graph)["residual"])
    initializers = {t.name for t in graph.graph.initializer}
    writers = [n for n in graph.graph.node if n.op_type == ("Conv" if conv else "MatMul") and n.input[1] in initializers
               and n.output[0] in residual]
    assert len(writers) == 2 * model.config.num_hidden_layers  # o and down of every block


@pytest.mark.parametrize(("make", "conv", "transforms"), [(tiny_llama, False, ("embed-rows",)),
                                                          (tiny_gemma3, True, ("rotate", "embed-rows"))])
def test_weight_groups_split_the_block_linears_and_store_as_int16(tmp_path, make, conv, transforms):
    model = make()
    lm = prepare(model, CAPACITY, transforms, conv=conv)
    export_graphs(lm, tmp_path, decode=False)
    graph = onnx.load(tmp_path / "model.onnx")
    groups = find_weight_groups(graph)
    layers = model.config.num_hidden_layers
    assert len(groups["mlp-weights"]) == 3 * layers  # gate, up, down
    assert len(groups["attention-weights"]) == 4 * layers  # q, k, v, o
    assert len(groups["embedding"]) == (1 if model.config.tie_word_embeddings else 2)
    assert all(".down." in w or ".gate." in w or ".up." in w for w in groups["mlp-weights"])
    assert not set(groups["mlp-weights"]) & set(groups["attention-weights"])
    # A rotated Gemma3 keeps each sub-layer output norm's weights as a hidden x hidden matrix after it.
    assert len(groups["norm-mixes"]) == (2 * layers if "rotate" in transforms else 0)
    assert not set(groups["norm-mixes"]) & {*groups["attention-weights"], *groups["head-mix"]}
    recipe = QuantRecipe("a16w8", 16, sixteen_bit_weights=("mlp-weights", "norm-mixes"))
    graphs = quantize_graphs(lm, tmp_path, recipe, get_profile("qnn-htp"), _ids(model, 2).numpy(), decode=False)
    quantized = onnx.load(graphs.prefill)
    types = {t.name: t.data_type for t in quantized.graph.initializer}
    stored = {n.input[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"
              and types.get(n.input[0]) == TensorProto.INT16}
    assert graphs.reports["prefill"].sixteen_bit_weights == sorted({*groups["mlp-weights"], *groups["norm-mixes"]})
    assert len(stored) == 3 * layers + len(groups["norm-mixes"])


def _graph(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers)),
                              opset_imports=[helper.make_opsetid("", 21)])
    return model


def test_inspect_reports_dynamic_dims_unsupported_ops_and_float_matmuls():
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, np.float32))
    model = _graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("NonZero", ["y"], ["z"]),
         helper.make_node("HardSwish", ["y"], ["h"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("z", TensorProto.INT64, [2, "n"]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 4])],
        [weight],
    )
    kinds = {(v.kind, v.where.split()[0]) for v in check(model, get_profile("qnn-htp"))}
    assert ("dynamic-dim", "x") in kinds
    assert ("shape-arithmetic", "NonZero") in kinds
    assert ("op", "HardSwish") in kinds
    assert ("float-island", "MatMul") in kinds


def test_inspect_passes_a_clean_qdq_matmul_and_flags_misaligned_channels():
    def qdq(channels: int) -> onnx.ModelProto:
        w = helper.make_tensor("w_q", TensorProto.INT8, [4, channels], np.ones(4 * channels, np.int8))
        scales = [helper.make_tensor(n, TensorProto.FLOAT, [], [0.1]) for n in ("s", "sw", "so")]
        zps = [helper.make_tensor("z", TensorProto.UINT8, [], [128]), helper.make_tensor("zw", TensorProto.INT8, [], [0]),
               helper.make_tensor("zo", TensorProto.UINT8, [], [128])]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
            helper.make_node("DequantizeLinear", ["w_q", "sw", "zw"], ["wd"]),
            helper.make_node("MatMul", ["xd", "wd"], ["y"]),
            helper.make_node("QuantizeLinear", ["y", "so", "zo"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "so", "zo"], ["out"]),
        ]
        return _graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                      [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, channels])], [w, *scales, *zps])

    assert check(qdq(64), get_profile("generic-a8w8")) == []
    assert [v.kind for v in check(qdq(64), get_profile("qnn-htp"))] == ["alignment"]  # 4 input rows, not 32
    assert check(qdq(48), get_profile("generic-a8w8")) == []
