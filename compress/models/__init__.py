"""Student families beyond the teacher's own class, and their registration with transformers.

``register()`` imports :mod:`compress.models.mobilellm` and :mod:`compress.models.mu`, whose import registers
their config and model classes with ``AutoConfig``, ``AutoModelForCausalLM`` and
``AutoModelForSeq2SeqLM``. Every place in ``compress`` that loads a checkpoint calls it first; users
loading a student themselves call it (or import either module) before ``from_pretrained``. It is not
done when ``compress`` is imported because the modeling code it pulls in costs seconds of start-up.
"""

from __future__ import annotations


def register() -> None:
    """Make ``from_pretrained`` through the Auto classes know the MobileLLM-like and Mu-like students."""
    import compress.models.mobilellm  # noqa: F401 - registers on import
    import compress.models.mu  # noqa: F401 - registers on import
