"""Qualcomm's HTP compiler (onnxruntime-qnn) on the graphs the project makes: every decoder family's A16W8, A8W8
and W4A16 qnn-htp graphs and the Mu-like encoder and decoder compile whole, the profile's operator set is confirmed
against what the compiler takes, a refused node is reported, and the compiled model runs on the emulator."""

import numpy as np
import onnx
import pytest
from factories import DECODER_FAMILIES, tiny_llama, token_ids
from onnx import TensorProto, helper, numpy_helper

from compress.app.cli import main
from compress.deploy.quantization import export_graphs, prepare, quantize_graphs
from quant import qnn, runtime
from quant.profiles import get_profile
from quant.quantize import PRESETS

pytestmark = pytest.mark.skipif(qnn.unavailable() is not None, reason=f"no HTP compiler here: {qnn.unavailable()}")
CAPACITY = 24


@pytest.fixture(scope="module")
def family_graphs(tmp_path_factory):
    """{(family, recipe): (prefill, decode)}: qnn-htp graphs in every Q/DQ recipe of the families whose rotated graphs
    hold int16 mixes: Llama's tied head and Gemma3's sandwich norms (tests/test_export_families.py compiles every
    family's A16W8 graphs)."""
    profile = get_profile("qnn-htp")
    graphs = {}
    for family in ("gemma3", "llama"):
        make = DECODER_FAMILIES[family]
        model = make()
        calib = token_ids(model, 4, CAPACITY, 2)
        for recipe in ("a16w8", "a8w8", "w4a16"):
            lm = prepare(model, CAPACITY, ("rotate", "embed-rows"), calib, conv=PRESETS[recipe].linears_as_conv(profile))
            folder = tmp_path_factory.mktemp(f"{family}-{recipe}")
            export_graphs(lm, folder)
            made = quantize_graphs(lm, folder, PRESETS[recipe], profile, calib.numpy(), decode_calib_tokens=32)
            graphs[family, recipe] = (made.prefill, made.decode)
    return graphs


def test_graphs_with_int16_mixes_compile_whole_in_every_recipe(family_graphs):
    # A8W8 used to lose the tied head's int16 mix to the CPU (8-bit activations x int16 weights); not any more.
    for (family, recipe), paths in family_graphs.items():
        for path in paths:
            result = qnn.compile_graph(path)
            assert result.whole, f"{family} {recipe} {path.name}: {[str(u) for u in result.unsupported]} {result.error}"
            assert result.supported_nodes == result.nodes and result.qnn_graphs == 1
            assert result.qnn_ops.get("RmsNorm", 0) > 0 and result.qnn_ops.get("Softmax", 0) > 0


def test_w4a16_stores_block_weights_as_lpbq_int4_and_the_table_in_int8_and_int4_rows_and_the_htp_runs_them(family_graphs):
    for family in ("gemma3", "llama"):
        for path in family_graphs[family, "w4a16"]:
            model = onnx.load(path)
            initializers = {t.name: t for t in model.graph.initializer}
            producers = {o: n for n in model.graph.node for o in n.output}
            weights = [producers[n.input[1]] for n in model.graph.node if n.op_type == "MatMul"
                       and n.input[1] in producers and producers[n.input[1]].input[0] in initializers]
            blocked = [dq for dq in weights if any(a.name == "block_size" for a in dq.attribute)]
            layers = sum(1 for n in model.graph.node if n.op_type == "Softmax")
            assert len(blocked) == 7 * layers, f"{family} {path.name}: every block linear in LPBQ blocks"
            for dq in blocked:
                assert initializers[dq.input[0]].data_type == TensorProto.INT4
                steps = producers[dq.input[1]]  # block steps: uint8 integers times a float per output channel
                assert steps.op_type == "DequantizeLinear" and initializers[steps.input[0]].data_type == TensorProto.UINT8
            tables = [producers[n.input[1]].input[0] for n in model.graph.node if n.op_type == "Gemm"]
            looked_up = {producers[n.input[0]].input[0] for n in model.graph.node if n.op_type == "Gather"
                         and n.input[0] in producers and producers[n.input[0]].op_type == "DequantizeLinear"}
            # Tied, each part stored once: the frequent tokens' rows int8, the rest int4.
            assert set(tables) <= looked_up and len(tables) == 2
            assert [initializers[t].data_type for t in tables] == [TensorProto.INT8, TensorProto.INT4]
    # The HTP runs the blocks' arithmetic as ONNX Runtime's CPU does.
    prefill, _ = family_graphs["llama", "w4a16"]
    ids = token_ids(tiny_llama(), 2, CAPACITY, 5).numpy()
    emulated = qnn.emulated_quality(prefill, ids)
    assert emulated.perplexity == pytest.approx(emulated.cpu_perplexity, rel=0.02)
    assert emulated.agreement_with_cpu >= 0.9


