"""Metrics. Each module registers its metrics with ``@register_metric``."""

from .base import METRICS, MetricSpec, get_metric, list_metrics, register_metric
from .localisation import box_iou, heatmap_box, localisation_correct
from .perturbation_curves import deletion, deletion_insertion, insertion
from .pointing import energy_pointing_game, pointing_accuracy, pointing_game
from .sanity import sanity_randomization

__all__ = [
    "METRICS", "MetricSpec", "get_metric", "list_metrics", "register_metric", "box_iou", "heatmap_box",
    "localisation_correct", "deletion", "deletion_insertion", "insertion", "energy_pointing_game",
    "pointing_accuracy", "pointing_game", "sanity_randomization",
]
