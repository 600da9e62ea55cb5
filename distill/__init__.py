"""Knowledge-distillation retraining, torch only: losses, schedules, optimizers, the loop, checkpoints.

Knows nothing of pruning: it takes a student, a teacher, token batches (or (input, output) ``Pairs``) and a
``DistillConfig``; ``distill.lora`` trains low-rank adapters instead of the whole student.
"""

from distill.checkpoint import checkpoints, latest_checkpoint
from distill.config import DistillConfig, DistillError, DistillResult
from distill.lora import LoraConfig, add_lora_, load_lora_, lora_state_dict, merge_lora_
from distill.losses import HiddenStateLoss, logit_distillation_loss
from distill.pairs import Pairs
from distill.trainer import KnowledgeDistillationLoss, distill

__all__ = [
    "DistillConfig",
    "DistillError",
    "DistillResult",
    "HiddenStateLoss",
    "KnowledgeDistillationLoss",
    "LoraConfig",
    "Pairs",
    "add_lora_",
    "checkpoints",
    "distill",
    "latest_checkpoint",
    "load_lora_",
    "logit_distillation_loss",
    "lora_state_dict",
    "merge_lora_",
]
