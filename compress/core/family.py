"""The registry of student families: what kind of small model a run makes from its teacher, as types.

A family implements the stages that differ between kinds of student: ``plan`` (the student's shape, written to
``plan.json``), ``prune`` (initialize it from the teacher into ``pruned/``), ``export`` and ``quantize`` (its
graphs under ``onnx/``), and says how its checkpoints are loaded, fed to the distillation trainer and scored
(``auto_class``, ``student_io``, ``reader``). Scoring, teacher correction, distillation and the report are
shared stages that ask the family for those. Each stage method takes the run's
:class:`compress.core.state.RunState` and returns the stage's metrics.

The built-in families live in :mod:`compress.families` (importing :mod:`compress` registers them). A new family
is one module with a :class:`StudentFamily` subclass and one :func:`register` call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from compress.evaluation.quality import CAUSAL, Reader, quality
from distill.students import CausalStudent, StudentIO


class StudentFamily:
    """One kind of student. Subclasses set ``name`` and ``description`` and implement the four stages."""

    name: ClassVar[str]
    description: ClassVar[str]
    # The plan prunes the teacher: an infeasible --target-size is refused before scoring, from the shapes alone.
    prunes_teacher: ClassVar[bool] = True
    # The plan may trim the vocabulary (``--axes ...,vocab``, see compress.pruning.vocab).
    trims_vocab: ClassVar[bool] = False
    # What the report suggests when the quantized graphs lose accuracy.
    calibration_hint: ClassVar[str] = "more `--quant-calib-samples`"
    # transformers model types whose checkpoints are this family's (the family of a checkpoint folder); a family
    # with none claims every checkpoint no other family claims.
    model_types: ClassVar[tuple[str, ...]] = ()
    # How its checkpoints load (an ``AutoModelFor...`` class name of transformers).
    auto_class: ClassVar[str] = "AutoModelForCausalLM"
    # It has graphs for weight-only CPU profiles (ort-cpu: float activations, MatMulNBits weights).
    weight_only_graphs: ClassVar[bool] = True
    # It has graphs whose int4 weights are LPBQ blocks (recipes with weight_block, e.g. w4a16).
    block_graphs: ClassVar[bool] = True
    # How the distillation trainer feeds it, and how evaluation reads its predictions.
    student_io: ClassVar[StudentIO] = CausalStudent()
    reader: ClassVar[Reader] = CAUSAL

    def score_set(self, model: Any, ids: torch.Tensor, top1: torch.Tensor | None, batch_size: int) -> tuple[float | None, float]:
        """(agreement with the teacher's ``top1``, perplexity) of ``model`` on one evaluation set's sequences, as the
        distillation stage tracks them."""
        result = quality(model, ids, batch_size, top1)
        return result.agreement, result.perplexity.perplexity

    def check_teacher(self, teacher_config: Any, config: Any) -> None:
        """Refuse, before any stage runs, a teacher this family cannot make a student of with ``config``'s options
        (UnsupportedArchitectureError naming what is missing); by default every teacher is taken."""

    def check_quant(self, config: Any) -> None:
        """Refuse, before any stage runs, ``config``'s recipe and NPU profile when this family has no such graphs
        (ConfigError saying what to use instead)."""
        from compress.errors import ConfigError
        from quant.profiles import get_profile
        from quant.quantize import PRESETS

        q, recipe = config.quant, PRESETS[config.quant.recipe]
        if get_profile(q.npu_profile).weight_only and not self.weight_only_graphs:
            # Without a weight-only form, ort-cpu would quantize nothing and report every weight as a violation.
            raise ConfigError(f"--student {self.name} has no graphs for --npu-profile {q.npu_profile} yet: use "
                              "--npu-profile qnn-htp (or generic-a8w8) with --quant a16w8 or a8w8, or --quant none")
        if recipe.weight_block and not self.block_graphs:
            raise ConfigError(f"--student {self.name} has no --quant {q.recipe} graphs yet (their int4 blocks are "
                              "GPTQ-rounded on the decoder-only export): use --quant a16w8")
        if recipe.weight_block and self.prunes_teacher and config.target.ratio != 1.0 and config.prune.align % recipe.weight_block:
            raise ConfigError(f"--quant {q.recipe} stores weights in blocks of {recipe.weight_block} inputs, which --align "
                              f"{config.prune.align} widths need not fill: use --align {max(recipe.weight_block, 64)}")

    def generation_graphs(self, model: Any, folder: Path, prompt_tokens: int, new_tokens: int, calib: Any,
                          recipe: Any, profile: Any, decode_calib_tokens: int) -> dict[str, dict[str, Path]]:
        """Graphs that generate ``new_tokens`` after a ``prompt_tokens`` prompt, float and quantized with ``recipe``
        for ``profile``: ``{"first": {"float": path, "quantized": path}, "step": {...}}``."""
        raise NotImplementedError

    def run_graphs(self, run_dir: Path, recipe: str) -> tuple[Path, Path]:
        """The (first, step) graphs a run of this family writes for ``recipe`` (``none``: the float ones):
        prefill and decode by default."""
        suffix = "" if recipe == "none" else f".{recipe}"
        return run_dir / "onnx" / f"model{suffix}.onnx", run_dir / "onnx" / f"decode{suffix}.onnx"

    @torch.no_grad()
    def begin_checkpoint_generation(self, model: Any, prompt: list[int]) -> tuple[Any, Any]:
        """(logits of the first new token, ``step(token) -> logits of the next``) for greedy decoding of a torch
        checkpoint of this family after ``prompt``; a causal model keeps its KV cache between steps."""
        result = model(input_ids=torch.tensor([prompt]), use_cache=True)
        state = {"cache": result.cache}

        @torch.no_grad()
        def step(token: int) -> Any:
            result = model(input_ids=torch.tensor([[token]]), cache=state["cache"], use_cache=True)
            state["cache"] = result.cache
            return result.logits[0, -1].float().numpy()

        return result.logits[0, -1].float().numpy(), step

    def begin_generation(self, first: Any, step: Any, prompt: list[int], model_config: Any) -> tuple[Any, Any]:
        """(cache, logits of the first new token) after ``prompt`` through the ``first`` and ``step`` graphs'
        sessions; ``cache.step(token)`` gives the logits of the next."""
        raise NotImplementedError

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
    if name not in FAMILIES:
        raise KeyError(f"unknown student family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_names() -> tuple[str, ...]:
    """The registered families' names, the built-in ones first."""
    return tuple(FAMILIES)


def load_model(path: Any, **kwargs: Any) -> Any:
    """A checkpoint of any student family, loaded with its family's ``auto_class``."""
    import transformers

    from compress.models import register as register_models

    register_models()  # the student families' own model classes, with transformers' Auto classes
    config = transformers.AutoConfig.from_pretrained(path)
    return getattr(transformers, family_of(config).auto_class).from_pretrained(path, **kwargs)


def family_of(model_config: Any) -> StudentFamily:
    """The family whose checkpoints have ``model_config``'s model type (the catch-all family otherwise)."""
    model_type = getattr(model_config, "model_type", None)
    claimed = [f for f in FAMILIES.values() if model_type in f.model_types]
    fallback = [f for f in FAMILIES.values() if not f.model_types]
    if not claimed and not fallback:
        raise KeyError(f"no student family loads model type {model_type!r}")
    return (claimed or fallback)[0]
