"""Explanation methods. Each module registers its methods with ``@register_method``."""

from . import baselines, cam, gradient, perturbation
from .base import Applicability, MethodSpec, explain, get_method, list_methods, register_method

__all__ = [
    "Applicability", "MethodSpec", "explain", "get_method", "list_methods", "register_method",
    "baselines", "cam", "gradient", "perturbation",
]
