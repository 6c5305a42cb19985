"""Class (or channel) visualisation by regularised gradient ascent on the input.

Simonyan, Vedaldi, Zisserman, "Deep inside convolutional networks", ICLR-W 2014:
find an image I maximising the unnormalised class score S_c(I) - lambda ||I||^2 by
gradient ascent from the zero (mean) image. Yosinski et al., "Understanding neural
networks through deep visualization", ICML-W 2015: the L2 penalty as a multiplicative
decay ``I <- (1 - l2) I`` after each step, and a Gaussian blur every few steps;
random jitter (rolling the image by a few pixels before each forward pass, as in
DeepDream and Yosinski et al.'s code) discourages high-frequency patterns.

Each step: roll ``x`` by a seeded random (dy, dx) in [-jitter, jitter], score it,
take the gradient ``g`` of the score with respect to ``x`` and move
``x <- (1 - l2) (x + lr g / mean|g|)`` (the gradient is scaled by its mean
magnitude so ``lr`` is in normalised-input units, whatever the model's score
scale); every ``blur_every`` steps blur ``x`` with a Gaussian of ``blur_sigma``
pixels; with ``mean`` and ``std`` given, clamp ``x`` to the normalised image of
[0,1] pixels. Seeded and deterministic on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from ..modelutil import get_module, has_feature_head_split, model_guard, num_classes
from .features import check_channel
from .receptive import default_input_size


@dataclass
class ClassVisualisation:
    """Result of :func:`class_visualisation`.

    ``input``: the optimised model input Tensor[3,H,W] (normalised space);
    ``image``: it as a displayable Tensor[3,H,W] in [0,1] (un-normalised with
    ``mean``/``std`` when given, else min-max scaled); ``scores``: Tensor[steps], the
    objective on each step's jittered input; ``initial_score`` / ``final_score``: the
    objective on the un-jittered start and end images.
    """

    input: torch.Tensor
    image: torch.Tensor
    scores: torch.Tensor
    initial_score: float
    final_score: float


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of Tensor[B,C,H,W] (kernel radius ceil(3 sigma), reflect padding)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def class_visualisation(
    model: nn.Module, target: int | None = None, *, steps: int = 200, lr: float = 0.1, l2: float = 1e-3,
    jitter: int = 4, blur_every: int = 4, blur_sigma: float = 0.5, seed: int = 0,
    size: int | tuple[int, int] | None = None, channel: int | None = None, layer: str | None = None,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None, init_std: float = 0.1,
) -> ClassVisualisation:
    """Gradient ascent on the input of ``model`` to maximise a class logit or a channel.

    The objective is the pre-softmax logit of class ``target``, or, when
    ``channel`` is given, the spatial mean of that channel of ``layer``'s output
    (``layer=None``: the output of timm's ``forward_features``). The start is the
    zero image (the data mean, in normalised space) plus seeded N(0, ``init_std``^2)
    noise, of ``size`` (default: timm's input size, else 224). ``steps`` and ``lr``
    set the ascent; ``l2``, ``jitter`` (pixels), ``blur_every`` (0: never) and
    ``blur_sigma`` the regularisers (see the module docstring). A channel taken after
    a ReLU that is zero everywhere on the start image has no gradient and stays put:
    take the layer before the activation (its BatchNorm) or another ``seed``.
    """
    if steps < 1 or lr <= 0:
        raise InvalidInputError(f"steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if not 0 <= l2 < 1 or jitter < 0 or blur_every < 0 or blur_sigma < 0:
        raise InvalidInputError(f"need 0 <= l2 < 1, jitter >= 0, blur_every >= 0, blur_sigma >= 0; got l2={l2}, "
                                f"jitter={jitter}, blur_every={blur_every}, blur_sigma={blur_sigma}")
    if channel is None:
        n = num_classes(model)
        if target is None or isinstance(target, bool) or not isinstance(target, int) or (
                n is not None and not 0 <= target < n):
            valid = f"0..{n - 1}" if n else "a class index"
            raise InvalidInputError(f"target must be a class index in {valid} (or pass channel=), got {target!r}")
    elif layer is not None:
        get_module(model, layer)
    elif not has_feature_head_split(model):
        raise InvalidInputError("channel= without layer= needs timm's forward_features; pass layer='<module name>'")
    hw = (size, size) if isinstance(size, int) else tuple(size) if size is not None else default_input_size(model)
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    x = (init_std * torch.randn(1, 3, *hw, generator=g)).to(dtype=p.dtype, device=p.device)
    lo = hi = None
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=p.dtype, device=p.device).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=p.dtype, device=p.device).view(1, 3, 1, 1)
        lo, hi = -m / s, (1 - m) / s
        x = torch.max(torch.min(x, hi), lo)

    with model_guard(model) as state:
        captured: list[torch.Tensor] = []

        def hook(_m: nn.Module, _inp: object, out: object) -> object:
            captured.append(out)  # type: ignore[arg-type]
            # Later in-place ops (ReLU(inplace=True)) must not overwrite the captured map.
            return out.clone() if isinstance(out, torch.Tensor) else None

        if channel is not None and layer is not None:
            state.handles.append(get_module(model, layer).register_forward_hook(hook))

        def objective(inp: torch.Tensor) -> torch.Tensor:
            captured.clear()
            if channel is None:
                return model(inp)[:, target]
            if layer is None:
                acts = model.forward_features(inp)
            else:
                model(inp)
                acts = captured[-1]
            if not isinstance(acts, torch.Tensor) or acts.ndim != 4:
                raise InvalidInputError(f"layer {layer!r} does not output a feature map [B,K,h,w]")
            check_channel(channel, acts.shape[1], layer)
            return acts[:, channel].mean((-2, -1))

        with torch.no_grad():
            initial = float(objective(x)[0])
        scores = torch.empty(steps, dtype=torch.float64)
        for step in range(steps):
            dy, dx = (torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist() if jitter else (0, 0))
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                score = objective(torch.roll(x, shifts=(dy, dx), dims=(-2, -1)))[0]
                (grad,) = torch.autograd.grad(score, x)
            scores[step] = float(score.detach())
            with torch.no_grad():
                x = (1 - l2) * (x + lr * grad / grad.abs().mean().clamp_min(1e-12))
                if blur_every and (step + 1) % blur_every == 0:
                    x = gaussian_blur(x, blur_sigma)
                if lo is not None:
                    x = torch.max(torch.min(x, hi), lo)
        with torch.no_grad():
            final = float(objective(x)[0])
    x = x.detach()[0]
    if mean is not None and std is not None:
        image = (x * s[0] + m[0]).clamp(0, 1)
    else:
        image = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return ClassVisualisation(x, image.float().cpu(), scores, initial, final)
