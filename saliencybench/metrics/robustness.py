"""Robustness of explanations to small input perturbations: max- and avg-sensitivity
(Yeh, Hsieh, Suggala, Inouye, Ravikumar. On the (In)fidelity and Sensitivity of
Explanations. NeurIPS 2019) and the local Lipschitz estimate (Alvarez-Melis, Jaakkola.
On the Robustness of Interpretability Methods. ICML-W 2018; Towards Robust
Interpretability with Self-Explaining Neural Networks. NeurIPS 2018).

All three call the explanation method again on perturbed copies of the images: every
perturbation of every image is explained in one :func:`~saliencybench.methods.base.explain`
call on the stacked batch (image-major: image i's k-th copy is row ``i * n_samples + k``,
the order of Captum's ``repeat_interleave``; the method batches internally). The
explanation of the clean image is the run's heatmap when one is given (the scorers pass
``ScoreBatch.heatmaps``), so no clean pass is repeated. Lower is better for all three. A run
scores them on its first 32 images by default (``n_images``: each image costs ``n_samples``
explanations).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import ConstantHeatmapWarning, InvalidInputError
from ..methods.base import add_note, explain, get_method
from ..modelutil import num_classes
from ..validation import check_images, check_targets
from .base import MetricResult, MetricSpec, ScoreBatch, get_metric, register_metric, register_metric_group

NOISES = ("uniform", "gaussian")
LIPSCHITZ_EPS = 1e-10  # Quantus' lipschitz_constant adds it to the input distance


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidInputError(f"{name} must be a finite number > 0, got {value!r}; e.g. {name}=0.02")
    return float(value)


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def perturbations(images: torch.Tensor, n_samples: int = 10, *, noise: str = "uniform", scale: float = 0.02,
                  seed: int = 0) -> torch.Tensor:
    """Perturbed copies x + delta of images Tensor[B,3,H,W]: Tensor[B*n_samples,3,H,W], image-major.

    ``noise="uniform"``: delta ~ U(-scale, scale) per input element (the L-infinity ball of
    radius ``scale``: Captum's ``default_perturb_func``, Quantus' ``batch_uniform_noise``);
    ``"gaussian"``: delta ~ N(0, scale^2) per element (Quantus' ``batch_gaussian_noise``).
    Drawn from ``seed`` by a generator on the images' device, in their dtype, in place (one
    buffer of B*n images): a seed gives the same draws on every run on a device type (CPU draws
    differ from CUDA draws); drawing full-resolution noise on the CPU and copying it would cost
    about as much as the gradient passes on a GPU.
    """
    images = check_images(images)
    _count("n_samples", n_samples)
    scale = _positive("scale", scale)
    if noise not in NOISES:
        raise InvalidInputError(f"noise must be one of {NOISES}, got {noise!r}")
    b = images.shape[0]
    shape = (b, n_samples, *images.shape[1:])
    g = torch.Generator(device=images.device)
    g.manual_seed(int(seed))
    if noise == "uniform":
        out = torch.rand(shape, generator=g, dtype=images.dtype, device=images.device).mul_(2 * scale).sub_(scale)
    else:
        out = torch.randn(shape, generator=g, dtype=images.dtype, device=images.device).mul_(scale)
    return out.add_(images[:, None]).view(b * n_samples, *images.shape[1:])


def _prepare(model: nn.Module, images: torch.Tensor, targets: Any, method: str, heatmaps: torch.Tensor | None,
             method_params: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Checked (images, targets, clean heatmaps Tensor[B,H,W], method parameters)."""
    get_method(method)
    images = check_images(images)
    b, _, h, w = images.shape
    targets = check_targets(targets, b, num_classes(model)).to(images.device)
    params = dict(method_params or {})
    if heatmaps is None:
        heatmaps = explain(model, images, targets, method, **params)
    if not isinstance(heatmaps, torch.Tensor) or tuple(heatmaps.shape) != (b, h, w):
        raise InvalidInputError(f"heatmaps must be a Tensor[B,H,W] = {(b, h, w)} (the method's maps of the clean "
                                f"images), got {getattr(heatmaps, 'shape', type(heatmaps).__name__)}")
    if not torch.isfinite(heatmaps).all():
        bad = (~torch.isfinite(heatmaps)).flatten(1).any(1).nonzero().flatten().tolist()
        raise InvalidInputError(f"heatmaps of samples {bad} contain NaN or infinite values; fix the method")
    return images, targets, heatmaps.to(images.device), params


