"""Class activation maps: CAM, Grad-CAM, Grad-CAM++, Score-CAM, Guided Grad-CAM (XGrad-CAM and
Layer-CAM: :mod:`~saliencybench.methods.cam_variants`).

One driver, :func:`layer_activations`, captures a layer's activations A[B,K,h,w]
(``layer=None``: the family's default layer, :mod:`saliencybench.methods.tokens`: the
output of ``forward_features`` for CNNs, Swin, ConvNeXt, MaxViT and CoAtNet, the output of
``blocks[-1].norm1`` for ViT and DeiT) and, for the gradient members, the gradients dS/dA
of the target score; each member only supplies its channel weights. Transformer outputs
are read as maps by :mod:`~saliencybench.methods.tokens` (ViT tokens without their class,
distillation and register tokens, reshaped to the patch grid; Swin's NHWC maps), which
leaves a note saying how. Maps are computed at the layer's resolution (``*_maps``
functions, Tensor[B,h,w]) and upsampled bilinearly (align_corners=False) to the input.

``sign``: every member's map is by definition a signed sum over channels (sum_k w_k A_k;
Layer-CAM sum_k relu(g_k) A_k) that the papers pass through a ReLU. ``sign="positive"``
(the default, the papers' maps) keeps the ReLU, ``"signed"`` returns the sum itself,
``"abs"`` its absolute value. CAM (Zhou et al.) has no ReLU: its default is ``"signed"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError, NotApplicableError
from ..modelutil import (FEATURES, SCORES, GuardState, autocast, fast_inference, forward_with_layer,
                         gap_linear_head, has_feature_head_split, resolve_batch_size, resolve_layer, safe_forward,
                         target_score, upcast)
from .base import Applicability, batch_slices, reduce_channels, register_method, report_progress, upsample
from .gradient import guided_applicability, guided_gradients
from .shared import GradientPass, PassNeeds, derives_from_pass
from .tokens import probe_size, repeat_layer_note

CAM_SIGNS = ("positive", "signed", "abs")


def apply_sign(maps: torch.Tensor, sign: str) -> torch.Tensor:
    """The signed sum ``maps`` Tensor[B,h,w] as ``sign`` asks: ReLU (``"positive"``), as is, or |.|."""
    if sign == "positive":
        return F.relu(maps)
    if sign == "signed":
        return maps
    if sign == "abs":
        return maps.abs()
    raise InvalidInputError(f"unknown CAM sign {sign!r}; use one of {CAM_SIGNS}")


def layer_activations(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layer: str | None, score: str = "logit",
    with_grads: bool = True, batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Activations A[B,K,h,w], gradients dS/dA[B,K,h,w] (or None) and logits[B,C].

    S is the ``score`` of each image's target class; one forward (and backward)
    pass per ``batch_size`` images. ``layer``: a module name, ``"forward_features"``
    or None for the family's default (:func:`~saliencybench.modelutil.resolve_layer`).
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


def _probe(model: nn.Module) -> torch.Tensor:
    """A non-constant input of a size the model accepts (:func:`~saliencybench.methods.tokens.probe_size`)."""
    param = next(model.parameters(), None)
    h, w = probe_size(model)
    x = torch.zeros(1, 3, h, w, device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
    return x + torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)


def _probe_layer(model: nn.Module, layer: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(map [1,K,h,w], logits) of ``layer`` on :func:`_probe`'s input, in eval mode, nothing kept on the model."""
    was = [(m, m.training) for m in model.modules()]
    state = GuardState()
    try:
        model.eval()
        with torch.inference_mode():
            return forward_with_layer(model, _probe(model), layer, state)
    finally:
        for h in state.handles:
            h.remove()
        for m, flag in was:
            m.training = flag


def cam_applicability(model: nn.Module) -> Applicability:
    """CAM applies when the head is global average pooling + one linear layer (checked on a probe:
    CNNs with GAP+FC and Swin pass; ConvNeXt, MaxViT and CoAtNet (a LayerNorm after pooling), ViT and
    DeiT (class-token heads), VGG and MobileNetV3 (layers after pooling) do not)."""
    if not has_feature_head_split(model):
        return Applicability(False, f"{type(model).__name__} has no timm forward_features/forward_head split")
    try:
        feats, logits = _probe_layer(model, FEATURES)
        gap_linear_head(model, feats, logits)
    except NotApplicableError as e:
        return Applicability(False, str(e))
    return Applicability(True)


def layer_cam_applicability(model: nn.Module) -> Applicability:
    """Gradient CAMs apply when the default layer's output can be read as a map (a probe forward pass)."""
    try:
        _probe_layer(model, None)
    except NotApplicableError as e:
        return Applicability(False, str(e))
    return Applicability(True)


