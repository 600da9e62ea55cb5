"""Student families beyond the pruned teacher: the MobileLLM-like block-shared student."""

import json

import numpy as np
import onnx
import pytest
import torch
from factories import check_pairs_eval, tiny_llama, write_corpus, write_teacher
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from compress.app.cli import main
from compress.deploy.groups import find_weight_groups
from compress.deploy.quantization import export_graphs, prepare, quantize_graphs
from compress.models.mobilellm import MobileLLMForCausalLM, share_blocks, unique_parameters, unshare
from quant import runtime
from quant.profiles import get_profile
from quant.quantize import PRESETS

CAPACITY = 16


def _twice_by_hand(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A plain Llama twice as deep whose layer j is a copy of ``model``'s layer j // 2."""
    values = model.config.to_dict()
    values["num_hidden_layers"] *= 2
    plain = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in values.items() if k != "architectures"}))
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            for j in (2 * int(index), 2 * int(index) + 1):
                state[f"model.layers.{j}.{rest}"] = tensor.clone()
        else:
            state[key] = tensor.clone()
    plain.load_state_dict(state)
    return plain.eval()


def _ids(n: int = 2, length: int = CAPACITY) -> torch.Tensor:
    return torch.randint(3, 100, (n, length), generator=torch.Generator().manual_seed(0))


