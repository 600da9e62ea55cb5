"""(input, output) pairs, LoRA adapters and ``compress finetune``."""

import json

import pytest
import torch
from factories import tiny_llama, tiny_tokenizer, write_teacher
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compress.app.cli import main
from compress.app.finetune import adapter_layers, add_adapters, merge_adapters
from compress.evaluation.quality import CAUSAL, ENCODER_DECODER, pair_quality
from distill import CausalStudent, DistillConfig, EncoderDecoderStudent, Pairs, distill
from distill.objective import KnowledgeDistillationLoss


def _tiny_mu():
    from compress.models.mu import MuConfig, MuForConditionalGeneration

    torch.manual_seed(0)
    config = MuConfig(vocab_size=256, hidden_size=64, intermediate_size=128, encoder_layers=3, decoder_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return MuForConditionalGeneration(config).eval()


def _pairs(seed: int = 0, count: int = 5) -> Pairs:
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(3, 256, (int(n),), generator=generator).tolist() for n in torch.randint(1, 9, (count,), generator=generator)]
    outputs = [torch.randint(3, 256, (int(n),), generator=generator).tolist() for n in torch.randint(1, 7, (count,), generator=generator)]
    return Pairs.from_lists(inputs, outputs, pad_id=0)


def test_pairs_pack_inputs_then_outputs_and_refuse_empty_sides():
    pairs = Pairs.from_lists([[5, 6, 7], [8]], [[9], [10, 11, 12]], pad_id=0)
    assert pairs.ids.tolist() == [[5, 6, 7, 9], [8, 10, 11, 12]]
    inputs, mask = pairs.inputs()
    assert inputs.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    outputs, out_mask = pairs.outputs()
    assert outputs.tolist() == [[9, 0, 0], [10, 11, 12]] and out_mask.tolist() == [[True, False, False], [True, True, True]]
    # Causal position j predicts token j + 1: row 0 predicts its output (index 3) from position 2.
    assert pairs.predicting_outputs().tolist() == [[False, False, True], [True, True, True]]
    assert pairs[torch.tensor([1])].ids.tolist() == [[8, 10, 11, 12]] and pairs.output_tokens == 4
    with pytest.raises(ValueError, match="at least one input and one output"):
        Pairs.from_lists([[]], [[1]])


@pytest.mark.parametrize("family", ["causal", "mu"])
def test_pair_loss_is_cross_entropy_on_the_output_tokens_only(family):
    model = tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2) if family == "causal" else _tiny_mu()
    pairs = _pairs()
    student_io = CausalStudent() if family == "causal" else EncoderDecoderStudent()
    loss_module = KnowledgeDistillationLoss(model, None, DistillConfig(kl_weight=0.0, ce_weight=1.0), None, student_io)
    with torch.no_grad():
        loss = float(loss_module(pairs))
        # By hand, one pair at a time without padding.
        total, count = 0.0, 0
        for row in range(len(pairs)):
            ids = pairs.ids[row, : int(pairs.lengths[row])][None]
            cut = int(pairs.cuts[row])
            if family == "causal":
                logits = model(input_ids=ids).logits[0, cut - 1 : -1]
            else:
                start = torch.full((1, 1), model.config.decoder_start_token_id)
                logits = model(input_ids=ids[:, :cut], decoder_input_ids=torch.cat((start, ids[:, cut:-1]), 1)).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, cut:], reduction="sum"))
            count += ids.shape[1] - cut
    assert loss == pytest.approx(total / count, rel=1e-4)
    reader = CAUSAL if family == "causal" else ENCODER_DECODER
    assert pair_quality(model, pairs, batch_size=2, reader=reader).nll == pytest.approx(total / count, rel=1e-4)
    # Changing a padding position changes nothing: it is neither read nor scored.
    padded = Pairs(pairs.ids.clone(), pairs.cuts, pairs.lengths, pairs.pad_id)
    shortest = int(pairs.lengths.argmin())
    padded.ids[shortest, -1] = 77
    with torch.no_grad():
        assert float(loss_module(padded)) == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("family", ["causal", "mu"])
def test_a_batch_of_short_pairs_is_cut_to_its_own_width_with_the_same_loss(family):
    short = [([5 + i, 6], [7, 8 + i]) for i in range(3)]  # 4 tokens each
    pairs = Pairs.from_lists([a for a, _ in short] + [list(range(3, 30))], [b for _, b in short] + [[9, 10, 11]])
    assert pairs.shape[1] == 30
    rows = torch.tensor([0, 1, 2])
    batch = pairs[rows]
    assert batch.shape == (3, 8)  # 4 tokens, rounded up to a multiple of 8
    assert pairs[torch.tensor([0, 3])].shape == (2, 30)  # never wider than the set
    full = Pairs(pairs.ids[rows], pairs.cuts[rows], pairs.lengths[rows], pairs.pad_id)
    model = tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2) if family == "causal" else _tiny_mu()
    student_io = CausalStudent() if family == "causal" else EncoderDecoderStudent()
    loss_module = KnowledgeDistillationLoss(model, None, DistillConfig(kl_weight=0.0, ce_weight=1.0), None, student_io)
    with torch.no_grad():
        assert float(loss_module(batch)) == pytest.approx(float(loss_module(full)), rel=1e-5)


