"""Model passes per image of every method and metric (the declared cost table beside the registries),
for :mod:`saliencybench.benchmark.plan`.

A cost is ``(forwards, backwards)``: how many images go forward through the model, and how
many backward from its output, per image explained or scored. The built-in methods and
metrics declare theirs here, from their resolved parameters at the input size (H, W) and
the model, so the counts follow the code's protocol:

- saliency, guided backprop, input x gradient, deconvnet, Grad-CAM, Grad-CAM++: 1 + 1;
  Guided Grad-CAM 2 + 2 (guided gradients and Grad-CAM); CAM 1 forward;
- Integrated Gradients ``n_steps`` + ``n_steps``; SmoothGrad, SmoothGrad-Squared, VarGrad
  ``n_samples`` + ``n_samples``;
- occlusion: one forward per window position (Captum's grid, ``window_starts``) + 1 clean;
  RISE ``n_masks``; Score-CAM 1 + the layer's channels K; the baselines 0;
- deletion, insertion: one forward per curve point, n + 1 (``curve_points``), each on its own;
- sanity check: (1 + randomised stages) x the method's cost; max-sensitivity and local
  Lipschitz ``n_samples`` x the method's; avg-sensitivity shares max-sensitivity's
  explanations when both are scored with the same parameters (their group's scorer);
  random logit 1 x the method's; grid pointing game ``repeats`` x the method's (an upper
  bound: only images in a mosaic are explained; ``cell="full"`` mosaics are 2H x 2W,
  counted as 4 passes at H x W each);
- metrics that read only heatmaps, ground truth or labels: 0.

A plug-in without a declared cost is measured: one call on one image, its passes counted
by hooks (:func:`counting`). Plug-ins may declare theirs with :func:`declare_method_cost` /
:func:`declare_metric_cost`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .methods.base import explain, get_method
from .metrics.base import GROUPS, ScoreBatch, get_metric
from .modelutil import model_guard

Passes = tuple[float, float]
MethodCost = Callable[[dict[str, Any], tuple[int, int], nn.Module], Passes]


@dataclass
class MetricCall:
    """What a metric's cost depends on: its resolved ``params``, the resolved params of every
    configured member of its group, the input ``size`` (H, W), the ``model``, and the scored
    method's passes per image at a size (``method(size)``)."""

    params: dict[str, Any]
    group: dict[str, dict[str, Any]]
    size: tuple[int, int]
    model: nn.Module
    method: Callable[[tuple[int, int]], Passes]


MetricCost = Callable[[MetricCall], Passes]
METHOD_COSTS: dict[str, MethodCost] = {}
METRIC_COSTS: dict[str, MetricCost] = {}
PASS_FREE_INPUTS = {"masks", "boxes", "heatmaps", "labels"}


def declare_method_cost(name: str, cost: MethodCost) -> None:
    """Declare method ``name``'s passes per image: ``cost(params, (H, W), model) -> (fwd, bwd)``."""
    METHOD_COSTS[name] = cost


def declare_metric_cost(name: str, cost: MetricCost) -> None:
    """Declare metric ``name``'s passes per scored image: ``cost(MetricCall) -> (fwd, bwd)``."""
    METRIC_COSTS[name] = cost


def _times(k: float, p: Passes) -> Passes:
    return (k * p[0], k * p[1])


_CHANNELS: dict[tuple[int, str | None, tuple[int, int]], int] = {}


def layer_channels(model: nn.Module, layer: str | None, size: tuple[int, int]) -> int:
    """Channels K of the CAM layer's output (``None``: timm's forward_features) at ``size``."""
    key = (id(model), layer, tuple(size))
    if key not in _CHANNELS:
        from .methods.cam import layer_activations

        p = next(model.parameters())
        x = torch.zeros(1, 3, *size, device=p.device, dtype=p.dtype)
        with model_guard(model):
            a, _, _ = layer_activations(model, x, torch.zeros(1, dtype=torch.long, device=p.device), layer,
                                        with_grads=False)
        _CHANNELS[key] = int(a.shape[1])
    return _CHANNELS[key]


def occlusion_windows(params: dict[str, Any], size: tuple[int, int]) -> int:
    """Window positions of occlusion on an image of ``size``: ny x nx (Captum's grid)."""
    from .methods.perturbation import default_occlusion_window, window_starts

    h, w = size
    dw, ds = default_occlusion_window(h, w, params.get("windows_per_side", 14.0))
    window = params.get("window") or dw
    stride = params.get("stride") or ds
    return len(window_starts(h, window, stride)) * len(window_starts(w, window, stride))


def curve_forwards(params: dict[str, Any], size: tuple[int, int]) -> int:
    """Forwards of one deletion or insertion curve per image: its n + 1 points."""
    from .metrics.perturbation_curves import curve_points

    h, w = size
    return len(curve_points(h * w, params.get("step"), params.get("n_steps"), w))


for _name in ("saliency", "guided_backprop", "input_x_gradient", "deconvnet", "gradcam", "gradcam_pp", "xgradcam",
              "layercam", "transformer_attribution"):
    declare_method_cost(_name, lambda p, s, m: (1, 1))
for _name in ("smoothgrad", "smoothgrad_sq", "vargrad"):
    declare_method_cost(_name, lambda p, s, m: (p["n_samples"], p["n_samples"]))
for _name in ("random", "center", "edge"):
    declare_method_cost(_name, lambda p, s, m: (0, 0))
declare_method_cost("guided_gradcam", lambda p, s, m: (2, 2))
declare_method_cost("cam", lambda p, s, m: (1, 0))
for _name in ("attention_rollout", "raw_attention"):
    declare_method_cost(_name, lambda p, s, m: (1, 0))
