"""Run configuration: models x methods x metrics x data set, with parameters.

Loaded from YAML or TOML (safely: ``yaml.safe_load`` / ``tomllib``, with limits on
size, depth and expanded aliases); unknown keys and wrong types are errors that
name the key and suggest the closest valid one. ``method_params`` and
``metric_params`` merge key by key into the defaults: a config that sets one
parameter of one metric changes that parameter only (a ``null`` value asks for
the method's or metric's own default). The resolved config is saved with each
run and hashed, so ``--resume`` refuses a directory made by another config.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
import difflib
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ..errors import SaliencyBenchError
from .preprocess import PREPROCESSING

# A CNN with a GAP + linear head, a MobileNetV2-style CNN, and a ViT (the VGG, whose conv-MLP head CAM does not
# fit, is one flag away: it was traded for the ViT to keep the default run within its 5 minutes).
DEFAULT_MODELS = ["synthetic-resnet", "synthetic-mobilenetv2", "synthetic-vit"]
DEFAULT_METHODS = [
    "saliency", "guided_backprop", "integrated_gradients", "smoothgrad", "cam", "gradcam", "gradcam_pp",
    "guided_gradcam", "scorecam", "occlusion", "rise", "random", "center", "edge",
]
DEFAULT_METRICS = [
    "deletion", "insertion", "road_morf", "road_lerf", "average_drop",  # faithfulness
    "pointing_game", "energy_pointing_game", "max_box_acc", "grid_pointing_game", "box_iou",  # localisation
    "sparseness", "complexity",  # complexity
    "random_logit", "sanity_randomization",  # randomisation (the sanity check is a verdict, not a rank term)
]
# Budget choices of the default run (not tied to an image size: the image-size defaults,
# such as occlusion's window, RISE's cells and the pointing-game tolerance, come from each
# method's and metric's own rule for the image actually used).
DEFAULT_METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "rise": {"n_masks": 300}, "smoothgrad": {"n_samples": 16}, "integrated_gradients": {"n_steps": 16},
    "occlusion": {"windows_per_side": 8},  # 15 x 15 window positions at any image size (paper-like 14: 27 x 27)
}
DEFAULT_METRIC_PARAMS: dict[str, dict[str, Any]] = {
    "deletion": {"n_steps": 16}, "insertion": {"n_steps": 16},
    "road_morf": {"fractions": [0.1, 0.5, 0.9], "n_images": 16},
    "road_lerf": {"fractions": [0.1, 0.5, 0.9], "n_images": 16},
    "random_logit": {"n_images": 16}, "grid_pointing_game": {"n_images": 16},
}
# The embedded default's blocks on what the model uses (synthetic-cue, synthetic-contrast): a share of the images.
DEFAULT_PARTS: dict[str, dict[str, Any]] = {
    "cue": {"dataset": "synthetic-cue", "models": ["cue-mobilenetv2"], "n_images": 16,
            "metrics": ["energy_pointing_game", "pointing_game"], "metric_params": {"pointing_game": {"tolerance": 0}}},
    "contrast": {"dataset": "synthetic-contrast",
                 "models": ["contrast-object-mobilenetv2", "contrast-background-mobilenetv2"], "n_images": 16,
                 "model_dataset_params": {"contrast-background-mobilenetv2": {"label": "background"}},
                 "pairs": [["contrast-object-mobilenetv2", "contrast-background-mobilenetv2"]],
                 "metrics": ["model_contrast"]},
}
HEATMAP_DTYPES = ("float32", "float16", "uint8")
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 32


PART_KEYS = ("dataset", "dataset_params", "models", "methods", "metrics", "n_images", "batch_size", "method_params",
             "metric_params", "checkpoints", "model_dataset_params", "pairs", "image_size", "preprocess")


class DefaultPartsWarning(UserWarning):
    """The embedded default's cue and contrast blocks were left out (the config names other models or data)."""


class ConfigError(SaliencyBenchError):
    """A config file or flag with an unknown key or a value of the wrong type."""


