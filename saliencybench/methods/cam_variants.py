"""XGrad-CAM and Layer-CAM: gradient CAMs with activation-weighted and per-position weights.

Both use :mod:`~saliencybench.methods.cam`'s driver (the layer's activations A[B,K,h,w] and
gradients dS/dA, on CNNs and transformers alike, ``layer=None`` the family's default layer),
derive from a shared pass like Grad-CAM, and take the same ``sign`` option. Maps are computed
at the layer's resolution (``*_maps``, Tensor[B,h,w]) and upsampled bilinearly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import register_method, upsample
from .cam import CAM_CONSTRAINTS, apply_sign, derive_gradient_cam, gradient_cam_maps, layer_cam_applicability

XGRADCAM_EPS = 1e-7  # added to each channel's activation sum, as pytorch-grad-cam's XGradCAM does


def xgradcam_from_gradients(a: torch.Tensor, g: torch.Tensor, sign: str = "positive") -> torch.Tensor:
    """XGrad-CAM from A[B,K,h,w] and dS/dA[B,K,h,w]: ReLU(sum_k w_k A_k) with
    w_k = sum_ij A_kij / (sum_ab A_kab + 1e-7) * dS/dA_kij (Fu et al. eq. 9), Tensor[B,h,w]."""
    w = (g * a / (a.sum((2, 3), keepdim=True) + XGRADCAM_EPS)).sum((2, 3), keepdim=True)
    return apply_sign((w * a).sum(1), sign)


def layercam_from_gradients(a: torch.Tensor, g: torch.Tensor, sign: str = "positive") -> torch.Tensor:
    """Layer-CAM from A[B,K,h,w] and dS/dA[B,K,h,w]: ReLU(sum_k ReLU(dS/dA_k) * A_k), per position, Tensor[B,h,w]."""
    return apply_sign((F.relu(g) * a).sum(1), sign)


def xgradcam_maps(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layer: str | None = None, score: str = "logit",
    batch_size: int = 64, sign: str = "positive",
) -> torch.Tensor:
    """XGrad-CAM at the layer's resolution: Tensor[B,h,w] (see :func:`xgradcam`)."""
    return gradient_cam_maps(xgradcam_from_gradients, model, images, targets, layer, score, batch_size, sign)


@register_method(
    "xgradcam",
    paper="Fu, Hu, Dong, Ye, Wang, Zhu, Li. Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of "
    "CNNs. BMVC 2020",
    family="cam",
    applicability=layer_cam_applicability,
    constraints=CAM_CONSTRAINTS,
)
def xgradcam(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None, score: str = "logit",
    batch_size: int = 64, sign: str = "positive",
) -> torch.Tensor:
    """XGrad-CAM: Grad-CAM with activation-weighted gradients as channel weights, upsampled.

    w_k = sum_ij (A_kij / sum_ab A_kab) dS/dA_kij, the weights that satisfy the paper's
    sensitivity and conservation axioms (eq. 9; 1e-7 added to the denominator as
    pytorch-grad-cam does); map = ReLU(sum_k w_k A_k). Returns Tensor[B,H,W].
    """
    return upsample(xgradcam_maps(model, images, targets, layer, score, batch_size, sign), images.shape[-2:])


def layercam_maps(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layer: str | None = None, score: str = "logit",
    batch_size: int = 64, sign: str = "positive",
) -> torch.Tensor:
    """Layer-CAM at the layer's resolution: Tensor[B,h,w] (see :func:`layercam`)."""
    return gradient_cam_maps(layercam_from_gradients, model, images, targets, layer, score, batch_size, sign)


@register_method(
    "layercam",
    paper="Jiang, Zhang, Hou, Cheng, Wei. LayerCAM: Exploring Hierarchical Class Activation Maps for Localization. "
    "IEEE TIP 2021",
    family="cam",
    applicability=layer_cam_applicability,
    constraints=CAM_CONSTRAINTS,
)
def layercam(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None, score: str = "logit",
    batch_size: int = 64, sign: str = "positive",
) -> torch.Tensor:
    """Layer-CAM: each position's activations weighted by their own positive gradients, upsampled.

    map_ij = ReLU(sum_k ReLU(dS/dA_kij) A_kij) (the paper's eq. 5-6, one layer); unlike
    Grad-CAM's one weight per channel, the weight varies over space, so it stays faithful
    at shallow layers. Returns Tensor[B,H,W].
    """
    return upsample(layercam_maps(model, images, targets, layer, score, batch_size, sign), images.shape[-2:])


derive_gradient_cam("xgradcam", xgradcam_from_gradients)
derive_gradient_cam("layercam", layercam_from_gradients)
