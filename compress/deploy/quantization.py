"""Export and quantize a causal LM into the run directory's ``onnx/`` graphs, and measure each graph.

``prepare(model, seq_len, transforms, calibration_ids)`` gives the export-ready float module with the
outlier rewrites applied (:mod:`compress.deploy.outliers`); ``export_graphs`` writes its prefill and decode
graphs; ``quantize_graphs`` turns both into QDQ graphs for a recipe and NPU profile; ``measure``
evaluates any graph with ONNX Runtime.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from compress.deploy.decoder import allowed_transforms
from compress.deploy.export import DecodeStep, Prefill, StaticLM
from compress.deploy.groups import quantize_graph
from compress.deploy.outliers import TRANSFORMS, normalize_embedding, rotate, smooth
from compress.deploy.qat import QAT_LR, QAT_TABLE_LR, QAT_UNIT_LR, qat_
from compress.deploy.split_table import SplitTable, frequent_rows
from quant import runtime
from quant.export import export
from quant.lpbq import write_blocks
from quant.profiles import NpuProfile, check
from quant.quantize import QuantRecipe, QuantReport

log = logging.getLogger(__name__)


def prepare(model: nn.Module, seq_len: int, transforms: tuple[str, ...] = TRANSFORMS,
            calibration_ids: torch.Tensor | None = None, fused_norm: bool = True, seed: int = 0,
            conv: bool = False, separate_head: bool = False) -> StaticLM:
    """The export-ready float copy of ``model`` with ``transforms`` applied in TRANSFORMS order; with
    ``conv``, linear layers become 1x1 Convs (for profiles that take per-channel weights only on Conv), else
    MatMuls on stored (in, out) weights, and with ``separate_head`` a tied head its own MatMul (weight-only
    profiles). Transforms the model's family does not allow are skipped with a warning; ``lm.transforms`` holds
    those applied."""
    unknown = set(transforms) - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown transforms {sorted(unknown)}; known: {', '.join(TRANSFORMS)}")
    lm = StaticLM(model, seq_len, fused_norm=fused_norm).eval()
    skipped = [t for t in transforms if t not in allowed_transforms(lm.spec)]
    if skipped:
        log.warning("%s: skipping the transforms %s, which its blocks do not allow (norms on the sub-layers' "
                    "outputs do not commute with a rotation of the residual stream)", lm.spec.name, ", ".join(skipped))
        transforms = tuple(t for t in transforms if t not in skipped)
    lm.transforms = tuple(t for t in TRANSFORMS if t in transforms)  # what was applied, for the stage metrics
    if "rotate" in transforms:
        rotate(lm, seed)
    if "smooth" in transforms:
        if calibration_ids is None:
            raise ValueError("smoothing needs calibration_ids")
        smooth(lm, calibration_ids)
    if "embed-rows" in transforms:
        normalize_embedding(lm)
    return lm.convolutional() if conv else lm.matmul_layout(separate_head)


def export_graphs(lm: StaticLM, out_dir: str | Path, decode: bool = True,
                  prefill_length: int | None = None) -> tuple[Path, Path | None]:
    """Write ``model.onnx`` (prefill) and, with ``decode``, ``decode.onnx`` (one step, static cache) into ``out_dir``.

    The prefill graph reads ``prefill_length`` tokens (default: the cache capacity); a shorter prefill leaves
    cache slots for generated tokens, e.g. a 128-token prompt graph with a 192-slot decode graph."""
    out_dir = Path(out_dir)
    length = lm.capacity if prefill_length is None else prefill_length
    if not 0 < length <= lm.capacity:
        raise ValueError(f"prefill_length {length}: must be in [1, {lm.capacity}] (the cache capacity)")
    prefill = Prefill(lm, length)
    prefill_path = export(prefill, prefill.example(), out_dir / "model.onnx", *prefill.names())
    if not decode:
        return prefill_path, None
    step = DecodeStep(lm)
    return prefill_path, export(step, step.example(), out_dir / "decode.onnx", *step.names())


class DecodeFeeds(Sequence):
    """Calibration inputs for the decode graph, about ``tokens`` decode steps over the sequences of ``ids``,
    laid out as :class:`quant.runtime.DecodeCache` lays them out after a prefill: the keys and values of the
    tokens before the position in the slots of their positions, zeros and a 0 mask after them.

    One prefill of ``lm`` per sequence gives the keys and values of every position (causal attention: a
    prefix's cache does not depend on what follows), so many positions cost no more than one, and each
    feed is assembled when calibration asks for it (a feed holds the whole cache: megabytes).
    Positions per sequence: 0 and 1 (the first token carries the model's massive activation, which a decode
    step meets when it starts a sequence), every later token that carries one too (its residual stream RMS, at
    some block, over MASSIVE times the sequence's median there: Gemma3's commas and apostrophes; a decode graph
    calibrated without such a token clips the MLP outputs that build it and loses that step's prediction
    entirely), then the rest spread evenly. A decode graph's activations are one token's, so its ranges need many
    tokens. Fake-quantizing every activation of SmolLM2's decode graph at 16 bits: 24 steps +1.45% perplexity (the
    distilled student), 144 steps +0.63% and 528 steps +0.32% (the teacher).
    """

    MASSIVE = 8.0  # a massive activation is tens of times a token's usual RMS; ordinary tokens vary within ~3x
    MAX_MASSIVE = 16  # per sequence: text with many such tokens adds at most this many steps

    def __init__(self, lm: StaticLM, ids: np.ndarray, tokens: int = 512) -> None:
        self.names = DecodeStep(lm).names()[0]
        self.capacity, self.windows = lm.capacity, lm.windows[1:]
        self.ids = np.asarray(ids)
        last = min(self.ids.shape[1], lm.capacity) - 1
        per_sequence = max(2, -(-tokens // max(1, len(self.ids))))
        rest = np.linspace(2, last, per_sequence - 2).round().astype(int) if last >= 2 else []
        spread = {p for p in (0, 1, *(int(p) for p in rest)) if p <= last}
        self.caches, self.steps = [], []  # steps: (sequence, position)
        with torch.no_grad():
            for index, row in enumerate(self.ids):
                norms: list[torch.Tensor] = []
                _, keys, values = lm.prefill(torch.as_tensor(row[None, : lm.capacity]), norms=norms)
                self.caches.append([t.numpy() for pair in zip(keys, values, strict=True) for t in pair])
                self.steps += [(index, p) for p in sorted(spread | self.massive(torch.stack(norms), last))]

    @classmethod
    def massive(cls, norms: torch.Tensor, last: int) -> set[int]:
        """Positions after the first whose residual RMS at some block ([blocks, t] ``norms``) is over MASSIVE times
        that block's median, the largest MAX_MASSIVE of them."""
        ratio = (norms / norms.median(dim=1, keepdim=True).values.clamp_min(1e-12)).max(dim=0).values
        ratio[0] = 0.0
        found = [p for p in torch.argsort(ratio, descending=True).tolist() if ratio[p] > cls.MASSIVE and p <= last]
        return set(found[: cls.MAX_MASSIVE])

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        row, cut = self.steps[index % len(self)]
        slots = np.arange(self.capacity)
        masks = [(slots < cut).astype(np.float32)[None]]
        masks += [((slots < cut) & (cut - slots < window)).astype(np.float32)[None] for window in self.windows]
        cache = []
        for keys, values in zip(self.caches[row][::2], self.caches[row][1::2], strict=True):
            past_keys = np.zeros((*keys.shape[:2], keys.shape[3], self.capacity), np.float32)  # transposed
            past_keys[:, :, :, :cut] = keys[:, :, :cut].transpose(0, 1, 3, 2)
            past_values = np.zeros((*values.shape[:2], self.capacity, values.shape[3]), np.float32)
            past_values[:, :, :cut] = values[:, :, :cut]
            cache += [past_keys, past_values]
        inputs = (np.array([[self.ids[row, cut]]], np.int64), np.array([[cut]], np.int64), *masks, *cache)
        return dict(zip(self.names, inputs, strict=True))