def merge_params(base: dict[str, dict[str, Any]], override: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``base`` updated key by key with ``override`` (name -> {param: value}); neither is modified."""
    out = copy.deepcopy(base)
    for name, params in override.items():
        out.setdefault(name, {}).update(copy.deepcopy(params))
    return out


@dataclass
class RunConfig:
    """What a run computes. Every field has a default: the embedded default benchmark.

    ``image_size``: 0 resizes images to each model's own input size (its timm data
    config); a positive value resizes them to that size for every model.
    ``preprocess``: ``squash`` (RISE), ``shorter_side`` (TorchRay: aspect kept,
    scored at the original resolution) or ``center_crop`` (timm's eval transform).
    ``method_params`` / ``metric_params``: per name, the parameters that differ from
    the method's or metric's own defaults, merged key by key into
    :data:`DEFAULT_METHOD_PARAMS` / :data:`DEFAULT_METRIC_PARAMS`; metrics also take
    the scheduling options ``n_images`` and ``methods``.
    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    ``heatmap_dtype``: how heatmaps are stored and scored (float16 by default, with a
    per-map scale; see :mod:`saliencybench.benchmark.store`); ``store_heatmaps``:
    keep them in ``<run>/heatmaps/`` (needed by ``saliencybench score``).
    ``plugins``: Python files imported before the run (in every worker) that
    register methods and metrics. ``inspect``: model-inspection sections for the
    report (``filters``, ``activations``, ``class-visualisation``, ``neighbours``,
    ``tsne``). ``gallery_images``: images per model shown in the report's gallery.
    ``model_dataset_params``: per model, data-set parameters that differ for it (the
    contrast models' ``label``). ``pairs``: (model A, model B) pairs scored together by
    the ``"pair"`` metrics (model contrast). ``parts``: further named blocks of the run,
    each a mapping of the keys above that differ from the top level (another data set,
    models, metrics, fewer images); their results are reported in their own sections and
    never mixed into the main ranking (:data:`PART_KEYS`).
    """

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    dataset: str = "synthetic"
    dataset_params: dict[str, Any] = field(default_factory=dict)
    n_images: int = 32
    image_size: int = 0
    preprocess: str = "squash"
    batch_size: int = 16
    seed: int = 0
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)
    inspect: list[str] = field(default_factory=lambda: ["filters", "activations", "neighbours"])
    device: str = "auto"
    heatmap_dtype: str = "float16"
    store_heatmaps: bool = True
    gallery_images: int = 4
    plugins: list[str] = field(default_factory=list)
    model_dataset_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    pairs: list[list[str]] = field(default_factory=list)
    parts: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_PARTS))
    output: str = "results"

    def __post_init__(self) -> None:
        # a partial override never resets the other defaults (idempotent: merging twice changes nothing)
        if isinstance(self.method_params, dict):
            self.method_params = merge_params(DEFAULT_METHOD_PARAMS, self.method_params)
        if isinstance(self.metric_params, dict):
            self.metric_params = merge_params(DEFAULT_METRIC_PARAMS, self.metric_params)
        # the cue and contrast blocks belong to the embedded default: a run of other models or data leaves them out
        if self.parts == DEFAULT_PARTS and (self.models != DEFAULT_MODELS or self.dataset != "synthetic"):
            self.parts = {}
            warnings.warn("the default run's 'cue' and 'contrast' parts (what the model uses) are left out because "
                          "the config names other models or another data set; set parts to keep them",
                          DefaultPartsWarning, stacklevel=3)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Hash of everything that determines the results (not where they are written or on which device)."""
        d = self.to_dict()
        for k in ("output", "device", "gallery_images", "inspect"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def method_params_for(self, method: str) -> dict[str, Any]:
        """The config's parameters for ``method`` without ``None`` values (``None``: the method's own default)."""
        return {k: v for k, v in self.method_params.get(method, {}).items() if v is not None}

    def metric_params_for(self, metric: str) -> dict[str, Any]:
        """The config's parameters for ``metric`` without ``None`` values."""
        return {k: v for k, v in self.metric_params.get(metric, {}).items() if v is not None}


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_type(key: str, value: Any, hint: Any) -> None:
    origin = getattr(hint, "__origin__", None)
    if origin is list:
        inner = hint.__args__[0]
        if getattr(inner, "__origin__", None) is list:
            if not isinstance(value, list) or not all(isinstance(v, list) and len(v) == 2 and
                                                      all(isinstance(n, str) for n in v) for v in value):
                raise ConfigError(f"config key {key!r} must be a list of [name, name] pairs, got {value!r}")
        elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key {key!r} must be a list of names, got {value!r}")
    elif origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {type(value).__name__}")
        inner = hint.__args__[1]
        if getattr(inner, "__origin__", None) is dict:
            bad = [k for k, v in value.items() if not isinstance(v, dict)]
            if bad:
                raise ConfigError(f"config key {key!r} must map names to mappings of parameters; "
                                  f"{bad[0]!r} maps to {value[bad[0]]!r}")
        elif inner is str and not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"config key {key!r} must map names to strings, got {value!r}")
    elif hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    elif hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    elif hint is str and not isinstance(value, str):
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")


def config_from_dict(data: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A :class:`RunConfig` from a mapping: unknown keys and wrong types name the key; parameters merge
    key by key into ``base``'s (or the defaults)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
    hints = get_type_hints(RunConfig)
    for k in data:
        if k not in hints:
            hint = _suggest(str(k), sorted(hints))
            legacy = {"sanity_methods": "methods", "sanity_images": "n_images"}.get(str(k))
            if legacy:
                hint = f" (now metric_params: {{sanity_randomization: {{{legacy}: ...}}}})"
            raise ConfigError(f"unknown config key {k!r}{hint}; valid keys: {sorted(hints)}")
    for k, v in data.items():
        _check_type(k, v, hints[k])
    for name, part in data.get("parts", {}).items():
        for k, v in part.items():
            if k not in PART_KEYS:
                raise ConfigError(f"part {name!r} has an unknown key {k!r}{_suggest(str(k), list(PART_KEYS))}; a part "
                                  f"sets {list(PART_KEYS)}")
            _check_type(f"parts.{name}.{k}", v, hints[k])
    if data.get("preprocess", "squash") not in PREPROCESSING:
        raise ConfigError(f"config key 'preprocess' must be one of {list(PREPROCESSING)}, got "
                          f"{data['preprocess']!r}{_suggest(str(data['preprocess']), list(PREPROCESSING))}")
    if data.get("heatmap_dtype", "float16") not in HEATMAP_DTYPES:
        raise ConfigError(f"config key 'heatmap_dtype' must be one of {list(HEATMAP_DTYPES)}, got "
                          f"{data['heatmap_dtype']!r}")
    base = base or RunConfig()
    data = dict(data)
    for k in ("method_params", "metric_params"):
        if k in data:
            data[k] = merge_params(getattr(base, k), data[k])
    return dataclasses.replace(base, **data)


def _check_size(data: Any, source: str) -> None:
    """Refuse configs whose structure is too deep or expands (YAML aliases) to too many values."""
    budget = [MAX_CONFIG_NODES]
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        obj, depth = stack.pop()
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(f"config {source} expands to more than {MAX_CONFIG_NODES} values (YAML aliases?); "
                              "write the values out")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"config {source} is nested deeper than {MAX_CONFIG_DEPTH} levels")
        if isinstance(obj, dict):
            stack += [(k, depth + 1) for k in obj] + [(v, depth + 1) for v in obj.values()]
        elif isinstance(obj, (list, tuple)):
            stack += [(v, depth + 1) for v in obj]


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML (.yaml/.yml) or TOML (.toml) run config safely."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(path)!r} is larger than {MAX_CONFIG_BYTES >> 10} KiB")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e}") from None
    kind = "TOML" if path.suffix == ".toml" else "YAML"
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid {kind}: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(path)!r} is nested too deeply to parse") from None
    _check_size(data, repr(str(path)))
    return config_from_dict(data or {})


def part_config(config: RunConfig, part: str) -> RunConfig:
    """The config of one named part of a run (``""``: the main block): the top level with the part's keys."""
    if not part:
        return config
    if part not in config.parts:
        from ..errors import UnknownNameError

        raise UnknownNameError("part", part, list(config.parts))
    over = dict(config.parts[part])
    for k in ("method_params", "metric_params"):
        if k in over:
            over[k] = merge_params(getattr(config, k), over[k])
    return dataclasses.replace(config, parts={}, inspect=[], **over)