def test_block_shared_model_applies_each_block_twice_and_counts_its_parameters_once():
    model = tiny_llama(layers=2)
    shared = share_blocks(model, 2)
    assert isinstance(shared, MobileLLMForCausalLM) and shared.config.num_hidden_layers == 4
    assert unique_parameters(shared) == unique_parameters(model) == shared.num_parameters()
    layers = shared.model.layers
    assert layers[1].mlp.up_proj.weight is layers[0].mlp.up_proj.weight
    assert layers[2].mlp.up_proj.weight is not layers[0].mlp.up_proj.weight
    assert layers[1].self_attn.layer_idx == 1  # its own cache slot
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(shared(ids).logits, _twice_by_hand(model)(ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="repeats"):
        share_blocks(model, 0)


def test_block_shared_checkpoint_reloads_shared_through_the_auto_classes(tmp_path):
    shared = share_blocks(tiny_llama(layers=2), 2)
    shared.save_pretrained(tmp_path / "mobile")
    with safe_open(str(tmp_path / "mobile" / "model.safetensors"), "pt") as f:
        stored = {k.split(".")[2] for k in f.keys() if k.startswith("model.layers.")}  # noqa: SIM118 - not a dict
    assert stored == {"0", "2"}, "each shared block is stored once"
    config = json.loads((tmp_path / "mobile" / "config.json").read_text())
    assert config["model_type"] == "pdq_mobilellm" and config["share_repeats"] == 2
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "mobile", output_loading_info=True)
    assert isinstance(reloaded, MobileLLMForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.model.layers[3].self_attn.q_proj.weight is reloaded.model.layers[2].self_attn.q_proj.weight
    assert unique_parameters(reloaded) == unique_parameters(shared)
    ids = _ids(1, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, shared(ids).logits)
    # Generation with the KV cache: every layer keeps its own cache slot, shared weights or not.
    plain = unshare(reloaded)
    assert type(plain) is LlamaForCausalLM and plain.num_parameters() > reloaded.num_parameters()
    ours = reloaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, plain.generate(ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("layout", ["Conv", "MatMul"])
def test_shared_blocks_export_once_and_the_graphs_match_torch(tmp_path, layout):
    # Hidden 128: weights past the exporter's constant-folding limit (8,192 entries), as real ones are, so a
    # runtime Transpose of a weight read at two depths would show.
    shared = share_blocks(tiny_llama(hidden=128, mlp=256, layers=2), 2)
    lm = prepare(shared, CAPACITY, ("rotate", "embed-rows"), conv=layout == "Conv")
    assert len(lm.blocks) == 4 and len(lm.unique_blocks) == 2
    prefill, decode = export_graphs(lm, tmp_path)
    graph = onnx.load(prefill)
    initializers = {t.name for t in graph.graph.initializer}
    weights = {n.input[1] for n in graph.graph.node if n.op_type == layout and n.input[1] in initializers}
    weights -= set(find_weight_groups(graph)["head-mix"])  # the rotation's matrix before the head, not a block's
    assert len(weights) == 7 * 2, "a shared block's weights appear once in the graph, read directly"
    if layout == "MatMul":
        profile = get_profile("generic-a8w8")
        graphs = quantize_graphs(lm, tmp_path, PRESETS["a8w8"], profile, _ids().numpy(), decode_calib_tokens=8)
        assert graphs.violations == {"prefill": [], "decode": []}
    ids = _ids()
    with torch.no_grad():
        expected = shared(ids).logits.numpy()
    got = runtime.prefill_logits(runtime.session(prefill), ids.numpy())
    assert np.abs(got - expected).max() <= 1e-4  # rotated once per unique block, not once per use
    tokens, logits, _ = runtime.decode(runtime.session(decode), [int(t) for t in ids[0, :6]], 3,
                                       prefill_sess=runtime.session(prefill))
    full = torch.tensor([[*ids[0, :6].tolist(), *tokens]])
    with torch.no_grad():
        reference = shared(full).logits[0].numpy()
    assert np.abs(logits[0] - reference[6]).max() <= 1e-4


def test_mobilellm_student_runs_from_the_cli_deep_and_thin(tmp_path, capsys):
    teacher = write_teacher(tmp_path, tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=4))
    corpus = write_corpus(tmp_path)
    out = tmp_path / "mobile"
    args = ["--teacher", teacher, "--data", corpus, "--target-size", "0.6x", "--out", out, "--student", "mobilellm",
            "--axes", "heads,hidden,mlp,layers", "--calib-samples", "8", "--calib-seq-len", "16", "--eval-samples", "4",
            "--eval-seq-len", "16", "--align", "16", "--tolerance", "0.15", "--search-candidates", "2",
            "--batch-size", "4", "--quiet", "--distill-tokens", "256", "--distill-seq-len", "16",
            "--distill-batch-size", "4", "--seq-len", "16", "--quant", "a8w8", "--npu-profile", "generic-a8w8",
            "--quant-calib-samples", "2", "--stop-after", "quantize"]
    assert main([str(a) for a in args]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["repeats"] == 2 and plan["reason"].startswith("deep and thin")
    depth = plan["shape"]["layers"]
    assert depth == max(c["shape"]["layers"] for c in plan["candidates"])
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert isinstance(student, MobileLLMForCausalLM) and student.config.num_hidden_layers == 2 * depth
    assert unique_parameters(student) == plan["params"]
    quantized = json.loads((out / "quantize.metrics.json").read_text())
    assert quantized["violations"] == []
    graph = onnx.load(out / "onnx" / "model.onnx")
    assert sum(n.op_type == "RMSNormalization" for n in graph.graph.node) == 2 * 2 * depth + 1
    check_pairs_eval(out, tmp_path, max_input_tokens=8)
    # FSDP cannot shard a block-shared student: refused in one line, before any training.
    capsys.readouterr()
    assert main([str(a) for a in [*args, "--distill-parallel", "fsdp", "--distill-tokens", "512"]]) == 2
    assert "--distill-parallel ddp" in capsys.readouterr().err


def _tiny_mu():
    from compress.models.mu import MuConfig, MuForConditionalGeneration

    torch.manual_seed(0)
    config = MuConfig(vocab_size=128, hidden_size=64, intermediate_size=128, encoder_layers=3, decoder_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return MuForConditionalGeneration(config).eval()


def test_mu_like_model_round_trips_through_the_auto_classes(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from compress.models.mu import MuForConditionalGeneration

    model = _tiny_mu()
    assert model.lm_head.weight is model.model.shared.weight, "one table for encoder, decoder and head"
    layer = model.model.decoder_layers[0]
    assert {n for n, _ in layer.named_children()} >= {"self_attn", "cross_attn", "attn_pre_norm", "attn_post_norm",
                                                      "cross_pre_norm", "cross_post_norm", "mlp_pre_norm", "mlp_post_norm"}
    ids, labels = _ids(2, 10) % 128, _ids(2, 7) % 128
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 7, 128) and torch.isfinite(out.loss)
    model.save_pretrained(tmp_path / "mu")
    assert json.loads((tmp_path / "mu" / "config.json").read_text())["model_type"] == "pdq_mu"
    reloaded, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "mu", output_loading_info=True)
    assert isinstance(reloaded, MuForConditionalGeneration) and not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.lm_head.weight is reloaded.model.shared.weight
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, labels=labels).logits, out.logits)
    # Padding the input changes nothing for the real tokens' continuation.
    padded = torch.cat((ids, torch.zeros(2, 3, dtype=torch.long)), dim=1)
    mask = torch.cat((torch.ones(2, 10), torch.zeros(2, 3)), dim=1)
    with torch.no_grad():
        again = model(input_ids=padded, attention_mask=mask, labels=labels).logits
    assert torch.allclose(again, out.logits, atol=1e-5)


