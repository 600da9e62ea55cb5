"""The built-in student families (``--student``), registered in :mod:`compress.core.family` on import:

- ``minitron``: the teacher pruned by importance along heads, hidden channels, MLP neurons and layers, then
  distilled (:mod:`compress.families.minitron`);
- ``mobilellm``: the same, deep and thin, each kept block applied twice (MobileLLM's block-wise weight sharing);
- ``mu``: a Mu-like encoder-decoder initialized from the teacher and distilled across architectures
  (:mod:`compress.families.mu`).

A new family is one module here with a :class:`~compress.core.family.StudentFamily` subclass and its
``register`` call, plus its import line below.
"""

from compress.core.family import FAMILIES, StudentFamily, family_names, family_of, get_family, register
from compress.families import minitron, mu  # noqa: F401 - each registers its families

__all__ = ["FAMILIES", "StudentFamily", "family_names", "family_of", "get_family", "register"]
