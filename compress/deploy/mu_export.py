"""Static-shape graphs of a Mu-like encoder-decoder (:mod:`compress.models.mu`) for NPUs.

- :class:`MuEncoderGraph`: ``input_ids`` [1, L] and ``attention_mask`` [1, L] (1 = token, 0 = padding) →
  every decoder layer's cross-attention keys ``cross.<i>.key`` [1, KV, d, L] (transposed, as the score
  matmul reads them) and values ``cross.<i>.value`` [1, KV, L, d], computed once per input.
- :class:`MuDecoderStep`: one token, its position, a 0/1 ``attention_mask`` [1, C] over the self-attention
  cache slots, the ``encoder_mask`` [1, L], the cache ``past.<i>.key`` [1, KV, d, C] (transposed) and
  ``past.<i>.value`` [1, KV, C, d] and the cross
  keys/values → ``logits`` [1, 1, V] and the token's own key/value ``present.<i>.key|value`` [1, KV, 1, d],
  which the host writes into a slot (the same contract as the decoder-only graphs of
  :mod:`compress.deploy.export`; :class:`quant.runtime.DecodeCache` keeps the ring and the mask).

RoPE tables and masks are constants or plain arithmetic on inputs: no shape computation in the graphs.
``write_mu_graphs`` exports both; ``generate`` is the reference host loop with ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress.models.mu import MASK_VALUE, MuForConditionalGeneration, rope_tables
from quant import runtime


def _names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


class MuEncoderGraph(nn.Module):
    """The encoder and the cross-attention projections, for inputs of exactly ``length`` tokens."""

    def __init__(self, model: MuForConditionalGeneration, length: int) -> None:
        super().__init__()
        self.model, self.length = model.model, length
        cos, sin = rope_tables(model.config, length)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bias = ((attention_mask - 1.0) * -MASK_VALUE)[:, None, None, :]
        x = self.model.shared(input_ids)
        for layer in self.model.encoder_layers:
            x = layer(x, self.cos, self.sin, bias)
        encoded = self.model.encoder_norm(x)
        return tuple(t for pair in self.model.cross_keys_values(encoded) for t in pair)

    def names(self) -> tuple[list[str], list[str]]:
        return ["input_ids", "attention_mask"], _names("cross", len(self.model.decoder_layers))

    def example(self) -> tuple[torch.Tensor, ...]:
        return torch.zeros(1, self.length, dtype=torch.long), torch.ones(1, self.length)


class MuDecoderStep(nn.Module):
    """One decoder step with a static self-attention cache of ``capacity`` slots over an ``length``-token input."""

    def __init__(self, model: MuForConditionalGeneration, capacity: int, length: int) -> None:
        super().__init__()
        self.model, self.head = model.model, model.lm_head
        self.capacity, self.length = capacity, length
        cos, sin = rope_tables(model.config, max(capacity, model.config.max_position_embeddings))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        c = model.config
        self.cache_shapes = ((1, c.num_key_value_heads, c.head_dim, capacity), (1, c.num_key_value_heads, capacity, c.head_dim))
        self.cross_shapes = ((1, c.num_key_value_heads, c.head_dim, length), (1, c.num_key_value_heads, length, c.head_dim))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                encoder_mask: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = len(self.model.decoder_layers)
        past, cross = caches[: 2 * layers], caches[2 * layers:]
        x = self.model.shared(input_ids)
        cos = F.embedding(position_ids, self.cos)[:, None]  # (1, 1, 1, head_dim)
        sin = F.embedding(position_ids, self.sin)[:, None]
        slots = torch.cat((attention_mask, torch.ones_like(attention_mask[:, :1])), dim=1)
        self_bias = ((slots - 1.0) * -MASK_VALUE)[:, None, None]  # (1, 1, 1, C + 1)
        cross_bias = ((encoder_mask - 1.0) * -MASK_VALUE)[:, None, None]
        presents = []
        for i, layer in enumerate(self.model.decoder_layers):
            k, v = layer.self_keys_values(x, cos, sin)
            presents += [k, v]  # the host writes them into a slot (quant.runtime.DecodeCache)
            k = torch.cat((past[2 * i], k.transpose(-1, -2)), dim=3)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            x = layer(x, cos, sin, k, v, self_bias, cross[2 * i], cross[2 * i + 1], cross_bias, keys_transposed=True)
        return (self.head(self.model.decoder_norm(x)), *presents)

    def names(self) -> tuple[list[str], list[str]]:
        layers = len(self.model.decoder_layers)
        return (["input_ids", "position_ids", "attention_mask", "encoder_mask", *_names("past", layers),
                 *_names("cross", layers)], ["logits", *_names("present", layers)])

    def example(self) -> tuple[torch.Tensor, ...]:
        layers = len(self.model.decoder_layers)
        return (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                torch.zeros(1, self.capacity), torch.ones(1, self.length),
                *[torch.zeros(shape) for _ in range(layers) for shape in self.cache_shapes],
                *[torch.zeros(shape) for _ in range(layers) for shape in self.cross_shapes])


def write_mu_graphs(model: MuForConditionalGeneration, out_dir: str | Path, length: int,
                    capacity: int) -> tuple[Path, Path]:
    """Export ``encoder.onnx`` ([1, ``length``] inputs) and ``decoder.onnx`` (a ``capacity``-slot cache)."""
    from quant.export import export

    out_dir = Path(out_dir)
    model = model.float().eval()
    encoder = MuEncoderGraph(model, length)
    step = MuDecoderStep(model, capacity, length)
    return (export(encoder, encoder.example(), out_dir / "encoder.onnx", *encoder.names()),
            export(step, step.example(), out_dir / "decoder.onnx", *step.names()))


def encoder_feed(encoder_sess, input_ids: list[int] | np.ndarray) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The encoder graph's inputs for ``input_ids``: padded to the graph's length, with the 0/1 mask."""
    length = encoder_sess.get_inputs()[0].shape[1]
    if len(input_ids) > length:
        raise ValueError(f"the encoder graph takes at most {length} tokens, got {len(input_ids)}")
    ids = np.zeros((1, length), dtype=np.int64)
    ids[0, : len(input_ids)] = input_ids
    mask = np.zeros((1, length), dtype=np.float32)
    mask[0, : len(input_ids)] = 1.0
    return {"input_ids": ids, "attention_mask": mask}


