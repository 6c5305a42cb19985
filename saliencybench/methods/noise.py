"""Noisy-sample gradient methods: SmoothGrad, SmoothGrad-Squared and VarGrad.

One driver, :func:`noisy_gradient_mean`, adds seeded Gaussian noise to each image
``n_samples`` times, takes the input gradient of every noisy copy (all copies of
all images batched together) and averages a per-sample statistic of it. The three
methods differ only in that statistic:

- SmoothGrad (Smilkov et al. 2017): the gradient's heatmap (``sign``/``reduce`` of
  :func:`~.gradient.attribution_map`), averaged;
- SmoothGrad-Squared (Hooker et al. 2019): the squared gradient g^2 per channel,
  averaged, then reduced over channels;
- VarGrad (Adebayo et al. 2018): E[g^2] - E[g]^2 per channel, then reduced.

Hooker et al.'s ROAR found these two the only methods that beat random removal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .base import REDUCTIONS, batch_slices, generator, reduce_channels, register_method
from .gradient import SIGN_CONSTRAINTS, concrete_sign, input_gradients, resolve_sign

NOISE_CONSTRAINTS = {**SIGN_CONSTRAINTS, "n_samples": ">=1", "noise_level": ">0"}
MOMENT_CONSTRAINTS = {**NOISE_CONSTRAINTS, "reduce": REDUCTIONS}
MOMENT_CONSTRAINTS.pop("sign")


def sample_noise(images: torch.Tensor, n_samples: int, noise_level: float, seed: int) -> torch.Tensor:
    """The noise of every sample: Tensor[n_samples,B,3,H,W], N(0, sigma_b^2) per image b.

    sigma_b = ``noise_level`` x (max - min) of image b (Smilkov et al.'s 15% of the
    input range), from a CPU generator seeded with ``seed`` (standard normals of shape
    [n,B,3,H,W] in the images' dtype, drawn in one call, then scaled).
    """
    sigma = noise_level * (images.flatten(1).amax(1) - images.flatten(1).amin(1))
    noise = torch.randn((n_samples, *images.shape), generator=generator(seed), dtype=images.dtype)
    return noise.to(images.device) * sigma.view(1, -1, 1, 1, 1)


def noisy_gradient_mean(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, stat: Callable[[torch.Tensor], torch.Tensor], *,
    n_samples: int, noise_level: float, seed: int, score: str, batch_size: int,
) -> torch.Tensor:
    """Mean over noisy samples of ``stat(gradients)`` per image: Tensor[B, ...] in float64.

    For sample i of image b, g = d score / d x at x = images[b] + noise[i, b]
    (:func:`sample_noise`); ``stat`` maps gradients Tensor[N,3,H,W] to Tensor[N, ...].
    The (sample, image) jobs are batched ``batch_size`` per forward pass; the mean is
    accumulated in float64, so it does not depend on the batching.
    """
    b = images.shape[0]
    noise = sample_noise(images, n_samples, noise_level, seed)
    total: torch.Tensor | None = None
    jobs_img = torch.arange(b).repeat(n_samples)
    jobs_sample = torch.arange(n_samples).repeat_interleave(b)
    for sl in batch_slices(len(jobs_img), batch_size):
        idx, smp = jobs_img[sl].to(images.device), jobs_sample[sl].to(images.device)
        s = stat(input_gradients(model, images[idx] + noise[smp, idx], targets[idx], score, batch_size)).double()
        if total is None:
            total = torch.zeros((b, *s.shape[1:]), device=images.device, dtype=torch.float64)
        total.index_add_(0, idx, s)
    return total / n_samples


@register_method(
    "smoothgrad",
    paper="Smilkov, Thorat, Kim, Viegas, Wattenberg. SmoothGrad: removing noise by adding noise. ICML-W 2017",
    family="gradient",
    constraints=NOISE_CONSTRAINTS,
    finalise=concrete_sign,
)
def smoothgrad(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, n_samples: int = 50, noise_level: float = 0.15,
    seed: int = 0, score: str = "logit", sign: str | None = None, reduce: str | None = None, batch_size: int = 64,
) -> torch.Tensor:
    """SmoothGrad: the saliency map averaged over ``n_samples`` noisy copies of each image.

    Noise: :func:`sample_noise`. ``sign="abs"`` (the default, max over channels):
    1/n sum_i reduce(|g_i|), the mean of the magnitude maps; ``"signed"``: sum_c of the
    mean gradient 1/n sum_i g_i; ``"positive"``: max(0, that). Returns Tensor[B,H,W].
    """
    sign, reduce = resolve_sign(sign, reduce)
    kw = dict(n_samples=n_samples, noise_level=noise_level, seed=seed, score=score, batch_size=batch_size)
    if sign == "abs":
        return noisy_gradient_mean(model, images, targets, lambda g: reduce_channels(g, reduce), **kw).float()
    mean_sum = noisy_gradient_mean(model, images, targets, lambda g: g.sum(1), **kw)
    return (mean_sum.clamp(min=0) if sign == "positive" else mean_sum).float()


@register_method(
    "smoothgrad_sq",
    paper="Hooker, Erhan, Kindermans, Kim. A Benchmark for Interpretability Methods in Deep Neural Networks. "
    "NeurIPS 2019 (SmoothGrad-Squared)",
    family="gradient",
    constraints=MOMENT_CONSTRAINTS,
    finalise=concrete_sign,
)
def smoothgrad_sq(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, n_samples: int = 50, noise_level: float = 0.15,
    seed: int = 0, score: str = "logit", reduce: str = "max_abs", batch_size: int = 64,
) -> torch.Tensor:
    """SmoothGrad-Squared: ``reduce`` over channels of E[g^2], the per-channel mean of squared gradients.

    The gradients g of :func:`smoothgrad`'s noisy samples (same noise for the same
    ``seed``) are squared elementwise, averaged over the samples, then reduced over
    channels (default: max; ``sum_abs`` (= ``sum``) sums them, as Hooker et al.'s
    grayscale conversion does). Equal to Captum's ``NoiseTunnel(Saliency)`` with
    ``nt_type="smoothgrad_sq"`` on the same noise, before its channel reduction
    (Captum's ``abs=True`` default does not matter: |g|^2 = g^2). Returns Tensor[B,H,W].
    """
    kw = dict(n_samples=n_samples, noise_level=noise_level, seed=seed, score=score, batch_size=batch_size)
    return reduce_channels(noisy_gradient_mean(model, images, targets, torch.square, **kw), reduce).float()


@register_method(
    "vargrad",
    paper="Adebayo, Gilmer, Goodfellow, Kim. Local Explanation Methods for Deep Neural Networks Lack Sensitivity "
    "to Parameter Values. ICLR-W 2018",
    family="gradient",
    constraints=MOMENT_CONSTRAINTS,
    finalise=concrete_sign,
)
def vargrad(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, n_samples: int = 50, noise_level: float = 0.15,
    seed: int = 0, score: str = "logit", reduce: str = "max_abs", batch_size: int = 64,
) -> torch.Tensor:
    """VarGrad: ``reduce`` over channels of Var[g] = E[g^2] - E[g]^2, per channel, over the noisy samples.

    The population variance (divided by n) of the signed gradients of
    :func:`smoothgrad`'s noisy samples, accumulated in float64 and clipped at 0
    against rounding; then reduced over channels (default: max). Equal to Captum's
    ``NoiseTunnel(Saliency)`` with ``nt_type="vargrad"`` and ``abs=False`` on the same
    noise; Captum's default ``abs=True`` would give Var[|g|] instead. Returns
    Tensor[B,H,W].
    """
    kw = dict(n_samples=n_samples, noise_level=noise_level, seed=seed, score=score, batch_size=batch_size)
    m = noisy_gradient_mean(model, images, targets, lambda g: torch.stack((g, g * g), 1), **kw)
    return reduce_channels((m[:, 1] - m[:, 0].square()).clamp(min=0), reduce).float()
