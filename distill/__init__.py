"""Knowledge-distillation retraining, torch only: losses, schedules, optimizers, the loop, checkpoints.

Knows nothing of pruning: it takes a student, a teacher, token batches (or (input, output) ``Pairs``) and a
``DistillConfig``. Low-rank adapters come from ``peft`` (see :mod:`compress.app.finetune`): the trainer trains
whatever parameters require gradients.
"""

from distill.checkpoint import checkpoints, latest_checkpoint
from distill.config import DistillConfig, DistillError, DistillResult
from distill.losses import HiddenStateLoss, logit_distillation_loss
from distill.objective import KnowledgeDistillationLoss
from distill.pairs import Pairs
from distill.students import CausalStudent, EncoderDecoderStudent, StudentIO
from distill.trainer import distill

__all__ = [
    "CausalStudent",
    "DistillConfig",
    "DistillError",
    "DistillResult",
    "EncoderDecoderStudent",
    "HiddenStateLoss",
    "KnowledgeDistillationLoss",
    "Pairs",
    "StudentIO",
    "checkpoints",
    "distill",
    "latest_checkpoint",
    "logit_distillation_loss",
]
