"""Model-randomisation sanity check (Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim.
Sanity Checks for Saliency Maps. NeurIPS 2018).

Protocol. On a deep copy of the model, re-initialise parameterised blocks
cascading from the output back to the input (``order="cascading"``; each stage
keeps the earlier ones randomised) or one block at a time
(``order="independent"``), recompute the heatmaps at each stage and compare them
with the original ones: Spearman rank correlation of absolute values, Spearman
without absolute values, and SSIM of min-max normalised maps (Gaussian window
sigma 1.5, as scikit-image). A method that depends on the model should lose
similarity as stages are randomised: lower is better.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from ..methods.base import explain, get_method
from .base import MetricResult, MetricSpec, ScoreBatch, register_metric

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def randomization_blocks(model: nn.Module, granularity: str = "block") -> list[str]:
    """Names of the model's parameterised blocks in registration (input-to-output) order.

    ``"block"``: containers (Sequential, ModuleList) are opened, so a ResNet gives
    conv1, bn1, layer1.0, ..., layer4.1, fc; ``"layer"``: every module that owns
    parameters directly (each conv, norm and linear layer).
    """
    if granularity == "layer":
        return [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    if granularity != "block":
        raise InvalidInputError(f"granularity must be 'block' or 'layer', got {granularity!r}")
    names: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if not any(True for _ in child.parameters()):
                continue
            if isinstance(child, CONTAINERS):
                walk(full, child)
            else:
                names.append(full)

    walk("", model)
    if any(True for _ in model.parameters(recurse=False)):
        names.append("")
    return names


def reinitialise(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter (and norm statistics) of ``module`` from ``seed``.

    Layers with ``reset_parameters`` use it (PyTorch's default initialisation);
    parameters of any other module are drawn from N(0, 0.02^2).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        covered: set[int] = set()
        for m in module.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
                covered.update(id(p) for p in m.parameters(recurse=False))
        with torch.no_grad():
            for p in module.parameters():
                if id(p) not in covered:
                    p.normal_(0.0, 0.02)


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of Tensor[B,H,W] to [0,1] (constant maps become 0)."""
    flat = maps.flatten(1).double()
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp(min=1e-12)).view_as(maps)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004) of each pair of maps Tensor[B,H,W]: Tensor[B].

    Gaussian-weighted (sigma 1.5, 11 taps), population covariance, averaged over
    the valid region: scikit-image's ``structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, data_range=...)``.
    """
    g = _gaussian_window().to(a.device)
    k = len(g)
    if min(a.shape[-2:]) < k:
        raise InvalidInputError(f"SSIM needs maps of at least {k}x{k} pixels, got {tuple(a.shape[-2:])}")

    def filt(x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x[:, None], g.view(1, 1, k, 1))
        return F.conv2d(x, g.view(1, 1, 1, k))[:, 0]

    a, b = a.double(), b.double()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ma, mb = filt(a), filt(b)
    va, vb, cov = filt(a * a) - ma**2, filt(b * b) - mb**2, filt(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(1).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Spearman rank correlation (average ranks for ties) of each pair of maps: array[B]."""
    from scipy.stats import spearmanr  # imported here: scipy.stats costs 0.4 s, paid only by runs that use it

    out = []
    for x, y in zip(a.flatten(1).cpu().double().numpy(), b.flatten(1).cpu().double().numpy()):
        if x.std() == 0 or y.std() == 0:
            out.append(float("nan"))
        else:
            out.append(float(spearmanr(x, y).statistic))
    return np.asarray(out)


def similarities(original: torch.Tensor, other: torch.Tensor) -> dict[str, np.ndarray]:
    """The three similarities of Adebayo et al. between Tensor[B,H,W] maps: arrays[B]."""
    return {
        "spearman_abs": spearman(original.abs(), other.abs()),
        "spearman": spearman(original, other),
        "ssim": ssim(minmax(original), minmax(other)).cpu().numpy(),
    }


def _score_sanity(spec: MetricSpec, batch: ScoreBatch, params: dict[str, Any]) -> MetricResult:
    """The runner's scorer: per image and stage one row per similarity (``sanity_spearman_abs`` ...,
    with ``stage`` and ``layer`` columns); the metric's own value per image is the Spearman
    similarity of absolute values at the fully randomised (last) stage."""
    p = {k: v for k, v in params.items() if k not in ("per_image", "method_params")}
    df = sanity_randomization(batch.model, batch.images, batch.targets, batch.method, per_image=True,
                              method_params=batch.method_params, **p)
    rows = [{"index": int(r.image), "metric": f"sanity_{sim}", "value": float(getattr(r, sim)), "stage": int(r.stage),
             "layer": r.layer} for r in df.itertuples() for sim in ("spearman_abs", "spearman", "ssim")]
    last = df[df.stage == df.stage.max()].sort_values("image")
    final = np.full(batch.images.shape[0], np.nan)
    final[last.image.to_numpy(dtype=int)] = last.spearman_abs.to_numpy(dtype=float)
    return MetricResult({spec.name: final}, rows=rows)


@register_metric(
    "sanity_randomization",
    paper="Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim. Sanity Checks for Saliency Maps. NeurIPS 2018",
    higher_is_better=False,
    inputs="method",
    criterion="randomisation",
    value_range=(-1.0, 1.0),
    ranked=False,
    outputs=("sanity_spearman_abs", "sanity_spearman", "sanity_ssim"),
    schedule={"n_images": 8, "methods": ["saliency", "guided_backprop", "gradcam"]},
    scorer=_score_sanity,
    verdict="sanity_spearman_abs",
    constraints={"order": ("cascading", "independent"), "granularity": ("block", "layer"), "seed": ">=0"},
)
def sanity_randomization(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, method: str, *, order: str = "cascading",
    granularity: str = "block", seed: int = 0, per_image: bool = False, method_params: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Similarity between original and randomised-model heatmaps, stage by stage.

    Returns a DataFrame with one row per stage (per stage and image with
    ``per_image=True``): ``stage`` (0 = original model), ``layer`` (the block
    randomised at that stage), ``order``, ``method``, ``spearman_abs``,
    ``spearman``, ``ssim`` (means over images, NaN-free where defined) and
    ``n_images``. The model passed in is never modified.
    """
    if order not in ("cascading", "independent"):
        raise InvalidInputError(f"order must be 'cascading' or 'independent', got {order!r}")
    get_method(method)
    params = dict(method_params or {})
    original = explain(model, images, targets, method, **params)
    blocks = list(reversed(randomization_blocks(model, granularity)))
    if not blocks:
        raise InvalidInputError("the model has no parameters to randomise")
    rows: list[dict[str, Any]] = []

    def record(stage: int, layer: str, maps: torch.Tensor) -> None:
        sims = similarities(original, maps)
        base = {"stage": stage, "layer": layer, "order": order, "method": method}
        if per_image:
            for i in range(maps.shape[0]):
                rows.append({**base, "image": i, **{k: float(v[i]) for k, v in sims.items()}})
        else:
            rows.append({**base, **{k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                                    for k, v in sims.items()}, "n_images": maps.shape[0]})

    record(0, "", original)
    randomised = copy.deepcopy(model)
    for stage, name in enumerate(blocks, start=1):
        if order == "independent" and stage > 1:
            randomised = copy.deepcopy(model)
        reinitialise(randomised.get_submodule(name) if name else randomised, seed + stage)
        record(stage, name or "<root>", explain(randomised, images, targets, method, **params))
    return pd.DataFrame(rows)