def _explain_perturbed(model: nn.Module, perturbed: torch.Tensor, targets: torch.Tensor, method: str,
                       params: dict[str, Any], n: int) -> torch.Tensor:
    """Maps of the perturbed copies Tensor[B*n,3,H,W] for their images' targets: Tensor[B,n,H*W] float64."""
    maps = explain(model, perturbed, targets.repeat_interleave(n), method, **params)
    return maps.double().view(targets.shape[0], n, -1)


def sensitivities(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, method: str, heatmaps: torch.Tensor | None = None,
    method_params: dict[str, Any] | None = None, *, n_samples: int = 10, radius: float = 0.02, seed: int = 0,
) -> torch.Tensor:
    """Relative explanation changes ||Phi(x + delta_k) - Phi(x)||_F / ||Phi(x)||_F: Tensor[B,n_samples].

    delta_k ~ U(-radius, radius) per input element (:func:`perturbations`), Phi the method's
    map Tensor[H,W] (Frobenius norm over the map). An all-zero Phi(x) has no scale: its
    denominator is taken as 1, as Captum's ``sensitivity_max`` does (Quantus divides by 0);
    that is warned (:class:`ConstantHeatmapWarning`) and noted.
    """
    images, targets, heat, params = _prepare(model, images, targets, method, heatmaps, method_params)
    radius = _positive("radius", radius)
    n = _count("n_samples", n_samples)
    pert = perturbations(images, n, noise="uniform", scale=radius, seed=seed)
    maps = _explain_perturbed(model, pert, targets, method, params, n)
    clean = heat.double().flatten(1)
    denom = clean.norm(dim=1)
    zero = (denom == 0).nonzero().flatten().tolist()
    if zero:
        text = (f"sensitivity: the {method} maps of samples {zero} are all zero; their change is not divided by "
                "the map's norm (Captum's convention: denominator 1)")
        warnings.warn(text, ConstantHeatmapWarning, stacklevel=3)
        add_note(text)
    return (maps - clean[:, None]).norm(dim=2) / torch.where(denom == 0, torch.ones_like(denom), denom)[:, None]


_SENS_PAPER = ("Yeh, Hsieh, Suggala, Inouye, Ravikumar. On the (In)fidelity and Sensitivity of Explanations. "
               "NeurIPS 2019")
_SENS_CONSTRAINTS = {"n_samples": ">=1", "radius": ">0"}
_SCHEDULE = {"n_images": 32}


def _method_scorer(spec: MetricSpec, batch: ScoreBatch, p: dict[str, Any]) -> MetricResult:
    """Score a method-calling metric of this module on a batch, reusing the run's heatmaps as Phi(x)."""
    out = spec.fn(batch.model, batch.images, batch.targets, batch.method, batch.heatmaps, batch.method_params, **p)
    return MetricResult({spec.name: out.detach().cpu().numpy()})


@register_metric("max_sensitivity", paper=_SENS_PAPER, higher_is_better=False, inputs="method",
                 criterion="robustness", value_range=(0.0, math.inf), constraints=_SENS_CONSTRAINTS,
                 schedule=_SCHEDULE, scorer=_method_scorer, group="sensitivity")
def max_sensitivity(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, method: str, heatmaps: torch.Tensor | None = None,
    method_params: dict[str, Any] | None = None, *, n_samples: int = 10, radius: float = 0.02, seed: int = 0,
) -> torch.Tensor:
    """Max-sensitivity (Yeh et al. 2019): Tensor[B], lower is better.

    Protocol: max over ``n_samples`` draws delta ~ U(-radius, radius)^(3xHxW) of
    ||Phi(x + delta) - Phi(x)||_F / ||Phi(x)||_F (:func:`sensitivities`). Defaults are Captum's
    ``sensitivity_max`` (``perturb_radius=0.02``, ``n_perturb_samples=10``, ``norm_ord="fro"``,
    normalised by the clean map's norm) and equal it on the same draws; Quantus'
    ``MaxSensitivity`` computes the same quantity (defaults 200 samples, radius 0.2).
    images Tensor[B,3,H,W] normalised for the model, targets LongTensor[B]; ``heatmaps``
    Tensor[B,H,W] the method's maps of the clean images (computed when None);
    ``method_params`` the method's parameters. The model is left unchanged.
    """
    return sensitivities(model, images, targets, method, heatmaps, method_params, n_samples=n_samples,
                         radius=radius, seed=seed).amax(1).float()


@register_metric("avg_sensitivity", paper=_SENS_PAPER, higher_is_better=False, inputs="method",
                 criterion="robustness", value_range=(0.0, math.inf), constraints=_SENS_CONSTRAINTS,
                 schedule=_SCHEDULE, scorer=_method_scorer, group="sensitivity")
