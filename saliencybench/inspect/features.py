"""Looking inside a CNN: first-layer filters, layer activations, maximally activating
data-set images with their receptive-field patches, and penultimate features.

Every function runs the model under :func:`saliencybench.modelutil.model_guard`
(eval mode, parameters frozen, hooks removed on exit) and leaves it as it found it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn

from ..benchmark.datasets import Sample
from ..errors import InvalidInputError, NotApplicableError
from ..modelutil import forward_with_layer, get_module, has_feature_head_split, model_guard
from .receptive import ReceptiveField, receptive_field

Transform = Callable[[torch.Tensor], torch.Tensor]


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The model's first 2-D convolution and its module name.

    Found by walking ``model.named_modules()`` (registration order; timm models
    register their stem first, so this is the first convolution of the forward
    pass), never by name. A model without any :class:`torch.nn.Conv2d` (timm's
    ``Conv2dSame`` and ``StdConv2d`` are subclasses) raises :class:`NotApplicableError`.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise NotApplicableError(
        f"{type(model).__name__} has no convolution layer (torch.nn.Conv2d), so it has no filters, "
        "feature maps or receptive fields to inspect; use a convolutional model"
    )


def filter_grid(model: nn.Module, padding: int = 1, columns: int | None = None) -> torch.Tensor:
    """The first convolution's filters as one RGB image grid: float Tensor[3,H,W] in [0,1].

    Each filter Tensor[C,kh,kw] is min-max scaled on its own (a constant filter
    becomes 0.5 grey) and shown as RGB when C is 3, as grey when C is 1, and as the
    grey mean over its input channels otherwise. Filters are laid out row by row,
    ``columns`` per row (default ceil(sqrt(K))), separated by ``padding`` white pixels:
    H = rows (kh + padding) + padding, W = columns (kw + padding) + padding.
    """
    _, conv = first_conv(model)
    w = conv.weight.detach().float().cpu()
    k, c, kh, kw = w.shape
    if c != 3:
        w = w.mean(1, keepdim=True).expand(k, 3, kh, kw)
    lo = w.flatten(1).min(1).values.view(k, 1, 1, 1)
    hi = w.flatten(1).max(1).values.view(k, 1, 1, 1)
    span = hi - lo
    scaled = torch.where(span > 0, (w - lo) / span.clamp_min(1e-12), torch.full_like(w, 0.5))
    cols = columns or math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    grid = torch.ones(3, rows * (kh + padding) + padding, cols * (kw + padding) + padding)
    for n in range(k):
        r, q = divmod(n, cols)
        y, x = padding + r * (kh + padding), padding + q * (kw + padding)
        grid[:, y : y + kh, x : x + kw] = scaled[n]
    return grid


def check_channel(channel: int, n_channels: int, layer: str | None) -> None:
    """Raise :class:`InvalidInputError` unless ``0 <= channel < n_channels``."""
    if not isinstance(channel, int) or isinstance(channel, bool) or not 0 <= channel < n_channels:
        where = f"layer {layer!r}" if layer else "the layer"
        raise InvalidInputError(
            f"channel {channel!r} is out of range: {where} has {n_channels} channels, so valid channels are "
            f"0..{n_channels - 1}"
        )


def layer_activations(model: nn.Module, images: torch.Tensor, layer: str, batch_size: int = 64) -> torch.Tensor:
    """Output of module ``layer`` for normalised images Tensor[B,3,H,W]: Tensor[B,K,h,w].

    An unknown layer name raises :class:`UnknownNameError` listing the model's
    module names; a layer whose output is not a 4-D map raises :class:`NotApplicableError`.
    """
    get_module(model, layer)
    _check_images(images)
    chunks = []
    with model_guard(model) as state, torch.no_grad():
        for i in range(0, len(images), batch_size):
            acts, _ = forward_with_layer(model, images[i : i + batch_size], layer, state)
            chunks.append(acts.detach())
    return torch.cat(chunks)


def activation_maps(model: nn.Module, images: torch.Tensor, layer: str, channel: int) -> torch.Tensor:
    """Channel ``channel`` of ``layer``'s output for images Tensor[B,3,H,W]: Tensor[B,h,w]."""
    acts = layer_activations(model, images, layer)
    check_channel(channel, acts.shape[1], layer)
    return acts[:, channel]


@dataclass
class TopActivation:
    """One maximally activating data-set image for a (layer, channel).

    ``index``: position in the data set; ``value``: the channel's maximum over its
    map; ``position``: (row, column) of that maximum in the map [h,w] (the first
    in row-major order on ties); ``box``: its receptive field ``(x1, y1, x2, y2)``
    in image pixels (x2, y2 exclusive, clipped to the image); ``image``:
    Tensor[3,H,W] in [0,1] at the size the model saw; ``patch``: ``image`` cropped to ``box``.
    """

    index: int
    image_id: str
    label: int
    value: float
    position: tuple[int, int]
    box: tuple[int, int, int, int]
    image: torch.Tensor
    patch: torch.Tensor


