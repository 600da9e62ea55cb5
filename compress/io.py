"""Atomic file writes and the cache directory. Nothing is ever left half-written under its final name."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Where fetched teachers and data live: ``$PDQ_CACHE`` or ``~/.cache/pdq-compress``."""
    root = os.environ.get("PDQ_CACHE") or Path.home() / ".cache" / "pdq-compress"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary name in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
        tmp = Path(handle.name)
    tmp.chmod(0o644)  # mkstemp creates 0600; a run's outputs are meant to be shared
    tmp.replace(path)


def write_json(path: str | Path, value: Any) -> None:
    """Write JSON atomically (see :func:`write_text`)."""
    write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    tmp.chmod(0o755)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


PROJECT_LOGGERS = ("compress", "distill", "quant", "importance", "benchmarks")


def project_records(record: logging.LogRecord) -> bool:
    """A log filter: the project's own INFO lines and everyone's warnings (the ONNX exporter's optimizer alone logs
    thousands of INFO lines, "Replaced initializer ...", that a user has no use for)."""
    return record.levelno >= logging.WARNING or record.name.split(".")[0] in PROJECT_LOGGERS
