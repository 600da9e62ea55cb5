"""Export a module to a static-shape ONNX graph (torch's dynamo exporter), written atomically."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from quant.ops import OPSET, TRANSLATIONS
from quant.profiles import check as check_graph
from quant.profiles import get_profile

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The exporter produced a graph that breaks the static-shape rules."""


def export(
    module: nn.Module,
    example: Sequence[torch.Tensor],
    path: str | Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> Path:
    """Export ``module`` called on ``example`` to ``path`` with every dimension fixed.

    The graph uses opset 23 (``quant.ops.OPSET``), the ops of ``quant.ops`` as single nodes, and
    keeps a tensor used twice (a tied embedding) as one initializer. Raises ExportError if any
    dimension is dynamic or control flow / shape arithmetic is left in the graph.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    quiet = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(quiet), _quiet_exporter(), warnings.catch_warnings():
        # torch's exporter warns about its own internals (LeafSpec deprecations), nothing a user can act on
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            module, tuple(example), dynamo=True, opset_version=OPSET, custom_translation_table=TRANSLATIONS,
            input_names=list(input_names), output_names=list(output_names), optimize=True, verbose=False,
        )
    model = program.model_proto
    problems = [v for v in check_graph(model, get_profile("generic-a8w8"), quantized=False) if v.kind != "op"]
    if problems:
        raise ExportError("the exported graph is not static: " + "; ".join(map(str, problems[:5])))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a run's graphs are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextlib.contextmanager
def _quiet_exporter():  # noqa: ANN202
    names = ("torch.onnx", "torch.export", "onnxscript")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


__all__ = ["ExportError", "export"]
