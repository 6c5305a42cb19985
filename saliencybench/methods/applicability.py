"""Which methods apply to which models: one answer per (method, model), and the whole table.

Every registered method may declare an ``applicability`` check (its defining rule holds on
the model, or the reason it does not); methods without one apply everywhere. What the checks
answer per architecture family (timm models; "runs" means the method still runs, and says
why its result is not the paper's method):

===============================  ===============  ==============  ===============  ==============  ===============
method                           CNN with GAP+FC  VGG, MobileNet  ViT, DeiT        Swin            ConvNeXt;
                                 (ResNet, EffNet)  V3                                               MaxViT/CoAtNet
===============================  ===============  ==============  ===============  ==============  ===============
cam                              ok               no: layers      no: class-token  ok: avg pool +  no: LayerNorm
                                                  after pooling   head(s)          one linear      after pooling
                                                                                                   (``*_rw``: ok)
gradcam, gradcam_pp, xgradcam,   ok               ok              ok (blocks[-1]   ok (final NHWC  ok
layercam, scorecam                                                .norm1)          map)
guided_backprop, guided_gradcam  ok (ReLU)        ok on ReLU      runs: GELU, not  runs: GELU      runs: GELU/SiLU
                                                  only            the guided rule
attention_rollout,               no: no           no              ok (class or     no: windowed,   no: attention in
transformer_attribution,         attention                        distillation     no class token  stages, no class
raw_attention                                                     token)                           token
saliency, integrated_gradients,  ok               ok              ok               ok              ok
smoothgrad, occlusion, rise
===============================  ===============  ==============  ===============  ==============  ===============

CAM on ConvNeXt and the ``*_tf`` MaxViT/CoAtNet variants: their head
(``NormMlpClassifierHead``) is global average pooling, a LayerNorm, then the linear
classifier, so logit_t = sum_k W_tk gamma_k (g_k - mean(g)) / std(g) + const for the pooled
vector g: the logits are not Linear(GAP(features)) and Zhou et al.'s CAM (sum_k W_tk A_k)
does not decompose them. We report it as not applicable rather than a CAM with the norm
folded in per image. timm's ``*_rw`` MaxViT/CoAtNet variants normalise before pooling
(``model.norm``, inside ``forward_features``) and then pool and apply one linear layer, so
CAM applies there exactly, as on Swin. The numerical check in
:func:`~saliencybench.modelutil.gap_linear_head` decides, on the model's actual logits.
Guided backprop on GELU networks keeps the guided rule at the ReLUs there are (none in a
ViT), which is the plain gradient there: flagged, as for any non-ReLU network.
"""

from __future__ import annotations

import pandas as pd
from torch import nn

from ..errors import NotApplicableError
from .base import Applicability, get_method, list_methods


def applicability(method: str, model: nn.Module) -> Applicability:
    """Whether registered ``method``'s defining rule holds on ``model``, and why not.

    The checks may run one probe forward pass (CAM's head test, the CAM layer probe);
    the model is left as found.
    """
    try:
        return get_method(method).check(model)
    except NotApplicableError as e:
        return Applicability(False, str(e))


def applicability_matrix(models: dict[str, nn.Module], methods: list[str] | None = None) -> pd.DataFrame:
    """Method x model table: ``"ok"`` or the reason the method does not apply.

    ``models``: name -> model (the column order); ``methods``: registered names (the row
    order; default all, sorted). Returns a DataFrame of strings, index ``method``.
    """
    names = list_methods() if methods is None else list(methods)
    for name in names:
        get_method(name)  # unknown names fail here, listing the valid ones
    rows = {}
    for name in names:
        rows[name] = {}
        for label, model in models.items():
            found = applicability(name, model)
            rows[name][label] = "ok" if found.applicable else found.reason
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(models))
    table.index.name = "method"
    return table


__all__ = ["applicability", "applicability_matrix"]
