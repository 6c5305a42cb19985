"""Model plumbing shared by methods and metrics: state guard, scores, layers, heads.

Nothing here keeps state on the model: :func:`model_guard` puts the model in eval
mode and freezes its parameters for the duration of a call, and restores training
flags, ``requires_grad`` and ``inplace`` flags and removes every hook on exit, also
when an exception is raised midway.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import InvalidInputError, NotApplicableError, UnknownNameError

SCORES = ("logit", "probability", "log_probability")


@dataclass
class GuardState:
    """Handles and attribute changes registered during a guarded call, undone on exit."""

    handles: list = field(default_factory=list)
    restore: list[Callable[[], None]] = field(default_factory=list)


@contextmanager
def model_guard(model: nn.Module, *, freeze: bool = True) -> Iterator[GuardState]:
    """Run a block with ``model`` in eval mode (and frozen parameters); restore it after.

    Yields a :class:`GuardState` whose ``handles`` (hook handles) are removed and
    whose ``restore`` callables are run when the block exits, whatever happens.
    """
    training = [(m, m.training) for m in model.modules()]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    state = GuardState()
    try:
        model.eval()
        if freeze:
            for p, _ in requires:
                p.requires_grad_(False)
        yield state
    finally:
        for h in state.handles:
            h.remove()
        for undo in reversed(state.restore):
            undo()
        for m, flag in training:
            m.training = flag
        for p, flag in requires:
            p.requires_grad_(flag)


@contextmanager
def channels_last(model: nn.Module, enabled: bool = True) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Run a block with the model's 4-D weights in channels_last memory format; restore them after.

    Yields the function that puts an input batch Tensor[B,3,H,W] in the same
    format. The values computed are the same up to float summation order; on CPU
    (oneDNN) and GPU convolutions run faster in this layout, depthwise ones much
    faster. ``enabled=False`` changes nothing and yields the identity.
    """
    if not enabled:
        yield lambda x: x
        return
    saved = {name: t.data for name, t in [*model.named_parameters(), *model.named_buffers()] if t.ndim == 4}
    try:
        model.to(memory_format=torch.channels_last)
        yield lambda x: x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
    finally:
        current = dict([*model.named_parameters(), *model.named_buffers()])
        for name, data in saved.items():
            current[name].data = data


