"""Student families: what kind of small model a run makes from its teacher, as types in a registry.

A family implements the stages that differ between kinds of student: ``plan`` (the student's shape, written to
``plan.json``), ``prune`` (initialize it from the teacher into ``pruned/``), ``export`` and ``quantize`` (its
graphs under ``onnx/``). Scoring, teacher correction, distillation and the report are shared: the trainer
learns across architectures (see :mod:`distill.trainer`). Each method takes the run's
:class:`compress.runstate.RunState` and returns the stage's metrics.

Built in (``--student``):

- ``minitron``: the teacher pruned by importance along heads, hidden channels, MLP neurons and layers, then
  distilled (:mod:`compress.families.minitron`);
- ``mobilellm``: the same, deep and thin, each kept block applied twice (MobileLLM's block-wise weight sharing);
- ``mu``: a Mu-like encoder-decoder initialized from the teacher and distilled across architectures
  (:mod:`compress.families.mu`).

A new family is one module with a :class:`StudentFamily` subclass and one :func:`register` call.
"""

from __future__ import annotations

from typing import Any, ClassVar


class StudentFamily:
    """One kind of student. Subclasses set ``name`` and ``description`` and implement the four stages."""

    name: ClassVar[str]
    description: ClassVar[str]
    # The plan prunes the teacher: an infeasible --target-size is refused before scoring, from the shapes alone.
    prunes_teacher: ClassVar[bool] = True
    # What the report suggests when the quantized graphs lose accuracy.
    calibration_hint: ClassVar[str] = "more `--quant-calib-samples`"

    def plan(self, state: Any) -> dict[str, Any]:
        raise NotImplementedError

    def prune(self, state: Any) -> dict[str, Any]:
        raise NotImplementedError

    def export(self, state: Any) -> dict[str, Any]:
        raise NotImplementedError

    def quantize(self, state: Any) -> dict[str, Any]:
        raise NotImplementedError


FAMILIES: dict[str, StudentFamily] = {}


def register(family: StudentFamily) -> StudentFamily:
    """Add ``family`` to the registry under its name (a later registration of the same name replaces it)."""
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> StudentFamily:
    """The registered family called ``name``; KeyError naming the known ones otherwise."""
    _builtins()
    if name not in FAMILIES:
        raise KeyError(f"unknown student family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_names() -> tuple[str, ...]:
    """The registered families' names, the built-in ones first."""
    _builtins()
    return tuple(FAMILIES)


def _builtins() -> None:
    # Imported on first use: the family modules import the run's machinery, which imports the config.
    from compress.families import minitron, mu  # noqa: F401
