"""Activation-based importance of a model's prunable units (Minitron-style), torch only.

Receives plain probe points from its caller; knows nothing of model families or of pruning.
"""

from importance.collect import ImportanceScores, Probe, collect, removal_scores, skipped
from importance.reducers import (
    AGGREGATIONS,
    BatchStatistic,
    block_influence,
    channel_magnitudes,
    head_norms,
    reduce_sequence,
    weight_slice_norms,
)

__all__ = [
    "AGGREGATIONS",
    "BatchStatistic",
    "ImportanceScores",
    "Probe",
    "block_influence",
    "channel_magnitudes",
    "collect",
    "head_norms",
    "reduce_sequence",
    "removal_scores",
    "skipped",
    "weight_slice_norms",
]