class _DropAct(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its normalisation is folded: drop, then act."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _norm_remainder(bn: nn.Module) -> nn.Module | None:
    """The module that replaces a folded batch norm, or ``None`` when it cannot be folded."""
    if bn.training or not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return None
    if bn._forward_hooks or bn._forward_pre_hooks:
        return None
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and isinstance(getattr(bn, "drop", None), nn.Module) \
            and isinstance(getattr(bn, "act", None), nn.Module):
        return _DropAct(bn.drop, bn.act)
    return None


# Tensor operations (``__torch_function__`` names) that only read a tensor's metadata, never its values.
METADATA_QUERIES = frozenset({"size", "dim", "__get__", "__len__", "numel", "nelement", "ndimension", "stride",
                              "is_contiguous", "data_ptr", "element_size", "is_floating_point", "is_complex",
                              "get_device", "storage_offset", "_assert", "__hash__"})


class _ValueUses(TorchFunctionMode):
    """Counts, per tensor id, the torch operations that read the tensor's values."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in METADATA_QUERIES:
            for t in iter_tensors([args, kwargs]):
                self.uses[id(t)] = self.uses.get(id(t), 0) + 1
        return func(*args, **kwargs)


def conv_batchnorm_pairs(model: nn.Module, probe: torch.Tensor) -> tuple[list[tuple[nn.Conv2d, nn.Module]], object]:
    """The (convolution, batch norm) pairs where the norm alone reads the convolution's output,
    found on one forward pass of ``probe`` Tensor[1,3,H,W]: ``(pairs, output)``.

    A convolution whose output anything else reads too (a residual sum, an in-place
    activation before the norm), and a convolution or norm called more than once (shared
    modules), is left out: folding would change those other uses.
    """
    produced: dict[int, tuple[torch.Tensor, nn.Conv2d]] = {}  # the tensors are kept alive: ids stay unique
    calls: dict[int, int] = {}
    pairs: dict[int, tuple[nn.Conv2d, nn.Module, torch.Tensor]] = {}
    handles = []
    counter = _ValueUses()

    def conv_hook(m: nn.Module, _inp: object, out: object) -> None:
        calls[id(m)] = calls.get(id(m), 0) + 1
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (out, m)  # type: ignore[assignment]
            counter.uses[id(out)] = 0  # uses of an earlier, freed tensor with the same id do not count

    def bn_hook(m: nn.Module, inp: tuple[object, ...]) -> None:
        calls[id(m)] = calls.get(id(m), 0) + 1
        x = inp[0] if inp else None
        out, conv = produced.get(id(x), (None, None))
        if conv is not None and out is x and getattr(conv, "out_channels", None) == getattr(m, "num_features", 0):
            pairs[id(m)] = (conv, m, out)

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_hook))
    try:
        with counter:
            out = model(probe)
    finally:
        for h in handles:
            h.remove()
    convs = [conv for conv, _, _ in pairs.values()]
    keep = [(c, bn) for c, bn, y in pairs.values()
            if calls[id(c)] == 1 and calls[id(bn)] == 1 and convs.count(c) == 1 and counter.uses.get(id(y)) == 1]
    return keep, out


def _outputs_close(a: object, b: object, rtol: float = 1e-4) -> bool:
    ta, tb = list(iter_tensors(a)), list(iter_tensors(b))
    if len(ta) != len(tb) or not ta:
        return False
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return False
        x, y = x.double(), y.double()
        if not torch.allclose(x, y, rtol=rtol, atol=rtol * float(y.abs().max()) + 1e-12):
            return False
    return True


# model -> {(structure, input shape, dtype, device): [(conv name, norm name)]}: the pairs found
# and checked on the first call, so that later calls on the same model need no probe passes.
_FOLDABLE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, list[tuple[str, str]]]] = weakref.WeakKeyDictionary()


@contextmanager
def folded_batchnorm(model: nn.Module, probe: torch.Tensor) -> Iterator[int]:
    """Run a block with eval-mode batch norms folded into the convolutions that feed them.

    Each norm ``y = (x - mean) / sqrt(var + eps) * gamma + beta`` right after a
    convolution becomes part of that convolution's weight and bias, and the norm is
    swapped for ``nn.Identity`` (timm's ``BatchNormAct2d``: for its drop and act), so
    inference skips one pass over every feature map; this is what compilers do.
    The pairs come from one forward pass of ``probe`` Tensor[1,3,H,W] (a norm is folded
    only if nothing else reads its convolution's output), and the folded model must
    reproduce that pass to 1e-4 of its largest output, else nothing is folded. The
    pairs are remembered per model, module structure and input shape, so later calls
    run no probe. Yields the number of norms folded. Weights, biases and modules are
    restored on exit, also after an exception. Only for inference: not for
    gradients with respect to intermediate layers.
    """
    key = (hash(tuple((name, id(m), type(m)) for name, m in model.named_modules())), tuple(probe.shape[1:]),
           probe.dtype, probe.device.type)
    known = _FOLDABLE.setdefault(model, {}).get(key)
    if known is None:
        with torch.inference_mode():
            pairs, reference = conv_batchnorm_pairs(model, probe)
    else:
        modules = dict(model.named_modules())
        pairs, reference = [(modules[c], modules[b]) for c, b in known], None
    names = {id(m): name for name, m in model.named_modules()}
    parents = {id(m): (parent, name) for parent in model.modules() for name, m in parent.named_children()}
    seen: dict[int, int] = {}  # modules and parameters by how many places hold them (tied weights)
    for m in [*model.modules(remove_duplicate=False), *(p for _, p in model.named_parameters(remove_duplicate=False))]:
        seen[id(m)] = seen.get(id(m), 0) + 1
    undo: list[Callable[[], None]] = []
    folded_count = 0

    def restore() -> None:
        for fn in reversed(undo):
            fn()
        undo.clear()

    try:
        for conv, bn in pairs:
            remainder = _norm_remainder(bn)
            if remainder is None or seen.get(id(bn), 0) != 1 or id(bn) not in parents or any(
                    p is not None and seen.get(id(p), 0) != 1 for p in (conv.weight, conv.bias)):
                continue
            parent, name = parents[id(bn)]
            with torch.inference_mode(False), torch.no_grad():
                scale = bn.running_var.to(conv.weight.dtype).add(bn.eps).rsqrt()
                shift = -bn.running_mean.to(scale.dtype) * scale
                if bn.weight is not None:
                    scale = scale * bn.weight.to(scale.dtype)
                    shift = shift * bn.weight.to(scale.dtype)
                if bn.bias is not None:
                    shift = shift + bn.bias.to(scale.dtype)
                weight = conv.weight.data
                fmt = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) \
                    and not weight.is_contiguous() else torch.contiguous_format
                folded = (weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=fmt)
                bias = shift if conv.bias is None else conv.bias.data * scale + shift
            old_bias = conv.bias
            old_weight, old_bias_data = weight, None if old_bias is None else old_bias.data
            conv.weight.data = folded
            if old_bias is None:
                conv.bias = nn.Parameter(bias, requires_grad=False)
                undo.append(lambda c=conv: setattr(c, "bias", None))
            else:
                old_bias.data = bias
                undo.append(lambda p=old_bias, d=old_bias_data: setattr(p, "data", d))
            undo.append(lambda c=conv, w=old_weight: setattr(c.weight, "data", w))
            setattr(parent, name, remainder)
            undo.append(lambda p=parent, n=name, m=bn: setattr(p, n, m))
            folded_count += 1
        if known is None:
            if folded_count:
                with torch.inference_mode():
                    if not _outputs_close(model(probe), reference):
                        restore()
                        folded_count, pairs = 0, []
            _FOLDABLE[model][key] = [(names[id(c)], names[id(b)]) for c, b in pairs]
        yield folded_count
    finally:
        restore()


@contextmanager
def fast_inference(model: nn.Module, images: torch.Tensor, *, fold: bool = True
                   ) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Run many inference forward passes on inputs like ``images`` Tensor[B,3,H,W] fast.

    For float32/16 inputs (:func:`fast_layout`): weights channels_last
    (:func:`channels_last`) and, with ``fold``, batch norms folded into their
    convolutions (:func:`folded_batchnorm`, checked on one image). Yields the function
    that puts a batch in the model's memory format. Outputs equal plain forward passes
    up to float rounding (about 1e-6 relative). The model is restored on exit.
    """
    if not fast_layout(images):
        yield lambda x: x
        return
    with channels_last(model) as fmt:
        if fold and not any(m.training for m in model.modules()):
            with folded_batchnorm(model, fmt(images[:1])):
                yield fmt
        else:
            yield fmt


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA or CPU allocator)."""
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def safe_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` for a batch Tensor[N,...]; on an out-of-memory error the batch is split
    in halves (recursively, down to one input) and the outputs concatenated."""
    try:
        return model(x)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if not is_out_of_memory(e) or x.shape[0] == 1:
            raise
    if x.is_cuda:
        torch.cuda.empty_cache()
    half = x.shape[0] // 2
    return torch.cat([safe_forward(model, x[:half]), safe_forward(model, x[half:])])


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30


def auto_batch_size(model: nn.Module, image: torch.Tensor, fraction: float = 0.25, limit: int = 256) -> int:
    """A batch size for inference of inputs like ``image`` Tensor[3,H,W] that uses at most
    ``fraction`` of the free memory: the sum of all module outputs' sizes of one
    probe forward bounds the memory per input (inference keeps fewer alive at once)."""
    sizes: list[int] = []

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(image[None])
    finally:
        for h in handles:
            h.remove()
    per_input = max(sum(sizes), image.numel() * image.element_size())
    return int(max(1, min(limit, fraction * free_memory_bytes(image.device) // per_input)))


def resolve_batch_size(batch_size: int | str, model: nn.Module, images: torch.Tensor) -> int:
    """``batch_size`` itself, or :func:`auto_batch_size` for ``"auto"``."""
    if batch_size == "auto":
        return auto_batch_size(model, images[0])
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return batch_size


PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(images: torch.Tensor, precision: str = "float32"):
    """A context running the forward passes in ``precision`` (torch.autocast), or a no-op for float32."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {precision!r}; use one of {sorted(PRECISIONS)}")
    if PRECISIONS[precision] is None:
        return nullcontext()
    return torch.autocast(images.device.type, dtype=PRECISIONS[precision])


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (of autocast) as float32; others unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def fast_layout(images: torch.Tensor) -> bool:
    """Whether many forward passes on ``images`` should run channels_last: float32/16 only
    (oneDNN has no float64 kernels, so float64 references keep the plain layout)."""
    return images.dtype in (torch.float32, torch.float16, torch.bfloat16)


def iter_tensors(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) tensor, list, tuple or dict, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from iter_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_tensors(o)


def int_pair(v: object, default: object = None) -> tuple[int, int]:
    """A module's (h, w) setting as two ints: a scalar, a pair, or the last two of a longer tuple."""
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, (list, tuple)):
        return (int(v[-2]), int(v[-1])) if len(v) >= 2 else (int(v[0]), int(v[0]))
    return (int(v), int(v))


def target_score(logits: torch.Tensor, targets: torch.Tensor, score: str = "logit") -> torch.Tensor:
    """Select the target class score from ``logits[B,C]``: Tensor[B].

    ``score`` is ``"logit"`` (pre-softmax, the default of every method),
    ``"probability"`` (softmax) or ``"log_probability"`` (log-softmax).
    """
    if score == "logit":
        vals = logits
    elif score == "probability":
        vals = logits.softmax(-1)
    elif score == "log_probability":
        vals = logits.log_softmax(-1)
    else:
        raise InvalidInputError(f"unknown score {score!r}; use one of {SCORES}")
    return vals.gather(1, targets.view(-1, 1)).squeeze(1)


def num_classes(model: nn.Module) -> int | None:
    """Number of output classes of a timm-style model, or ``None`` if it cannot be told."""
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name``; an unknown name lists the candidates."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        raise UnknownNameError("layer", name, [n for n in modules if n])
    return modules[name]


def has_feature_head_split(model: nn.Module) -> bool:
    """Whether the model exposes timm's ``forward_features`` / ``forward_head`` split."""
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


# ---- layer outputs as feature maps -------------------------------------------------------
#
# CAM methods need a layer's output as a map A[B,K,h,w]. CNNs give one; a ViT gives tokens
# [B,N,C] (class, distillation and register tokens first), Swin gives NHWC maps. How to turn
# a timm model's layer output into a map is model knowledge that lives in
# ``saliencybench.methods.tokens``, which installs it here with :func:`use_layer_maps` when
# it is imported (saliencybench's own import does so). Without it every layer is read as
# today: 4-D outputs as NCHW, anything else refused. The dependency points one way: tokens
# imports this module, never the reverse.

FEATURES = "forward_features"  # the layer name meaning the output of timm's ``forward_features``


@dataclass(frozen=True)
class LayerMap:
    """How one captured layer output ``raw`` becomes a feature map A[B,K,h,w] and back.

    ``to_map(raw) -> A``; ``from_map(A, raw, detach) -> raw'``, the tensor of ``raw``'s
    shape the forward pass continues with (built from ``A``; parts of ``raw`` that ``A``
    leaves out, such as class tokens, are taken from ``raw``, detached when ``detach``).
    ``note``: how the map was made (empty for plain NCHW maps).
    """

    to_map: Callable[[torch.Tensor], torch.Tensor]
    from_map: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
    note: str = ""


def _plain_layer_map(model: nn.Module, layer: str, module: nn.Module | None, out: object,
                     size: tuple[int, int]) -> LayerMap:
    """Today's reading: a 4-D output is an NCHW map; anything else is refused."""
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        raise NotApplicableError(
            f"layer {layer!r} outputs {type(out).__name__} "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}; a 4-D feature map "
            "[B,K,h,w] is needed: choose a convolutional layer"
        )
    return LayerMap(lambda raw: raw, lambda a, raw, detach: a)


@dataclass
class LayerMaps:
    """The model knowledge :func:`forward_with_layer` uses: ``default_layer(model)`` (a module
    name, or None for ``forward_features``) and ``layer_map(model, layer, module, out, size)``
    (a :class:`LayerMap` for output ``out`` of ``module`` called ``layer`` at input ``size``
    (H, W); ``module`` None for ``forward_features``; raises :class:`NotApplicableError`)."""

    default_layer: Callable[[nn.Module], str | None] = lambda model: None
    layer_map: Callable[[nn.Module, str, nn.Module | None, object, tuple[int, int]], LayerMap] = _plain_layer_map


_LAYER_MAPS = [LayerMaps()]


def use_layer_maps(maps: LayerMaps) -> LayerMaps:
    """Install ``maps`` for :func:`forward_with_layer`; returns the ones it replaces."""
    old, _LAYER_MAPS[0] = _LAYER_MAPS[0], maps
    return old


def resolve_layer(model: nn.Module, layer: str | None) -> str:
    """The layer ``forward_with_layer`` captures: ``layer``, or for None the model's default
    (:data:`FEATURES`, the output of ``forward_features``, unless the installed layer maps
    name another, such as a ViT's ``blocks.<last>.norm1``)."""
    return layer if layer is not None else (_LAYER_MAPS[0].default_layer(model) or FEATURES)


def forward_with_layer(
    model: nn.Module, images: torch.Tensor, layer: str | None, state: GuardState, grad: bool = False,
    through: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``images`` and capture one layer's output as a map: ``(activations[B,K,h,w], logits)``.

    ``layer``: a module name, :data:`FEATURES` for the output of timm's ``forward_features``,
    or None for the model's default (:func:`resolve_layer`: ``forward_features`` for CNNs).
    A named module's output is captured by a forward hook registered on ``state`` (so it
    is removed by :func:`model_guard`). Outputs that are not NCHW maps (ViT tokens, Swin's
    NHWC maps) are turned into A[B,K,h,w] by the installed :class:`LayerMaps`, and the
    forward pass continues from A. With ``grad=True`` the captured activation is a leaf
    that requires grad and the rest of the forward runs from it, so
    ``autograd.grad(logits, activations)`` works even when the model's parameters and
    input are frozen, and the backward pass stops at that layer. With ``through=True``
    the captured map stays inside the graph instead, so one backward pass gives the
    gradients with respect to both the layer and an input that requires grad.
    """
    maps = _LAYER_MAPS[0]
    layer = resolve_layer(model, layer)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    leaf = grad and not through
    if layer == FEATURES:
        if not has_feature_head_split(model):
            raise NotApplicableError(
                f"{type(model).__name__} has no forward_features/forward_head (timm) split, so the "
                "default layer cannot be found; pass layer='<module name>'"
            )
        feats = model.forward_features(images)
        lm = maps.layer_map(model, FEATURES, None, feats, size)
        a = lm.to_map(feats)
        if leaf:
            a = a.detach().requires_grad_(True)
        return a, model.forward_head(lm.from_map(a, feats, leaf))
    module = get_module(model, layer)
    captured: list[torch.Tensor] = []

    def hook(m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        lm = maps.layer_map(model, layer, m, out, size)
        a = lm.to_map(out)
        if leaf:
            a = a.detach().requires_grad_(True)
        captured.append(a)
        # Later in-place ops (ReLU(inplace=True)) must not overwrite the captured map.
        return lm.from_map(a, out, leaf).clone()

    handle = module.register_forward_hook(hook)
    state.handles.append(handle)
    try:
        logits = model(images)
    finally:
        handle.remove()
    if not captured:
        raise NotApplicableError(f"layer {layer!r} was not called in the forward pass; choose another layer")
    return captured[-1], logits


def _head_difference(model: nn.Module) -> str:
    """What in a timm head stands between global average pooling and the classifier, in words."""
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str) and pool in ("token", "map"):
        return (f"{type(model).__name__}'s head reads the class token (global_pool={pool!r}), not an average of "
                "the patch tokens")
    for where, norm in (("fc_norm", getattr(model, "fc_norm", None)),
                        ("head.norm", getattr(getattr(model, "head", None), "norm", None))):
        if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
            return (f"{type(model).__name__}'s head normalises the pooled features ({where} is "
                    f"{type(norm).__name__}) before the classifier, so the logits are not linear in the "
                    "pooled map (ConvNeXt, MaxViT and CoAtNet heads do this)")
    return (f"{type(model).__name__}'s head computes something else (another pooling or extra layers between "
            "pooling and the classifier)")


def gap_linear_head(model: nn.Module, feats: torch.Tensor, logits: torch.Tensor) -> nn.Linear:
    """Return the linear classifier if ``logits == Linear(GAP(feats))``; else raise.

    ``feats``: the output of ``forward_features`` as a map [B,K,h,w] (as
    :func:`forward_with_layer` gives it: a ViT's patch tokens without the prefix tokens,
    Swin's NHWC map as NCHW). The check is structural (``get_classifier()`` is one
    ``nn.Linear`` over the feature channels) and numerical (the head's output equals that
    linear layer on the spatial mean of ``feats``), so any head with extra layers (VGG's
    conv-MLP, MobileNetV3's conv head after pooling, max pooling, a LayerNorm after pooling
    as in ConvNeXt, a class-token readout as in ViT) is refused. Swin's head (average pool
    of the final normalised NHWC map, then one linear layer) passes.
    """
    name = type(model).__name__
    get_classifier = getattr(model, "get_classifier", None)
    fc = get_classifier() if callable(get_classifier) else None
    if isinstance(fc, tuple):
        raise NotApplicableError(
            f"CAM needs a head of global average pooling followed by one linear classifier; {name} has "
            f"{len(fc)} classifiers (DeiT's class- and distillation-token heads, averaged). Use gradcam instead"
        )
    if not isinstance(fc, nn.Linear):
        raise NotApplicableError(
            f"CAM needs a head of global average pooling followed by one linear classifier; "
            f"{name}'s classifier is {type(fc).__name__}. Use gradcam, which needs no such structure"
        )
    if feats.ndim != 4 or fc.in_features != feats.shape[1]:
        raise NotApplicableError(
            f"CAM needs the classifier to act directly on the pooled final feature maps; {name}'s "
            f"classifier takes {fc.in_features} inputs but forward_features gives "
            f"{tuple(feats.shape[1:])} (there are layers between pooling and the classifier, as in "
            "VGG's MLP or MobileNetV3's conv head). Use gradcam instead"
        )
    expected = F.linear(feats.mean((2, 3)), fc.weight, fc.bias)
    if not torch.allclose(expected, logits, rtol=1e-4, atol=1e-4 * float(logits.abs().max()) + 1e-6):
        raise NotApplicableError(
            f"CAM needs logits = Linear(global average pool(features)); {_head_difference(model)}. "
            "Use gradcam instead"
        )
    return fc


ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
RELU_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All activation modules of the model (torch's and timm's), with their names."""
    found = []
    for name, m in model.named_modules():
        cls = type(m).__name__
        if isinstance(m, ACTIVATION_TYPES) or cls in {"Swish", "HardSwish", "HardSigmoid", "GELUTanh", "QuickGELU"}:
            found.append((name, m))
    return found


def non_relu_activations(model: nn.Module) -> list[str]:
    """Class names of the model's activation modules that are not ReLU or ReLU6."""
    return sorted({type(m).__name__ for _, m in activation_modules(model) if not isinstance(m, RELU_TYPES)})
