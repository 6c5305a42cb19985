"""One validation pass over a resolved run config, before any run directory is created.

Every name (models, methods, metrics, data set, inspections, checkpoint keys), every
parameter of every method and metric (names with closest-name suggestions, types,
ranges, the metrics' scheduling options), the data set's parameters, the device,
sizes and counts, and the run id: a typo fails before the first task runs, never
after earlier tasks ran. Duplicate names are removed with a warning.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

from ..errors import SaliencyBenchError, UnknownNameError
from ..methods.base import get_method
from ..metrics.base import get_metric
from ..registry import check_params
from .config import ConfigError, RunConfig, part_config
from .datasets import DATASETS
from .devices import resolve_device
from .plugins import load_plugins

MAX_NAMES = 1000
MAX_IMAGE_SIZE = 4096
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _dedupe(key: str, names: list[str]) -> list[str]:
    if len(names) > 10 * MAX_NAMES:
        raise ConfigError(f"config key {key!r} lists {len(names)} names; at most {MAX_NAMES} distinct names are "
                          "supported")
    seen: dict[str, None] = dict.fromkeys(names)
    if len(seen) < len(names):
        dup = sorted({n for n in names if names.count(n) > 1}) if len(names) < 1000 else ["..."]
        warnings.warn(f"config key {key!r} lists {', '.join(dup)} more than once; each runs once", UserWarning,
                      stacklevel=3)
    if len(seen) > MAX_NAMES:
        raise ConfigError(f"config key {key!r} lists {len(seen)} names; at most {MAX_NAMES} are supported")
    return list(seen)


def _positive(key: str, value: int, minimum: int = 1, maximum: int | None = None) -> None:
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"config key {key!r} must be {bound}, got {value}")


def check_run_id(run_id: str) -> str:
    """A run id that names one directory inside ``--output`` (no separators, no ``..``)."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ConfigError(f"run id {run_id!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter "
                          "or digit (it names a directory inside --output)")
    return run_id


def check_model_name(name: str) -> None:
    from .models import MODELS, ModelLoadError

    if name in MODELS:
        return
    import timm

    if not timm.is_model(name):
        close = UnknownNameError("model", name, [*MODELS.names(), *timm.list_models()])
        raise ModelLoadError(f"unknown model {name!r}: use a saliencybench model ({', '.join(MODELS.names())}) or a "
                             f"timm model name.{str(close).split('.', 1)[1].split(' Valid')[0]}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check the whole config (and each of its parts); return it with duplicate names removed. Raises
    :class:`SaliencyBenchError` naming the key and the fix."""
    from . import load_all

    load_all()
    load_plugins(cfg.plugins)
    cfg = _block(cfg, "")
    parts = {}
    for name in cfg.parts:
        if not RUN_ID.fullmatch(name):
            raise ConfigError(f"part name {name!r} must be letters, digits, '.', '_' or '-'")
        sub = _block(part_config(cfg, name), f"parts.{name}.")
        parts[name] = {k: getattr(sub, k) if k in ("models", "methods", "metrics") else v
                       for k, v in cfg.parts[name].items()}
    from .inspection import INSPECTIONS

    bad = sorted(set(cfg.inspect) - set(INSPECTIONS))
    if bad:
        raise ConfigError(f"unknown inspection(s) {bad} in config key 'inspect'; choose from {list(INSPECTIONS)}")
    _positive("gallery_images", cfg.gallery_images, 0, 64)
    _positive("seed", cfg.seed, 0)
    resolve_device(cfg.device)
    return dataclasses.replace(cfg, parts=parts)


def _block(cfg: RunConfig, where: str) -> RunConfig:
    """Checks of one block (the main one or a part): names, parameters, data set, checkpoints, pairs."""
    cfg = dataclasses.replace(cfg, models=_dedupe(f"{where}models", cfg.models),
                              methods=_dedupe(f"{where}methods", cfg.methods),
                              metrics=_dedupe(f"{where}metrics", cfg.metrics))
    for key in ("models", "methods", "metrics"):
        if not getattr(cfg, key):
            raise ConfigError(f"config key {where}{key!r} is empty; name at least one")
    _positive(f"{where}n_images", cfg.n_images)
    _positive(f"{where}batch_size", cfg.batch_size)
    _positive(f"{where}image_size", cfg.image_size, 0, MAX_IMAGE_SIZE)
    for m in cfg.models:
        check_model_name(m)
    for m in cfg.methods:
        get_method(m)
    for m in cfg.metrics:
        get_metric(m)
    for name, params in cfg.method_params.items():
        spec = get_method(name)
        spec.resolve_params({k: v for k, v in params.items() if v is not None})  # also cross-parameter checks
    for name, params in cfg.metric_params.items():
        spec = get_metric(name)
        given = {k: v for k, v in params.items() if v is not None}
        spec.check_params(given)
        for m in given.get("methods") or []:
            get_method(m)
    ds = DATASETS.get(cfg.dataset)
    check_params("data set", cfg.dataset, cfg.dataset_params, ds.factory, ds.params)
    for model, params in cfg.model_dataset_params.items():
        if model not in cfg.models:
            raise UnknownNameError(f"model in {where}model_dataset_params", model, cfg.models)
        check_params("data set", cfg.dataset, params, ds.factory, ds.params)
    for name, path in cfg.checkpoints.items():
        if name not in cfg.models and not where:
            raise UnknownNameError("model in --checkpoint", name, cfg.models)
        if not Path(path).is_file():
            from .models import ModelLoadError

            raise ModelLoadError(f"checkpoint {path!r} of model {name!r} does not exist; pass the path of a "
                                 ".safetensors or .pt file")
    pair_metrics = [m for m in cfg.metrics if "pair" in get_metric(m).inputs]
    for a, b in cfg.pairs:
        for m in (a, b):
            if m not in cfg.models:
                raise UnknownNameError(f"model in {where}pairs", m, cfg.models)
    if pair_metrics and not cfg.pairs:
        raise ConfigError(f"metric(s) {pair_metrics} compare two models: list them in {where}pairs, e.g. "
                          "pairs: [[contrast-object-resnet, contrast-background-resnet]]")
    return cfg


def config_diff(a: RunConfig, b: RunConfig) -> list[str]:
    """The config keys whose values differ between ``a`` and ``b`` (what determines results only)."""
    da, db = a.to_dict(), b.to_dict()
    skip = {"output", "device", "gallery_images", "inspect"}
    return [k for k in da if k not in skip and da[k] != db[k]]


def describe_error(e: BaseException) -> str:
    """One line for an error: the project's message, or the type and message of another exception."""
    if isinstance(e, SaliencyBenchError):
        return str(e)
    return f"{type(e).__name__}: {e}"


__all__ = ["validate", "check_run_id", "config_diff", "describe_error", "check_model_name"]