def test_pair_kl_is_zero_when_the_student_is_the_teacher():
    teacher = tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2, initializer_range=0.2)
    loss_module = KnowledgeDistillationLoss(teacher, teacher, DistillConfig(kl_weight=1.0), None)
    caches = []
    teacher.model.layers[0].register_forward_pre_hook(lambda m, a, kw: caches.append(kw.get("cache")), with_kwargs=True)
    with torch.no_grad():
        assert float(loss_module(_pairs())) < 1e-5
    assert len(caches) == 2 and caches == [None, None]  # student and teacher passes, neither building a KV cache


def test_lora_starts_as_the_model_trains_only_adapters_and_merges_exactly(tmp_path):
    from peft import PeftModel

    model = tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2)
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = add_adapters(model, rank=4, alpha=16.0)
    assert len(adapter_layers(model)) == 2 * 7, "q, k, v, o, gate, up, down in each block; never the tied head"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected), "B starts at zero"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    pairs = _pairs(count=16)
    distill(model, None, pairs, DistillConfig(steps=8, batch_size=4, lr=5e-3, kl_weight=0.0, ce_weight=1.0, warmup_steps=1,
                                              eval_every=0, checkpoint_every=0, bf16=False), progress=False)
    for name, param in model.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(param, frozen[name.replace(".base_layer.", ".")]), f"{name} moved"
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, expected, atol=1e-4), "training moved the adapters"
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = merge_adapters(wrapped)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-4)
    # Saved adapters load into a fresh copy of the base, with peft's own loader, and give the same outputs.
    fresh = PeftModel.from_pretrained(tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, adapted, atol=1e-5)


def test_lora_keeps_block_sharing_one_adapter_per_shared_weight():
    from compress.models.mobilellm import share_blocks, unique_parameters

    model = share_blocks(tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2), 2)
    unique = unique_parameters(model)
    wrapped = add_adapters(model, rank=4, alpha=16.0, targets=("q_proj",))
    first, second = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    assert first is second, "the repeated block's q_proj shares its adapter"
    with torch.no_grad():
        first.lora_B["default"].weight.normal_()
    model = merge_adapters(wrapped)
    assert model.model.layers[0].self_attn.q_proj.weight is model.model.layers[1].self_attn.q_proj.weight
    assert unique_parameters(model) == unique, "merging added no parameters and kept the sharing"


def _write_pairs(path, words=10):
    vocabulary = ["kernel", "task", "page", "python", "file", "memory", "disk", "loop", "source", "time"][:words]
    with open(path, "w") as handle:
        for a in vocabulary:
            for b in vocabulary:
                # The output is a fixed function of the input, from a small set of words: worth learning.
                handle.write(json.dumps({"input": f"Reverse: {a} {b}.", "output": f"{b} {a}"}) + "\n")
    return path


def test_finetune_cli_lowers_held_out_output_perplexity_and_writes_a_plain_checkpoint(tmp_path, capsys):
    student = write_teacher(tmp_path, tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2), tiny_tokenizer())
    data = _write_pairs(tmp_path / "task.jsonl")
    out = tmp_path / "task"
    args = ["finetune", "--student", student, "--data", data, "--out", out, "--epochs", "6", "--batch-size", "8",
            "--lora-rank", "4", "--lr", "1e-2", "--quiet"]
    assert main([str(a) for a in args]) == 0
    assert "held-out output perplexity" in capsys.readouterr().out
    metrics = json.loads((out / "finetune.json").read_text())
    # The autograd and fused losses, sdpa and eager attention all land at 0.49-0.51 of the starting perplexity
    # here (bf16, 63 steps at 1e-2): the bar is the drop and the accuracy learned, not that coin flip.
    assert metrics["after"]["perplexity"] < 0.6 * metrics["before"]["perplexity"]
    assert metrics["after"]["accuracy"] > metrics["before"]["accuracy"] + 0.3
    assert metrics["trainable_params"] < 0.2 * metrics["params"] and metrics["lora_layers"] == 14
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert sum(p.numel() for p in model.parameters()) == metrics["params"]
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 14 and json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"


