"""Weight-only quantization for CPUs: float activations, matmul weights as int8 or int4 blocks.

Decoding one token reads every weight once, so on a CPU it runs at the speed weights stream from memory, and
ONNX Runtime's 16-bit Q/DQ graphs run as float there (it has no 16-bit kernels). Its ``MatMulNBits`` kernels
read packed integer blocks and compute with int8 activations (VNNI / AMX on x86): the graph for a user without
an NPU (the ``ort-cpu`` profile, the ``w8`` and ``w4`` recipes). Everything goes through
``onnxruntime.quantization``'s ``MatMulNBitsQuantizer``; this module only configures it and writes atomically.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx


def quantize_weights(float_path: Path, out_path: Path, bits: int, block_size: int) -> None:
    """Every MatMul of the float graph at ``float_path`` that reads a stored weight becomes ONNX Runtime's
    MatMulNBits: symmetric ``bits``-bit integers in blocks of ``block_size`` along the input, one scale per
    block, computed with int8 activations inside the kernel (accuracy level 4). No calibration. Written to
    ``out_path`` atomically."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=bits,
                                          op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(onnx.load(float_path), algo_config=config)
    ort_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = ort_log.level
    ort_log.setLevel(logging.WARNING)  # it logs two INFO lines per node
    try:
        quantizer.process()
    finally:
        ort_log.setLevel(level)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.name}.") as tmp:
        staged = Path(tmp) / "quantized.onnx"
        onnx.save(quantizer.model.model, staged)
        staged.replace(out_path)