def _refused_graph(path) -> None:
    """A QDQ Add the compiler takes, then uint8 activations x an int16 weight in one MatMul, which QNN's HTP has
    no kernel for (the pattern A8W8 graphs had around the tied head's int16 mix)."""
    def q(name, scale, zero, kind):
        return [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
                numpy_helper.from_array(np.array(zero, kind), f"{name}_z")]

    def qdq(tensor, name):
        return [helper.make_node("QuantizeLinear", [tensor, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"quantize_{name}"),
                helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_d"],
                                 name=f"dequantize_{name}")]

    weight = (np.arange(32 * 32, dtype=np.int32).reshape(32, 32) % 61 - 30).astype(np.int16)
    nodes = [*qdq("x", "x"), helper.make_node("Add", ["x_d", "x_d"], ["sum"], name="add"), *qdq("sum", "sum"),
             helper.make_node("DequantizeLinear", ["w", "w_s", "w_z"], ["w_d"], name="dequantize_w"),
             helper.make_node("MatMul", ["sum_d", "w_d"], ["y"], name="matmul"), *qdq("y", "y")]
    inits = [*q("x", 0.01, 128, np.uint8), *q("sum", 0.02, 128, np.uint8), *q("y", 0.05, 128, np.uint8),
             numpy_helper.from_array(weight, "w"), *q("w", 0.001, 0, np.int16)]
    graph = helper.make_graph(nodes, "refused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 32])],
                              [helper.make_tensor_value_info("y_d", TensorProto.FLOAT, [1, 32, 32])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


def test_inspect_compile_names_the_nodes_the_compiler_refuses(tmp_path, capsys):
    _refused_graph(tmp_path / "refused.onnx")
    assert main(["inspect", str(tmp_path / "refused.onnx"), "--compile", "qnn-htp", "--trace", str(tmp_path / "t.json")]) == 1
    out = capsys.readouterr().out
    assert "passes the qnn-htp profile" in out  # the static check cannot see it; the compiler does
    assert "refused: MatMul matmul:" in out and "refuses" in out
    assert (tmp_path / "t.json").exists()
    assert main(["inspect", str(tmp_path / "refused.onnx"), "--compile", "qnn-htp", "--soc-model", "X"]) == 2
    assert "--soc-model 'X'" in capsys.readouterr().err


def test_a_whole_graph_is_written_as_a_compiled_model_that_runs_like_the_qdq_graph(family_graphs, tmp_path):
    prefill, _ = family_graphs["llama", "a16w8"]
    result = qnn.compile_graph(prefill, context_model=tmp_path / "model.qnn.onnx", trace=tmp_path / "trace.json")
    assert result.whole and result.context_model == str(tmp_path / "model.qnn.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.qnn.onnx", "model.qnn_qnn.bin", "trace.json"]
    assert [n.op_type for n in onnx.load(tmp_path / "model.qnn.onnx").graph.node] == ["EPContext"]
    # The emulator runs the compiled arithmetic; on the same sequences it lands next to ONNX Runtime's CPU.
    ids = token_ids(tiny_llama(), 2, CAPACITY, 5).numpy()
    emulated = qnn.emulated_quality(prefill, ids)
    cpu, _ = runtime.quality(runtime.session(prefill), ids)
    assert emulated.cpu_perplexity == pytest.approx(cpu.perplexity, rel=1e-4)
    assert emulated.perplexity == pytest.approx(cpu.perplexity, rel=0.02)
    assert emulated.agreement_with_cpu >= 0.9 and emulated.tokens == 2 * (CAPACITY - 1)
