"""The per-process context of a run's tasks: models, data sets, device, prepared shards, shared passes.

A :class:`TaskContext` builds (once per process) what tasks need from the config and keeps the last
shard's preprocessed inputs, clean logits and shared forward/backward passes; each part of a run
has its own context sharing the models (:meth:`TaskContext.for_part`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SaliencyBenchError
from ..methods.base import progress_to
from ..methods.shared import SharedPasses, pass_requests
from .config import RunConfig, part_config
from .datasets import GroundTruthDataset, Sample, UnreadableImageError, get_dataset
from .devices import resolve_device
from .models import ModelBundle, load_model
from .preprocess import preprocess


@dataclass
class Group:
    """Samples of one shard whose model inputs share one shape: dataset ``indices``, normalised
    images ``x`` Tensor[b,3,H,W] on the device, ground-truth ``labels`` LongTensor[b], scored samples."""

    indices: list[int]
    x: torch.Tensor
    labels: torch.Tensor
    samples: list[Sample]


@dataclass
class TaskContext:
    """Builds (once per process) what tasks need from the config: models, data set, device, passes."""

    config: RunConfig
    run_id: str
    run_dir: Path | None = None
    _models: dict[str, ModelBundle] = field(default_factory=dict)
    _datasets: dict[str, GroundTruthDataset] = field(default_factory=dict)
    _device: torch.device | None = None
    _parts: dict[str, TaskContext] = field(default_factory=dict)
    part: str = ""
    _prepared: dict[tuple[str, tuple[int, ...]], tuple[list[Group], list[dict[str, Any]]]] = field(default_factory=dict)
    _shared: tuple[Any, SharedPasses] | None = None
    _logits: dict[tuple[str, tuple[int, ...]], torch.Tensor] = field(default_factory=dict)
    explain_allowed: bool = True
    inner_progress: bool = False
    imported: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # method -> image id -> map

    @property
    def remote(self) -> Any:  # -> remote.Remote | None
        """The run's shared copy when its ``output`` is a URL (:mod:`.remote`), else None."""
        from .remote import remote_of

        return remote_of(self.config.output, self.run_id)

    @property
    def location(self) -> str:
        """Where the run lives, as a user names it (``--resume``): its URL, else its directory."""
        return self.remote.url if self.remote is not None else str(self.run_dir)

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = resolve_device(self.config.device)
        return self._device

    def model(self, name: str) -> ModelBundle:
        if name not in self._models:
            bundle = load_model(name, checkpoint=self.config.checkpoints.get(name))
            bundle.model.to(self.device)
            self._models[name] = bundle
        return self._models[name]

    def for_part(self, part: str) -> TaskContext:
        """The context of one part of the run (its data set, models and metrics); models are shared."""
        if not part or part == self.part:
            return self
        if part not in self._parts:
            sub = TaskContext(part_config(self.config, part), self.run_id, self.run_dir, self._models,
                              explain_allowed=self.explain_allowed, inner_progress=self.inner_progress, part=part)
            sub._device = self._device
            self._parts[part] = sub
        return self._parts[part]

    @property
    def dataset(self) -> GroundTruthDataset:
        """The part's data set (as the config gives it, without per-model parameters)."""
        return self.dataset_for("")

    def dataset_for(self, model: str) -> GroundTruthDataset:
        """The data set ``model`` sees: the config's parameters and the model's ``model_dataset_params``."""
        extra = self.config.model_dataset_params.get(model, {}) if model else {}
        key = json.dumps(extra, sort_keys=True, default=str)
        if key not in self._datasets:
            params = {**self.config.dataset_params, **extra}
            if self.config.dataset.startswith("synthetic"):
                params.setdefault("n_images", self.config.n_images)
                params.setdefault("seed", self.config.seed)
            self._datasets[key] = get_dataset(self.config.dataset, **params)
        return self._datasets[key]

    def input_size(self, model: str) -> int:
        return self.config.image_size or self.model(model).input_size

    def prepare(self, model: str, indices: tuple[int, ...]) -> tuple[list[Group], list[dict[str, Any]]]:
        """The shard's samples preprocessed for ``model``, in groups of one input shape, and the
        samples that could not be used (``{"index", "error"}``); kept for the last shard."""
        key = (model, indices)
        if key not in self._prepared:
            bundle = self.model(model)
            crop_pct = float(getattr(bundle.model, "pretrained_cfg", {}).get("crop_pct") or 0.875)
            size = self.input_size(model)
            by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor, Sample]]] = {}
            skipped = []
            for i in indices:
                try:
                    img, sample = preprocess(self.dataset_for(model)[i], size, self.config.preprocess, crop_pct)
                    by_shape.setdefault(tuple(img.shape), []).append((i, img, sample))
                except (UnreadableImageError, SaliencyBenchError) as e:
                    skipped.append({"index": i, "error": str(e)})
            groups = [Group([i for i, _, _ in m], bundle.normalise(torch.stack([x for _, x, _ in m])).to(self.device),
                            torch.tensor([s.label for _, _, s in m], device=self.device), [s for _, _, s in m])
                      for m in by_shape.values()]
            self._prepared = {key: (groups, skipped)}
        return self._prepared[key]

    def logits(self, model: str, group: Group) -> torch.Tensor:
        key = (model, tuple(group.indices))
        if key not in self._logits:
            with torch.inference_mode():
                self._logits = {key: self.model(model).model.eval()(group.x).float()}
        return self._logits[key]

    def shared_passes(self, model: str, group: Group) -> SharedPasses:
        """The forward/backward passes the run's methods share on one group (kept for one group)."""
        key = (model, tuple(group.indices))
        if self._shared is None or self._shared[0] != key:
            methods = {m: self.config.method_params_for(m) for m in self.config.methods}
            self._shared = (key, SharedPasses(self.model(model).model, group.x, group.labels, pass_requests(methods)))
        return self._shared[1]

    def class_name(self, model: str, label: int) -> str:
        classes = self.dataset_for(model).classes
        return classes[label] if 0 <= label < len(classes) else str(label)


@contextmanager
def inner_bar(ctx: TaskContext, label: str) -> Iterator[None]:
    """An inner progress bar over the batches of one long method or metric call (in-process runs only)."""
    if not ctx.inner_progress:
        yield
        return
    from tqdm.auto import tqdm

    bars: list[Any] = []  # made on the first report, so calls without long loops show nothing

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=f"  {label}", leave=False, position=1, dynamic_ncols=True,
                             mininterval=0.5))
        bar = bars[0]
        if bar.total != total:
            bar.reset(total=total)
        bar.update(done - bar.n)

    try:
        with progress_to(update):
            yield
    finally:
        for bar in bars:
            bar.close()