def avg_sensitivity(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, method: str, heatmaps: torch.Tensor | None = None,
    method_params: dict[str, Any] | None = None, *, n_samples: int = 10, radius: float = 0.02, seed: int = 0,
) -> torch.Tensor:
    """Avg-sensitivity (Yeh et al. 2019; Bhatt, Weller, Moura IJCAI 2020): Tensor[B], lower is better.

    As :func:`max_sensitivity` with the mean over the draws instead of the max (Quantus'
    ``AvgSensitivity``, which equals it on the same draws). Same seed, same draws as
    :func:`max_sensitivity`, so the two are scored from one set of explanations in a run.
    """
    return sensitivities(model, images, targets, method, heatmaps, method_params, n_samples=n_samples,
                         radius=radius, seed=seed).mean(1).float()


def _sensitivity_group(batch: ScoreBatch, requested: dict[str, dict[str, Any]]) -> dict[str, MetricResult]:
    """Score max- and avg-sensitivity together: one set of perturbed explanations when their
    parameters agree (the usual case), each on its own otherwise."""
    keys = {name: (p["n_samples"], p["radius"], p["seed"]) for name, p in requested.items()}
    out: dict[str, MetricResult] = {}
    if len(requested) == 2 and len(set(keys.values())) == 1:
        p = next(iter(requested.values()))
        s = sensitivities(batch.model, batch.images, batch.targets, batch.method, batch.heatmaps,
                          batch.method_params, **p)
        out["max_sensitivity"] = MetricResult({"max_sensitivity": s.amax(1).float().cpu().numpy()}, params=dict(p))
        out["avg_sensitivity"] = MetricResult({"avg_sensitivity": s.mean(1).float().cpu().numpy()}, params=dict(p))
        return out
    for name, p in requested.items():
        spec = get_metric(name)
        out[name] = _method_scorer(spec, batch, p)
        out[name].params = dict(p)
    return out


register_metric_group("sensitivity", _sensitivity_group)


@register_metric(
    "local_lipschitz",
    paper="Alvarez-Melis, Jaakkola. On the Robustness of Interpretability Methods. ICML-W 2018; Towards Robust "
    "Interpretability with Self-Explaining Neural Networks. NeurIPS 2018",
    higher_is_better=False, inputs="method", criterion="robustness", value_range=(0.0, math.inf),
    constraints={"n_samples": ">=1", "scale": ">0", "noise": NOISES}, schedule=_SCHEDULE, scorer=_method_scorer,
)
def local_lipschitz(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, method: str, heatmaps: torch.Tensor | None = None,
    method_params: dict[str, Any] | None = None, *, n_samples: int = 10, noise: str = "gaussian", scale: float = 0.1,
    normalise: bool = True, seed: int = 0,
) -> torch.Tensor:
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018): Tensor[B], lower is better.

    Protocol (Quantus' ``LocalLipschitzEstimate``): for ``n_samples`` neighbours x' = x + delta,
    delta ~ N(0, scale^2) per input element (``noise="gaussian"``, Quantus' default
    ``perturb_std=0.1``; ``"uniform"``: U(-scale, scale), the L-infinity ball of radius ``scale``
    of the paper's B_eps(x)), the estimate is max_k ||Phi(x) - Phi(x'_k)||_2 / (||x - x'_k||_2 + 1e-10)
    (norms over the flattened map and image; 1e-10 as Quantus). ``normalise=True`` divides every
    map by its own max |value| first (Quantus' default ``normalise_by_max``, which Quantus applies
    per call batch: equal to ours with Quantus ``batch_size=1``); all-zero maps stay zero.
    Quantus draws 200 neighbours by default; we draw ``n_samples=10`` (as the sensitivities),
    since each costs one explanation per image: the max over more draws is larger.
    Shapes and ``heatmaps``/``method_params`` as :func:`max_sensitivity`.
    """
    images, targets, heat, params = _prepare(model, images, targets, method, heatmaps, method_params)
    n = _count("n_samples", n_samples)
    pert = perturbations(images, n, noise=noise, scale=scale, seed=seed)
    maps = _explain_perturbed(model, pert, targets, method, params, n)
    clean = heat.double().flatten(1)[:, None]
    if normalise:
        maps = maps / torch.where((m := maps.abs().amax(2, keepdim=True)) == 0, torch.ones_like(m), m)
        clean = clean / torch.where((c := clean.abs().amax(2, keepdim=True)) == 0, torch.ones_like(c), c)
    b = images.shape[0]
    dx = (pert.double().view(b, n, -1) - images.double().flatten(1)[:, None]).norm(dim=2)
    return ((maps - clean).norm(dim=2) / (dx + LIPSCHITZ_EPS)).amax(1).float()