def measure(prefill: Path, decode: Path | None, valid: np.ndarray, reference_top1: np.ndarray | None,
            prompt_tokens: int = 64, new_tokens: int = 64, decode_samples: int = 4,
            progress: bool = False, others: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None,
            ) -> tuple[dict, np.ndarray]:
    """Perplexity, agreement with ``reference_top1``, size on disk, median prefill latency and decode
    tokens/s of one graph pair, with ONNX Runtime on this machine. Also returns the graph's top-1.

    The decode graph is also scored (``decode_perplexity``, ``decode_agreement``) on the second halves of
    the first ``decode_samples`` validation sequences, fed one token at a time after a prefill of the first
    halves: the path generation takes, with the cache passing through the graph at every step.

    ``others`` (name -> sequences and a reference top-1) are more evaluation sets, scored by the prefill graph
    into ``evals``."""
    sess = runtime.session(prefill)
    quality, top1 = runtime.quality(sess, valid, reference_top1, progress=progress, label=prefill.name)
    evals = {}
    for name, (ids, reference) in (others or {}).items():
        scored, _ = runtime.quality(sess, ids, reference, progress=progress, label=f"{prefill.name} on {name}")
        evals[name] = {"perplexity": scored.perplexity, "agreement": scored.agreement, "tokens": scored.tokens}
    metrics = {
        "perplexity": quality.perplexity, "agreement": quality.agreement, "validation_tokens": quality.tokens,
        "prefill_mb": prefill.stat().st_size / 1e6,
        "prefill_latency_ms": runtime.prefill_latency(sess, int(valid.shape[1])) * 1000,
    }
    if evals:
        metrics["evals"] = evals
    if decode is not None:
        step = runtime.session(decode)
        prompt = [int(t) for t in valid[0, :prompt_tokens]]
        _, _, per_token = runtime.decode(step, prompt, new_tokens, prefill_sess=sess)
        metrics.update(decode_mb=decode.stat().st_size / 1e6, decode_tokens_per_second=1.0 / per_token,
                       decode_prompt_tokens=len(prompt), decode_new_tokens=new_tokens)
        if decode_samples > 0:
            rows = valid[:decode_samples]
            reference = reference_top1[:decode_samples] if reference_top1 is not None else None
            scored = runtime.decode_quality(step, sess, rows, rows.shape[1] // 2, reference,
                                            progress=progress, label=decode.name)
            metrics.update(decode_perplexity=scored.perplexity, decode_agreement=scored.agreement,
                           decode_validation_tokens=scored.tokens)
    return metrics, top1


