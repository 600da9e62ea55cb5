"""Every registered decoder family (tiny real models from transformers configs) exported, quantized and checked:
the export's float forward against transformers' own, the graphs against torch, the A16W8 graphs against the
qnn-htp profile; and teachers a run cannot ship refused before any stage runs."""

import numpy as np
import onnx
import pytest
import torch
from factories import DECODER_FAMILIES, tiny_bert, tiny_qwen2, write_corpus, write_teacher

from compress.app.cli import main
from compress.deploy.decoder import allowed_transforms, check_exportable, export_family
from compress.deploy.export import StaticLM
from compress.deploy.outliers import TRANSFORMS, fold_norms, normalize_embedding, rotate, smooth
from compress.deploy.quantization import export_graphs, prepare, quantize_graphs
from compress.errors import UnsupportedArchitectureError
from quant import qnn, runtime
from quant.profiles import check, get_profile
from quant.quantize import PRESETS

CAPACITY = 24  # longer than tiny_gemma3's sliding window (8), so the window's masks are exercised
FLOAT_TOLERANCE = 1e-4  # max |logit difference| of the float graphs and the export's forward against transformers
A16W8_TOLERANCE = 0.1  # RMS logit error of the A16W8 graphs over the logits' spread (random tiny weights, int8)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (n, CAPACITY), generator=torch.Generator().manual_seed(seed))


def _decoded(lm: StaticLM, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of the tokens after ``prompt`` through the export's decode step, the cache seeded by a prefill and
    kept as the host keeps it (slot = position here: the sequence is no longer than the cache)."""
    _, keys, values = lm.prefill(ids[:, :prompt])
    key_shape, value_shape = lm.cache_shapes()
    cache = []
    for k, v in zip(keys, values, strict=True):
        cache += [torch.zeros(key_shape), torch.zeros(value_shape)]
        cache[-2][..., :prompt], cache[-1][:, :, :prompt] = k.transpose(-1, -2), v
    slots, out = torch.arange(CAPACITY), []
    for position in range(prompt, ids.shape[1]):
        mask = (slots < position).float()[None]
        windows = [(mask[0].bool() & (position - slots < w)).float()[None] for w in lm.windows[1:]]
        logits, new = lm.decode(ids[:, position: position + 1], torch.tensor([[position]]), mask, cache, windows)
        for i in range(0, len(cache), 2):
            cache[i][..., position], cache[i + 1][:, :, position] = new[i][:, :, 0], new[i + 1][:, :, 0]
        out.append(logits[:, 0])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("family", sorted(DECODER_FAMILIES))
def test_export_forward_and_its_rewrites_match_transformers(family):
    model = DECODER_FAMILIES[family]()
    ids = _ids(3, seed=1)
    allowed = allowed_transforms(export_family(model.config))
    rewrites = {"fold": fold_norms, "rotate": rotate, "smooth": lambda lm: smooth(lm, ids),
                "embed-rows": normalize_embedding}
    with torch.no_grad():
        expected = model(input_ids=ids[:1]).logits
        lm = StaticLM(model, CAPACITY).eval()
        assert (lm.prefill(ids[:1])[0] - expected).abs().max() <= FLOAT_TOLERANCE
        assert (_decoded(lm, ids[:1], 10) - expected[:, 10:]).abs().max() <= FLOAT_TOLERANCE
        for name, rewrite in rewrites.items():
            if name in TRANSFORMS and name not in allowed:
                continue
            rewritten = rewrite(StaticLM(model, CAPACITY).eval())
            assert (rewritten.prefill(ids[:1])[0] - expected).abs().max() <= FLOAT_TOLERANCE, name
    # Every family rotates; norms on the sub-layers' outputs (Gemma3's sandwich) keep their weights as mixes.
    assert check_exportable(model.config, TRANSFORMS) == [] and allowed == TRANSFORMS
    rotated = rotate(StaticLM(model, CAPACITY).eval())
    mixes = [m for b in rotated.unique_blocks for m in (b.attn_out_mix, b.mlp_out_mix) if m is not None]
    assert len(mixes) == (2 * model.config.num_hidden_layers if family == "gemma3" else 0)


@pytest.mark.parametrize("family", sorted(DECODER_FAMILIES))
def test_every_decoder_family_exports_and_quantizes_for_the_npu_profile(family, tmp_path):
    model = DECODER_FAMILIES[family]()
    calib, ids = _ids(6, seed=2), _ids(2, seed=3)
    profile = get_profile("qnn-htp")
    lm = prepare(model, CAPACITY, TRANSFORMS, calib, conv=profile.linear_as_conv)
    prefill, decode = export_graphs(lm, tmp_path)
    assert {p.stat().st_mode & 0o777 for p in (prefill, decode)} == {0o644}  # written by rename, readable as usual
    with torch.no_grad():
        expected = model(input_ids=ids).logits.numpy()
    got = runtime.prefill_logits(runtime.session(prefill), ids.numpy())
    assert np.abs(got - expected).max() <= FLOAT_TOLERANCE
    step = runtime.session(decode)
    cache = runtime.DecodeCache(step)
    cache.prefill(runtime.session(prefill), [int(t) for t in ids[0, :12]])
    logits = cache.step(int(ids[0, 12]))
    assert np.abs(np.asarray(logits).reshape(-1) - expected[0, 12]).max() <= FLOAT_TOLERANCE

    graphs = quantize_graphs(lm, tmp_path, PRESETS["a16w8"], profile, calib.numpy())
    assert graphs.violations == {"prefill": [], "decode": []}
    for path in (graphs.prefill, graphs.decode):
        assert check(onnx.load(path), profile) == []  # every operator the exporter wrote is in the profile's set
        if qnn.unavailable() is None:  # and Qualcomm's HTP compiler takes every one of them, whole
            result = qnn.compile_graph(path)
            assert result.whole, f"{family} {path.name}: {[str(u) for u in result.unsupported]} {result.error}"
    got = runtime.prefill_logits(runtime.session(graphs.prefill), ids.numpy())
    error = np.sqrt(((got - expected) ** 2).mean()) / expected.std()
    assert error <= A16W8_TOLERANCE, f"{family}: relative logit error {error:.4f}"


def test_a_family_without_an_export_path_is_refused_by_name():
    with pytest.raises(UnsupportedArchitectureError, match="bert.*no export path"):
        StaticLM(tiny_bert(), CAPACITY)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


SMALL = ["--calib-samples", "8", "--calib-seq-len", "16", "--eval-samples", "4", "--eval-seq-len", "16",
         "--align", "16", "--tolerance", "0.15", "--search-candidates", "3", "--batch-size", "4", "--quiet"]


@pytest.mark.parametrize(("student", "make", "named"), [("minitron", tiny_bert, "bert"), ("mobilellm", tiny_qwen2, "qwen2")])
def test_a_teacher_the_run_cannot_ship_is_refused_before_scoring(tmp_path, capsys, student, make, named):
    teacher, corpus, out = write_teacher(tmp_path, make()), write_corpus(tmp_path), tmp_path / "run"
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["--teacher", str(teacher), "--data", str(corpus), "--target-size", "0.7x", "--student", student,
                 "--out", str(out), *SMALL]) == 2
    assert named in _error_line(capsys)
    assert not (out / "scores.safetensors").exists()
