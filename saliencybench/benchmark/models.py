"""Models: the embedded default models trained on the synthetic set, any timm name,
and local checkpoints.

A model is returned as a :class:`ModelBundle`: the module in eval mode, its class
names, and its preprocessing (input size, mean, std) from timm's data config.
Default models are trained on first use and cached under the user cache
directory (``$SALIENCYBENCH_CACHE`` or ``~/.cache/saliencybench``) as
safetensors, keyed by a hash of their recipe; ``saliencybench train`` rebuilds
them. Checkpoints load with safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import SaliencyBenchError
from ..registry import Registry
from .datasets import get_dataset
from .default_archs import _synthetic_mobilenet, _synthetic_resnet, _synthetic_vgg, _synthetic_vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.25, 0.25, 0.25)


class ModelLoadError(SaliencyBenchError):
    """A model that cannot be built or whose weights cannot be loaded."""


@dataclass
class ModelBundle:
    """A model ready to explain, with what is needed to feed it."""

    name: str
    model: nn.Module
    classes: list[str]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    info: dict[str, Any] = field(default_factory=dict)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Images Tensor[B,3,H,W] in [0,1] -> normalised for the model (same shape)."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a default model's weights; its hash keys the cache.

    AdamW with a one-cycle schedule; ``head_lr_scale`` scales the learning rate of the
    layers after ``forward_features`` (VGG's wide-fan-in conv-MLP head needs a smaller one).
    """

    arch: str
    size: int = 64
    n_train: int = 3000
    n_val: int = 600
    epochs: int = 4
    batch_size: int = 32
    lr: float = 5e-3
    head_lr_scale: float = 1.0
    weight_decay: float = 1e-4
    seed: int = 0
    dataset: str = "synthetic"  # the registered data set trained on (train / val splits)
    dataset_params: tuple[tuple[str, Any], ...] = ()  # its further parameters, as sorted (name, value) pairs
    threads: int = 1  # CPU threads of the training loop: fixed, so the weights are the same on every machine

    def key(self) -> str:
        """The cache key: a hash of the fields; ``dataset`` and ``dataset_params`` enter it only when they
        differ from their defaults, so the keys of the models trained on the synthetic set are unchanged."""
        fields = dict(self.__dict__)
        if fields["dataset"] == "synthetic":
            del fields["dataset"]
        if not fields["dataset_params"]:
            del fields["dataset_params"]
        blob = json.dumps({**fields, "v": 2, "timm": timm.__version__.split(".")[0]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def classes(self) -> list[str]:
        """The class names of the data set the recipe trains on."""
        return list(get_dataset(self.dataset, size=self.size, n_images=1, seed=self.seed, split="val",
                                **dict(self.dataset_params)).classes)


DEFAULT_ARCHS: dict[str, Callable[[int], nn.Module]] = {
    "synthetic-resnet": _synthetic_resnet,
    "synthetic-mobilenetv2": _synthetic_mobilenet,
    "synthetic-vgg": _synthetic_vgg,
    "synthetic-vit": _synthetic_vit,
}
DEFAULT_RECIPES = {
    "synthetic-resnet": Recipe(arch="synthetic-resnet", epochs=4, lr=5e-3),
    "synthetic-mobilenetv2": Recipe(arch="synthetic-mobilenetv2", epochs=3, lr=2e-2),
    "synthetic-vgg": Recipe(arch="synthetic-vgg", epochs=5, lr=5e-3, head_lr_scale=0.1),
    "synthetic-vit": Recipe(arch="synthetic-vit", epochs=12, lr=2e-3, weight_decay=0.05),
}
_HEAD_PREFIXES = ("pre_logits.", "head.", "fc.", "classifier.")  # timm: the modules forward_head runs


def cache_root() -> Path:
    """saliencybench's cache on this machine: ``$SALIENCYBENCH_CACHE`` or ``~/.cache/saliencybench``."""
    return Path(os.environ.get("SALIENCYBENCH_CACHE") or Path.home() / ".cache" / "saliencybench")


def cache_dir() -> Path:
    """Where trained default models are cached."""
    path = cache_root() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128) -> float:
    """Top-1 accuracy of ``model`` on normalised images Tensor[N,3,H,W]."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            correct += int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


# The default recipes share their data (same size, counts and seed): it is rendered once
# per process and kept until every default model that uses it is cached on disk.
_DATA: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _data_key(recipe: Recipe) -> tuple[Any, ...]:
    return recipe.size, recipe.n_train, recipe.n_val, recipe.seed, recipe.dataset, recipe.dataset_params


def _training_data(recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, labels, val images, labels) of the recipe's data set, images in [0,1]; cached in-process."""
    key = _data_key(recipe)
    if key not in _DATA:
        threads = torch.get_num_threads()
        # rendering is thousands of tiny tensor ops: one thread is as fast when idle and
        # 10x faster when other processes load the cores (OpenMP barriers); same images
        torch.set_num_threads(1)
        try:
            params = dict(recipe.dataset_params)
            xtr, ytr = get_dataset(recipe.dataset, size=recipe.size, n_images=recipe.n_train, seed=recipe.seed,
                                   split="train", **params).tensors()
            xva, yva = get_dataset(recipe.dataset, size=recipe.size, n_images=recipe.n_val, seed=recipe.seed,
                                   split="val", **params).tensors()
        finally:
            torch.set_num_threads(threads)
        _DATA.clear()
        _DATA[key] = (xtr, ytr, xva, yva)
    return _DATA[key]


def _release_training_data(recipe: Recipe) -> None:
    """Drop the shared data once all default models that use it are cached."""
    key = _data_key(recipe)
    users = [n for n, r in DEFAULT_RECIPES.items() if _data_key(r) == key]
    if all((cache_dir() / f"{n}-{DEFAULT_RECIPES[n].key()}.safetensors").exists() for n in users):
        _DATA.pop(key, None)


def train_default_model(recipe: Recipe, progress: bool = True,
                        data: tuple[torch.Tensor, ...] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train a default model from its recipe: (model in eval mode, info with accuracy and time).

    ``data``: (train images Tensor[N,3,H,W] in [0,1], labels LongTensor[N], held-out images,
    labels) to train and test on instead of the recipe's own (ROAR's modified images). The loop runs on ``recipe.threads`` CPU threads (restored after): float reductions depend on the
    thread count, so a fixed count makes the weights the same on every machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        return _train(recipe, progress, data)
    finally:
        torch.set_num_threads(before)


def _train(recipe: Recipe, progress: bool, data: tuple[torch.Tensor, ...] | None) -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    model = DEFAULT_ARCHS[recipe.arch](len(recipe.classes()))

    def norm(x: torch.Tensor) -> torch.Tensor:  # SYNTHETIC_MEAN / SYNTHETIC_STD
        return ((x - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)

    t0 = time.perf_counter()
    xtr, ytr, xva, yva = data if data is not None else _training_data(recipe)
    xtr, xva = norm(xtr), norm(xva)
    model = model.to(memory_format=torch.channels_last)  # channels-last: ~1.2-1.5x faster training on CPU
    head = [p for n, p in model.named_parameters() if n.startswith(_HEAD_PREFIXES)]
    body = [p for n, p in model.named_parameters() if not n.startswith(_HEAD_PREFIXES)]
    lrs = [recipe.lr, recipe.lr * recipe.head_lr_scale]
    opt = torch.optim.AdamW([{"params": body, "lr": lrs[0]}, {"params": head, "lr": lrs[1]}],
                            weight_decay=recipe.weight_decay)
    steps = recipe.epochs * ((len(xtr) + recipe.batch_size - 1) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lrs, total_steps=steps, pct_start=0.25)
    bar = tqdm(total=steps, desc=f"train {recipe.arch}", disable=not progress, leave=False)
    for _epoch in range(recipe.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), recipe.batch_size):
            idx = perm[i : i + recipe.batch_size]
            loss = F.cross_entropy(model(_augment(xtr[idx], g)), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    acc = evaluate_accuracy(model, xva, yva)
    model = model.to(memory_format=torch.contiguous_format).eval()  # as when loaded from the cache
    return model, {"val_accuracy": acc, "train_seconds": time.perf_counter() - t0, "recipe": recipe.__dict__,
                   "recipe_key": recipe.key()}


def architecture_key(model: nn.Module) -> str:
    """A hash of a model's structure: its module tree with every layer's settings (``repr``)
    and its parameter and buffer names and shapes. Any edit to a default architecture changes
    it, so cached weights of an older architecture are never loaded into a newer one."""
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    blob = json.dumps({"modules": repr(model), "state": shapes})
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_files(name: str, recipe: Recipe | None = None, model: nn.Module | None = None) -> tuple[Path, Path]:
    """(weights, metadata) paths of default model ``name`` trained with ``recipe`` in the cache."""
    recipe = recipe or DEFAULT_RECIPES[name]
    model = model if model is not None else DEFAULT_ARCHS[recipe.arch](len(recipe.classes()))
    stem = cache_dir() / f"{name}-{recipe.key()}-{architecture_key(model)}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def default_model(name: str, recipe: Recipe | None = None, retrain: bool = False, progress: bool = True) -> ModelBundle:
    """The default model ``name``: loaded from the cache, or trained and cached first.

    The cache file is keyed by the recipe and the architecture (:func:`architecture_key`).
    """
    recipe = recipe or DEFAULT_RECIPES[name]
    classes = recipe.classes()
    model = DEFAULT_ARCHS[recipe.arch](len(classes))
    weights, meta = cache_files(name, recipe, model)
    if weights.exists() and meta.exists() and not retrain:
        model.load_state_dict(load_file(str(weights)))
        info = json.loads(meta.read_text())
    else:
        model, info = train_default_model(recipe, progress)
        tmp = weights.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(weights)
        meta.write_text(json.dumps(info, indent=2))
        _release_training_data(recipe)
    info = {**info, "source": f"trained on {recipe.dataset}", "weights": str(weights)}
    return ModelBundle(name, model.eval(), classes, recipe.size, SYNTHETIC_MEAN, SYNTHETIC_STD, info)


# ---- the registry: default models, timm names, checkpoints -------------------------------

@dataclass
class ModelSpec:
    name: str
    loader: Callable[..., ModelBundle]
    summary: str


MODELS: Registry[ModelSpec] = Registry("model")


def register_model(name: str, summary: str) -> Callable[[Callable[..., ModelBundle]], Callable[..., ModelBundle]]:
    """Decorator registering a named model loader ``loader(**kwargs) -> ModelBundle``."""

    def deco(fn: Callable[..., ModelBundle]) -> Callable[..., ModelBundle]:
        MODELS.add(name, ModelSpec(name, fn, summary))
        return fn

    return deco


for _name, _fn in DEFAULT_ARCHS.items():
    MODELS.add(_name, ModelSpec(_name, lambda _n=_name, **kw: default_model(_n, **kw), (_fn.__doc__ or "").strip()))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or torch with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist; pass the path of a .safetensors or .pt file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code, wrong format
        raise ModelLoadError(
            f"cannot read checkpoint {str(path)!r} ({type(e).__name__}: {e}); saliencybench loads only safetensors "
            "or plain state dicts (torch.load with weights_only=True)"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {str(path)!r} holds {type(state).__name__}, not a state dict")
    return state


def timm_model(name: str, *, checkpoint: str | Path | None = None, pretrained: bool = True,
               num_classes: int | None = None, classes: list[str] | None = None) -> ModelBundle:
    """Any timm model by name, with ImageNet weights from the hub or a local ``checkpoint``."""
    if not timm.is_model(name):
        raise ModelLoadError(
            f"unknown model {name!r}: neither a saliencybench model ({', '.join(MODELS.names())}) nor a timm "
            "model name (see timm.list_models())"
        )
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    state = read_state_dict(checkpoint) if checkpoint is not None else None
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except Exception as e:
        raise ModelLoadError(
            f"cannot fetch pretrained weights for {name!r} ({type(e).__name__}: {str(e)[:200]}); this machine may "
            "be offline: pass --checkpoint FILE (safetensors or a torch state dict) instead"
        ) from None
    if state is not None:
        head = model.get_classifier()
        weight = getattr(head, "weight", None)
        key = next((k for k, v in model.named_parameters() if weight is not None and v is weight), None)
        if key and key in state and state[key].shape[0] != model.num_classes and num_classes is None:
            model.reset_classifier(int(state[key].shape[0]))
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise ModelLoadError(f"checkpoint {str(checkpoint)!r} does not fit timm {name!r}: {str(e)[:300]}") from None
        if missing or unexpected:
            raise ModelLoadError(
                f"checkpoint {str(checkpoint)!r} does not fit timm {name!r}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    cfg = timm.data.resolve_data_config({}, model=model)
    n = model.num_classes
    return ModelBundle(name, model.eval(), classes or [str(i) for i in range(n)], int(cfg["input_size"][-1]),
                       tuple(cfg["mean"]), tuple(cfg["std"]),
                       {"source": f"checkpoint {checkpoint}" if checkpoint else "timm pretrained"})


def load_model(name: str, *, checkpoint: str | Path | None = None, **kwargs: Any) -> ModelBundle:
    """A registered model, or a timm model name (with ``checkpoint`` or pretrained weights)."""
    if name in MODELS and checkpoint is None:
        return MODELS.get(name).loader(**kwargs)
    return timm_model(name, checkpoint=checkpoint, **kwargs)


def list_models() -> list[str]:
    """Names of the registered models (any timm name works too)."""
    return MODELS.names()