def _resize(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """Image Tensor[3,H,W] squashed to ``size`` x ``size`` (bilinear, antialiased), as the runner does."""
    if size is None or tuple(image.shape[-2:]) == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp(0, 1)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidInputError(f"images must be a float Tensor[B,C,H,W], got {shape}")
    if len(images) == 0:
        raise InvalidInputError("no images given: the batch is empty")


def _unique_samples(dataset: Sequence[Sample], limit: int | None) -> Iterator[tuple[int, Sample]]:
    """(index, sample) for the first sample of each image (multi-label sets repeat images), at most ``limit``."""
    if len(dataset) == 0:
        name = getattr(dataset, "name", "") or type(dataset).__name__
        raise InvalidInputError(f"data set {name!r} is empty: there are no images to inspect")
    seen: set[str] = set()
    for i in range(len(dataset)):
        if limit is not None and len(seen) >= limit:
            return
        s = dataset[i]
        key = str(s.meta.get("image", s.image_id))
        if key not in seen:
            seen.add(key)
            yield i, s


def dataset_tensors(dataset: Sequence[Sample], size: int | None = None, limit: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The data set's images as (Tensor[N,3,S,S] in [0,1], labels LongTensor[N], image ids).

    One entry per image (the first sample of multi-label images), at most ``limit``,
    squashed to ``size`` when given. An empty data set raises :class:`InvalidInputError`.
    """
    samples = [s for _, s in _unique_samples(dataset, limit)]
    images = [_resize(s.image, size) for s in samples]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise InvalidInputError(f"images of different sizes {sorted(shapes)[:3]}; pass size= to squash them to one")
    return torch.stack(images), torch.tensor([s.label for s in samples]), [s.image_id for s in samples]


def top_activating(model: nn.Module, dataset: Sequence[Sample], layer: str, channel: int, k: int = 9, *,
                   transform: Transform | None = None, size: int | None = None, limit: int | None = None,
                   batch_size: int = 32) -> tuple[list[TopActivation], ReceptiveField]:
    """The ``k`` data-set images whose channel ``channel`` of ``layer`` peaks highest.

    Each image (first sample per image, at most ``limit``) is squashed to ``size``
    if given, passed through ``transform`` (the model's normalisation) and scored by
    the maximum of the channel's map Tensor[h,w]; the receptive field of that
    maximum's unit (:func:`receptive_field`, traced at the image size) is cropped
    from the image. Returns the top ``k`` by value (ties by data-set order) and the
    layer's :class:`ReceptiveField`.
    """
    get_module(model, layer)
    if k < 1:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    indices: list[int] = []
    values, positions = [], []
    image_hw: tuple[int, int] | None = None
    p = next(model.parameters(), None)
    stream = _unique_samples(dataset, limit)
    while batch := [(i, _resize(s.image, size)) for i, s in islice(stream, batch_size)]:
        indices += [i for i, _ in batch]
        shapes = {tuple(im.shape) for _, im in batch}
        image_hw = image_hw or (int(batch[0][1].shape[-2]), int(batch[0][1].shape[-1]))
        if len(shapes) > 1 or next(iter(shapes))[-2:] != image_hw:
            raise InvalidInputError(f"images of different sizes ({sorted(shapes)[:3]}, ...); pass size= to squash "
                                    "them to one size")
        x = torch.stack([im for _, im in batch])
        if p is not None:
            x = x.to(dtype=p.dtype, device=p.device)
        acts = layer_activations(model, transform(x) if transform else x, layer, batch_size)
        check_channel(channel, acts.shape[1], layer)
        maps = acts[:, channel].flatten(1)
        best = maps.argmax(1)
        values.append(maps.gather(1, best[:, None])[:, 0].float().cpu())
        w = acts.shape[-1]
        positions += [(int(b) // w, int(b) % w) for b in best]
    vals = torch.cat(values)
    order = torch.sort(-vals, stable=True).indices[:k].tolist()
    rf = receptive_field(model, layer, input_size=image_hw)
    tops = []
    for n in order:
        s = dataset[indices[n]]
        image = _resize(s.image, size)
        i, j = positions[n]
        x1, y1, x2, y2 = rf.box(i, j)
        tops.append(TopActivation(indices[n], s.image_id, s.label, float(vals[n]), (i, j), (x1, y1, x2, y2), image,
                                  image[:, y1:y2, x1:x2].clone()))
    return tops, rf


def penultimate_features(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Penultimate (pre-logits) features of normalised images Tensor[N,3,H,W]: Tensor[N,D].

    For timm models ``forward_head(forward_features(x), pre_logits=True)``: the
    pooled vector the classifier reads (after VGG's conv-MLP, MobileNetV3's conv
    head). Other models: the input of ``get_classifier()``, captured by a hook.
    """
    _check_images(images)
    chunks = []
    with model_guard(model) as state, torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            if has_feature_head_split(model):
                feats = model.forward_head(model.forward_features(x), pre_logits=True)
            else:
                get_classifier = getattr(model, "get_classifier", None)
                head = get_classifier() if callable(get_classifier) else None
                if not isinstance(head, nn.Module):
                    raise NotApplicableError(
                        f"{type(model).__name__} has neither timm's forward_features/forward_head split nor "
                        "get_classifier(), so its penultimate features cannot be found"
                    )
                captured: list[torch.Tensor] = []
                handle = head.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0]))
                state.handles.append(handle)
                model(x)
                handle.remove()
                feats = captured[0]
            chunks.append(feats.flatten(1).detach())
    return torch.cat(chunks)
