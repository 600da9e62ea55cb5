"""Knowledge-distillation retraining, torch only: losses, schedules, optimizers, the loop, checkpoints.

Knows nothing of pruning: it takes a student, a teacher, token batches and a ``DistillConfig``.
"""

from distill.checkpoint import checkpoints, latest_checkpoint
from distill.config import DistillConfig, DistillError, DistillResult
from distill.losses import HiddenStateLoss, logit_distillation_loss
from distill.trainer import KnowledgeDistillationLoss, distill

__all__ = [
    "DistillConfig",
    "DistillError",
    "DistillResult",
    "HiddenStateLoss",
    "KnowledgeDistillationLoss",
    "checkpoints",
    "distill",
    "latest_checkpoint",
    "logit_distillation_loss",
]
