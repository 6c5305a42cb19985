"""saliencybench: score CNN explanation methods against ground truth, end to end.

>>> import saliencybench as sb
>>> heat = sb.explain(model, images, targets, method="gradcam")   # Tensor[B,H,W]
>>> sb.metrics.deletion(model, images, targets, heat)             # Tensor[B] AUC
"""

from . import inspect, methods, metrics
from .benchmark import load_all as _load_all
from .benchmark.config import RunConfig, load_config
from .benchmark.runner import Run, open_run, run
from .errors import InvalidInputError, NotApplicableError, SaliencyBenchError, UnknownNameError
from .methods import explain, explain_many, get_method, list_methods, register_method
from .metrics import get_metric, list_metrics, register_metric

__version__ = "0.1.0"

_load_all()

__all__ = [
    "inspect", "methods", "metrics", "explain", "explain_many", "get_method", "list_methods", "register_method", "get_metric",
    "list_metrics", "register_metric", "InvalidInputError", "NotApplicableError", "SaliencyBenchError",
    "UnknownNameError", "__version__", "RunConfig", "load_config", "Run", "open_run", "run",
]