def test_mu_like_graphs_match_torch_and_pass_inspection(tmp_path):
    from compress.deploy.mu_export import generate, write_mu_graphs
    from quant import qnn
    from quant.profiles import check, get_profile

    model = _tiny_mu()
    encoder_path, decoder_path = write_mu_graphs(model, tmp_path, length=12, capacity=16)
    for path in (encoder_path, decoder_path):
        assert check(onnx.load(path), get_profile("qnn-htp"), quantized=False) == []
    prompt = [int(t) % 128 for t in _ids(1, 9)[0]]
    encoder, decoder = runtime.session(encoder_path), runtime.session(decoder_path)
    tokens, logits = generate(encoder, decoder, prompt, 6, model.config.decoder_start_token_id)
    expected = model.greedy(torch.tensor([prompt]), 6)[0].tolist()
    assert tokens == expected
    with torch.no_grad():
        full = model(input_ids=torch.tensor([prompt]),
                     decoder_input_ids=torch.tensor([[model.config.decoder_start_token_id, *tokens[:-1]]])).logits[0]
    assert np.abs(np.stack(logits) - full.numpy()).max() <= 1e-4
    with pytest.raises(ValueError, match="at most 12"):
        generate(encoder, decoder, list(range(13)), 1, 1)

    # Both graphs quantize whole through the same recipes and profiles, calibrated on real decoder feeds.
    from compress.deploy.groups import quantize_graph
    from quant.quantize import PRESETS

    encoder_feeds, decoder_feeds = [], []
    for shift in range(3):
        text = [(t + 7 * shift) % 128 for t in prompt]
        generate(encoder, decoder, text, 5, model.config.decoder_start_token_id, record=decoder_feeds)
        encoder_feeds.append({"input_ids": np.array([text + [0] * 3]), "attention_mask": np.array([[1.0] * 9 + [0.0] * 3],
                                                                                                   dtype=np.float32)})
    profile = get_profile("qnn-htp")
    quantize_graph(encoder_path, tmp_path / "encoder.a16w8.onnx", encoder_feeds, PRESETS["a16w8"], profile)
    quantize_graph(decoder_path, tmp_path / "decoder.a16w8.onnx", decoder_feeds, PRESETS["a16w8"], profile)
    for name in ("encoder.a16w8.onnx", "decoder.a16w8.onnx"):
        assert check(onnx.load(tmp_path / name), profile) == [], name
        if qnn.unavailable() is None:  # Qualcomm's HTP compiler takes them whole, LayerNorms included
            result = qnn.compile_graph(tmp_path / name)
            assert result.whole and result.qnn_ops.get("LayerNorm", 0) > 0, [str(u) for u in result.unsupported]
    quantized, _ = generate(runtime.session(tmp_path / "encoder.a16w8.onnx"), runtime.session(tmp_path / "decoder.a16w8.onnx"),
                            prompt, 6, model.config.decoder_start_token_id)
    assert quantized == tokens


