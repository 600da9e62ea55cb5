"""Mu-like students: a small encoder-decoder transformer shaped for NPUs.

After Microsoft's Mu (the on-device model behind the Windows Settings agent): the encoder reads the
input once, the decoder generates with a small self-attention cache and cross-attention keys/values
computed once per input. Its parts:

- **Dual LayerNorm**: every sub-layer (self-attention, cross-attention, MLP) has a LayerNorm before
  it and one on its output before the residual add.
- **RoPE** in self-attention (encoder and decoder); cross-attention has none (the keys are encoder
  positions, not decoder ones).
- **Grouped-query attention** in self- and cross-attention.
- **SwiGLU** MLPs; **one embedding table** for the encoder input, the decoder input and the output head.
- Every matrix dimension a multiple of the NPU's channel multiple (the caller picks the sizes; see
  :func:`mu_config`), about two thirds of the layer parameters in the encoder.

``MuConfig`` / ``MuForConditionalGeneration`` are registered with ``AutoConfig`` and
``AutoModelForSeq2SeqLM`` when this module is imported (``compress.register_students()`` does it), and
save and load like any Hugging Face model (config.json + safetensors). Attention is written as plain matmul + softmax with an additive
mask, the same code the exported graphs run (:mod:`compress.deploy.mu_export`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM, PretrainedConfig, PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import Seq2SeqLMOutput

MASK_VALUE = -100.0  # additive mask; bounded so integer graphs can hold it (exp(-100) is 0 in float32 terms)


class MuConfig(PretrainedConfig):
    """Sizes of a Mu-like encoder-decoder."""

    model_type = "pdq_mu"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 49152,
        hidden_size: int = 384,
        intermediate_size: int = 1024,
        encoder_layers: int = 10,
        decoder_layers: int = 4,
        num_attention_heads: int = 6,
        num_key_value_heads: int = 2,
        head_dim: int = 64,
        layer_norm_eps: float = 1e-5,
        rope_theta: float = 100000.0,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        decoder_start_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads "
                             f"({num_key_value_heads})")
        kwargs.pop("is_encoder_decoder", None)
        if decoder_start_token_id is None:
            decoder_start_token_id = bos_token_id
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         decoder_start_token_id=decoder_start_token_id, tie_word_embeddings=tie_word_embeddings,
                         is_encoder_decoder=True, **kwargs)


def rope_tables(config: MuConfig, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [positions, head_dim] (Llama's rotate-half convention)."""
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim))
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, keys_transposed: bool = False) -> torch.Tensor:
    """Attention of q [B, H, T, d] over k, v [B, KV, S, d] with an additive ``bias`` [B or 1, 1, T or 1, S];
    returns [B, T, H·d]. ``keys_transposed``: k is given as [B, KV, d, S].

    Grouped-query attention without copying keys and values: the H/KV query heads of a group are stacked
    along the rows ([B, KV, G·T, d]) and meet their group's keys in one matmul, so k and v feed MatMuls
    directly (an NPU graph then quantizes them where they enter)."""
    b, heads, t, d = q.shape
    kv = k.shape[1]
    groups = heads // kv
    q = q.reshape(b, kv, groups * t, d)
    if groups > 1 and bias.shape[2] > 1:
        bias = bias.repeat(1, 1, groups, 1)  # rows ordered (group member, position), as q's
    scores = torch.matmul(q, k if keys_transposed else k.transpose(-1, -2)) * d**-0.5 + bias
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, KV, G·T, d]
    return out.reshape(b, heads, t, d).transpose(1, 2).reshape(b, t, heads * d)


class MuAttention(nn.Module):
    def __init__(self, config: MuConfig) -> None:
        super().__init__()
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.heads, self.kv_heads, self.head_dim = h, kv, hd
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x).view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = x.shape[:2]
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return k, v


