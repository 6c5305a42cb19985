"""saliencybench: score explanation methods for image classifiers against ground truth, end to end.

>>> import saliencybench as sb
>>> bundle = sb.load_model("synthetic-resnet")              # .model, .normalise, .classes
>>> data = sb.load_dataset("synthetic", n_images=8)
>>> x = bundle.normalise(torch.stack([s.image for s in data]))
>>> heat = sb.explain(bundle.model, x, None, method="gradcam")  # Tensor[B,H,W]; None: the top-1 classes
>>> sb.metrics.deletion(bundle.model, x, [s.label for s in data], heat)   # Tensor[B] AUC
>>> run = sb.run(sb.RunConfig(n_images=16)); run.report()

Importing the package loads the methods and metrics (torch, timm); the benchmark
stack (data sets, models, runner, pandas, plotting) loads on first use.
"""

from __future__ import annotations

from typing import Any

from . import methods, metrics
from .errors import InvalidInputError, NotApplicableError, SaliencyBenchError, UnknownNameError
from .methods import explain, explain_many, get_method, list_methods, register_method
from .metrics import get_metric, list_metrics, register_metric

__version__ = "0.1.0"

_LAZY = {
    "RunConfig": ("benchmark.config", "RunConfig"),
    "load_config": ("benchmark.config", "load_config"),
    "Run": ("benchmark.runner", "Run"),
    "open_run": ("benchmark.runner", "open_run"),
    "run": ("benchmark.runner", "run"),
    "load_model": ("benchmark.api", "load_model"),
    "load_dataset": ("benchmark.api", "load_dataset"),
    "list_models": ("benchmark.api", "list_models"),
    "list_datasets": ("benchmark.api", "list_datasets"),
    "show_heatmap": ("benchmark.overlay", "show_heatmap"),
    "inspect": ("inspect", None),
    "benchmark": ("benchmark", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'saliencybench' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    if module_name.startswith("benchmark"):
        from .benchmark import load_all

        load_all()
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "methods", "metrics", "explain", "explain_many", "get_method", "list_methods", "register_method", "get_metric",
    "list_metrics", "register_metric", "InvalidInputError", "NotApplicableError", "SaliencyBenchError",
    "UnknownNameError", "__version__", *_LAZY,
]
