"""Explanation methods. Each module registers its methods with ``@register_method``."""

from . import tokens  # noqa: I001 (first: installs the token-to-map geometry that layer capture uses)
from . import applicability, baselines, cam, cam_variants, gradient, noise, perturbation, shared, transformer
from .base import Applicability, MethodSpec, explain, get_method, list_methods, register_method
from .shared import SharedPasses, explain_many

__all__ = [
    "Applicability", "MethodSpec", "explain", "get_method", "list_methods", "register_method", "applicability",
    "baselines", "cam", "cam_variants", "gradient", "noise", "perturbation", "shared", "tokens", "transformer",
    "SharedPasses", "explain_many",
]