def _continuation_kl(student, teacher, ids: torch.Tensor, cut: int) -> float:
    """Mean KL(teacher ‖ student) over the continuation tokens ids[:, cut:]."""
    start = torch.full_like(ids[:, :1], student.config.decoder_start_token_id)
    with torch.no_grad():
        s = student(input_ids=ids[:, :cut], decoder_input_ids=torch.cat((start, ids[:, cut:-1]), dim=1)).logits
        t = teacher(input_ids=ids).logits[:, cut - 1 : -1]
    return float(torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                            reduction="batchmean")) / s.shape[1]


def test_mu_like_student_distills_from_a_causal_teacher_across_architectures(tmp_path):
    from compress.models.mu import MuConfig, MuForConditionalGeneration
    from distill import DistillConfig, EncoderDecoderStudent, distill
    from distill.objective import split_point

    teacher = tiny_llama()
    torch.manual_seed(0)
    student = MuForConditionalGeneration(MuConfig(
        vocab_size=teacher.config.vocab_size, hidden_size=64, intermediate_size=128, encoder_layers=2, decoder_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, bos_token_id=1))
    train = torch.randint(3, teacher.config.vocab_size, (32, 24), generator=torch.Generator().manual_seed(1))
    held_out = torch.randint(3, teacher.config.vocab_size, (8, 24), generator=torch.Generator().manual_seed(2))
    cuts = {split_point(train[i : i + 4]) for i in range(0, 32, 4)}
    assert len(cuts) > 1 and all(6 <= c < 18 for c in cuts), cuts  # varies between a quarter and three quarters
    before = _continuation_kl(student, teacher, held_out, 12)
    caches = []  # the teacher's forward builds no KV cache (one per layer made compiled layers recompile per layer)
    teacher.model.layers[0].register_forward_pre_hook(lambda m, a, kw: caches.append(kw.get("cache")), with_kwargs=True)
    config = DistillConfig(steps=40, batch_size=4, lr=3e-3, warmup_steps=2, bf16=False, eval_every=0,
                           checkpoint_every=0)
    result = distill(student, teacher, train, config, progress=False, student_io=EncoderDecoderStudent())
    after = _continuation_kl(student.eval(), teacher, held_out, 12)
    assert result.steps == 40 and after < 0.7 * before, (before, after)
    assert len(caches) >= 40 and all(c is None for c in caches[:40])  # the 40 steps, before the check after


