"""saliencybench: score CNN explanation methods against ground truth, end to end.

>>> import saliencybench as sb
>>> heat = sb.explain(model, images, targets, method="gradcam")   # Tensor[B,H,W]
>>> sb.metrics.deletion(model, images, targets, heat)             # Tensor[B] AUC
"""

from . import methods, metrics
from .errors import InvalidInputError, NotApplicableError, SaliencyBenchError, UnknownNameError
from .methods import explain, get_method, list_methods, register_method
from .metrics import get_metric, list_metrics, register_metric

__version__ = "0.1.0"

__all__ = [
    "methods", "metrics", "explain", "get_method", "list_methods", "register_method", "get_metric",
    "list_metrics", "register_metric", "InvalidInputError", "NotApplicableError", "SaliencyBenchError",
    "UnknownNameError", "__version__",
]
