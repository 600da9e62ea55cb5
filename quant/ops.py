"""Operators that export to one ONNX node each, so that quantization sees them whole.

Exported as plain torch code, RMSNorm becomes Pow → ReduceMean → Add → Sqrt → Div → Mul, and a QDQ
quantizer then rounds x² on its own: one outlier token sets the range and every other token's x²
rounds to zero. ``rms_norm`` here exports to the single ONNX ``RMSNormalization`` (opset 23), whose
internal arithmetic stays in float on every runtime.
"""

from __future__ import annotations

import torch
from onnxscript import opset23

OPSET = 23  # RMSNormalization appeared in opset 23; 16-bit Q/DQ needs >= 21


@torch.library.custom_op("pdq::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square normalization over the last dimension, times ``weight``."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


@rms_norm.register_fake
def _rms_norm_shape(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


def _rms_norm_onnx(x, weight, eps: float):  # noqa: ANN001, ANN202
    return opset23.RMSNormalization(x, weight, axis=-1, epsilon=eps)


#: ``custom_translation_table`` for ``torch.onnx.export``: every op of this module to its ONNX node.
TRANSLATIONS = {torch.ops.pdq.rms_norm.default: _rms_norm_onnx}
