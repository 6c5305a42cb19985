"""The peers' methods by name: ``captum:<Class>`` and ``gradcam:<Class>``.

``captum:DeepLift``, ``captum:GradientShap``, ``captum:Lime`` ... wrap any attribution
class of Captum (Kokhlikyan et al., "Captum: A unified and generic model
interpretability library for PyTorch", 2020); ``gradcam:EigenCAM``,
``gradcam:HiResCAM`` ... wrap pytorch-grad-cam's CAM classes (Gildenblat et al.,
github.com/jacobgil/pytorch-grad-cam). They are registered on first use, so they
behave as every other method: the same contract (``heatmaps[B,H,W]`` at the input
resolution), the model guard, the runner, the leaderboard.

Parameters (``method_params``):

- ``init`` / ``attribute``: keyword arguments of the class's constructor and of its
  ``attribute`` call (names checked against their signatures before a run starts);
- ``layer``: for Captum's ``Layer*`` classes and every pytorch-grad-cam class, the module
  name; default the module whose output is ``forward_features`` (ours for CAM methods);
- ``baseline``: the constant baseline (normalised space) passed as ``baselines`` where the
  class takes one and ``attribute`` does not set it;
- ``feature_grid``: for Captum's perturbation classes that take a ``feature_mask``
  (FeatureAblation, FeaturePermutation, Lime, KernelShap, ShapleyValueSampling,
  ShapleyValues), square cells of this many pixels (all channels of a cell together);
  default min(H, W) / 14 rounded, as our occlusion window;
- ``sign`` / ``reduce``: how input attributions [B,3,H,W] become a map, as for our gradient
  methods (default max over channels of |A|); layer attributions [B,K,h,w] are summed over
  channels (signed) and upsampled bilinearly.

pytorch-grad-cam scales every map to [0, 1] with OpenCV; the wrapper computes the map
from the class's own ``get_cam_image`` (with its ReLU) and upsamples it with torch
instead, unscaled, so it compares with the other methods. Classes that override the
per-layer computation or the forward pass (FullGrad, FinerCAM, RefineCAM, SESS,
ShapleyCAM) are called as a whole: their maps are pytorch-grad-cam's scaled ones, and a
note on every row says so.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..errors import NotApplicableError, SaliencyBenchError, UnknownNameError
from ..modelutil import get_module, has_feature_head_split
from ..registry import check_params
from .base import METHODS, MethodSpec, add_note, batch_slices, upsample
from .gradient import attribution_map, resolve_sign

PREFIXES = {"captum": ("captum", "captum"), "gradcam": ("pytorch_grad_cam", "gradcam")}
FEATURE_MASK_CLASSES = ("FeatureAblation", "FeaturePermutation", "Lime", "KernelShap", "ShapleyValueSampling",
                        "ShapleyValues")
WHOLE_CAM_CLASSES = ("FullGrad", "FinerCAM", "RefineCAM", "SESS", "ShapleyCAM")
CAPTUM_PAPER = ("Kokhlikyan et al. Captum: A unified and generic model interpretability library for PyTorch. "
                "arXiv 2020")
GRADCAM_PAPER = "Gildenblat et al. pytorch-grad-cam (github.com/jacobgil/pytorch-grad-cam)"


def _import(prefix: str) -> Any:
    module, extra = PREFIXES[prefix]
    try:
        return __import__(module)
    except ImportError:
        raise SaliencyBenchError(f"{prefix}:<Class> methods need the {module} package: pip install "
                                 f"'saliencybench[{extra}]'") from None


def available_classes(prefix: str) -> list[str]:
    """The class names a prefix can wrap (empty when its package is not installed)."""
    try:
        _import(prefix)
    except SaliencyBenchError:
        return []
    if prefix == "captum":
        import captum.attr as ca

        return sorted(n for n, c in vars(ca).items() if inspect.isclass(c) and callable(getattr(c, "attribute", None))
                      and n not in ("Attribution", "GradientAttribution", "PerturbationAttribution", "NoiseTunnel",
                                    "LayerAttribution", "NeuronAttribution"))
    import pytorch_grad_cam as pg
    from pytorch_grad_cam.base_cam import BaseCAM

    return sorted(n for n, c in vars(pg).items() if inspect.isclass(c) and issubclass(c, BaseCAM) and c is not BaseCAM)


def final_feature_module(model: nn.Module, images: torch.Tensor) -> str:
    """The name of the module whose output is the model's ``forward_features`` output (the
    default layer of our CAM methods), found on one forward pass of ``images[:1]``."""
    if not has_feature_head_split(model):
        raise NotApplicableError(f"{type(model).__name__} has no forward_features; pass layer='<module name>'")
    outputs: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.append((n, o)))
             for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            feats = model.forward_features(images[:1])
    finally:
        for h in hooks:
            h.remove()
    for name, out in reversed(outputs):
        if out is feats:
            return name
    for name, out in reversed(outputs):
        if isinstance(out, torch.Tensor) and out.shape == feats.shape and torch.equal(out, feats):
            return name
    raise NotApplicableError(f"no module of {type(model).__name__} outputs forward_features (it ends in a "
                             "functional operation); pass layer='<module name>'")


def _grid_mask(h: int, w: int, cell: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(h, device=device) // cell
    cols = torch.arange(w, device=device) // cell
    return (rows[:, None] * ((w + cell - 1) // cell) + cols[None, :])[None, None]


def _captum_method(cls_name: str) -> Any:
    _import("captum")
    import captum.attr as ca

    if cls_name not in available_classes("captum"):
        raise UnknownNameError("Captum attribution class", cls_name, available_classes("captum"))
    cls = getattr(ca, cls_name)
    is_layer = "layer" in inspect.signature(cls.__init__).parameters
    attr_sig = inspect.signature(cls.attribute).parameters

    def fn(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, init: dict | None = None,
           attribute: dict | None = None, layer: str | None = None, baseline: float = 0.0,
           feature_grid: int | None = None, sign: str | None = None, reduce: str | None = None,
           batch_size: int = 16) -> torch.Tensor:
        """Captum attribution ``cls_name`` as a heatmap Tensor[B,H,W] (see :mod:`saliencybench.methods.peers`)."""
        h, w = images.shape[-2:]
        if is_layer:
            module = get_module(model, layer or final_feature_module(model, images))
            explainer = cls(model, module, **(init or {}))
        else:
            explainer = cls(model, **(init or {}))
        kwargs = dict(attribute or {})
        if "baselines" in attr_sig and "baselines" not in kwargs:
            kwargs["baselines"] = torch.full_like(images[:1], float(baseline))
        if cls_name in FEATURE_MASK_CLASSES and "feature_mask" not in kwargs:
            cell = int(feature_grid or max(1, round(min(h, w) / 14)))
            kwargs["feature_mask"] = _grid_mask(h, w, cell, images.device)
            add_note(f"{cls_name}: features are {cell}x{cell} px cells")
        out = []
        for sl in batch_slices(images.shape[0], batch_size):
            x = images[sl].clone().requires_grad_(True)
            a = explainer.attribute(x, target=targets[sl], **kwargs)
            a = a[0] if isinstance(a, tuple) else a
            out.append(a.detach().float())
        att = torch.cat(out)
        if att.shape[1:] == images.shape[1:]:
            return attribution_map(att, sign, reduce)
        if att.ndim == 4:
            return upsample(att.sum(1), (h, w))
        raise NotApplicableError(f"captum:{cls_name} returned attributions of shape {tuple(att.shape)}, neither the "
                                 "input's nor a layer's [B,K,h,w]")

    def finalise(p: dict[str, Any]) -> dict[str, Any]:
        init_sig = inspect.signature(cls.__init__).parameters
        check_params("captum constructor of", cls_name, p.get("init") or {}, None,
                     {k: v.default for k, v in init_sig.items() if k not in ("self", "forward_func", "layer", "model")})
        check_params("captum attribute() of", cls_name, p.get("attribute") or {}, None,
                     {k: v.default for k, v in attr_sig.items() if k not in ("self", "inputs", "target")})
        sign, reduce = resolve_sign(p.get("sign"), p.get("reduce"))
        return {**p, "sign": sign, "reduce": reduce}

    return fn, finalise, f"Captum {cls_name}; {CAPTUM_PAPER}"


def _gradcam_method(cls_name: str) -> Any:
    _import("gradcam")
    import pytorch_grad_cam as pg
    from pytorch_grad_cam.base_cam import BaseCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if cls_name not in available_classes("gradcam"):
        raise UnknownNameError("pytorch-grad-cam class", cls_name, available_classes("gradcam"))
    cls = getattr(pg, cls_name)
    whole = cls_name in WHOLE_CAM_CLASSES or cls.forward is not BaseCAM.forward or \
        cls.compute_cam_per_layer is not BaseCAM.compute_cam_per_layer

    def fn(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, layer: str | None = None,
           init: dict | None = None, eigen_smooth: bool = False, batch_size: int = 16) -> torch.Tensor:
        """pytorch-grad-cam ``cls_name`` as a heatmap Tensor[B,H,W], unscaled where the class allows."""
        module = get_module(model, layer or final_feature_module(model, images))
        h, w = images.shape[-2:]
        cam = cls(model=model, target_layers=[module], **(init or {}))
        out = []
        try:
            for sl in batch_slices(images.shape[0], batch_size):
                x = images[sl].clone().requires_grad_(True)  # the model's parameters are frozen by the guard
                tg = [ClassifierOutputTarget(int(t)) for t in targets[sl]]
                if whole:
                    out.append(torch.as_tensor(cam(input_tensor=x, targets=tg, eigen_smooth=eigen_smooth)).float())
                    continue
                outputs = cam.activations_and_grads(x)
                if cam.uses_gradients:
                    model.zero_grad()
                    sum(t(o) for t, o in zip(tg, outputs)).backward(retain_graph=True)
                acts = cam.activations_and_grads.activations[0].cpu().data.numpy()
                grads = (cam.activations_and_grads.gradients[0].cpu().data.numpy()
                         if cam.activations_and_grads.gradients else None)
                maps = torch.as_tensor(cam.get_cam_image(x, module, tg, acts, grads, eigen_smooth)).float()
                out.append(upsample(maps.clamp(min=0).to(images.device), (h, w)))
        finally:
            cam.activations_and_grads.release()
        if whole:
            add_note(f"gradcam:{cls_name} maps are pytorch-grad-cam's, scaled to [0, 1] per image")
        return torch.cat(out).to(images.device)

    return fn, None, f"pytorch-grad-cam {cls_name}; {GRADCAM_PAPER}"


def register_peer(name: str) -> MethodSpec:
    """Register ``captum:<Class>`` or ``gradcam:<Class>`` as a method (once) and return its spec."""
    if name in METHODS:
        return METHODS.get(name)
    prefix, _, cls_name = name.partition(":")
    if prefix not in PREFIXES or not cls_name:
        raise UnknownNameError("method", name, METHODS.names())
    fn, finalise, paper = (_captum_method if prefix == "captum" else _gradcam_method)(cls_name)
    params = {k: v.default for k, v in inspect.signature(fn).parameters.items()
              if v.kind is inspect.Parameter.KEYWORD_ONLY}
    spec = MethodSpec(name, fn, paper, prefix, params, summary=f"{paper.split(';')[0]} (wrapped)",
                      constraints={"batch_size": ">=1", "feature_grid": ">=1"}, finalise=finalise)
    return METHODS.add(name, spec)


__all__ = ["register_peer", "available_classes", "final_feature_module"]