def test_finetune_refuses_bad_input_with_a_clear_message(tmp_path, capsys):
    student = write_teacher(tmp_path)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    cases = [
        (["--data", rows], "'input' or 'output' column"),
        (["--data", tmp_path / "missing.jsonl"], "no such file"),
        (["--data", _write_pairs(tmp_path / "ok.jsonl"), "--kl-weight", "1"], "needs a teacher"),
        (["--data", tmp_path / "ok.jsonl", "--out", student], "student's own folder"),
    ]
    for extra, message in cases:
        args = ["finetune", "--student", student, "--out", tmp_path / "o", *extra]
        assert main([str(a) for a in args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_pairs_follow_a_split_column_when_the_data_has_one(tmp_path):
    from compress.errors import DataError
    from compress.sources.data import load_pairs, pair_batches, split_pairs

    rows = [{"input": f"question {i}", "output": f"answer {i}", "split": "validation" if i < 3 else "train"}
            for i in range(12)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = load_pairs(str(path))
    assert sorted(s for s, _ in split_pairs(dataset, "validation")) == ["question 0", "question 1", "question 2"]
    assert len(split_pairs(dataset, "train")) == 9
    batch = pair_batches(dataset, tiny_tokenizer(), "validation", 4, 3)
    assert len(batch) == 3 and int(batch.cuts.max()) <= 4 and int((batch.lengths - batch.cuts).max()) <= 3
    # A tokenizer that wants BOS keeps it first when a long input is cut to its last tokens.
    with_bos = pair_batches(dataset, tiny_tokenizer(add_bos=True), "validation", 4, 3)
    assert (with_bos.ids[:, 0] == 1).all() and int(with_bos.cuts.max()) <= 4
    path.write_text(json.dumps({"input": "a", "output": "b", "split": "test"}) + "\n")
    with pytest.raises(DataError, match="'validation' or 'train'"):
        split_pairs(load_pairs(str(path)), "train")


def test_finetune_trains_a_mu_like_student_on_pairs_with_teacher_kl(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from compress.app.finetune import FinetuneConfig, finetune
    from compress.models.mu import MuForConditionalGeneration

    tokenizer = tiny_tokenizer()
    teacher = write_teacher(tmp_path, tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2), tokenizer)
    student = tmp_path / "mu"
    _tiny_mu().save_pretrained(student)
    tokenizer.save_pretrained(student)
    config = FinetuneConfig(student=str(student), data=str(_write_pairs(tmp_path / "task.jsonl")), out=str(tmp_path / "o"),
                            teacher=str(teacher), kl_weight=1.0, lora_rank=4, epochs=3, lr=1e-2)
    metrics = finetune(config, progress=False)
    assert metrics["after"]["perplexity"] < 0.7 * metrics["before"]["perplexity"]
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "o")
    assert isinstance(reloaded, MuForConditionalGeneration)
    assert reloaded.lm_head.weight is reloaded.model.shared.weight, "one shared table, still tied after merging"


@pytest.mark.parametrize("rank", [4, 0], ids=["lora", "every-weight"])
def test_an_interrupted_finetuning_resumes_to_the_same_weights_and_other_settings_start_over(tmp_path, monkeypatch, caplog,
                                                                                            rank):
    import dataclasses

    import distill.trainer
    from compress.app.finetune import FinetuneConfig, finetune

    student = write_teacher(tmp_path, tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2), tiny_tokenizer())
    config = FinetuneConfig(student=str(student), data=str(_write_pairs(tmp_path / "task.jsonl")),
                            out=str(tmp_path / "straight"), lora_rank=rank, epochs=2, lr=1e-2)
    straight = finetune(config, progress=False)
    assert straight["resumed_from_step"] == 0 and not (tmp_path / "straight.checkpoints").exists()
    saved = distill.trainer.save_checkpoint

    def interrupted(out: str, **changes):
        """Fine-tune into ``out`` and stop it as a kill would, right after step 5's checkpoint."""

        def killed_after_step_5(folder, step, *args, **kwargs):
            saved(folder, step, *args, **kwargs)
            if step == 5:
                raise KeyboardInterrupt

        monkeypatch.setattr(distill.trainer, "save_checkpoint", killed_after_step_5)
        with pytest.raises(KeyboardInterrupt):
            finetune(dataclasses.replace(config, out=str(tmp_path / out), **changes), progress=False)
        monkeypatch.setattr(distill.trainer, "save_checkpoint", saved)
        assert not (tmp_path / out).exists() and (tmp_path / f"{out}.checkpoints").is_dir()

    interrupted("resumed")
    with caplog.at_level("INFO", logger="compress.app.finetune"):
        resumed = finetune(dataclasses.replace(config, out=str(tmp_path / "resumed")), progress=False)
    assert "resuming the fine-tuning from" in caplog.text and "step-0000005" in caplog.text
    assert resumed["resumed_from_step"] == 5 and resumed["steps"] == straight["steps"] > 5
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not (tmp_path / "resumed.checkpoints").exists(), "checkpoints go once the model is written"
    # Another learning rate does not continue the interrupted run's state, nor does --no-resume.
    interrupted("changed")
    assert finetune(dataclasses.replace(config, out=str(tmp_path / "changed"), lr=5e-3), progress=False)["resumed_from_step"] == 0
    interrupted("again")
    args = ["finetune", "--student", student, "--data", config.data, "--out", tmp_path / "again", "--lora-rank", rank,
            "--epochs", "2", "--lr", "1e-2", "--no-resume", "--quiet"]
    assert main([str(a) for a in args]) == 0
    assert json.loads((tmp_path / "again" / "finetune.json").read_text())["resumed_from_step"] == 0