def guided_gradcam_applicability(model: nn.Module) -> Applicability:
    """Guided Grad-CAM needs both the guided rule (ReLU networks) and a Grad-CAM layer."""
    found = layer_cam_applicability(model)
    return found if not found.applicable else guided_applicability(model)


def cam_maps(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, sign: str = "signed") -> torch.Tensor:
    """CAM at feature resolution: sum_k w_{t,k} A_k -> Tensor[B,h,w] (no bias; ``sign`` as :func:`apply_sign`).

    A: the output of ``forward_features`` as a map. Raises :class:`NotApplicableError`
    unless logits = Linear(GAP(forward_features)).
    """
    feats, _, logits = layer_activations(model, images, targets, FEATURES, with_grads=False)
    return apply_sign(cam_from_activations(model, feats, logits, targets), sign)


def cam_from_activations(model: nn.Module, feats: torch.Tensor, logits: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """CAM from final activations feats[B,K,h,w] and logits[B,C]: Tensor[B,h,w] (checks the head)."""
    fc = gap_linear_head(model, feats, logits)
    return torch.einsum("bk,bkhw->bhw", fc.weight[targets].to(feats.dtype), feats)


CAM_CONSTRAINTS = {"sign": CAM_SIGNS, "score": SCORES, "batch_size": ">=1"}


@register_method(
    "cam",
    paper="Zhou, Khosla, Lapedriza, Oliva, Torralba. Learning Deep Features for Discriminative Localization. CVPR 2016",
    family="cam",
    needs_grad=False,
    applicability=cam_applicability,
    constraints={"sign": CAM_SIGNS},
)
def cam(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, sign: str = "signed") -> torch.Tensor:
    """Class activation mapping: sum_k w_{t,k} A_k of the final feature maps, upsampled.

    Only for heads of global average pooling followed by one linear classifier
    (checked on the actual logits: CNNs with GAP+FC and Swin; not ConvNeXt, MaxViT or
    CoAtNet, whose heads normalise after pooling, nor ViT/DeiT class-token heads); any
    other head raises :class:`NotApplicableError`. Returns Tensor[B,H,W], signed by
    default (no ReLU, no bias).
    """
    return upsample(cam_maps(model, images, targets, sign), images.shape[-2:])


@derives_from_pass("cam", lambda p: PassNeeds(layer=None, acts=True))
def _cam_from_pass(gp: GradientPass, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                   p: dict) -> torch.Tensor:
    if resolve_layer(model, None) != FEATURES:  # the pass captured another default layer (ViT): compute alone
        return cam(model, images, targets, sign=p["sign"])
    repeat_layer_note(model, None, images.shape[-2:])
    return upsample(apply_sign(cam_from_activations(model, gp.acts, gp.logits, targets), p["sign"]),
                    images.shape[-2:])


def gradcam_from_gradients(a: torch.Tensor, g: torch.Tensor, sign: str = "positive") -> torch.Tensor:
    """Grad-CAM from activations A[B,K,h,w] and gradients dS/dA[B,K,h,w]: ReLU(sum_k mean(dS/dA_k) A_k), [B,h,w]."""
    return apply_sign((g.mean((2, 3), keepdim=True) * a).sum(1), sign)


def gradcam_pp_from_gradients(a: torch.Tensor, g: torch.Tensor, sign: str = "positive") -> torch.Tensor:
    """Grad-CAM++ from A[B,K,h,w] and dS/dA[B,K,h,w] (closed-form weights, eq. 19): Tensor[B,h,w]."""
    g2 = g.pow(2)
    denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g2 * g + 1e-6
    aij = torch.where(g != 0, g2 / denom, torch.zeros_like(g))
    w = (F.relu(g) * aij).sum((2, 3), keepdim=True)
    return apply_sign((w * a).sum(1), sign)


def _layer_needs(p: dict) -> PassNeeds:
    return PassNeeds(layer=p["layer"], score=p["score"], acts=True, layer_grads=True)


def gradient_cam_maps(from_gradients: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor], model: nn.Module,
                      images: torch.Tensor, targets: torch.Tensor, layer: str | None, score: str, batch_size: int,
                      sign: str) -> torch.Tensor:
    """A gradient CAM at the layer's resolution, Tensor[B,h,w]: ``from_gradients(A, dS/dA, sign)`` on the
    activations and gradients of :func:`layer_activations`."""
    a, g, _ = layer_activations(model, images, targets, layer, score, True, batch_size)
    return from_gradients(a, g, sign)


def derive_gradient_cam(method: str, from_gradients: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]) -> None:
    """Let ``method`` take its map from a shared pass's activations and layer gradients."""

    @derives_from_pass(method, _layer_needs)
    def _from_pass(gp: GradientPass, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                   p: dict) -> torch.Tensor:
        repeat_layer_note(model, p["layer"], images.shape[-2:])
        return upsample(from_gradients(gp.acts, gp.layer_grads, p["sign"]), images.shape[-2:])