def test_mu_like_student_initialized_from_the_teacher_copies_its_blocks_and_fits_its_outputs():
    from compress.families.mu_init import mu_from_teacher
    from compress.models.mu import MuConfig, MuForConditionalGeneration
    from compress.pruning.archspec import resolve
    from compress.pruning.scoring import score_importance

    teacher = tiny_llama(layers=4)
    spec = resolve(teacher)
    calib = torch.randint(3, teacher.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(3))
    scores = score_importance(teacher, spec, "activation", calib)
    theta = teacher.config.rope_parameters["rope_theta"]
    full = dict(vocab_size=teacher.config.vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rope_theta=theta, bos_token_id=1)
    # Every teacher width kept: the copies must be the teacher's own blocks, encoder first, decoder last.
    mu = mu_from_teacher(teacher, spec, scores, MuConfig(encoder_layers=2, decoder_layers=2, **full), calib)
    layers = teacher.model.layers
    for dst, src in zip([*mu.model.encoder_layers, *mu.model.decoder_layers], layers, strict=True):
        assert torch.equal(dst.self_attn.q_proj.weight, src.self_attn.q_proj.weight)
        assert torch.equal(dst.mlp.down_proj.weight, src.mlp.down_proj.weight)
        assert torch.equal(dst.attn_pre_norm.weight, src.input_layernorm.weight)
    assert torch.equal(mu.model.decoder_layers[1].cross_attn.v_proj.weight, layers[3].self_attn.v_proj.weight)
    assert torch.equal(mu.model.shared.weight, teacher.model.embed_tokens.weight)
    assert mu.lm_head.weight is mu.model.shared.weight
    # The output norms reproduce the teacher's sub-layer outputs better than an identity LayerNorm does.
    outputs = []
    hook = layers[1].mlp.down_proj.register_forward_hook(lambda _m, _i, out: outputs.append(out[:, 1:].reshape(-1, 64)))
    with torch.no_grad():
        teacher(input_ids=calib)
    hook.remove()
    target = outputs[0]
    fitted = mu.model.encoder_layers[1].mlp_post_norm
    identity = torch.nn.LayerNorm(64)
    with torch.no_grad():
        assert (fitted(target) - target).pow(2).mean() < 0.5 * (identity(target) - target).pow(2).mean()
    # Pruned widths: a narrower, shallower Mu still takes the teacher's most important units, also when its
    # attention width (4 heads x 16) differs from its hidden size (48), which Llama's own config refuses.
    small = MuConfig(encoder_layers=2, decoder_layers=1, **{**full, "hidden_size": 48, "intermediate_size": 64})
    mu = mu_from_teacher(teacher, spec, scores, small, calib)
    assert isinstance(mu, MuForConditionalGeneration) and mu.model.shared.weight.shape == (teacher.config.vocab_size, 48)
    assert mu.model.encoder_layers[0].self_attn.q_proj.weight.shape == (64, 48)
    ids = calib[:2]
    with torch.no_grad():
        assert torch.isfinite(mu(input_ids=ids[:, :8], decoder_input_ids=ids[:, 8:]).logits).all()
    embedding_only = mu_from_teacher(teacher, spec, scores, MuConfig(encoder_layers=2, decoder_layers=2, **full), calib,
                                     blocks=False)
    assert torch.equal(embedding_only.model.shared.weight, teacher.model.embed_tokens.weight)
    assert not torch.equal(embedding_only.model.encoder_layers[0].self_attn.q_proj.weight, layers[0].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="rope_theta"):
        mu_from_teacher(teacher, spec, scores, MuConfig(encoder_layers=2, decoder_layers=1, **{**full, "rope_theta": 1.0}), calib)
    with pytest.raises(ValueError, match="layers"):
        mu_from_teacher(teacher, spec, scores, MuConfig(encoder_layers=4, decoder_layers=1, **full), calib)