class MuMLP(nn.Module):
    def __init__(self, config: MuConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _norm(config: MuConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class MuEncoderLayer(nn.Module):
    def __init__(self, config: MuConfig) -> None:
        super().__init__()
        self.self_attn, self.mlp = MuAttention(config), MuMLP(config)
        self.attn_pre_norm, self.attn_post_norm = _norm(config), _norm(config)
        self.mlp_pre_norm, self.mlp_post_norm = _norm(config), _norm(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.attn_pre_norm(x)
        q = apply_rope(self.self_attn.queries(h), cos, sin)
        k, v = self.self_attn.keys_values(h)
        x = x + self.attn_post_norm(self.self_attn.o_proj(attend(q, apply_rope(k, cos, sin), v, bias)))
        return x + self.mlp_post_norm(self.mlp(self.mlp_pre_norm(x)))


class MuDecoderLayer(nn.Module):
    def __init__(self, config: MuConfig) -> None:
        super().__init__()
        self.self_attn, self.cross_attn, self.mlp = MuAttention(config), MuAttention(config), MuMLP(config)
        self.attn_pre_norm, self.attn_post_norm = _norm(config), _norm(config)
        self.cross_pre_norm, self.cross_post_norm = _norm(config), _norm(config)
        self.mlp_pre_norm, self.mlp_post_norm = _norm(config), _norm(config)

    def self_keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's self-attention keys (rotated) and values for decoder input ``x``."""
        k, v = self.self_attn.keys_values(self.attn_pre_norm(x))
        return apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, self_k: torch.Tensor, self_v: torch.Tensor,
                self_bias: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor, cross_bias: torch.Tensor,
                keys_transposed: bool = False) -> torch.Tensor:
        """One decoder layer over ``x``; the self-attention reads ``self_k`` (transposed with ``keys_transposed``)
        and ``self_v``, which include x's own keys/values, the cross-attention the encoder's ``cross_k``
        (transposed) and ``cross_v``."""
        q = apply_rope(self.self_attn.queries(self.attn_pre_norm(x)), cos, sin)
        x = x + self.attn_post_norm(self.self_attn.o_proj(attend(q, self_k, self_v, self_bias, keys_transposed)))
        q = self.cross_attn.queries(self.cross_pre_norm(x))
        x = x + self.cross_post_norm(self.cross_attn.o_proj(attend(q, cross_k, cross_v, cross_bias, keys_transposed=True)))
        return x + self.mlp_post_norm(self.mlp(self.mlp_pre_norm(x)))


class MuPreTrainedModel(PreTrainedModel):
    config_class = MuConfig
    base_model_prefix = "model"
    _no_split_modules = ["MuEncoderLayer", "MuDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MuModel(MuPreTrainedModel):
    """The encoder, the decoder and their shared embedding."""

    def __init__(self, config: MuConfig) -> None:
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder_layers = nn.ModuleList(MuEncoderLayer(config) for _ in range(config.encoder_layers))
        self.decoder_layers = nn.ModuleList(MuDecoderLayer(config) for _ in range(config.decoder_layers))
        self.encoder_norm, self.decoder_norm = _norm(config), _norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.shared = value

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states [B, L, d] for ``input_ids`` [B, L] (``attention_mask``: 1 for tokens, 0 for padding)."""
        b, length = input_ids.shape
        cos, sin = rope_tables(self.config, length)  # computed per call: buffers would not survive meta-device loading
        mask = torch.ones(b, length) if attention_mask is None else attention_mask.float()
        bias = ((1.0 - mask) * MASK_VALUE)[:, None, None, :]
        x = self.shared(input_ids)
        for layer in self.encoder_layers:
            x = layer(x, cos, sin, bias)
        return self.encoder_norm(x)

    def cross_keys_values(self, encoded: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention keys, transposed [B, KV, d, L], and values [B, KV, L, d] for
        encoder states ``encoded`` (keys come transposed so the decoder's score matmul reads them as they are)."""
        pairs = [layer.cross_attn.keys_values(encoded) for layer in self.decoder_layers]
        return [(k.transpose(-1, -2), v) for k, v in pairs]

    def decode(self, decoder_input_ids: torch.Tensor, encoded: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder states [B, T, d], causal over ``decoder_input_ids`` [B, T], attending to ``encoded``."""
        b, t = decoder_input_ids.shape
        cos, sin = rope_tables(self.config, t)
        causal = torch.full((t, t), MASK_VALUE).triu(1)[None, None]
        mask = torch.ones(b, encoded.shape[1]) if attention_mask is None else attention_mask.float()
        cross_bias = ((1.0 - mask) * MASK_VALUE)[:, None, None, :]
        x = self.shared(decoder_input_ids)
        for layer, (ck, cv) in zip(self.decoder_layers, self.cross_keys_values(encoded), strict=True):
            k, v = layer.self_keys_values(x, cos, sin)
            x = layer(x, cos, sin, k, v, causal, ck, cv, cross_bias)
        return self.decoder_norm(x)


class MuForConditionalGeneration(MuPreTrainedModel, GenerationMixin):
    """The Mu-like encoder-decoder with its (tied) output head."""

    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}

    def __init__(self, config: MuConfig) -> None:
        super().__init__(config)
        self.model = MuModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.shared

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for ``labels``: the start token, then labels[:-1] (-100 becomes padding)."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat((start, labels[:, :-1]), dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id or 0)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                encoder_outputs: torch.Tensor | None = None, output_hidden_states: bool = False,
                **_: Any) -> Seq2SeqLMOutput:
        """Logits [B, T, V] of the decoder over ``decoder_input_ids`` (or ``labels`` shifted right) given the
        encoded ``input_ids``; with ``labels``, also their mean cross-entropy (-100 ignored). With
        ``output_hidden_states``, ``decoder_hidden_states`` holds the final (normalized) decoder states, and
        ``logits`` is None: a distillation loss projects them through the head in chunks instead."""
        encoded = encoder_outputs if encoder_outputs is not None else self.model.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        states = self.model.decode(decoder_input_ids, encoded, attention_mask)
        if output_hidden_states and labels is None:
            return Seq2SeqLMOutput(decoder_hidden_states=(states,), encoder_last_hidden_state=encoded)
        logits = self.lm_head(states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=encoded,
                               decoder_hidden_states=(states,) if output_hidden_states else None)

    @torch.no_grad()
    def greedy(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding without a cache (reference for the exported graphs): [B, max_new_tokens] tokens."""
        encoded = self.model.encode(input_ids, attention_mask)
        out = torch.full((input_ids.shape[0], 1), self.config.decoder_start_token_id, dtype=torch.long)
        for _ in range(max_new_tokens):
            logits = self.lm_head(self.model.decode(out, encoded, attention_mask))[:, -1]
            out = torch.cat((out, logits.argmax(-1, keepdim=True)), dim=1)
        return out[:, 1:]


AutoConfig.register(MuConfig.model_type, MuConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(MuConfig, MuForConditionalGeneration, exist_ok=True)


def layer_params(config: MuConfig) -> tuple[int, int]:
    """Parameters of one encoder layer and one decoder layer."""
    d, m, hd = config.hidden_size, config.intermediate_size, config.head_dim
    attention = 2 * d * config.num_attention_heads * hd + 2 * d * config.num_key_value_heads * hd
    mlp = 3 * d * m
    return attention + mlp + 4 * 2 * d, 2 * attention + mlp + 6 * 2 * d


def mu_config(vocab_size: int, target_params: int, align: int = 64, head_dim: int = 64, heads_per_kv: int = 3,
              mlp_ratio: float = 8 / 3, encoder_share: float = 2 / 3, max_hidden: int = 4096, max_mlp: int | None = None,
              max_layers: int | None = None, **special: Any) -> MuConfig:
    """The widest aligned Mu-like config within ``target_params`` that still has at least 3 decoder layers, with
    encoder layers holding about ``encoder_share`` of the layer parameters. ``max_*`` keep it within a teacher
    it is to be initialized from (:func:`compress.families.mu_init.mu_from_teacher`)."""
    best = None
    for hidden in range(align * 4, max_hidden + 1, align):
        heads = max(heads_per_kv, (hidden // head_dim) // heads_per_kv * heads_per_kv)
        mlp = max(align, round(hidden * mlp_ratio / align) * align)
        if max_mlp is not None:
            mlp = min(mlp, max_mlp // align * align)
        config = MuConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp, encoder_layers=1,
                          decoder_layers=1, num_attention_heads=heads, num_key_value_heads=heads // heads_per_kv,
                          head_dim=head_dim, **special)
        per_encoder, per_decoder = layer_params(config)
        budget = target_params - vocab_size * hidden - 4 * hidden
        # E·enc = share/(1-share) · D·dec, E·enc + D·dec = budget
        decoder = math.floor(budget * (1 - encoder_share) / per_decoder)
        encoder = math.floor((budget - decoder * per_decoder) / per_encoder)
        if decoder < 3 or encoder < 3:
            break
        if max_layers is not None and encoder + decoder > max_layers:
            continue
        config.encoder_layers, config.decoder_layers = encoder, decoder
        best = config
    if best is None:
        raise ValueError(f"no Mu-like shape of at least 3+3 layers fits {target_params / 1e6:.1f}M parameters with a "
                         f"{vocab_size}-token vocabulary; choose a larger --target-size")
    return best


__all__ = ["MuConfig", "MuForConditionalGeneration", "MuModel", "attend", "mu_config", "rope_tables"]
