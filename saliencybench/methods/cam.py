"""Class activation maps: CAM, Grad-CAM, Grad-CAM++, Score-CAM, Guided Grad-CAM.

One driver, :func:`layer_activations`, captures a layer's activations A[B,K,h,w]
(default: timm's ``forward_features`` output) and, for the gradient members, the
gradients dS/dA of the target score; each member only supplies its channel
weights. Maps are computed at the layer's resolution (``*_maps`` functions,
Tensor[B,h,w]) and upsampled bilinearly (align_corners=False) to the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError, NotApplicableError
from ..modelutil import (GuardState, autocast, fast_inference, forward_with_layer, gap_linear_head,
                         has_feature_head_split, resolve_batch_size, safe_forward, target_score, upcast)
from .base import Applicability, batch_slices, reduce_channels, register_method, upsample
from .gradient import guided_gradients
from .shared import GradientPass, PassNeeds, derives_from_pass


def layer_activations(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layer: str | None, score: str = "logit",
    with_grads: bool = True, batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Activations A[B,K,h,w], gradients dS/dA[B,K,h,w] (or None) and logits[B,C].

    S is the ``score`` of each image's target class; one forward (and backward)
    pass per ``batch_size`` images.
    """
    acts, grads, logits = [], [], []
    for sl in batch_slices(images.shape[0], batch_size):
        state = GuardState()
        try:
            with torch.enable_grad() if with_grads else torch.no_grad():
                a, out = forward_with_layer(model, images[sl], layer, state, grad=with_grads)
                if with_grads:
                    s = target_score(out, targets[sl], score)
                    (g,) = torch.autograd.grad(s.sum(), a)
                    grads.append(g.detach())
        finally:
            for h in state.handles:
                h.remove()
        if a.ndim != 4:
            raise NotApplicableError(
                f"the layer's output has shape {tuple(a.shape)}; CAM methods need a feature map [B,K,h,w]"
            )
        acts.append(a.detach())
        logits.append(out.detach())
    return torch.cat(acts), (torch.cat(grads) if with_grads else None), torch.cat(logits)