def decoder_cache(encoder_sess, decoder_sess, feed: dict[str, np.ndarray],  # noqa: ANN001
                  record: list[dict[str, np.ndarray]] | None = None) -> runtime.DecodeCache:
    """Run the encoder graph on ``feed`` and return the decoder's host loop with its cross keys/values and mask."""
    cross = dict(zip([o.name for o in encoder_sess.get_outputs()], encoder_sess.run(None, feed), strict=True))
    return runtime.DecodeCache(decoder_sess, {**cross, "encoder_mask": feed["attention_mask"]}, record)


def generate(encoder_sess, decoder_sess, input_ids: list[int], steps: int, start_token: int,  # noqa: ANN001
             record: list[dict[str, np.ndarray]] | None = None) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding with the two graphs: encode ``input_ids`` (padded to the graph's length), then run the
    decoder step ``steps`` times from ``start_token``. Returns the tokens and each step's logits; ``record``
    collects every decoder feed (calibration data for quantizing the decoder graph)."""
    cache = decoder_cache(encoder_sess, decoder_sess, encoder_feed(encoder_sess, input_ids), record)
    token, tokens, logits_seen = start_token, [], []
    for _ in range(steps):
        logits_seen.append(cache.step(token))
        token = int(np.argmax(logits_seen[-1]))
        tokens.append(token)
    return tokens, logits_seen


__all__ = ["MuDecoderStep", "MuEncoderGraph", "decoder_cache", "encoder_feed", "generate", "write_mu_graphs"]
