"""Post-training static quantization of a float ONNX graph into QDQ format, whole graph, per NPU profile.

Everything goes through ``onnxruntime.quantization``: for the ``qnn-htp`` profile its QNN helpers
(``qnn_preprocess_model``, ``get_qnn_qdq_config``), for the others ``StaticQuantConfig`` with ORT's own
mixed-precision fixer. Every operator is quantized (normalizations, softmax, residual adds included);
a recipe may keep named *groups* of tensors at 16 bits in an 8-bit graph, and the report lists them.

Groups are named sets of tensors that the caller finds in the graph (``quantize(..., groups=...)``, see
:func:`compress.deploy.groups.find_groups`): this module knows operators, not models.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quant.profiles import NpuProfile
from quant.qnn import layer_norm_parameters
from quant.weight_ranges import clip_weights

log = logging.getLogger(__name__)

CALIBRATIONS = ("minmax", "percentile", "entropy")
WEIGHT_RANGES = ("minmax", "mse")
WEIGHT_ROUNDINGS = ("nearest", "gptq")
# Finds the tensors of each named group in a float graph: {group: tensor names}.
GroupFinder = Callable[[onnx.ModelProto], Mapping[str, Sequence[str]]]


@dataclass(frozen=True)
class QuantRecipe:
    """How to quantize: integer types, calibration, and tensor groups kept at 16 bits."""

    name: str
    activation_bits: int = 8  # 8 → uint8, 16 → uint16
    weight_bits: int = 8  # symmetric int8, or int4 (per channel on the profile's per-channel operators)
    # The tied embedding table (the lookup's and the head's): int8, or int4 (per row with the embed-rows rewrite,
    # which scales each row to max |value| 1 and multiplies its scale back in).
    embedding_bits: int = 8
    # With an int4 table: the rows of this many most frequent tokens stored int8 in a second table (the project's
    # compress.deploy.split_table; its GPTQ rounds them onto the 8-bit grid). 0: one table.
    embedding_wide_rows: int = 0
    per_channel: bool = True  # on the operators the profile allows
    calibration: str = "minmax"
    percentile: float = 99.999
    weight_range: str = "minmax"  # "mse": each int8 weight channel clipped to its error-minimizing range
    # "gptq": block weights rounded with GPTQ before export (compress.deploy.gptq; done by compress.deploy.quantization's
    # quantize_graphs, which owns the torch model and the calibration text); quantize() then finds them on
    # their grids and keeps them exactly. "nearest": the quantizer rounds every weight to its nearest step.
    weight_rounding: str = "nearest"
    sixteen_bit: tuple[str, ...] = ()  # activation groups (quantize's ``groups``) kept at 16 bits in an 8-bit graph
    sixteen_bit_weights: tuple[str, ...] = ()  # weight groups (quantize's ``weight_groups``) stored as int16
    # Weight-only: float activations, every MatMul weight stored as ``weight_bits`` integers in blocks of
    # ``block_size`` along its input, each block with its own scale (ONNX Runtime's MatMulNBits, for CPUs).
    weight_only: bool = False
    block_size: int = 32
    # Q/DQ int4: MatMul weights in blocks of this many inputs, Qualcomm's low-power block format (quant.lpbq; the
    # linears export as MatMul, not 1x1 Conv), GPTQ-rounded onto them. 0: one step per output channel.
    weight_block: int = 0

    def __post_init__(self) -> None:
        if self.weight_only:
            if self.activation_bits != 32 or self.weight_bits not in (4, 8) or self.block_size < 16:
                raise ValueError("a weight-only recipe keeps float activations (activation_bits 32) and stores "
                                 "weight_bits 4 or 8 in blocks of at least 16")
        elif self.activation_bits not in (8, 16) or self.weight_bits not in (4, 8) or self.embedding_bits not in (4, 8):
            raise ValueError("activation_bits must be 8 or 16, weight_bits and embedding_bits 4 or 8")
        if not self.weight_only and self.weight_bits == 4 and not self.weight_block:
            # ONNX Runtime's quantizer puts int4 weights on -8..7 steps of max|w| / 7.5, which is not the symmetric grid
            # GPTQ rounds onto; and per channel int4 costs far more than blocks (benchmarks/weight_ranges.py --bits 4).
            raise ValueError("int4 Q/DQ weights go in LPBQ blocks: set weight_block (e.g. 64)")
        if self.weight_block and (self.weight_bits != 4 or self.weight_rounding != "gptq" or self.weight_block % 16):
            raise ValueError("weight_block (LPBQ blocks) takes weight_bits 4, weight_rounding gptq and a multiple of 16")
        if self.embedding_wide_rows and (self.embedding_wide_rows < 0 or self.embedding_bits != 4
                                         or self.weight_rounding != "gptq"):
            raise ValueError("embedding_wide_rows (int8 rows of an int4 table) takes embedding_bits 4 and weight_rounding "
                             "gptq, which rounds the rows onto their grids")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}")
        if self.weight_range not in WEIGHT_RANGES:
            raise ValueError(f"weight_range must be one of {', '.join(WEIGHT_RANGES)}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ValueError(f"weight_rounding must be one of {', '.join(WEIGHT_ROUNDINGS)}")
        object.__setattr__(self, "sixteen_bit", tuple(self.sixteen_bit))
        object.__setattr__(self, "sixteen_bit_weights", tuple(self.sixteen_bit_weights))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def linears_as_conv(self, profile: NpuProfile) -> bool:
        """Whether the model's linears export as 1x1 Convs for ``profile`` (per-channel weights where it takes them
        only on Conv), or as MatMuls (the other profiles, and LPBQ blocks, which the HTP takes on MatMul)."""
        return profile.linear_as_conv and not self.weight_block


MIXES = ("head-mix", "norm-mixes")  # a rotation's hidden x hidden matrices, where a norm's weight cannot fold
PRESETS = {
    "a16w8": QuantRecipe("a16w8", activation_bits=16, sixteen_bit_weights=MIXES, weight_rounding="gptq"),
    # 16 bits where 8 measurably break the model: the residual stream (one outlier token sets its range),
    # the attention scores and probabilities, and the MLP's gating; every matmul input stays 8-bit.
    "a8w8": QuantRecipe("a8w8", activation_bits=8, sixteen_bit=("residual", "softmax", "swiglu"),
                        sixteen_bit_weights=MIXES, weight_rounding="gptq"),
    # For CPUs (the ort-cpu profile): decoding one token reads every weight once, so it runs at the speed
    # weights stream from memory; int8 blocks of 32 read a quarter of fp32's bytes, int4 an eighth.
    # The format NPU LLM toolchains ship (Qualcomm AI Hub, Olive's QNN recipes): int4 weights in LPBQ blocks of 32
    # inputs (each block's range MSE-searched), GPTQ-rounded onto them block after block, 16-bit activations; the
    # tied table int4 per row, GPTQ-rounded as the head (an int8 table alone would be most of a small model's graph),
    # but the 8,192 most frequent tokens' rows int8 (+2.4 MB on SmolLM2; docs/quantize.md).
    "w4a16": QuantRecipe("w4a16", activation_bits=16, weight_bits=4, embedding_bits=4, sixteen_bit_weights=MIXES,
                         weight_rounding="gptq", weight_block=32, weight_range="mse", embedding_wide_rows=8192),
    "w8": QuantRecipe("w8", activation_bits=32, weight_bits=8, per_channel=False, weight_only=True, block_size=128),
    "w4": QuantRecipe("w4", activation_bits=32, weight_bits=4, per_channel=False, weight_only=True, block_size=32),
}


@dataclass
class QuantReport:
    recipe: dict
    profile: str
    calibration_samples: int
    sixteen_bit_tensors: int
    sixteen_bit_groups: dict[str, int] = field(default_factory=dict)
    sixteen_bit_weights: list[str] = field(default_factory=list)  # initializers stored as int16
    clipped_weights: int = 0  # int8 weights whose range the "mse" weight range narrowed (any channel)
    block_weights: int = 0  # MatMul weights stored as LPBQ int4 blocks (quant.lpbq)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def shared_weights(model: onnx.ModelProto) -> list[str]:
    """Initializers read both by a Gather (as its table) and by a MatMul/Gemm (as its weight)."""
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    multiplied = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}
    initializers = {t.name for t in model.graph.initializer}
    return sorted(gathered & multiplied & initializers)


_WEIGHT_AXIS = {"MatMul": 1, "Gemm": 0, "Conv": 0}  # the output-channel axis of each operator's weight


def _per_channel(config, model: onnx.ModelProto, profile: NpuProfile, keep_per_tensor: set[str]) -> None:  # noqa: ANN001
    """Switch weights to per-channel on the profile's operators, including weights the QNN helper pinned
    per-tensor (it targets QNN, where MatMul takes per-tensor weights only)."""
    config.per_channel = True
    axes = {op: _WEIGHT_AXIS[op] for op in profile.per_channel_ops if op in _WEIGHT_AXIS}
    config.extra_options["QDQOpTypePerChannelSupportToAxis"] = axes
    overrides = config.extra_options["TensorQuantOverrides"]
    initializers = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in axes and len(node.input) > 1 and node.input[1] in overrides and node.input[1] in initializers:
            name = node.input[1]
            if name not in keep_per_tensor and "axis" not in overrides[name][0]:
                overrides[name] = [{**overrides[name][0], "axis": axes[node.op_type]}]


class _Reader:
    """ORT CalibrationDataReader over a list of feed dicts, with the ``set_range`` ORT's strided
    calibration uses to collect a few runs at a time."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]], bar: Any = None) -> None:
        self._feeds = feeds
        self._i, self._end = 0, len(self._feeds)
        self._bar = bar  # a tqdm bar advanced once per calibration run, or None

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._i, self._end = start_index, min(end_index, len(self._feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= self._end:
            return None
        self._i += 1
        if self._bar is not None:
            self._bar.update(1)
        return self._feeds[self._i - 1]

    def rewind(self) -> None:
        self._i, self._end = 0, len(self._feeds)


def _chosen(model: onnx.ModelProto, names: Sequence[str], finder: GroupFinder | None, argument: str) -> dict[str, list[str]]:
    """{group: its tensors} for the groups ``names`` a recipe asks for, found by ``finder``."""
    if not names:
        return {}
    found = finder(model) if finder is not None else {}
    missing = [g for g in names if g not in found]
    if missing:
        raise ValueError(f"the recipe keeps tensor groups {', '.join(missing)} wide, which quantize(..., {argument}=...) "
                         f"does not find (it finds: {', '.join(found) or 'none'})")
    return {g: sorted(set(found[g])) for g in names}


def _overrides(model: onnx.ModelProto, chosen: dict[str, list[str]], wide: list[str],
               profile: NpuProfile, embedding_bits: int = 8, wide_rows: int = 0) -> dict[str, list[dict]]:
    """ORT's per-tensor overrides: 16-bit activations of the chosen groups, one symmetric int8 (int4) tensor for a
    tied embedding (the lookup and the head read it; with ``wide_rows``, the smaller of two such tables, which holds
    the frequent tokens' rows, stays int8), int16 for the wide weights; on QNN, uint8 LayerNorm scales."""
    from onnxruntime.quantization import QuantType

    overrides = {}
    if profile.qnn_toolchain:
        scales, biases = layer_norm_parameters(model)
        overrides = {name: [{"quant_type": QuantType.QUInt8, "symmetric": False}] for name in scales}
        overrides.update({name: [{"quant_type": QuantType.QUInt16, "symmetric": False}] for name in biases})
    overrides.update({name: [{"quant_type": QuantType.QUInt16}] for names in chosen.values() for name in names})
    initializers = {t.name: t for t in model.graph.initializer}
    shared = shared_weights(model)
    # Split in two (at most a quarter of the rows wide): the smaller table is the int8 one.
    int8_table = min(shared, key=lambda n: initializers[n].dims[0]) if wide_rows and len(shared) == 2 else None
    for name in shared:
        if embedding_bits == 4 and name != int8_table:
            # Symmetric on ±7 steps (ORT's own int4 grid is -8..7 steps of max|w| / 7.5): the rows the embed-rows
            # rewrite scaled to max |value| 1, and a GPTQ-rounded table, then keep their values exactly.
            peak = float(np.abs(onnx.numpy_helper.to_array(initializers[name])).max())
            overrides[name] = [{"quant_type": QuantType.QInt4, "scale": np.float32(max(peak, 1e-12) / 7), "zero_point": 0}]
        else:
            overrides[name] = [{"quant_type": QuantType.QInt8, "symmetric": True}]
    for name in wide:
        overrides[name] = [{"quant_type": QuantType.QInt16, "symmetric": True}]
    return overrides


def _ort_config(source: Path, tmp: Path, model: onnx.ModelProto, reader: Any, recipe: QuantRecipe, profile: NpuProfile,
                overrides: dict[str, list[dict]]) -> tuple[Path, Any]:
    """(the graph to quantize, ORT's StaticQuantConfig) for ``recipe`` on ``profile``."""
    from onnxruntime.quantization import CalibrationMethod, QuantType
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    activation = QuantType.QUInt16 if recipe.activation_bits == 16 else QuantType.QUInt8
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[recipe.calibration]
    if profile.qnn_toolchain:
        preprocessed = tmp / "preprocessed.onnx"
        if qnn_preprocess_model(source, preprocessed):
            source = preprocessed
    # ORT's QNN config helper also fixes mixed-precision boundaries (converts between 8- and 16-bit
    # tensors) and the types each operator needs; other profiles then switch on per-channel weights
    # for the operators they take them on.
    config = get_qnn_qdq_config(
        str(source), reader, calibrate_method=method, activation_type=activation,
        weight_type=QuantType.QInt4 if recipe.weight_bits == 4 else QuantType.QInt8, per_channel=recipe.per_channel and "Conv" in profile.per_channel_ops,
        init_overrides=overrides or None, activation_symmetric=False, weight_symmetric=True,
    )
    # ORT's calibrators keep every intermediate tensor of the runs of one collection pass (about
    # 0.6 GB per 256-token SmolLM2 run), and its CalibMaxIntermediateOutputs option drops data instead
    # of reducing it. A stride of one run per pass reduces ranges / histograms as they come.
    config.extra_options.update({"CalibPercentile": recipe.percentile, "CalibStridedMinMax": 1})
    if not profile.qnn_toolchain and recipe.per_channel:
        _per_channel(config, model, profile, keep_per_tensor=set(shared_weights(model)))
    return source, config


def _no_preprocessing_advice(record: logging.LogRecord) -> bool:
    """ORT advises shape-inference preprocessing on every call; the graphs are already static (and QNN's is run)."""
    return not str(record.msg).startswith("Please consider")


def _clipped(source: Path, tmp: Path, config) -> tuple[Path, int]:  # noqa: ANN001 - ORT's StaticQuantConfig
    """The graph at ``source`` with its weights clipped to their MSE ranges (:func:`clip_weights`), and how many.

    Calibration runs on this graph too. A recipe with ``weight_block`` skips it: its MatMul weights are quantized
    by ORT only to be replaced by their blocks (quant.lpbq), whose ranges GPTQ already searched, and clipping them
    per tensor would calibrate every activation on a broken model."""
    model = onnx.load(source)
    clipped = clip_weights(model, config)
    onnx.save(model, tmp / "clipped.onnx")
    return tmp / "clipped.onnx", clipped


def quantize(
    float_path: str | Path,
    out_path: str | Path,
    feeds: Sequence[dict[str, np.ndarray]] | Iterable[dict[str, np.ndarray]],
    recipe: QuantRecipe,
    profile: NpuProfile,
    progress: bool = False,
    groups: GroupFinder | None = None,
    weight_groups: GroupFinder | None = None,
) -> QuantReport:
    """Quantize the float graph at ``float_path`` into a QDQ graph at ``out_path`` (written atomically).

    ``feeds`` are calibration inputs (one dict of input name → array per run), real data from the
    calibration split; a ``Sequence`` is read item by item (it may build them on demand). ``groups`` and
    ``weight_groups`` find the named tensor groups the recipe keeps at 16 bits (``sixteen_bit``) or stores as
    int16 (``sixteen_bit_weights``). Returns what was done, including how many tensors were kept at 16 bits.
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize as ort_quantize

    started = time.perf_counter()
    if recipe.weight_only:
        from quant.weight_only import quantize_weights

        quantize_weights(Path(float_path), Path(out_path), recipe.weight_bits, recipe.block_size)
        report = QuantReport(recipe=recipe.to_dict(), profile=profile.name, calibration_samples=0, sixteen_bit_tensors=0,
                             seconds=time.perf_counter() - started)
        log.info("quantized %s → %s: %s", Path(float_path).name, Path(out_path).name, json.dumps(report.to_dict()))
        return report
    if not isinstance(feeds, Sequence):
        feeds = list(feeds)  # a sequence stays as it is: its items may be built on demand
    if not feeds:
        raise ValueError("quantization needs at least one calibration input")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(feeds), desc=f"calibrate {Path(float_path).name}", unit="run", disable=not progress)
    with bar, tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.name}.") as tmp:
        # A private copy: ORT writes '<stem>-inferred.onnx' next to its input, and two runs on one file race.
        source = Path(tmp) / "float.onnx"
        shutil.copyfile(float_path, source)
        model = onnx.load(source)
        chosen = _chosen(model, recipe.sixteen_bit, groups, "groups") if recipe.activation_bits == 8 else {}
        wide = sorted({n for names in _chosen(model, recipe.sixteen_bit_weights, weight_groups, "weight_groups").values()
                       for n in names})
        if recipe.activation_bits == 8 and profile.qnn_toolchain and wide:
            # QNN's HTP has no matmul of 8-bit activations by 16-bit weights: it refuses the node ("Failed to add
            # fused Matmul node") and the NPU would hand it to the CPU. The activations around an int16 weight
            # stay 16-bit.
            chosen["int16-weight-io"] = sorted({t for n in model.graph.node if n.op_type in _WEIGHT_AXIS
                                                and len(n.input) > 1 and n.input[1] in wide
                                                for t in (n.input[0], n.output[0])})
        overrides = _overrides(model, chosen, wide, profile, recipe.embedding_bits, recipe.embedding_wide_rows)
        sixteen_bit_activations = sum(1 for o in overrides.values() if o[0]["quant_type"] == QuantType.QUInt16)
        source, config = _ort_config(source, Path(tmp), model, _Reader(feeds, bar), recipe, profile, overrides)
        del model
        clipped = 0
        if recipe.weight_range == "mse" and not recipe.weight_block:  # blocks: see _clipped
            source, clipped = _clipped(source, Path(tmp), config)
        staged = Path(tmp) / "quantized.onnx"
        root = logging.getLogger()
        root.addFilter(_no_preprocessing_advice)
        try:
            ort_quantize(str(source), str(staged), config)
        finally:
            root.removeFilter(_no_preprocessing_advice)
        staged.replace(out_path)
    report = QuantReport(
        recipe=recipe.to_dict(), profile=profile.name, calibration_samples=len(feeds),
        sixteen_bit_tensors=sixteen_bit_activations, sixteen_bit_groups={g: len(v) for g, v in chosen.items()},
        sixteen_bit_weights=wide, clipped_weights=clipped,
        seconds=time.perf_counter() - started,
    )
    log.info("quantized %s → %s: %s", Path(float_path).name, out_path.name, json.dumps(report.to_dict()))
    return report
