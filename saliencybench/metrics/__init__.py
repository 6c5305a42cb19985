"""Metrics. Each module registers its metrics with ``@register_metric``."""

from .base import METRICS, MetricSpec, get_metric, list_metrics, register_metric
from .complexity import complexity, sparseness
from .contrast import model_contrast, model_contrast_score
from .faithfulness import (average_drop, confidence_change, faithfulness_correlation, increase_in_confidence,
                           infidelity)
from .grid_pointing import grid_pointing_game
from .localisation import box_iou, cam_code_box, heatmap_box, localisation_correct, normalise_heatmaps
from .perturbation_curves import deletion, deletion_insertion, insertion, score_perturbation_curves
from .pointing import energy_pointing_game, pointing_accuracy, pointing_game, pointing_reduce, torchray_smooth
from .randomisation import random_logit
from .road import road, road_lerf, road_morf, road_perturbations
from .robustness import avg_sensitivity, local_lipschitz, max_sensitivity
from .sanity import sanity_randomization
from .wsol import box_hits, max_box_acc, max_box_acc_reduce, pixel_counts, pxap, pxap_reduce

__all__ = [
    "METRICS", "MetricSpec", "get_metric", "list_metrics", "register_metric", "box_iou", "cam_code_box", "heatmap_box",
    "localisation_correct", "normalise_heatmaps", "deletion", "deletion_insertion", "insertion",
    "score_perturbation_curves", "energy_pointing_game", "pointing_accuracy", "pointing_game", "pointing_reduce",
    "torchray_smooth", "sanity_randomization", "box_hits", "max_box_acc", "max_box_acc_reduce", "pixel_counts", "pxap",
    "pxap_reduce", "complexity", "sparseness", "grid_pointing_game", "random_logit", "avg_sensitivity",
    "local_lipschitz", "max_sensitivity", "average_drop", "confidence_change", "faithfulness_correlation",
    "increase_in_confidence", "infidelity", "road", "road_lerf", "road_morf", "road_perturbations",
    "model_contrast", "model_contrast_score",
]
