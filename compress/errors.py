"""The errors a user can cause. Each message names what was given, what is allowed and what to do next."""

from __future__ import annotations


class CompressError(Exception):
    """Base of every error pdq-compress raises for bad input or an unusable environment."""


class ConfigError(CompressError):
    """A flag or config field has a value that is not allowed."""


class TeacherNotFoundError(CompressError):
    """The teacher is neither a built-in alias, a local model, a GGUF file nor a reachable hub id."""


class DataError(CompressError):
    """The data cannot be read, or holds too little text for what was asked."""


class UnsupportedArchitectureError(CompressError):
    """The model's family is not in the architecture registry, or lacks a module the registry expects."""


class PlanInfeasibleError(CompressError):
    """No candidate shape meets the target size under the alignment and tolerance rules."""


class RunDirectoryError(CompressError):
    """The output directory cannot be written, or holds a run that is incompatible with this one."""