declare_method_cost("integrated_gradients", lambda p, s, m: (p["n_steps"], p["n_steps"]))
declare_method_cost("occlusion", lambda p, s, m: (occlusion_windows(p, s) + 1, 0))
declare_method_cost("rise", lambda p, s, m: (p["n_masks"], 0))
declare_method_cost("scorecam", lambda p, s, m: (1 + layer_channels(m, p.get("layer"), s), 0))

declare_metric_cost("deletion", lambda c: (curve_forwards(c.params, c.size), 0))
declare_metric_cost("insertion", lambda c: (curve_forwards(c.params, c.size), 0))


def _sanity(c: MetricCall) -> Passes:
    from .metrics.sanity import randomization_blocks

    return _times(1 + len(randomization_blocks(c.model, c.params.get("granularity", "block"))), c.method(c.size))


def _avg_sensitivity(c: MetricCall) -> Passes:
    other = c.group.get("max_sensitivity")
    key = ("n_samples", "radius", "seed")
    if "sensitivity" in GROUPS and other is not None and all(other.get(k) == c.params.get(k) for k in key):
        return (0, 0)  # the group scores both from one set of explanations, counted with max_sensitivity
    return _times(c.params["n_samples"], c.method(c.size))


def _grid(c: MetricCall) -> Passes:
    if c.params.get("cell") == "full":
        h, w = c.size
        return _times(4 * c.params.get("repeats", 1), c.method((2 * h, 2 * w)))
    return _times(c.params.get("repeats", 1), c.method(c.size))


declare_metric_cost("sanity_randomization", _sanity)
declare_metric_cost("max_sensitivity", lambda c: _times(c.params["n_samples"], c.method(c.size)))
declare_metric_cost("avg_sensitivity", _avg_sensitivity)
declare_metric_cost("local_lipschitz", lambda c: _times(c.params["n_samples"], c.method(c.size)))
declare_metric_cost("random_logit", lambda c: c.method(c.size))
declare_metric_cost("grid_pointing_game", _grid)


# ---- measured costs -----------------------------------------------------------------------------


@contextmanager
def counting(model: nn.Module) -> Iterator[dict[str, int]]:
    """Count images entering the model's first parameterised leaf module (``forwards``) and
    gradients of batches flowing back from its last one (``backwards``); deep copies made inside
    the block (the sanity check's) share the counters."""
    leaves = [m for m in model.modules() if not any(True for _ in m.children())
              and any(True for _ in m.parameters(recurse=False))]
    counts = {"forwards": 0, "backwards": 0}
    if not leaves:
        yield counts
        return

    def on_input(_m: nn.Module, inp: tuple[Any, ...]) -> None:
        counts["forwards"] += int(inp[0].shape[0])

    def on_output(_m: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda g: counts.__setitem__("backwards", counts["backwards"] + int(g.shape[0])))

    handles = [leaves[0].register_forward_pre_hook(on_input), leaves[-1].register_forward_hook(on_output)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _probe(model: nn.Module, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    p = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *size, generator=g).to(p.device, p.dtype)
    return x, torch.zeros(1, dtype=torch.long, device=p.device)


def measure_method(name: str, params: dict[str, Any], size: tuple[int, int], model: nn.Module) -> Passes:
    """Passes of one call of method ``name`` on one random image of ``size``, counted by hooks."""
    x, t = _probe(model, size)
    with counting(model) as c:
        explain(model, x, t, name, **params)
    return (c["forwards"], c["backwards"])


def measure_metric(name: str, params: dict[str, Any], size: tuple[int, int], model: nn.Module, method: str,
                   method_params: dict[str, Any]) -> Passes:
    """Passes of one score of metric ``name`` on one random image and its ``method`` heatmap."""
    x, t = _probe(model, size)
    heat = explain(model, x, t, method, **method_params)
    with torch.inference_mode(), model_guard(model):
        logits = model(x).float()
    h, w = size
    batch = ScoreBatch(model, x, t, heat, [torch.ones(h, w, dtype=torch.bool)],
                       [torch.tensor([[0.0, 0.0, float(w), float(h)]])], t, logits, method, method_params, 0,
                       int(logits.shape[1]))
    with counting(model) as c:
        get_metric(name).score(batch, params)
    return (c["forwards"], c["backwards"])


def method_passes(name: str, params: dict[str, Any], size: tuple[int, int], model: nn.Module) -> tuple[Passes, str]:
    """(passes per image, "declared" or "measured") of method ``name`` with resolved ``params``."""
    if name in METHOD_COSTS:
        return METHOD_COSTS[name](params, size, model), "declared"
    return measure_method(name, params, size, model), "measured"


def metric_passes(name: str, group: dict[str, dict[str, Any]], size: tuple[int, int], model: nn.Module,
                  method: str, config: Any) -> tuple[Passes, str]:
    """(passes per scored image, how) of metric ``name`` scoring ``method``'s maps; ``group``: the
    resolved params of the configured members of its score task (``name`` among them)."""
    spec = get_metric(name)

    def method_cost(s: tuple[int, int]) -> Passes:
        return method_passes(method, get_method(method).resolve_params(config.method_params_for(method), s), s,
                             model)[0]

    if name in METRIC_COSTS:
        return METRIC_COSTS[name](MetricCall(group[name], group, size, model, method_cost)), "declared"
    if set(spec.inputs) <= PASS_FREE_INPUTS:
        return (0, 0), "none"
    mp = get_method(method).resolve_params(config.method_params_for(method), size)
    return measure_metric(name, group[name], size, model, method, mp), "measured"