def cam_applicability(model: nn.Module) -> Applicability:
    """CAM applies when the head is global average pooling + one linear layer."""
    if not has_feature_head_split(model):
        return Applicability(False, f"{type(model).__name__} has no timm forward_features/forward_head split")
    param = next(model.parameters(), None)
    size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 64, 64))[-1]
    x = torch.zeros(1, 3, min(int(size), 128), min(int(size), 128), device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
    x = x + torch.linspace(-1, 1, x.shape[-1], device=x.device)
    was = model.training
    try:
        model.eval()
        with torch.inference_mode():
            feats = model.forward_features(x)
            gap_linear_head(model, feats, model.forward_head(feats))
    except NotApplicableError as e:
        return Applicability(False, str(e))
    finally:
        model.train(was)
    return Applicability(True)


def cam_maps(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CAM at feature resolution: sum_k w_{t,k} A_k -> Tensor[B,h,w] (no bias, no ReLU).

    Raises :class:`NotApplicableError` unless logits = Linear(GAP(forward_features)).
    """
    feats, _, logits = layer_activations(model, images, targets, None, with_grads=False)
    return cam_from_activations(model, feats, logits, targets)


def cam_from_activations(model: nn.Module, feats: torch.Tensor, logits: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """CAM from final activations feats[B,K,h,w] and logits[B,C]: Tensor[B,h,w] (checks the head)."""
    fc = gap_linear_head(model, feats, logits)
    return torch.einsum("bk,bkhw->bhw", fc.weight[targets].to(feats.dtype), feats)


@register_method(
    "cam",
    paper="Zhou, Khosla, Lapedriza, Oliva, Torralba. Learning Deep Features for Discriminative Localization. CVPR 2016",
    family="cam",
    needs_grad=False,
    applicability=cam_applicability,
)
def cam(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Class activation mapping: sum_k w_{t,k} A_k of the final feature maps, upsampled.

    Only for heads of global average pooling followed by one linear classifier
    (checked on the actual logits); any other head raises :class:`NotApplicableError`.
    Returns Tensor[B,H,W], signed (no ReLU, no bias).
    """
    return upsample(cam_maps(model, images, targets), images.shape[-2:])


@derives_from_pass("cam", lambda p: PassNeeds(layer=None, acts=True))
def _cam_from_pass(gp: GradientPass, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                   p: dict) -> torch.Tensor:
    return upsample(cam_from_activations(model, gp.acts, gp.logits, targets), images.shape[-2:])


def gradcam_from_gradients(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM from activations A[B,K,h,w] and gradients dS/dA[B,K,h,w]: ReLU(sum_k mean(dS/dA_k) A_k), [B,h,w]."""
    return F.relu((g.mean((2, 3), keepdim=True) * a).sum(1))


def gradcam_pp_from_gradients(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ from A[B,K,h,w] and dS/dA[B,K,h,w] (closed-form weights, eq. 19): Tensor[B,h,w]."""
    g2 = g.pow(2)
    denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g2 * g + 1e-6
    aij = torch.where(g != 0, g2 / denom, torch.zeros_like(g))
    w = (F.relu(g) * aij).sum((2, 3), keepdim=True)
    return F.relu((w * a).sum(1))


def _layer_needs(p: dict) -> PassNeeds:
    return PassNeeds(layer=p["layer"], score=p["score"], acts=True, layer_grads=True)


def gradcam_maps(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layer: str | None = None, score: str = "logit",
    batch_size: int = 64,
) -> torch.Tensor:
    """Grad-CAM at the layer's resolution: ReLU(sum_k alpha_k A_k), alpha_k = mean dS/dA_k."""
    a, g, _ = layer_activations(model, images, targets, layer, score, True, batch_size)
    return gradcam_from_gradients(a, g)


@register_method(
    "gradcam",
    paper="Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra. Grad-CAM: Visual Explanations from Deep Networks via "
    "Gradient-based Localization. ICCV 2017",
    family="cam",
)
def gradcam(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None, score: str = "logit",
    batch_size: int = 64,
) -> torch.Tensor:
    """Grad-CAM: ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of dS/dA_k, upsampled.

    ``layer``: a module name; default the output of ``forward_features``.
    Returns Tensor[B,H,W] >= 0.
    """
    return upsample(gradcam_maps(model, images, targets, layer, score, batch_size), images.shape[-2:])


@derives_from_pass("gradcam", _layer_needs)
def _gradcam_from_pass(gp: GradientPass, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                       p: dict) -> torch.Tensor:
    return upsample(gradcam_from_gradients(gp.acts, gp.layer_grads), images.shape[-2:])


def gradcam_pp_maps(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layer: str | None = None, score: str = "logit",
    batch_size: int = 64,
) -> torch.Tensor:
    """Grad-CAM++ at the layer's resolution: Tensor[B,h,w] (see :func:`gradcam_pp`)."""
    a, g, _ = layer_activations(model, images, targets, layer, score, True, batch_size)
    return gradcam_pp_from_gradients(a, g)


@register_method(
    "gradcam_pp",
    paper="Chattopadhyay, Sarkar, Howlader, Balasubramanian. Grad-CAM++: Generalized Gradient-Based Visual "
    "Explanations for Deep Convolutional Networks. WACV 2018",
    family="cam",
)
def gradcam_pp(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None, score: str = "logit",
    batch_size: int = 64,
) -> torch.Tensor:
    """Grad-CAM++ with the closed-form weights of the paper's eq. 19 (exponential score).

    a_ij = g^2 / (2 g^2 + sum_ab A_ab g^3) where g != 0 (else 0);
    w_k = sum_ij a_ij relu(g_ij); map = ReLU(sum_k w_k A_k), upsampled. Tensor[B,H,W].
    """
    return upsample(gradcam_pp_maps(model, images, targets, layer, score, batch_size), images.shape[-2:])


@derives_from_pass("gradcam_pp", _layer_needs)
def _gradcam_pp_from_pass(gp: GradientPass, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                          p: dict) -> torch.Tensor:
    return upsample(gradcam_pp_from_gradients(gp.acts, gp.layer_grads), images.shape[-2:])


SCORECAM_WEIGHTS = ("probability", "channel_softmax")


def scorecam_maps(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layer: str | None = None,
    weights: str = "probability", align_corners: bool = False, batch_size: int | str = 64,
    precision: str = "float32",
) -> torch.Tensor:
    """Score-CAM at the layer's resolution: Tensor[B,h,w] (see :func:`scorecam`)."""
    if weights not in SCORECAM_WEIGHTS:
        raise InvalidInputError(f"unknown Score-CAM weights {weights!r}; use one of {SCORECAM_WEIGHTS}")
    batch_size = resolve_batch_size(batch_size, model, images)
    a, _, _ = layer_activations(model, images, targets, layer, with_grads=False, batch_size=batch_size)
    b, k = a.shape[:2]
    h, w = images.shape[-2:]
    kind = "probability" if weights == "probability" else "logit"
    scores = torch.empty(b, k, device=images.device, dtype=a.dtype)
    with fast_inference(model, images) as fmt, autocast(images, precision):
        source = fmt(images)
        buffer = fmt(torch.empty(min(k, batch_size), *images.shape[1:], device=images.device, dtype=images.dtype))
        for i in range(b):
            up = F.interpolate(a[i : i + 1], size=(h, w), mode="bilinear", align_corners=align_corners)[0]
            lo = up.flatten(1).amin(1).view(k, 1, 1)
            hi = up.flatten(1).amax(1).view(k, 1, 1)
            masks = ((up - lo) / (hi - lo + 1e-8)).to(images.dtype)
            for sl in batch_slices(k, batch_size):
                x = buffer[: sl.stop - sl.start]
                torch.mul(source[i : i + 1], masks[sl, None], out=x)
                logits = upcast(safe_forward(model, x))
                scores[i, sl] = target_score(logits, targets[i : i + 1].expand(logits.shape[0]), kind)
    if weights == "channel_softmax":
        scores = scores.softmax(1)
    return F.relu((scores[:, :, None, None] * a).sum(1))


@register_method(
    "scorecam",
    paper="Wang, Wang, Du, Yang, Zhang, Ding, Mardziel, Hu. Score-CAM: Score-Weighted Visual Explanations for "
    "Convolutional Neural Networks. CVPR-W 2020",
    family="cam",
    needs_grad=False,
)
def scorecam(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None,
    weights: str = "probability", align_corners: bool = False, batch_size: int | str = 64,
    precision: str = "float32",
) -> torch.Tensor:
    """Score-CAM: each channel, upsampled and min-max scaled to [0,1], masks the input.

    The channel weight is the model's score on ``image * mask_k``:
    ``weights="probability"`` uses the target's softmax probability (the authors'
    code); ``"channel_softmax"`` a softmax over channels of the target logits
    (pytorch-grad-cam). map = ReLU(sum_k w_k A_k), upsampled. Forward passes:
    B x K, batched ``batch_size`` at a time (``"auto"``: from free memory; a batch
    that runs out of memory is split); ``precision``: float32 or bfloat16/float16
    autocast. Returns Tensor[B,H,W].
    """
    maps = scorecam_maps(model, images, targets, layer, weights, align_corners, batch_size, precision)
    return upsample(maps, images.shape[-2:])


@register_method(
    "guided_gradcam",
    paper="Selvaraju et al. Grad-CAM (Guided Grad-CAM, section 3.1). ICCV 2017",
    family="cam",
)
def guided_gradcam(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None, score: str = "logit",
    reduce: str = "max_abs", batch_size: int = 64,
) -> torch.Tensor:
    """Guided Grad-CAM: guided backprop (3 channels) times the upsampled Grad-CAM map.

    The product is reduced over channels with ``reduce`` (default max |.|).
    Returns Tensor[B,H,W].
    """
    gb = guided_gradients(model, images, targets, score, batch_size)
    cam_up = upsample(gradcam_maps(model, images, targets, layer, score, batch_size), images.shape[-2:])
    return reduce_channels(gb * cam_up[:, None], reduce)


@derives_from_pass("guided_gradcam", _layer_needs)
def _guided_gradcam_from_pass(gp: GradientPass, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                              p: dict) -> torch.Tensor:
    gb = guided_gradients(model, images, targets, p["score"], p["batch_size"])
    cam_up = upsample(gradcam_from_gradients(gp.acts, gp.layer_grads), images.shape[-2:])
    return reduce_channels(gb * cam_up[:, None], p["reduce"])
