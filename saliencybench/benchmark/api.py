"""The benchmark's Python entry points for models and data sets: ``sb.load_model``, ``sb.load_dataset``.

>>> bundle = sb.load_model("synthetic-resnet")        # trained on first use, then cached
>>> data = sb.load_dataset("synthetic", n_images=8)   # Samples: .image [3,H,W] in [0,1], .label, .boxes, .mask
>>> x = bundle.normalise(torch.stack([s.image for s in data]))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .datasets import GroundTruthDataset, get_dataset, list_datasets
from .models import ModelBundle, list_models
from .models import load_model as _load_model

__all__ = ["load_model", "load_dataset", "list_models", "list_datasets"]


def load_model(name: str, *, checkpoint: str | Path | None = None, device: str = "cpu", **kwargs: Any) -> ModelBundle:
    """A model ready to explain: a saliencybench model (``list_models()``) or any timm name.

    Returns a :class:`~.models.ModelBundle` with ``.model`` (eval mode, on ``device``),
    ``.normalise(images[B,3,H,W] in [0,1]) -> normalised images``, ``.classes``,
    ``.input_size`` and ``.info`` (accuracy, provenance). timm names take
    ``checkpoint=FILE`` (safetensors or a state dict, loaded weights-only) or download
    pretrained weights where the machine can; ``pretrained=False`` gives random weights.
    """
    from .devices import resolve_device

    bundle = _load_model(name, checkpoint=checkpoint, **kwargs)
    bundle.model.to(resolve_device(device))
    return bundle


def load_dataset(name: str, **params: Any) -> GroundTruthDataset:
    """A data set with ground truth by name (``list_datasets()``): a sequence of samples with
    ``.image`` Tensor[3,H,W] in [0,1], ``.label``, ``.boxes`` Tensor[n,4] and ``.mask`` Tensor[H,W]."""
    return get_dataset(name, **params)
