"""Faithfulness metrics that score a map against the model's response to random or
map-shaped perturbations: faithfulness correlation, average drop and increase in
confidence, infidelity. Each function's docstring states its protocol.

All take images Tensor[B,3,H,W] normalised for the model, targets LongTensor[B]
and heatmaps Tensor[B,H,W] at the input resolution; a heatmap is a map-level
explanation, so where a protocol needs an attribution per input value the
pixel's heatmap value is used for each of its three channels. Perturbed inputs
of all images share forward passes of ``batch_size`` on the model's device
(:func:`~saliencybench.modelutil.fast_inference` for float32), the model is left
as it was (:func:`~saliencybench.modelutil.model_guard`), and the random draws
come from ``seed`` on the CPU, so results are deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError
from ..methods.base import batch_slices, generator
from ..modelutil import (SCORES, fast_inference, model_guard, num_classes, resolve_batch_size, safe_forward,
                         target_score, upcast)
from ..validation import check_heatmaps, check_images, check_targets
from .base import MetricResult, MetricSpec, ScoreBatch, register_metric, register_metric_group
from .road import stream_scores

BHATT = ("Bhatt, Weller, Moura. Evaluating and Aggregating Feature-based Model Explanations. IJCAI 2020")
GRADCAMPP = ("Chattopadhyay, Sarkar, Howlader, Balasubramanian. Grad-CAM++: Generalized Gradient-Based Visual "
             "Explanations for Deep Convolutional Networks. WACV 2018")
YEH = ("Yeh, Hsieh, Suggala, Inouye, Ravikumar. On the (In)fidelity and Sensitivity of Explanations. "
       "NeurIPS 2019")
BASELINES = ("black", "white", "mean", "zeros")
FEATURES = ("pixel", "element")


def _inputs(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor):
    """Checked (images, targets, heatmaps in the images' dtype and device)."""
    images = check_images(images)
    targets = check_targets(targets, images.shape[0], num_classes(model)).to(images.device)
    check_heatmaps(heatmaps, images)
    return images, targets, heatmaps.reshape(images.shape[0], *images.shape[2:]).to(images.device, images.dtype)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidInputError(message)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _constant_maps(heatmaps: torch.Tensor, metric: str, why: str) -> None:
    flat = heatmaps.flatten(1)
    const = (flat.amax(1) == flat.amin(1)).nonzero().flatten().tolist()
    _require(not const, f"heatmaps of samples {const} are constant (e.g. all zero): {metric} is undefined for a "
                        f"constant map ({why}); fix the method that produced them")


def _scorer(model: nn.Module, fmt: Callable[[torch.Tensor], torch.Tensor], score: str
            ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return target_score(upcast(safe_forward(model, fmt(x))), t, score)
    return forward


def _clean_scores(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor,
                  targets: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([forward(images[sl], targets[sl]) for sl in batch_slices(len(images), batch_size)])


# ---- faithfulness correlation -------------------------------------------------------------------


def random_subsets(b: int, n_features: int, subset_size: int, n_runs: int, seed: int = 0) -> torch.Tensor:
    """Uniform random subsets without replacement: LongTensor[B, n_runs, subset_size] of
    indices in [0, n_features), drawn on the CPU from ``seed`` (image-major, then run):
    the ``subset_size`` smallest of ``n_features`` float64 uniform keys per (image, run)."""
    g = generator(seed)
    rows = b * n_runs
    chunk = max(1, (1 << 22) // n_features)
    out = [torch.rand(min(chunk, rows - r), n_features, generator=g, dtype=torch.float64)
           .topk(subset_size, dim=1, largest=False).indices for r in range(0, rows, chunk)]
    return torch.cat(out).view(b, n_runs, subset_size)


@register_metric("faithfulness_correlation", paper=BHATT, higher_is_better=True, inputs="model",
                 criterion="faithfulness", value_range=(-1.0, 1.0), scaled=lambda h, w: {"subset_size": w},
                 constraints={"subset_size": ">=1", "n_runs": ">=2", "feature": FEATURES, "score": SCORES,
                              "baseline": lambda v: None if isinstance(v, (int, float)) or v in BASELINES
                              else f"must be a number or one of {list(BASELINES)}"})
def faithfulness_correlation(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, *,
    subset_size: int | None = None, n_runs: int = 100, baseline: str | float = "black", feature: str = "pixel",
    score: str = "logit", seed: int = 0, batch_size: int | str = 64,
) -> torch.Tensor:
    """Faithfulness correlation (higher is better): Pearson r of subset attribution and score drop.

    Protocol (Bhatt et al.; Quantus' ``FaithfulnessCorrelation`` defaults). For
    each of ``n_runs`` runs draw a random subset of ``subset_size`` features
    (:func:`random_subsets`, from ``seed``), set them to ``baseline`` and record
    the drop of the target's ``score`` (default the logit, as Quantus' default
    ``softmax=False``), ``f(x) - f(x_S=baseline)``, and the heatmap summed over
    the subset; the value per image is the Pearson correlation of the two over
    the runs (NaN if either is constant over the runs). ``feature="pixel"``
    (default): a feature is a pixel, all its channels set together;
    ``"element"``: a (channel, pixel) value, the heatmap broadcast to the three
    channels (what Quantus does with a [B,1,H,W] map on RGB images).
    ``subset_size`` default: the image width (Quantus' 224 at 224 px);
    ``baseline``: ``"black"`` (the image's minimum, Quantus' default), ``"white"``
    (maximum), ``"mean"`` (the image's mean), ``"zeros"`` or a number (in
    normalised space). Returns Tensor[B].
    """
    images, targets, heat = _inputs(model, images, targets, heatmaps)
    b, c, h, w = images.shape
    n_features = h * w if feature == "pixel" else c * h * w
    subset_size = w if subset_size is None else subset_size
    _require(feature in FEATURES, f"feature must be one of {FEATURES}, got {feature!r}")
    _require(_is_int(subset_size) and 1 <= subset_size < n_features,
             f"subset_size must be an integer in [1, {n_features}) ({feature}s of the image), got {subset_size!r}")
    _require(_is_int(n_runs) and n_runs >= 2, f"n_runs must be an integer >= 2 (a correlation), got {n_runs!r}")
    flat = images.flatten(1)
    values = {"black": flat.amin(1), "white": flat.amax(1), "mean": flat.mean(1), "zeros": flat.new_zeros(b)}
    _require(not isinstance(baseline, bool) and (isinstance(baseline, (int, float)) or baseline in values),
             f"baseline must be a number or one of {BASELINES}, got {baseline!r}")
    base = values[baseline] if isinstance(baseline, str) else flat.new_full((b,), float(baseline))
    _constant_maps(heat, "faithfulness correlation", "its summed attribution is the same for every subset")
    batch_size = resolve_batch_size(batch_size, model, images)
    subsets = random_subsets(b, n_features, subset_size, n_runs, seed).to(images.device)
    attr = heat.flatten(1).gather(1, (subsets % (h * w)).flatten(1)).view(b, n_runs, subset_size).sum(2)

    def stacks() -> Iterator[torch.Tensor]:
        for i in range(b):
            x = images[i].expand(n_runs, c, h, w).clone()
            idx = subsets[i]
            if feature == "pixel":
                x.view(n_runs, c, h * w).scatter_(2, idx[:, None].expand(n_runs, c, subset_size),
                                                  base[i].expand(n_runs, c, subset_size))
            else:
                x.view(n_runs, -1).scatter_(1, idx, base[i].expand(n_runs, subset_size))
            yield x

    with model_guard(model), torch.inference_mode(), fast_inference(model, images) as fmt:
        forward = _scorer(model, fmt, score)
        clean = _clean_scores(forward, images, targets, batch_size)
        perturbed = stream_scores(stacks(), targets.repeat_interleave(n_runs), batch_size, forward)
    drops = (clean[:, None] - perturbed.view(b, n_runs)).double()
    a = attr.double() - attr.double().mean(1, keepdim=True)
    d = drops - drops.mean(1, keepdim=True)
    r = (a * d).sum(1) / ((a * a).sum(1) * (d * d).sum(1)).sqrt()
    return r.to(images.dtype)


# ---- average drop and increase in confidence ----------------------------------------------------


def explanation_maps(images: torch.Tensor, heatmaps: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++'s explanation maps E = image * (heatmap min-max normalised to [0, 1] per image):
    Tensor[B,3,H,W], in the images' normalised space (as pytorch-grad-cam's ``multiply_tensor_with_cam``)."""
    flat = heatmaps.flatten(1)
    lo, hi = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
    return images * ((heatmaps - lo) / (hi - lo))[:, None]


def confidence_change(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, *,
    batch_size: int | str = 64, clean_logits: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Average drop and increase in confidence per image from one forward pass of the explanation maps:
    ``{"average_drop": Tensor[B], "increase_in_confidence": Tensor[B]}``.

    Protocol (Chattopadhyay et al., Grad-CAM++, Sec. 6.1): Y = the target's
    softmax probability on the image, O = the same on the explanation map
    (:func:`explanation_maps`); the paper calls both the model's "output score"
    for the class, its percentages being of confidences, so we take softmax
    probabilities (as pytorch-grad-cam's ``ClassifierOutputSoftmaxTarget``).
    Per image: drop ``max(0, Y - O) / Y`` (the paper's Average Drop % is 100 x
    the mean over images) and increase ``1 if O > Y else 0`` (the paper's %
    Increase in Confidence is 100 x the mean). ``clean_logits`` Tensor[B,C]:
    the images' logits when the caller has them (then the images are not scored).
    """
    images, targets, heat = _inputs(model, images, targets, heatmaps)
    _constant_maps(heat, "the Grad-CAM++ explanation map", "min-max normalisation divides by max - min = 0")
    batch_size = resolve_batch_size(batch_size, model, images)
    maps = explanation_maps(images, heat)
    with model_guard(model), torch.inference_mode(), fast_inference(model, images) as fmt:
        forward = _scorer(model, fmt, "probability")
        clean = target_score(clean_logits.to(images.device), targets, "probability") if clean_logits is not None \
            else _clean_scores(forward, images, targets, batch_size)
        explained = _clean_scores(forward, maps, targets, batch_size)
    clean = clean.to(explained.dtype)
    return {"average_drop": (clean - explained).clamp(min=0) / clean,
            "increase_in_confidence": (explained > clean).to(explained.dtype)}


def confidence_group_scorer(batch: ScoreBatch, requested: dict[str, dict[str, Any]]) -> dict[str, MetricResult]:
    """Both confidence metrics from one forward of the explanation maps (and the batch's clean logits)."""
    batch_size = next(iter(requested.values())).get("batch_size", 64)
    out = confidence_change(batch.model, batch.images, batch.targets, batch.heatmaps, batch_size=batch_size,
                            clean_logits=batch.logits)
    return {name: MetricResult({name: out[name]}, params=dict(p)) for name, p in requested.items()}


def _confidence_member(spec: MetricSpec, batch: ScoreBatch, params: dict[str, Any]) -> MetricResult:
    return confidence_group_scorer(batch, {spec.name: params})[spec.name]


register_metric_group("confidence", confidence_group_scorer)


@register_metric("average_drop", paper=GRADCAMPP, higher_is_better=False, inputs="model",
                 criterion="faithfulness", group="confidence", scorer=_confidence_member)
def average_drop(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, *,
                 batch_size: int | str = 64) -> torch.Tensor:
    """Average drop (lower is better): relative loss of target probability on the explanation map.

    Tensor[B] of ``max(0, Y - O) / Y`` in [0, 1]; see :func:`confidence_change`.
    """
    return confidence_change(model, images, targets, heatmaps, batch_size=batch_size)["average_drop"]


@register_metric("increase_in_confidence", paper=GRADCAMPP, higher_is_better=True, inputs="model",
                 criterion="faithfulness", group="confidence", scorer=_confidence_member)
def increase_in_confidence(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor,
                           *, batch_size: int | str = 64) -> torch.Tensor:
    """Increase in confidence (higher is better): whether the explanation map alone scores higher.

    Tensor[B] of 1.0 (O > Y) or 0.0; the data-set score is the share of images.
    See :func:`confidence_change`.
    """
    return confidence_change(model, images, targets, heatmaps, batch_size=batch_size)["increase_in_confidence"]


# ---- infidelity --------------------------------------------------------------------------------


def _gaussian_draws(shape: tuple[int, ...], n_perturb: int, sigma: float, seed: int, dtype: torch.dtype
                    ) -> Iterator[torch.Tensor]:
    g = generator(seed)
    for _ in range(shape[0]):
        yield (sigma * torch.randn((n_perturb, *shape[1:]), generator=g, dtype=torch.float64)).to(dtype)


def infidelity_perturbations(images: torch.Tensor, *, n_perturb: int = 10, sigma: float = 0.003,
                             seed: int = 0) -> torch.Tensor:
    """The perturbations :func:`infidelity` draws for these images: Tensor[B, n_perturb, 3, H, W],
    I ~ N(0, sigma^2) per value, image by image from ``seed`` (float64 draws in the images' dtype)."""
    return torch.stack(list(_gaussian_draws(tuple(images.shape), n_perturb, sigma, seed, images.dtype)))


@register_metric("infidelity", paper=YEH, higher_is_better=False, inputs="model", criterion="faithfulness",
                 value_range=(0.0, float("inf")), constraints={"sigma": ">0", "n_perturb": ">=1", "score": SCORES})
def infidelity(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, heatmaps: torch.Tensor, *,
    sigma: float = 0.003, n_perturb: int = 10, normalize: bool = True, score: str = "logit", seed: int = 0,
    batch_size: int | str = 64,
) -> torch.Tensor:
    """Infidelity (lower is better): E_I[(I . Phi - (f(x) - f(x - I)))^2], I ~ N(0, sigma^2).

    Protocol (Yeh et al.; as Captum's ``captum.metrics.infidelity``). Phi is the
    heatmap applied to each of the three channels (Phi[c,h,w] = heatmap[h,w]), so
    I . Phi = sum over pixels of heatmap x (the pixel's three perturbations summed).
    ``n_perturb`` Gaussian perturbations per image (:func:`infidelity_perturbations`;
    defaults sigma 0.003 in normalised space and 10 samples, Captum's documented
    example and default), f the target's ``score`` (default the logit, Captum's
    ``forward_func=model``). ``normalize=True``: Phi is scaled by the optimal
    beta = sum(I.Phi * diff) / sum((I.Phi)^2) first (beta 0 when the denominator is
    0, as Captum's ``safe_div``), which makes the value invariant to the map's
    scale; an all-zero map then scores E[diff^2]. Returns Tensor[B].
    """
    images, targets, heat = _inputs(model, images, targets, heatmaps)
    _require(isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and 0 < sigma < float("inf"),
             f"sigma must be a finite standard deviation > 0 (in normalised space), got {sigma!r}")
    _require(_is_int(n_perturb) and n_perturb >= 1, f"n_perturb must be an integer >= 1, got {n_perturb!r}")
    _require(isinstance(normalize, bool), f"normalize must be True or False, got {normalize!r}")
    b = len(images)
    batch_size = resolve_batch_size(batch_size, model, images)
    dots: list[torch.Tensor] = []

    def stacks() -> Iterator[torch.Tensor]:
        for i, noise in enumerate(_gaussian_draws(tuple(images.shape), n_perturb, sigma, seed, images.dtype)):
            noise = noise.to(images.device)
            dots.append((noise.sum(1) * heat[i]).flatten(1).sum(1))
            yield images[i] - noise

    with model_guard(model), torch.inference_mode(), fast_inference(model, images) as fmt:
        forward = _scorer(model, fmt, score)
        clean = _clean_scores(forward, images, targets, batch_size)
        perturbed = stream_scores(stacks(), targets.repeat_interleave(n_perturb), batch_size, forward)
    diff = clean[:, None] - perturbed.view(b, n_perturb)
    dot = torch.stack(dots).to(diff.dtype)
    if normalize:
        num, den = (dot * diff).sum(1), (dot * dot).sum(1)
        beta = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
        dot = beta[:, None] * dot
    return ((dot - diff) ** 2).mean(1)
