"""Run configuration: models x methods x metrics x data set, with parameters.

Loaded from YAML or TOML (safely: ``yaml.safe_load`` / ``tomllib``); unknown keys
and wrong types are errors that name the key. The resolved config is saved with
each run and hashed, so ``--resume`` refuses a directory made by another config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ..errors import SaliencyBenchError
from .preprocess import PREPROCESSING

DEFAULT_MODELS = ["synthetic-resnet", "synthetic-mobilenetv2", "synthetic-vgg"]
DEFAULT_METHODS = [
    "saliency", "guided_backprop", "integrated_gradients", "smoothgrad", "cam", "gradcam", "gradcam_pp",
    "guided_gradcam", "scorecam", "occlusion", "rise", "random", "center", "edge",
]
DEFAULT_METRICS = ["deletion", "insertion", "pointing_game", "energy_pointing_game", "box_iou",
                   "sanity_randomization"]


class ConfigError(SaliencyBenchError):
    """A config file or flag with an unknown key or a value of the wrong type."""


@dataclass
class RunConfig:
    """What a run computes. Every field has a default: the embedded default benchmark.

    ``inspect``: model-inspection sections for the report (``filters``,
    ``activations``, ``class-visualisation``, ``neighbours``, ``tsne``).
    ``image_size``: 0 resizes images to each model's own input size (its timm
    data config); a positive value resizes them to that size for every model.
    ``preprocess``: ``squash`` (RISE), ``shorter_side`` (TorchRay: aspect kept,
    scored at the original resolution) or ``center_crop`` (timm's eval transform);
    see :mod:`saliencybench.benchmark.preprocess`.
    """

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    dataset: str = "synthetic"
    dataset_params: dict[str, Any] = field(default_factory=dict)
    n_images: int = 48
    image_size: int = 0
    preprocess: str = "squash"
    batch_size: int = 16
    seed: int = 0
    method_params: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "rise": {"n_masks": 300}, "smoothgrad": {"n_samples": 16}, "integrated_gradients": {"n_steps": 16},
        "occlusion": {"window": 8, "stride": 4},
    })
    metric_params: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "deletion": {"n_steps": 16}, "insertion": {"n_steps": 16},
        "pointing_game": {"tolerance": 4},
    })
    checkpoints: dict[str, str] = field(default_factory=dict)
    sanity_methods: list[str] = field(default_factory=lambda: ["saliency", "guided_backprop", "gradcam"])
    sanity_images: int = 8
    inspect: list[str] = field(default_factory=lambda: ["filters", "activations", "class-visualisation", "neighbours",
                                                         "tsne"])
    output: str = "results"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Hash of everything that determines the results (not where they are written)."""
        d = self.to_dict()
        d.pop("output")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_type(key: str, value: Any, hint: Any) -> None:
    origin = getattr(hint, "__origin__", None)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key {key!r} must be a list of names, got {value!r}")
    elif origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {type(value).__name__}")
        inner = hint.__args__[1]
        if getattr(inner, "__origin__", None) is dict and not all(isinstance(v, dict) for v in value.values()):
            raise ConfigError(f"config key {key!r} must map names to mappings of parameters, got {value!r}")
    elif hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    elif hint is str and not isinstance(value, str):
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")


def config_from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A :class:`RunConfig` from a mapping; unknown keys and wrong types name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
    hints = get_type_hints(RunConfig)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {sorted(hints)}")
    for k, v in data.items():
        _check_type(k, v, hints[k])
    if data.get("preprocess", "squash") not in PREPROCESSING:
        raise ConfigError(f"config key 'preprocess' must be one of {PREPROCESSING}, got {data['preprocess']!r}")
    return dataclasses.replace(base or RunConfig(), **data)


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML (.yaml/.yml) or TOML (.toml) run config safely."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid {path.suffix[1:].upper() or 'YAML'}: {e}") from None
    return config_from_dict(data or {})
