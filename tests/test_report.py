from compress.app.report import _verdict


def _rows(decode_perplexity: float) -> list[dict]:
    graph = {"kind": "onnx", "path": "onnx/model.a16w8.onnx", "decode_path": "onnx/decode.a16w8.onnx", "mb": 50.0,
             "perplexity": 20.1, "violations": 0, "decode_validation_tokens": 512}
    return [{**graph, "name": "fp32 graph", "path": "onnx/model.onnx", "mb": 200.0, "perplexity": 20.0,
             "decode_perplexity": 30.0},
            {**graph, "name": "a16w8 graph (qnn-htp)", "decode_perplexity": decode_perplexity}]


def test_the_verdict_judges_the_decode_graph_too():
    metrics = {"quantize": {"quant": "a16w8", "npu_profile": "qnn-htp", "htp": {}}}
    within = _verdict(_rows(30.1), metrics)
    assert within.startswith("Ship `onnx/model.a16w8.onnx`") and "decode graph +0.3%" in within
    assert "above the bar" not in within
    above = _verdict(_rows(30.6), metrics)  # +2% on the decode graph while the prefill graph is +0.5%
    assert "decode graph +2.0%" in above and "above the bar (+2.0% on 512 tokens)" in above


def test_an_a8w8_graph_above_three_percent_is_not_called_shippable():
    rows = _rows(30.0)
    rows[1] = {**rows[1], "name": "a8w8 graph (qnn-htp)", "path": "onnx/model.a8w8.onnx", "perplexity": 21.0}
    verdict = _verdict(rows, {"quantize": {"quant": "a8w8", "npu_profile": "qnn-htp", "htp": {}}})
    assert not verdict.startswith("Ship") and "costs +5.0% perplexity" in verdict and "above the 3% bar for a8w8" in verdict
