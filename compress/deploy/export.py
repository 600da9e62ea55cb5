"""Export-ready copies of a causal LM: static shapes, one node per normalization, an explicit KV cache.

``StaticLM(model, capacity)`` copies a causal decoder's weights (every family whose registry entry names its
export roles: Llama, SmolLM, Mistral, Qwen2, Qwen3, Gemma3, Phi-3; :mod:`compress.deploy.decoder` reads them)
into a module whose forward has only fixed shapes: RoPE tables (one per layer type, Gemma3's local and global)
are constants gathered by position, the causal masks (one per sliding window shorter than the cache; a longer
window is the same as global attention inside a static graph) are constants, RMSNorm is one
``RMSNormalization`` node, the output head reuses the (tied) embedding through ``Gemm(transB=1)`` so the graph
stores it once. Two entry points:

- :class:`Prefill`: ``input_ids`` [1, L] → ``logits`` [1, L, V] and every layer's keys and values
  [1, kv_heads, L, head_dim] (to seed the decode cache);
- :class:`DecodeStep`: one token, its position, a 0/1 ``attention_mask`` [1, C] over the cache slots (and,
  for each sliding window shorter than the cache, ``window_mask.<W>`` [1, C]: the slots among the last W - 1
  positions) and the cache per layer (keys transposed, [1, kv_heads, head_dim, C], as the score matmul reads
  them; values [1, kv_heads, C, head_dim]) → ``logits`` [1, 1, V] and the token's own key and value
  [1, kv_heads, 1, head_dim] per layer, which the host writes into slot position mod C
  (:class:`quant.runtime.DecodeCache`): the graph never copies its cache, and no shape ever changes.

The float rewrites that prepare a model for integer arithmetic (norm folding, rotation, smoothing) are
in :mod:`compress.deploy.outliers`; they act on a ``StaticLM`` and leave its float outputs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.deploy.decoder import (
    BlockTensors,
    block_tensors,
    embedding_multiplier,
    export_family,
    rope_tables,
)
from compress.deploy.layouts import Conv1x1, MatMulLinear
from quant.ops import rms_norm

MAX_TABLE_POSITIONS = 8192  # RoPE positions the decode graph holds (Gemma3's 32k x 256 tables would be 134 MB)
MASK_VALUE = -100.0  # bounded so that integer graphs can represent it; exp(-100) is 0 in float32 terms
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")  # every block's linear layers


def _plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class _Block(nn.Module):
    """One decoder layer: pre-norm attention and gated MLP, with the optional parts the family's roles name
    (q/k norms, norms on the sub-layers' outputs, a sliding window, soft-capped scores)."""

    def __init__(self, tensors: BlockTensors, config) -> None:  # noqa: ANN001
        super().__init__()
        for role, linear in tensors.linears.items():
            setattr(self, role, linear)
        norms = {k: None if v is None else nn.Parameter(v.clone()) for k, v in tensors.norms.items()}
        self.ln1, self.ln2 = norms["attn_norm"], norms["mlp_norm"]
        self.q_norm, self.k_norm = norms["q_norm"], norms["k_norm"]
        self.attn_out_norm, self.mlp_out_norm = norms["attn_out_norm"], norms["mlp_out_norm"]
        # hidden x hidden Parameters after those norms once the residual stream is rotated (compress.deploy.outliers)
        self.attn_out_mix = self.mlp_out_mix = None
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = float(config.rms_norm_eps)
        self.scaling, self.softcap, self.act = tensors.scaling, tensors.softcap, tensors.activation
        self.window, self.rope_kind = tensors.window, tensors.rope_kind
        self.rope_index = self.mask_index = 0  # the StaticLM's RoPE table and mask this block reads
        self.fused_norm = True

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (rms_norm if self.fused_norm else _plain_rms_norm)(x, weight, self.eps)

    def attention_inputs(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):  # noqa: ANN201
        """Normalized input → rotated queries [1, H, T, d], keys and values [1, KV, T, d]."""
        h = self._norm(x, self.ln1)
        t = x.shape[1]
        q = self.q(h).view(1, t, self.heads, self.head_dim)
        k = self.k(h).view(1, t, self.kv_heads, self.head_dim)
        v = self.v(h).view(1, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self._norm(q, self.q_norm), self._norm(k, self.k_norm)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def prefill(self, x: torch.Tensor, tables: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The new residual stream for ``x`` [1, t, d], and this block's keys and values; ``tables`` are
        :meth:`StaticLM.prefill_tables`' (RoPE and causal bias of each kind)."""
        q, k, v = self.attention_inputs(x, tables[f"cos{self.rope_index}"], tables[f"sin{self.rope_index}"])
        return self.attend(x, q, k, v, tables[f"bias{self.mask_index}"]), k, v

    def attend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Attention of q over (k, v) with an additive ``bias``, then the MLP; returns the new residual."""
        groups = self.heads // self.kv_heads
        if groups > 1:
            s = k.shape
            k = k[:, :, None].expand(s[0], s[1], groups, s[2], s[3]).reshape(s[0], self.heads, s[2], s[3])
            v = v[:, :, None].expand(s[0], s[1], groups, s[2], s[3]).reshape(s[0], self.heads, s[2], s[3])
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        attn = torch.matmul(torch.softmax(scores + bias, dim=-1), v)
        return self._rest(x, attn.transpose(1, 2).reshape(1, x.shape[1], self.heads * self.head_dim))

    def attend_cached(self, x: torch.Tensor, q: torch.Tensor, k_past: torch.Tensor, v_past: torch.Tensor,
                      k_new: torch.Tensor, v_new: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """One token's attention over the cache's slots (keys transposed; ``bias`` [1, 1, 1, C] hides empty ones)
        and its own key/value, then the MLP. The cache is never copied: not concatenated, not expanded per head."""
        groups = self.heads // self.kv_heads
        q = q.reshape(1, self.kv_heads, groups, self.head_dim)  # [1, H, 1, d], heads grouped by their KV head
        past = torch.matmul(q, k_past) * self.scaling  # [1, KV, groups, C]
        own = torch.matmul(q, k_new.transpose(-1, -2)) * self.scaling  # [1, KV, groups, 1]
        if self.softcap:
            past = torch.tanh(past / self.softcap) * self.softcap
            own = torch.tanh(own / self.softcap) * self.softcap
        weights = torch.softmax(torch.cat((past + bias, own), dim=-1), dim=-1)
        attn = torch.matmul(weights[..., :-1], v_past) + torch.matmul(weights[..., -1:], v_new)
        return self._rest(x, attn.reshape(1, 1, self.heads * self.head_dim))

    def _rest(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The output projection of ``attn`` [1, t, H * d] into the residual, then the MLP."""
        out = self.o(attn)
        x = x + self._out_norm(out, self.attn_out_norm, self.attn_out_mix)
        h = self._norm(x, self.ln2)
        out = self.down(self.act(self.gate(h)) * self.up(h))
        return x + self._out_norm(out, self.mlp_out_norm, self.mlp_out_mix)

    def _out_norm(self, out: torch.Tensor, weight: torch.Tensor | None, mix: torch.Tensor | None) -> torch.Tensor:
        """A sub-layer's output as it enters the residual stream: through its own norm where the family has one."""
        if weight is None:
            return out
        out = self._norm(out, weight)
        return out if mix is None else out @ mix


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:  # partial rotary (Phi-3 variants): the rest of each head passes through
        return torch.cat((_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class StaticLM(nn.Module):
    """A float copy of a llama-family causal LM with static shapes; see the module docstring."""

    def __init__(self, model: nn.Module, capacity: int, fused_norm: bool = True) -> None:
        super().__init__()
        config = model.config
        spec = export_family(config)
        self.config = config
        self.capacity = capacity
        self.spec = spec
        base = model.model
        self.embed = nn.Parameter(base.embed_tokens.weight.detach().float().clone())
        head = model.get_output_embeddings().weight
        self.head = self.embed if head is base.embed_tokens.weight else nn.Parameter(head.detach().float().clone())
        self.embed_multiplier = embedding_multiplier(base)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        # Layers that share weights (MobileLLM-like students, compress.models.mobilellm) share one block, so the
        # graphs store those weights once.
        made: dict[int, _Block] = {}
        blocks = []
        for layer in base.layers:
            key = next(layer.parameters()).data_ptr()
            if key not in made:
                made[key] = _Block(block_tensors(layer, spec, config), config)
            blocks.append(made[key])
        self.blocks = nn.ModuleList(blocks)
        self.fused_norm = fused_norm  # False: RMSNorm as plain ops (Pow, ReduceMean, ...), to measure the difference
        for block in self.blocks:
            block.fused_norm = fused_norm
        self.norm = nn.Parameter(base.norm.weight.detach().float().clone() + spec.norm_weight_offset)
        self.eps = float(config.rms_norm_eps)
        # Residual-stream transforms set by compress.deploy.outliers: the embedding rows are stored already
        # multiplied by a rotation, and ``head_mix`` (hidden x hidden) undoes it before the output head.
        self.head_mix: nn.Parameter | None = None
        # Per-row scales of the embedding table (compress.deploy.outliers.normalize_embedding): the table holds
        # rows of max |value| 1, the lookup multiplies the row's scale back in, and a tied head multiplies
        # each logit by it. One int8 per-tensor table then fits every row.
        self.embed_scale: nn.Parameter | None = None
        self.embed_scale_rows: nn.Parameter | None = None  # the same scales as a (vocab, 1) table for the lookup
        self.head_layer: nn.Module | None = None  # set by the layout methods for an untied head
        self.table_grid: nn.Module | None = None  # set while the table trains on its grid (compress.deploy.qat)
        self.split: nn.Module | None = None  # the tied table in two precisions (compress.deploy.split_table)
        self._tables(base, capacity)

    def _tables(self, base: nn.Module, capacity: int) -> None:
        """RoPE tables of each kind the blocks read and the masks of each window, as constants."""
        # RoPE tables cover every position the model was trained for (up to MAX_TABLE_POSITIONS): decoding past
        # the cache capacity (a sliding window) keeps counting positions.
        positions = max(capacity, min(int(getattr(self.config, "max_position_embeddings", capacity)), MAX_TABLE_POSITIONS))
        tables = rope_tables(base, [b.rope_kind for b in self.blocks], positions)
        kinds = list(tables)
        # A window at least as long as the cache (plus the decoded token) sees everything: such a layer is global.
        windows = sorted({b.window for b in self.blocks if b.window is not None and b.window <= capacity})
        for block in self.blocks:
            block.rope_index = kinds.index(block.rope_kind if block.rope_kind in tables else None)
            block.mask_index = windows.index(block.window) + 1 if block.window in windows else 0
        self.rope_kinds, self.windows = len(kinds), [None, *windows]
        for i, (cos, sin) in enumerate(tables.values()):
            self.register_buffer(f"cos{i}", cos, persistent=False)  # (positions, rotary_dim)
            self.register_buffer(f"sin{i}", sin, persistent=False)
            # Prefill constants in their final shapes: the exporter's constant folding skips large tensors, so
            # a Slice, Unsqueeze or Trilu of a constant would stay in the graph.
            self.register_buffer(f"cos_prefill{i}", cos[:capacity][None, None].clone(), persistent=False)
            self.register_buffer(f"sin_prefill{i}", sin[:capacity][None, None].clone(), persistent=False)
        rows = torch.arange(capacity)[:, None]
        for j, window in enumerate(self.windows):
            hidden = torch.arange(capacity)[None, :] > rows
            if window is not None:
                hidden |= torch.arange(capacity)[None, :] <= rows - window
            self.register_buffer(f"causal_bias{j}", (hidden.float() * MASK_VALUE)[None, None], persistent=False)

    @property
    def unique_blocks(self) -> list[nn.Module]:
        """The blocks, each once (a shared block is applied at several depths); weight rewrites go through this."""
        return list({id(b): b for b in self.blocks}.values())

    @property
    def tied(self) -> bool:
        return self.head is self.embed

    def table(self) -> torch.Tensor:
        """The embedding table as the lookup and a tied head read it (through its grid while it trains)."""
        return self.embed if self.table_grid is None else self.table_grid(self.embed)

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the output head multiplies, [t, hidden], for the blocks' output ``x`` [1, t, hidden]."""
        h = (rms_norm if self.fused_norm else _plain_rms_norm)(x, self.norm, self.eps).reshape(x.shape[1], -1)
        return h @ self.head_mix if self.head_mix is not None else h

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        t, h = x.shape[1], self.head_input(x)
        # Tied: the 2-D F.linear, a Gemm(transB=1) storing E once; untied: the blocks' layout (per channel).
        head = self.table() if self.tied else self.head
        if self.split is not None:
            logits = self.split.head(h)
        else:
            logits = self.head_layer(h[None])[0] if self.head_layer is not None else F.linear(h, head)
        if self.embed_scale is not None and self.tied:
            logits = logits * self.embed_scale
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.reshape(1, t, -1)

    def embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.split.lookup(input_ids) if self.split is not None else F.embedding(input_ids, self.table())
        if self.embed_scale is not None:
            x = x * F.embedding(input_ids, self.embed_scale_rows)
        return x * self.embed_multiplier if self.embed_multiplier != 1.0 else x

    def prefill_tables(self, length: int) -> dict[str, torch.Tensor]:
        """RoPE cos and sin of each kind and the causal bias of each window for a prefill of ``length`` tokens."""
        if length > self.capacity:
            raise ValueError(f"prefill takes at most {self.capacity} tokens, got {length}")
        tables = {f"{kind}{i}": getattr(self, f"{kind}_prefill{i}")[:, :, :length]
                  for i in range(self.rope_kinds) for kind in ("cos", "sin")}
        return tables | {f"bias{j}": getattr(self, f"causal_bias{j}")[:, :, :length, :length]
                         for j in range(len(self.windows))}

    def prefill(self, input_ids: torch.Tensor, tables: dict[str, torch.Tensor] | None = None,
                norms: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Logits and every layer's keys and values for ``input_ids`` [1, t]; ``tables`` (from
        :meth:`prefill_tables`) spare the slicing, which an exported graph would otherwise keep as float ops.
        ``norms``, when given, collects each block's residual stream RMS per position ([t] tensors)."""
        x = self.embedding(input_ids)
        tables = tables if tables is not None else self.prefill_tables(input_ids.shape[1])
        keys, values = [], []
        for block in self.blocks:
            x, k, v = block.prefill(x, tables)
            keys.append(k)
            values.append(v)
            if norms is not None:
                norms.append(x[0].float().pow(2).mean(-1).sqrt())
        return self.logits(x), keys, values

    def decode(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
               cache: list[torch.Tensor], window_masks: list[torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits of one token and every layer's key and value for it ([1, KV, 1, d]); ``attention_mask`` and
        ``window_masks`` (one per window in ``windows[1:]``) mark the slots of ``cache`` each layer reads."""
        x = self.embedding(input_ids)
        rope = [(F.embedding(position_ids, getattr(self, f"cos{i}"))[:, None],  # (1, 1, 1, rotary_dim)
                 F.embedding(position_ids, getattr(self, f"sin{i}"))[:, None]) for i in range(self.rope_kinds)]
        biases = [((m - 1.0) * -MASK_VALUE)[:, None, None] for m in (attention_mask, *(window_masks or []))]  # (1, 1, 1, C)
        presents = []
        for i, block in enumerate(self.blocks):
            q, k, v = block.attention_inputs(x, *rope[block.rope_index])
            presents += [k, v]
            x = block.attend_cached(x, q, cache[2 * i], cache[2 * i + 1], k, v, biases[block.mask_index])
        return self.logits(x), presents

    def convolutional(self) -> StaticLM:
        """Every linear layer of the blocks as a 1x1 Conv (in place; apply after the float rewrites)."""
        return self._relayout(Conv1x1)

    def matmul_layout(self, separate_head: bool = False) -> StaticLM:
        """Every linear layer of the blocks as a MatMul on a stored (in, out) weight (in place; apply after the
        float rewrites): the layout for profiles that take per-channel weights on MatMul. ``separate_head``: a
        tied head too gets its own MatMul on a transposed copy of the table (for weight-only profiles, whose
        matmul operators hold their weights packed, so the lookup cannot share them)."""
        if separate_head and self.tied:
            if self.embed_scale is not None:
                raise ValueError("separate_head: apply it without the embed-rows rewrite (the head would need the "
                                 "table's row scales)")
            self.head = nn.Parameter(self.embed.detach().clone())
        return self._relayout(MatMulLinear)

    def _relayout(self, layer_type: type[nn.Module]) -> StaticLM:
        for block in self.unique_blocks:
            for name in (n for n in LINEARS if isinstance(getattr(block, n), nn.Linear)):
                setattr(block, name, layer_type(getattr(block, name)))
        if not self.tied:
            head = nn.Linear(self.head.shape[1], self.head.shape[0], bias=False)
            head.weight = self.head
            self.head_layer = layer_type(head)
        return self

    def cache_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The decode graph's per-layer key cache (transposed) and value cache shapes."""
        b = self.blocks[0]
        return (1, b.kv_heads, b.head_dim, self.capacity), (1, b.kv_heads, self.capacity, b.head_dim)


class Prefill(nn.Module):
    """``input_ids`` [1, L] → logits and the per-layer keys/values, as graph outputs (L: ``length``, by
    default the cache capacity)."""

    def __init__(self, lm: StaticLM, length: int | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.length = lm.capacity if length is None else length
        # Tables cut to the graph's length once, here, so the graph holds them as constants.
        self.table_names = list(lm.prefill_tables(self.length))
        for name, table in lm.prefill_tables(self.length).items():
            self.register_buffer(name, table.clone(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, keys, values = self.lm.prefill(input_ids, {n: getattr(self, n) for n in self.table_names})
        return (logits, *[t for pair in zip(keys, values, strict=True) for t in pair])

    def names(self) -> tuple[list[str], list[str]]:
        return ["input_ids"], ["logits", *_cache_names(len(self.lm.blocks), "present")]

    def example(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, self.length, dtype=torch.long),)


class DecodeStep(nn.Module):
    """One token with a static cache: see the module docstring."""

    def __init__(self, lm: StaticLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w = len(self.lm.windows) - 1  # the window masks come before the cache
        logits, presents = self.lm.decode(input_ids, position_ids, attention_mask, list(rest[w:]), list(rest[:w]))
        return (logits, *presents)

    def names(self) -> tuple[list[str], list[str]]:
        layers = len(self.lm.blocks)
        windows = [f"window_mask.{w}" for w in self.lm.windows[1:]]
        return (["input_ids", "position_ids", "attention_mask", *windows, *_cache_names(layers, "past")],
                ["logits", *_cache_names(layers, "present")])

    def example(self) -> tuple[torch.Tensor, ...]:
        cache = [torch.zeros(shape) for _ in self.lm.blocks for shape in self.lm.cache_shapes()]
        masks = [torch.zeros(1, self.lm.capacity) for _ in self.lm.windows]
        return (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), *masks, *cache)


def _cache_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
