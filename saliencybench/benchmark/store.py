"""The heatmap store: every heatmap of a run, one file per explain task, under ``<run>/heatmaps/``.

Format. One safetensors file per explain task, ``<task key>.safetensors``, written
atomically (a temporary file, fsync, rename). safetensors because it is a plain,
documented format (an 8-byte header length, a JSON header, raw little-endian
arrays), safe to read (no pickle), readable from any language, and memory-mapped:
``safe_open`` reads one tensor without loading the file, so ``run.heatmaps(model,
method)`` reads only the files of that model and method, and a data set of any size
is never held in memory at once. (numpy ``.npy`` would be as fast but needs one file
per array or a pickled index; HDF5 adds a compiled dependency.)

Contents. Maps of one input shape are stacked as ``maps.<g>`` [n_g,H,W] with their
image positions ``index.<g>`` (int64); the header's metadata holds the model, the
method, its parameters, the image ids (JSON) and the dtype. ``heatmap_dtype``:

- ``float32``: as computed;
- ``float16`` (default): each map divided by its largest absolute value (kept as
  ``scale.<g>`` float32), so small gradient maps keep their relative precision
  (about 1e-3 of the map's maximum) instead of underflowing to zero;
- ``uint8``: each map min-max scaled to 0..255 (``offset.<g>`` and ``scale.<g>``):
  1/255 of the map's range.

The metrics score the maps as stored (:func:`quantise`), so rescoring a finished run
from its store (``saliencybench score``) gives exactly the rows of the run itself.
Cost: 2 bytes per pixel in float16 (a 64x64 map: 8 KiB, 224x224: 98 KiB) plus a few
hundred bytes of header per file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..errors import InvalidInputError, SaliencyBenchError

DTYPES = ("float32", "float16", "uint8")


def _encode(maps: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    maps = maps.detach().float().cpu()
    if dtype == "float32":
        return {"maps": maps.contiguous()}
    if dtype == "float16":
        scale = maps.flatten(1).abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny)
        return {"maps": (maps / scale[:, None, None]).half().contiguous(), "scale": scale}
    if dtype == "uint8":
        lo = maps.flatten(1).amin(1)
        span = (maps.flatten(1).amax(1) - lo).clamp(min=torch.finfo(torch.float32).tiny)
        q = ((maps - lo[:, None, None]) / span[:, None, None] * 255).round().clamp(0, 255).to(torch.uint8)
        return {"maps": q.contiguous(), "offset": lo, "scale": span / 255}
    raise InvalidInputError(f"unknown heatmap dtype {dtype!r}; use one of {DTYPES}")


def _decode(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    maps = parts["maps"].float()
    if "offset" in parts:
        return maps * parts["scale"][:, None, None] + parts["offset"][:, None, None]
    if "scale" in parts:
        return maps * parts["scale"][:, None, None]
    return maps


def quantise(maps: torch.Tensor, dtype: str) -> torch.Tensor:
    """Heatmaps Tensor[B,H,W] as they will be read back from a store of ``dtype`` (float32 on the maps' device)."""
    return _decode(_encode(maps, dtype)).to(maps.device)


def _groups(maps: list[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(maps):
        groups.setdefault(tuple(m.shape), []).append(i)
    return groups


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` by write, fsync and rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class HeatmapStore:
    """The heatmaps of one run directory: ``<run>/heatmaps/<task key>.safetensors``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir) / "heatmaps"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def write(self, key: str, image_ids: list[str], maps: list[torch.Tensor] | torch.Tensor, dtype: str = "float16",
              meta: dict[str, Any] | None = None) -> Path:
        """Store ``maps`` (Tensor[N,H,W], or N Tensors[H_i,W_i] of mixed shapes) of ``image_ids``."""
        maps = list(maps)
        if len(maps) != len(image_ids):
            raise InvalidInputError(f"{len(maps)} heatmaps for {len(image_ids)} image ids")
        tensors: dict[str, torch.Tensor] = {}
        for g, (_, members) in enumerate(_groups(maps).items()):
            for name, t in _encode(torch.stack([maps[i] for i in members]), dtype).items():
                tensors[f"{name}.{g}"] = t
            tensors[f"index.{g}"] = torch.tensor(members, dtype=torch.int64)
        header = {"image_ids": json.dumps(image_ids), "dtype": dtype,
                  **{k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
                     for k, v in (meta or {}).items()}}
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        write_atomic(path, save(tensors, metadata=header))
        return path

    def read(self, key: str) -> tuple[list[str], list[torch.Tensor], dict[str, str]]:
        """(image ids, heatmaps as float32 Tensors[H,W] in stored order, header metadata) of one task."""
        path = self.path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                names = list(f.keys())
                ids = json.loads(meta["image_ids"])
                out: list[torch.Tensor | None] = [None] * len(ids)
                for g in sorted({n.split(".", 1)[1] for n in names}):
                    parts = {n.split(".", 1)[0]: f.get_tensor(n) for n in names if n.endswith(f".{g}")}
                    index = parts.pop("index").tolist()
                    for i, m in zip(index, _decode(parts)):
                        out[i] = m
        except FileNotFoundError:
            raise SaliencyBenchError(f"heatmap file {path} is missing; rerun the explain task (run --resume)") from None
        except Exception as e:  # noqa: BLE001 - truncated or foreign file
            raise SaliencyBenchError(f"heatmap file {path} cannot be read ({type(e).__name__}: {e}); delete it and "
                                     "resume the run to recompute it") from None
        if any(m is None for m in out):
            raise SaliencyBenchError(f"heatmap file {path} is incomplete; delete it and resume the run")
        return ids, out, meta  # type: ignore[return-value]

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.safetensors")) if self.root.is_dir() else []

    def metadata(self, key: str) -> dict[str, str]:
        with safe_open(str(self.path(key)), framework="pt") as f:
            return f.metadata() or {}

    def select(self, model: str, method: str, keys: Iterable[str] | None = None
               ) -> tuple[list[str], list[torch.Tensor]]:
        """All stored heatmaps of ``model`` and ``method``: (image ids, maps), in data-set order."""
        found: list[tuple[int, str, torch.Tensor]] = []
        for key in keys if keys is not None else self.keys():
            meta = self.metadata(key)
            if meta.get("model") == model and meta.get("method") == method:
                i, m, _ = self.read(key)
                index = json.loads(meta.get("indices", "[]")) or list(range(len(i)))
                found += zip(index, i, m)
        found.sort(key=lambda f: f[0])
        return [f[1] for f in found], [f[2] for f in found]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*.safetensors")) if self.root.is_dir() else 0
