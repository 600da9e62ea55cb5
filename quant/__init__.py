"""Static-shape ONNX export, whole-graph QDQ post-training quantization, NPU profiles and graph checks.

Knows nothing of pruning, distillation or model families: it exports and quantizes whatever module it
is given (``compress.deploy.export`` builds the export-ready modules).

- :mod:`quant.ops`: operators that export to one ONNX node each (``rms_norm`` → ``RMSNormalization``);
- :mod:`quant.export`: ``export(module, example, path, input_names, output_names)``, static shapes only;
- :mod:`quant.quantize`: ``QuantRecipe`` (``PRESETS``: a16w8, a8w8) and ``quantize(...)`` through
  ``onnxruntime.quantization``;
- :mod:`quant.profiles`: ``NpuProfile`` (``PROFILES``: qnn-htp, generic-a8w8) and ``check(model, profile)``;
- :mod:`quant.runtime`: ONNX Runtime perplexity, agreement, prefill latency and a static-cache decode loop.
"""

from quant.profiles import PROFILES, NpuProfile, Violation, check, get_profile
from quant.quantize import PRESETS, QuantRecipe, quantize

__all__ = ["PRESETS", "PROFILES", "NpuProfile", "QuantRecipe", "Violation", "check", "get_profile", "quantize"]