def _rounded(lm: StaticLM, recipe: QuantRecipe, profile: NpuProfile, ids: torch.Tensor,
             qat: QatSettings | None = None, progress: bool = False, frequency_ids: torch.Tensor | None = None,
             ) -> StaticLM:
    """A copy of ``lm`` whose block weights GPTQ rounded onto the recipe's grids (LPBQ blocks with
    ``recipe.weight_block``), and, for an int4 table, whose tied table GPTQ rounded as the head (split in two with
    ``recipe.embedding_wide_rows``: the rows of the tokens most frequent in ``frequency_ids``, default QAT's sequences,
    else ``ids``, on the int8 grid, :mod:`compress.deploy.split_table`); with ``qat``, then trained on those grids to
    match ``lm``
    (:func:`compress.deploy.qat.qat_`; ``rounded.qat`` says how)."""
    from compress.deploy.gptq import block_op, gptq_, gptq_table_

    if qat is not None and not recipe.weight_block:
        raise ValueError(f"quantization-aware training trains LPBQ int4 blocks; recipe {recipe.name} has none")
    int4_table = recipe.embedding_bits == 4 and lm.tied and lm.embed_scale is not None
    split = int4_table and recipe.embedding_wide_rows > 0
    if split and qat is not None and qat.table_lr > 0:
        raise ValueError(f"recipe {recipe.name} stores the table in two precisions, and the table trains on one int4 "
                         "grid: leave the table's QAT rate at 0 (--quant-qat-table-lr 0)")
    if recipe.weight_block and block_op(lm) != "MatMul":
        raise ValueError(f"recipe {recipe.name} stores LPBQ blocks, which need MatMul linears: prepare the model with "
                         "conv=recipe.linears_as_conv(profile)")
    # At 4 bits a block's inputs move with the rounding of the blocks before it: GPTQ takes them as the rounded
    # model makes them (one more calibration pass per block; at 8 bits the float model's inputs are as good).
    rounded = gptq_(copy.deepcopy(lm), ids, per_channel=recipe.per_channel and block_op(lm) in profile.per_channel_ops,
                    weight_range=recipe.weight_range, bits=recipe.weight_bits, block_size=recipe.weight_block,
                    sequential=recipe.weight_bits == 4)
    wide = None
    if split:
        counted = frequency_ids if frequency_ids is not None else torch.as_tensor(qat.ids) if qat is not None else ids
        wide = frequent_rows(counted, lm.embed.shape[0], recipe.embedding_wide_rows)
    if int4_table:
        gptq_table_(rounded, ids, recipe.embedding_bits, wide)
    if qat is not None:
        rounded.qat = qat_(rounded, lm, torch.as_tensor(qat.ids), lr=qat.lr, unit_lr=qat.unit_lr,
                           table_lr=qat.table_lr, progress=progress).as_dict()
    if wide is not None:
        rounded.split = SplitTable(rounded.embed.detach(), wide)
    return rounded


