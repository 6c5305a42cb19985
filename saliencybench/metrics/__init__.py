"""Metrics. Each module registers its metrics with ``@register_metric``."""

from .base import METRICS, MetricSpec, get_metric, list_metrics, register_metric
from .localisation import box_iou, heatmap_box, localisation_correct
from .perturbation_curves import deletion, deletion_insertion, insertion
from .pointing import energy_pointing_game, pointing_accuracy, pointing_game
from .complexity import complexity, sparseness
from .grid_pointing import grid_pointing_game
from .randomisation import random_logit
from .robustness import avg_sensitivity, local_lipschitz, max_sensitivity
from .sanity import sanity_randomization

__all__ = [
    "METRICS", "MetricSpec", "get_metric", "list_metrics", "register_metric", "box_iou", "heatmap_box",
    "localisation_correct", "deletion", "deletion_insertion", "insertion", "energy_pointing_game",
    "pointing_accuracy", "pointing_game", "sanity_randomization", "complexity", "sparseness", "grid_pointing_game",
    "random_logit", "avg_sensitivity", "local_lipschitz", "max_sensitivity",
]