def test_mu_student_runs_from_the_cli_to_a_report_scored_on_continuations(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from compress.models.mu import MuForConditionalGeneration

    # A Mu layer costs more than a teacher layer (cross-attention) and needs 3 + 3 of them: a deep tiny teacher.
    teacher = write_teacher(tmp_path, tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=16))
    corpus = write_corpus(tmp_path)
    out = tmp_path / "mu"
    args = ["--teacher", teacher, "--data", corpus, "--target-size", "0.8x", "--out", out, "--student", "mu",
            "--calib-samples", "8", "--calib-seq-len", "16", "--eval-samples", "4", "--eval-seq-len", "16",
            "--align", "16", "--batch-size", "4", "--quiet", "--distill-tokens", "256", "--distill-seq-len", "16",
            "--distill-batch-size", "4", "--distill-eval-every", "2", "--seq-len", "16", "--quant", "a16w8",
            "--npu-profile", "qnn-htp", "--quant-calib-samples", "2", "--quant-decode-calib-tokens", "16"]
    assert main([str(a) for a in args]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["family"] == "mu" and plan["shape"]["decoder_layers"] >= 3 and plan["shape"]["encoder_layers"] >= 3
    student = AutoModelForSeq2SeqLM.from_pretrained(out / "student")
    assert isinstance(student, MuForConditionalGeneration)
    assert sum(p.numel() for p in student.parameters()) == plan["params"]
    pruned = json.loads((out / "prune.metrics.json").read_text())
    distilled = json.loads((out / "distill.metrics.json").read_text())
    assert pruned["metric"] == "continuation" and pruned["validation_tokens"] == 4 * 8  # second halves of 4 x 16
    assert distilled["student_perplexity_before"] == pytest.approx(pruned["pruned_perplexity"], rel=1e-5)
    exported = json.loads((out / "export.metrics.json").read_text())
    assert exported["max_abs_diff_vs_torch"] <= 1e-3
    from quant import qnn

    graphs = {"encoder.onnx", "decoder.onnx", "encoder.a16w8.onnx", "decoder.a16w8.onnx"}
    if qnn.unavailable() is None:  # Qualcomm's HTP compiler took both quantized graphs whole
        graphs |= {"encoder.a16w8.qnn.onnx", "decoder.a16w8.qnn.onnx"}
    assert {p.name for p in (out / "onnx").glob("*.onnx")} == graphs
    # The float graphs score the continuations as the distilled torch model does (same tokens, same cut).
    assert exported["fp32"]["perplexity"] == pytest.approx(distilled["student_perplexity"], rel=1e-3)
    quantized = json.loads((out / "quantize.metrics.json").read_text())
    assert quantized["violations"] == []
    assert 0 <= quantized["a16w8"]["agreement_with_float"] <= 1
    if qnn.unavailable() is None:
        assert set(quantized["htp"]["graphs"]) == {"encoder", "decoder"}
        assert all(g["whole"] and not g["unsupported"] for g in quantized["htp"]["graphs"].values())
    else:
        assert quantized["htp"] == {"skipped": qnn.unavailable()}
    # The graphs score the held-out general set too, on continuations of its sequences like the torch models
    # (all 4 of them here: fewer than the graphs' 16), so the float graph matches the distilled model there.
    general = distilled["evals"]["general-english"]
    assert exported["fp32"]["evals"]["general-english"]["perplexity"] == pytest.approx(general["perplexity"], rel=1e-3)
    assert 0 <= quantized["a16w8"]["evals"]["general-english"]["agreement"] <= 1
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["teacher", "pruned", "distilled", "fp32 graph", "a16w8 graph (qnn-htp)"]
    assert report["rows"][3]["path"] == "onnx/encoder.onnx" and report["rows"][4]["decode_path"] == "onnx/decoder.a16w8.onnx"
    assert "continuations" in (out / "report.md").read_text()
    check_pairs_eval(out, tmp_path, max_input_tokens=6)


def test_a_new_student_family_is_one_class_and_one_registry_line(tmp_path):
    from compress import run
    from compress.families import FAMILIES, family_names, register
    from compress.families.minitron import Minitron
    from compress.pruning.planner import keep_all_plan

    class Unpruned(Minitron):
        """A fake family: the student is the whole teacher (Minitron's prune, export and quantize stages)."""

        name = "unpruned"
        description = "the teacher, every unit kept"
        prunes_teacher = False

        def plan(self, state):
            chosen = keep_all_plan(state.spec, state.teacher.config)
            chosen.save(state.dir / "plan.json")
            return {"shape": chosen.shape.to_dict(), "params": chosen.params, "teacher_params": chosen.teacher_params,
                    "target_params": chosen.target_params, "candidates": 0, "reason": chosen.reason}

    teacher = tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2)
    register(Unpruned())
    try:
        assert "unpruned" in family_names()
        result = run(teacher=str(write_teacher(tmp_path, teacher)), data=str(write_corpus(tmp_path)), target_size="0.5x",
                     out=str(tmp_path / "run"), student="unpruned", stop_after="prune", calib_samples=4,
                     calib_seq_len=16, eval_samples=2, eval_seq_len=16, batch_size=2, progress=False)
    finally:
        FAMILIES.pop("unpruned")
    pruned = result.load_pruned()
    assert pruned.config.intermediate_size == 128 and pruned.config.num_hidden_layers == 2
    assert result.metrics()["prune"]["params"] == result.metrics()["prune"]["teacher_params"]
    assert "unpruned" not in family_names()
