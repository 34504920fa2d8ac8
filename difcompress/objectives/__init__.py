"""Distillation objectives: LIFT, PLACE and the baselines they are compared against.

Pure tensor functions, no model code and no I/O: ``core`` (the affine fit, LIFT, PLACE),
``baselines`` (task, output MSE, DIST), ``feature`` (adapters and feature KD),
``variance`` (VLB and KL to the teacher for learned-variance models) and ``registry``
(every objective the CLI offers, by name).
"""

from difcompress.objectives.baselines import dist_loss, mse_loss, task_loss
from difcompress.objectives.core import (
    COARSE_NORMS,
    FIT_EPS,
    PLACE_GROUP_SIZE,
    KDTerms,
    affine_fit,
    coarse_term,
    coarse_to_fine_loss,
    fine_term,
    group_sizes,
    lift_loss,
    place_loss,
)
from difcompress.objectives.feature import (
    FeatureAdapters,
    feature_loss,
    massive_activation_mask,
)
from difcompress.objectives.registry import (
    LOSS_NAMES,
    OBJECTIVES,
    Objective,
    OutputOptions,
    get_objective,
    kd_loss,
)

__all__ = [
    "COARSE_NORMS", "FIT_EPS", "PLACE_GROUP_SIZE", "KDTerms", "affine_fit", "coarse_term", "coarse_to_fine_loss",
    "fine_term", "group_sizes", "lift_loss", "place_loss", "task_loss", "mse_loss", "dist_loss", "FeatureAdapters",
    "feature_loss", "massive_activation_mask", "LOSS_NAMES", "OBJECTIVES", "Objective", "OutputOptions",
    "get_objective", "kd_loss",
]