def gradcam_maps(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layer: str | None = None, score: str = "logit",
    batch_size: int = 64, sign: str = "positive",
) -> torch.Tensor:
    """Grad-CAM at the layer's resolution: ReLU(sum_k alpha_k A_k), alpha_k = mean dS/dA_k, Tensor[B,h,w]."""
    return gradient_cam_maps(gradcam_from_gradients, model, images, targets, layer, score, batch_size, sign)


@register_method(
    "gradcam",
    paper="Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra. Grad-CAM: Visual Explanations from Deep Networks via "
    "Gradient-based Localization. ICCV 2017",
    family="cam",
    applicability=layer_cam_applicability,
    constraints=CAM_CONSTRAINTS,
)
def gradcam(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None, score: str = "logit",
    batch_size: int = 64, sign: str = "positive",
) -> torch.Tensor:
    """Grad-CAM: ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of dS/dA_k, upsampled.

    ``layer``: a module name, ``"forward_features"``, or None for the family's default
    (:mod:`~saliencybench.methods.tokens`). Returns Tensor[B,H,W] >= 0 (``sign``: see the module).
    """
    return upsample(gradcam_maps(model, images, targets, layer, score, batch_size, sign), images.shape[-2:])


def gradcam_pp_maps(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layer: str | None = None, score: str = "logit",
    batch_size: int = 64, sign: str = "positive",
) -> torch.Tensor:
    """Grad-CAM++ at the layer's resolution: Tensor[B,h,w] (see :func:`gradcam_pp`)."""
    return gradient_cam_maps(gradcam_pp_from_gradients, model, images, targets, layer, score, batch_size, sign)


@register_method(
    "gradcam_pp",
    paper="Chattopadhyay, Sarkar, Howlader, Balasubramanian. Grad-CAM++: Generalized Gradient-Based Visual "
    "Explanations for Deep Convolutional Networks. WACV 2018",
    family="cam",
    applicability=layer_cam_applicability,
    constraints=CAM_CONSTRAINTS,
)
def gradcam_pp(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None, score: str = "logit",
    batch_size: int = 64, sign: str = "positive",
) -> torch.Tensor:
    """Grad-CAM++ with the closed-form weights of the paper's eq. 19 (exponential score).

    a_ij = g^2 / (2 g^2 + sum_ab A_ab g^3) where g != 0 (else 0);
    w_k = sum_ij a_ij relu(g_ij); map = ReLU(sum_k w_k A_k), upsampled. Tensor[B,H,W].
    """
    return upsample(gradcam_pp_maps(model, images, targets, layer, score, batch_size, sign), images.shape[-2:])


for _name, _fn in (("gradcam", gradcam_from_gradients), ("gradcam_pp", gradcam_pp_from_gradients)):
    derive_gradient_cam(_name, _fn)


SCORECAM_WEIGHTS = ("probability", "channel_softmax")


def scorecam_maps(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layer: str | None = None,
    weights: str = "probability", align_corners: bool = False, batch_size: int | str = 64,
    precision: str = "float32", sign: str = "positive",
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
                report_progress(i * k + sl.start, b * k)
                x = buffer[: sl.stop - sl.start]
                torch.mul(source[i : i + 1], masks[sl, None], out=x)
                logits = upcast(safe_forward(model, x))
                scores[i, sl] = target_score(logits, targets[i : i + 1].expand(logits.shape[0]), kind)
    if weights == "channel_softmax":
        scores = scores.softmax(1)
    return apply_sign((scores[:, :, None, None] * a).sum(1), sign)


@register_method(
    "scorecam",
    paper="Wang, Wang, Du, Yang, Zhang, Ding, Mardziel, Hu. Score-CAM: Score-Weighted Visual Explanations for "
    "Convolutional Neural Networks. CVPR-W 2020",
    family="cam",
    needs_grad=False,
    applicability=layer_cam_applicability,
    constraints={"sign": CAM_SIGNS, "weights": SCORECAM_WEIGHTS},
)
def scorecam(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None,
    weights: str = "probability", align_corners: bool = False, batch_size: int | str = 64,
    precision: str = "float32", sign: str = "positive",
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
    maps = scorecam_maps(model, images, targets, layer, weights, align_corners, batch_size, precision, sign)
    return upsample(maps, images.shape[-2:])


@register_method(
    "guided_gradcam",
    paper="Selvaraju et al. Grad-CAM (Guided Grad-CAM, section 3.1). ICCV 2017",
    family="cam",
    applicability=guided_gradcam_applicability,
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
    repeat_layer_note(model, p["layer"], images.shape[-2:])
    gb = guided_gradients(model, images, targets, p["score"], p["batch_size"])
    cam_up = upsample(gradcam_from_gradients(gp.acts, gp.layer_grads), images.shape[-2:])
    return reduce_channels(gb * cam_up[:, None], p["reduce"])
