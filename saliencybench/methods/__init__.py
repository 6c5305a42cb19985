"""Explanation methods. Each module registers its methods with ``@register_method``."""

from . import baselines, cam, gradient, noise, perturbation, shared
from .base import Applicability, MethodSpec, explain, get_method, list_methods, register_method
from .shared import SharedPasses, explain_many

__all__ = [
    "Applicability", "MethodSpec", "explain", "get_method", "list_methods", "register_method",
    "baselines", "cam", "gradient", "noise", "perturbation", "shared", "SharedPasses", "explain_many",
]
