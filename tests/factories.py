"""Tiny *real* architectures built from transformers configs, a tokenizer trained on the spot, and readers of
the graphs made from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 256
TEXT = (
    "The kernel schedules tasks on every processor. Each task has a priority and a time slice. "
    "Python reads the source file, compiles it to bytecode and runs it in the interpreter loop. "
    "Memory is divided into pages; a page fault brings the missing page in from the disk. "
) * 40


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def token_ids(model, n: int, length: int, seed: int) -> torch.Tensor:  # noqa: ANN001 - any causal LM
    """``n`` random sequences of ``length`` ids from ``model``'s vocabulary (none of the first three), the same for
    the same seed."""
    return torch.randint(3, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


def tiny_llama(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, mlp: int = 128, seed: int = 0,
               vocab_size: int = VOCAB, **kw):
    _seeded(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_qwen2(seed: int = 0):
    _seeded(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random biases, so that slicing them is actually exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    return model


def tiny_qwen3(seed: int = 0):
    _seeded(seed)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # q/k norms start at one: make them non-trivial
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 2.0)
            layer.self_attn.k_norm.weight.uniform_(0.5, 2.0)
    return model


def tiny_mistral(seed: int = 0):
    _seeded(seed)
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, pad_token_id=0, sliding_window=None,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_gemma3(seed: int = 0):
    _seeded(seed)
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2, query_pre_attn_scalar=32,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # Gemma norms start at zero (weight = 1 + w): make them non-trivial
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.3)
    return model


def tiny_phi3(seed: int = 0, partial_rotary_factor: float = 1.0):
    _seeded(seed)
    config = Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        partial_rotary_factor=partial_rotary_factor,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_bert(seed: int = 0):
    _seeded(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )
    return BertModel(config).eval()


FAMILY_FACTORIES = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "qwen3": tiny_qwen3,
    "mistral": tiny_mistral,
    "gemma3": tiny_gemma3,
    "phi3": tiny_phi3,
    "bert": tiny_bert,
}
DECODER_FAMILIES = {name: make for name, make in FAMILY_FACTORIES.items() if name != "bert"}


def tiny_tokenizer(add_bos: bool = False, text: str = TEXT) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of VOCAB tokens trained on ``text`` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def static_kl(reference, model, ids: torch.Tensor) -> float:  # noqa: ANN001 - two compress.deploy.export.StaticLMs
    """Mean KL (per position) from ``reference``'s next-token distribution to ``model``'s, over the rows of ``ids``."""
    total = 0.0
    for row in ids:
        with torch.no_grad():
            expected = torch.log_softmax(reference.prefill(row[None])[0][0].double(), -1)
            got = torch.log_softmax(model.prefill(row[None])[0][0].double(), -1)
        total += (expected.exp() * (expected - got)).sum(-1).mean().item() / len(ids)
    return total


def write_teacher(tmp: Path, model=None, tokenizer=None) -> Path:
    """A tiny teacher checkpoint folder (config + safetensors + tokenizer)."""
    folder = tmp / "teacher"
    (model or tiny_llama()).save_pretrained(folder)
    (tokenizer or tiny_tokenizer()).save_pretrained(folder)
    return folder


def write_corpus(tmp: Path, documents: int = 120) -> Path:
    """A folder of small text documents, varied enough that every split gets some."""
    folder = tmp / "corpus"
    folder.mkdir()
    sentences = TEXT.split(". ")
    for i in range(documents):
        body = ". ".join(sentences[(i + j) % len(sentences)] for j in range(12))
        (folder / f"doc{i:03d}.txt").write_text(f"Document {i}. {body}\n")
    return folder


def int8_weights(quantized: onnx.ModelProto, floats: dict[str, np.ndarray]):  # noqa: ANN201 - an iterator of tuples
    """(name, float weight, scale, axis or None, dequantized weight) for every int8 weight of a QDQ graph, its float
    weight looked up in ``floats`` (the float graph's initializers) by ORT's ``<name>_quantized`` naming."""
    values = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    for node in quantized.graph.node:
        source = node.input[0]
        if node.op_type != "DequantizeLinear" or values.get(source, np.zeros(0)).dtype != np.int8:
            continue
        weight, scale = floats[source.removesuffix("_quantized")], values[node.input[1]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % weight.ndim if scale.size > 1 else None
        shape = [1] * weight.ndim
        if axis is not None:
            shape[axis] = -1
        yield source, weight, scale, axis, values[source].astype(np.float32) * scale.reshape(shape)


HAND_PAIRS = [  # written by hand, not by the task generator: compress eval --pairs takes any file of this shape
    {"input": "turn on night light", "output": '{"setting": "display.night_light", "value": true}'},
    {"input": "volume to 30", "output": '{"setting": "sound.volume", "value": 30}'},
    {"input": "lock my pc", "output": '{"setting": "security.lock_now"}'},
]


def check_pairs_eval(run_dir: Path, tmp: Path, max_input_tokens: int = 6, new_tokens: int = 4) -> None:
    """``compress eval RUN --pairs`` on hand-written pairs answers every request through the run's float graphs with
    the student checkpoint's own tokens, and through its integer graphs too."""
    import json

    from compress.app.cli import main

    pairs = tmp / "hand.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in HAND_PAIRS))
    common = ["--pairs", str(pairs), "--max-new-tokens", str(new_tokens), "--max-input-tokens", str(max_input_tokens)]
    results = {}
    for name, extra in (("checkpoint", []), ("float", ["--graph", "float"]), ("quantized", ["--graph"])):
        out = tmp / f"answers-{name}.json"
        assert main(["eval", str(run_dir), *common, *extra, "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    for result in results.values():
        assert result["pairs"] == len(HAND_PAIRS) and len(result["answers"]) == len(HAND_PAIRS)
        assert 0 <= result["exact_match"] <= result["setting_accuracy"] <= 1
        assert 0 < result["first_token_ms_p50"] <= result["call_ms_p50"]
    # The float graphs and their host loop answer exactly as the checkpoint does.
    assert [a["output"] for a in results["float"]["answers"]] == [a["output"] for a in results["checkpoint"]["answers"]]
    assert results["quantized"]["answered_by"] != results["float"]["answered_by"]
    # On Qualcomm's HTP emulator, the qnn-htp integer graphs answer the same requests through the same host loop.
    from quant import qnn

    config = json.loads((run_dir / "config.json").read_text())["quant"]
    if config["npu_profile"] == "qnn-htp" and qnn.unavailable() is None:
        from compress.app.htp_calls import emulated_calls
        from compress.families import get_family

        first, step = get_family(json.loads((run_dir / "config.json").read_text())["student"]).run_graphs(
            run_dir, config["recipe"])
        emulated = emulated_calls(first, step, run_dir / "student", pairs, len(HAND_PAIRS), new_tokens, max_input_tokens)
        assert emulated["pairs"] == len(HAND_PAIRS)
        assert [a["output"] for a in emulated["answers"]] == [a["output"] for a in results["quantized"]["answers"]]