FREQUENCY_TOKENS = 131_072  # training tokens counted to rank the table's rows (a recipe's embedding_wide_rows)


@dataclass
class QatSettings:
    """Quantization-aware training after GPTQ (LPBQ recipes): the training sequences [n, L], the learning rate of
    the weights, that of the LPBQ channel units' logarithms (0: GPTQ's units stay) and how far the tied int4 table's
    largest entry moves a step (0: GPTQ's table stays; :func:`compress.deploy.qat.qat_`)."""

    ids: np.ndarray
    lr: float = QAT_LR
    unit_lr: float = QAT_UNIT_LR
    table_lr: float = QAT_TABLE_LR


@dataclass
class QuantizedGraphs:
    prefill: Path
    decode: Path | None
    reports: dict[str, QuantReport]
    violations: dict[str, list[str]]
    qat: dict | None = None  # what the quantization-aware training did (QatResult.as_dict), if it ran


def quantize_graphs(lm: StaticLM, float_dir: str | Path, recipe: QuantRecipe, profile: NpuProfile,
                    calibration_ids: np.ndarray, decode: bool = True, progress: bool = False,
                    decode_calib_tokens: int = 512, qat: QatSettings | None = None,
                    gptq_ids: np.ndarray | None = None, frequency_ids: np.ndarray | None = None) -> QuantizedGraphs:
    """Quantize ``model.onnx`` (and ``decode.onnx``) in ``float_dir`` to ``model.<recipe>.onnx`` etc.; the decode
    graph is calibrated on about ``decode_calib_tokens`` decode steps over the same sequences (:class:`DecodeFeeds`).

    With ``recipe.weight_rounding == "gptq"`` the graphs quantized are those of a copy of ``lm`` whose block weights
    :func:`compress.deploy.gptq.gptq_` rounded onto their integer grids (Hessians from ``gptq_ids``, default
    ``calibration_ids``: a Hessian of a 1,536-input layer wants more than 8 x 256 tokens), exported next to
    the float ones and removed after; the float graphs in ``float_dir`` stay the reference. With ``qat`` (LPBQ
    recipes), those weights then train on their grids to match ``lm`` before the export. A recipe with
    ``embedding_wide_rows`` keeps the rows of the tokens most frequent in ``frequency_ids`` (default: QAT's
    sequences, else GPTQ's) in int8, FREQUENCY_TOKENS of training text being what the pipeline counts."""
    float_dir = Path(float_dir)
    calibration_ids = np.asarray(calibration_ids)
    # The prefill graph may read fewer tokens than the cache holds (export_graphs' prefill_length): its feeds are
    # the sequences' first tokens, while the decode graph calibrates on positions up to the cache's capacity.
    length = onnx.load(float_dir / "model.onnx", load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1]
    length = length.dim_value
    prefill_feeds = [{"input_ids": row[None, :length].astype(np.int64)} for row in calibration_ids]
    reports, violations = {}, {}
    out = float_dir / f"model.{recipe.name}.onnx"
    decode_out = float_dir / f"decode.{recipe.name}.onnx" if decode else None
    with tempfile.TemporaryDirectory(dir=float_dir, prefix=".rounded.") as tmp:
        source_dir, source_lm = float_dir, lm
        if recipe.weight_rounding == "gptq":
            hessian_ids = calibration_ids if gptq_ids is None else np.asarray(gptq_ids)
            source_lm = _rounded(lm, recipe, profile, torch.as_tensor(hessian_ids), qat, progress,
                                 None if frequency_ids is None else torch.as_tensor(np.asarray(frequency_ids)))
            source_dir = Path(tmp)
            export_graphs(source_lm, source_dir, decode=decode, prefill_length=length)
        blocks = getattr(source_lm, "weight_blocks", {})

        def made(kind: str, source: Path, target: Path, feeds: Sequence) -> None:
            staged = Path(tmp) / target.name  # the LPBQ blocks go in before the graph takes its name
            reports[kind] = quantize_graph(source, staged, feeds, recipe, profile, progress)
            if blocks:
                reports[kind].block_weights = write_blocks(staged, blocks, recipe.weight_bits)
            staged.replace(target)
            violations[kind] = [str(v) for v in check(onnx.load(target), profile)]

        made("prefill", source_dir / "model.onnx", out, prefill_feeds)
        if decode_out is not None:
            made("decode", source_dir / "decode.onnx", decode_out, DecodeFeeds(source_lm, calibration_ids, decode_calib_tokens))
    return QuantizedGraphs(out, decode_out, reports, violations, getattr(source_lm, "qat", None))
