"""Pure NumPy/SciPy metrics of the modality gap: paired accuracy gap, layer similarity,
token alignment (APS) and correlations. No torch: inputs are arrays of hidden states or 0/1 scores.
"""

from lmeval_speech.metrics.alignment import (
    alignment_path_score,
    argmax_path,
    critical_tokens,
    dtw_path,
    monotonicity,
    path_scores,
    per_token_path,
    similarity_matrix,
)
from lmeval_speech.metrics.correlation import linear_fit, logistic_fit, point_biserial
from lmeval_speech.metrics.gap import mcnemar, paired_gap
from lmeval_speech.metrics.similarity import layer_similarity, layer_similarity_batch, mean_pool

__all__ = [
    "alignment_path_score",
    "argmax_path",
    "critical_tokens",
    "dtw_path",
    "layer_similarity",
    "layer_similarity_batch",
    "linear_fit",
    "logistic_fit",
    "mcnemar",
    "mean_pool",
    "monotonicity",
    "paired_gap",
    "path_scores",
    "per_token_path",
    "point_biserial",
    "similarity_matrix",
]
