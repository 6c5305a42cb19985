"""ROAR, RemOve And Retrain (Hooker, Erhan, Kindermans, Kim. A Benchmark for Interpretability Methods
in Deep Neural Networks. NeurIPS 2019), on the default models trained on the synthetic set.

Protocol (:func:`roar`):

1. The base model is the default model ``name`` (:func:`~.models.default_model`: loaded from the
   cache, or trained from its recipe first). Its recipe's training and held-out images
   (``n_train`` / ``n_val`` of the recipe's data set, in [0,1]) are the ROAR data.
2. Each method explains every training and held-out image with the base model, for the base
   model's top-1 class (the ``prediction`` of Hooker et al.'s code). The maps, Tensor[N,H,W], are
   cached per (base model, method, resolved parameters) under ``<output>/roar-heatmaps/``.
3. Pixels are ranked per image by the map, descending, all three channels of a pixel together,
   ties broken by a seeded random permutation per image
   (:func:`~saliencybench.metrics.perturbation_curves.pixel_ranks`; seed ``seed`` for the
   training images, ``seed + 1`` for the held-out ones). The control ``random`` ranks a constant
   map the same way: a uniform random permutation per image. (Hooker et al. rank the H x W x 3
   elements and draw the random control by Bernoulli dropout; we rank pixels and remove exactly
   ``round(t * H * W)`` of them in every image, random ones included.)
4. The top ``round(t * H * W)`` pixels of every image get the per-channel mean of the unmodified
   training images, computed in [0,1] space (:func:`ablate`); the training normalisation
   (``SYNTHETIC_MEAN`` / ``SYNTHETIC_STD``) is applied afterwards, as to any image. It is
   per-channel affine, so this equals replacing by the per-channel mean of the normalised
   training images.
5. The architecture is retrained from scratch on the modified training images with the base
   model's recipe (same seed, epochs, learning rate, loop: :func:`retrain`), and its top-1
   accuracy on the held-out images, modified the same way with the same method's maps (computed
   by the base model), is the cell's score. Fraction 0 is the same retraining on the unmodified
   images, trained once and shared by every method's curve. Hooker et al. retrain 5 times per
   cell; ``repeats`` R retrains with recipe seeds ``seed_recipe + r`` (r < R) and reports the
   mean and the standard deviation (ddof 1) of the R accuracies.

A method whose removal lowers the retrained accuracy more than random removal identifies pixels
the task needs; Hooker et al. found that only SmoothGrad-Squared and VarGrad beat random.

Cost: (1 + methods x fractions) x repeats retrainings of one recipe, each as long as training
the default model (``synthetic-mobilenetv2``, 3000 images x 3 epochs: about 90 s on two busy CPU
cores), plus each method's maps of n_train + n_val images (once; cached). :func:`roar` prints the
estimate before starting and records the measured seconds in every row. Results:
``<output>/roar-<run id>/`` holds ``roar.csv``, ``roar.md``, ``roar.png`` / ``.svg`` and one JSON
file per finished (method, fraction, repeat) cell, written atomically; a call with the same run
id (the default is derived from the model, recipe and seed) retrains only the missing cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save

from ..errors import InvalidInputError, SaliencyBenchError
from ..methods.base import batch_slices, explain, get_method
from ..metrics.perturbation_curves import pixel_ranks
from . import models as _models
from .models import DEFAULT_ARCHS, DEFAULT_RECIPES, ModelBundle, Recipe, default_model, train_default_model
from .provenance import package_versions
from .roar_outputs import RANDOM, write_outputs
from .store import write_atomic

ROAR_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_METHODS = ("smoothgrad_sq", "vargrad", "saliency", "gradcam")
BASELINE = "none"  # the cell of fraction 0
_PROTOCOL = 1  # enters every cache key


# ---- the ablation: pure tensor functions ------------------------------------------------------

def ablate(images: torch.Tensor, ranks: torch.Tensor, fraction: float, fill: torch.Tensor) -> torch.Tensor:
    """ROAR's modified images: the top ``round(fraction * H * W)`` pixels of each image set to ``fill``.

    images Tensor[N,3,H,W] (in [0,1]); ranks integer Tensor[N,H*W] (0 = most salient, from
    :func:`~saliencybench.metrics.perturbation_curves.pixel_ranks`); fill Tensor[3], the
    per-channel value (:func:`channel_mean`). All channels of a removed pixel are replaced;
    the other pixels are untouched (``round`` is Python's, half to even). Returns a new Tensor[N,3,H,W].
    """
    n, c, h, w = images.shape
    if tuple(ranks.shape) != (n, h * w):
        raise InvalidInputError(f"ranks must be [N,H*W] = {[n, h * w]}, got {list(ranks.shape)}")
    if not 0.0 <= fraction <= 1.0:
        raise InvalidInputError(f"fraction must be in [0, 1], got {fraction}")
    removed = (ranks < round(fraction * h * w)).view(n, 1, h, w)
    return torch.where(removed, fill.to(images).view(1, c, 1, 1), images)


def channel_mean(images: torch.Tensor) -> torch.Tensor:
    """Per-channel mean Tensor[3] of images Tensor[N,3,H,W] over images and pixels (ROAR's fill value)."""
    return images.double().mean((0, 2, 3)).to(images.dtype)


# ---- retraining with the default models' loop ---------------------------------------------------

def retrain(recipe: Recipe, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
            progress: bool = False) -> tuple[float, float]:
    """Train ``recipe``'s architecture from scratch on ``train`` = (images Tensor[N,3,H,W] in [0,1],
    labels LongTensor[N]) with the default models' loop (:func:`~.models.train_default_model`: its
    seed, epochs, learning rate, augmentation, normalisation): (top-1 accuracy on ``val``, seconds)."""
    _model, info = train_default_model(recipe, progress, data=(train[0], train[1], val[0], val[1]))
    return float(info["val_accuracy"]), float(info["train_seconds"])


# ---- checks --------------------------------------------------------------------------------------

def roar_recipe(model: str, n_train: int | None = None, n_val: int | None = None, epochs: int | None = None,
                recipe: Recipe | None = None) -> Recipe:
    """The recipe of default model ``model`` (or ``recipe``) with ``n_train`` / ``n_val`` / ``epochs`` replaced."""
    if model not in DEFAULT_ARCHS:
        raise SaliencyBenchError(
            f"ROAR retrains the model from scratch, which needs a training recipe: {model!r} is not a default model; "
            f"choose one of {', '.join(DEFAULT_ARCHS)}")
    base = recipe or DEFAULT_RECIPES[model]
    if base.arch != model:
        raise SaliencyBenchError(f"recipe.arch {base.arch!r} does not match model {model!r}")
    changes = {k: v for k, v in (("n_train", n_train), ("n_val", n_val), ("epochs", epochs)) if v is not None}
    for k, v in changes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SaliencyBenchError(f"{k} must be a whole number >= 1, got {v!r}")
    return dataclasses.replace(base, **changes)


def _fractions(fractions: Sequence[float]) -> list[float]:
    out = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
            raise SaliencyBenchError(f"ROAR fractions must lie strictly between 0 and 1 (0 is always the unmodified "
                                     f"baseline), got {f!r}; e.g. --fractions 0.1,0.5,0.9")
        out.append(round(float(f), 6))
    if not out:
        raise SaliencyBenchError("give at least one fraction, e.g. --fractions 0.1,0.5,0.9")
    return sorted(set(out))


def _method_params(methods: Sequence[str], method_params: Mapping[str, Mapping[str, Any]] | None,
                   given: Mapping[str, Any], size: int) -> dict[str, dict[str, Any]]:
    """Resolved parameters per method (none for ``random`` and given maps); unknown names are errors."""
    method_params = dict(method_params or {})
    stray = sorted(set(method_params) - set(methods))
    if stray:
        raise SaliencyBenchError(f"method_params for {stray}, which are not among the methods {list(methods)}")
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        if m == RANDOM or m in given:
            if method_params.get(m):
                raise SaliencyBenchError(f"{m!r} takes no parameters in ROAR, got {dict(method_params[m])}")
            out[m] = {}
        else:
            out[m] = get_method(m).resolve_params(dict(method_params.get(m, {})), (size, size))
    return out


def _key(blob: Any) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---- heatmaps: computed once per base model, method and parameters -------------------------------

def method_heatmaps(bundle: ModelBundle, method: str, params: dict[str, Any], images: torch.Tensor,
                    batch_size: int = 64, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps Tensor[N,H,W] of ``method`` on images Tensor[N,3,H,W] in [0,1] (normalised for the model
    here) for the model's top-1 classes, in batches of ``batch_size``: (maps, targets LongTensor[N])."""
    from tqdm.auto import tqdm

    maps, targets = [], []
    for sl in tqdm(batch_slices(len(images), batch_size), desc=f"explain {method}", disable=not progress,
                   leave=False):
        x = bundle.normalise(images[sl])
        with torch.no_grad():
            t = bundle.model(x).argmax(1)
        maps.append(explain(bundle.model, x, t, method, **params))
        targets.append(t)
    return torch.cat(maps), torch.cat(targets)


def _map_meta(path: Path) -> dict[str, Any] | None:
    """The header of a cached map file, or None when it is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["roar"])
    except Exception:  # noqa: BLE001 - missing, truncated or foreign file
        return None


def _cached_maps(path: Path, bundle: ModelBundle, method: str, params: dict[str, Any], splits: dict[str, torch.Tensor],
                 batch_size: int, progress: bool) -> tuple[dict[str, torch.Tensor], float]:
    """({split: maps Tensor[N,H,W]}, seconds they took to compute) from ``path``, or computed and written there."""
    meta = _map_meta(path)
    if meta is not None:
        with safe_open(str(path), framework="pt") as f:
            maps = {s: f.get_tensor(s) for s in splits if s in f.keys()}
        if all(s in maps and maps[s].shape == x.shape[:1] + x.shape[2:] for s, x in splits.items()):
            return maps, float(meta["explain_seconds"])
    t0 = time.perf_counter()
    maps = {s: method_heatmaps(bundle, method, params, x, batch_size, progress)[0] for s, x in splits.items()}
    seconds = time.perf_counter() - t0
    meta = {"method": method, "params": params, "model": bundle.name, "weights": bundle.info.get("weights"),
            "explain_seconds": seconds, "targets": "base model top-1"}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save({s: m.contiguous() for s, m in maps.items()},
                            metadata={"roar": json.dumps(meta, default=str)}))
    return maps, seconds


# ---- the benchmark --------------------------------------------------------------------------------

def roar(model: str = "synthetic-mobilenetv2", methods: Sequence[str] = DEFAULT_METHODS,
         fractions: Sequence[float] = ROAR_FRACTIONS, *, n_train: int | None = None, n_val: int | None = None,
         epochs: int | None = None, repeats: int = 1, seed: int = 0, output: str | Path = "results",
         run_id: str | None = None, progress: bool = True, method_params: Mapping[str, Mapping[str, Any]] | None = None,
         heatmaps: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None, recipe: Recipe | None = None,
         batch_size: int = 64) -> pd.DataFrame:
    """Run ROAR (the protocol in the module docstring) on default model ``model``: one row per method x fraction.

    ``methods``: registered method names; the control ``random`` is always added. ``fractions``:
    each in (0, 1); fraction 0 (the unmodified retraining, shared by all methods) is added.
    ``n_train`` / ``n_val`` / ``epochs`` shrink the default recipe for quick looks (a base model of
    that recipe is trained and cached); ``recipe`` replaces it (Python API). ``heatmaps``: extra
    rankings by name, (maps of the training images Tensor[n_train,H,W], of the held-out images
    Tensor[n_val,H,W]). ``seed``: the tie-breaks and the random control. Rows: ``model, method,
    fraction, removed_pixels, accuracy`` (mean over repeats), ``accuracy_std`` (NaN for one repeat),
    ``accuracies, repeats, n_train, n_val, train_seconds`` (mean seconds of one retraining),
    ``explain_seconds`` (the method's maps of all images), ``base_accuracy, chance, seed, params,
    recipe, recipe_key, fill, versions``. Writes ``roar.csv``, ``roar.md`` and ``roar.png`` / ``.svg``
    under ``<output>/roar-<run_id>/`` (``table.attrs["run_dir"]``).
    """
    from .remote import is_url

    if is_url(output):
        raise InvalidInputError(f"roar writes its cells and maps to a local directory, not {output!r}: give --output "
                                "a local or mounted directory and copy roar-<id>/ to the URL afterwards")
    recipe = roar_recipe(model, n_train, n_val, epochs, recipe)
    given = dict(heatmaps or {})
    names = [RANDOM, *[m for m in dict.fromkeys([*methods, *given]) if m != RANDOM]]
    grid = _fractions(fractions)
    params = _checked(names, method_params, given, recipe, repeats, batch_size, seed)
    bundle = default_model(model, recipe=recipe, progress=progress)
    xtr, ytr, xva, yva = _models._training_data(recipe)
    splits, fill = {"train": xtr, "val": xva}, channel_mean(xtr)
    base_id = Path(str(bundle.info.get("weights", recipe.key()))).stem
    run_dir = Path(output) / f"roar-{run_id or f'{model}-{recipe.key()}-seed{seed}'}"
    (run_dir / "cells").mkdir(parents=True, exist_ok=True)
    recipes = [dataclasses.replace(recipe, seed=recipe.seed + r) for r in range(repeats)]
    ids = {m: _key({"v": _PROTOCOL, "base": base_id, "method": m, "params": params[m], "batch": batch_size})
           for m in names if m not in given and m != RANDOM}
    map_files = {m: Path(output) / "roar-heatmaps" / f"{model}-{_safe(m)}-{i}.safetensors" for m, i in ids.items()}
    ids.update({m: hashlib.sha256(b"".join(t.detach().float().contiguous().numpy().tobytes() for t in pair)
                                  ).hexdigest()[:12] for m, pair in given.items()})

    def cell_path(m: str, f: float, r: int) -> Path:
        blob = {"v": _PROTOCOL, "base": base_id, "maps": ids.get(m, m), "fraction": f, "recipe": recipes[r].key(),
                "seed": seed}
        return run_dir / "cells" / f"{_safe(m)}-{f:.4f}-r{r}-{_key(blob)}.json"

    cells = [(BASELINE, 0.0, r) for r in range(repeats)] + [(m, f, r) for m in names for f in grid
                                                           for r in range(repeats)]
    todo = [c for c in cells if not cell_path(*c).is_file()]
    if progress:
        probe = {m: _probe_seconds(bundle, m, params[m], xtr) for m, p in map_files.items() if _map_meta(p) is None}
        print(_cost_line(model, bundle, recipe, len(names), len(grid), repeats, len(todo), len(cells), probe),
              flush=True)
    results = {c: _run_cell(cell_path(*c), recipes[c[2]], (xtr, ytr), (xva, yva), 0, progress)
               for c in todo if c[0] == BASELINE}
    explain_seconds = {m: 0.0 for m in names}
    for m in names:
        pending = [c for c in todo if c[0] == m]
        if m in map_files and (pending or _map_meta(map_files[m]) is None):
            maps, explain_seconds[m] = _cached_maps(map_files[m], bundle, m, params[m], splits, batch_size, progress)
        elif m in map_files:
            explain_seconds[m] = float(_map_meta(map_files[m])["explain_seconds"])  # type: ignore[index]
        if not pending:
            continue
        if m == RANDOM:  # a constant map: pixel_ranks' seeded tie-break alone, a uniform random permutation
            maps = {s: torch.zeros(x.shape[:1] + x.shape[2:]) for s, x in splits.items()}
        elif m in given:
            maps = {"train": given[m][0].detach().float().cpu(), "val": given[m][1].detach().float().cpu()}
        ranks = {"train": pixel_ranks(maps["train"], seed).int(), "val": pixel_ranks(maps["val"], seed + 1).int()}
        for c in pending:
            train, val = (ablate(xtr, ranks["train"], c[1], fill), ytr), (ablate(xva, ranks["val"], c[1], fill), yva)
            results[c] = _run_cell(cell_path(*c), recipes[c[2]], train, val, round(c[1] * recipe.size ** 2), progress)
        del maps, ranks
    results.update({c: json.loads(cell_path(*c).read_text()) for c in cells if c not in results})
    table = _table(model, bundle, recipe, names, grid, repeats, results, params, explain_seconds, fill, seed)
    write_outputs(table, run_dir)
    table.attrs["run_dir"] = str(run_dir)
    return table


def _checked(names: list[str], method_params: Mapping[str, Mapping[str, Any]] | None,
             given: dict[str, tuple[torch.Tensor, torch.Tensor]], recipe: Recipe, repeats: int, batch_size: int,
             seed: int) -> dict[str, dict[str, Any]]:
    """Check what :func:`roar` was given before any work; the resolved parameters per method."""
    for k, v in (("repeats", repeats), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SaliencyBenchError(f"{k} must be a whole number >= 1, got {v!r}")
    shape = ([recipe.n_train, recipe.size, recipe.size], [recipe.n_val, recipe.size, recipe.size])
    for name, pair in given.items():
        if len(pair) != 2 or [list(getattr(t, "shape", [])) for t in pair] != list(shape):
            raise InvalidInputError(f"heatmaps[{name!r}] must be (train maps, held-out maps) of shapes {shape}, got "
                                    f"{[list(getattr(t, 'shape', [])) for t in pair]}")
    return {**_method_params(names, method_params, given, recipe.size), RANDOM: {"tie_break_seed": seed}}


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._" else "_" for ch in name)


def _run_cell(path: Path, recipe: Recipe, train: tuple[torch.Tensor, torch.Tensor],
              val: tuple[torch.Tensor, torch.Tensor], removed: int, progress: bool) -> dict[str, Any]:
    """Retrain one cell and write its record (accuracy, seconds) atomically."""
    acc, seconds = retrain(recipe, train, val, progress)
    record = {"accuracy": acc, "train_seconds": seconds, "removed_pixels": removed, "recipe_key": recipe.key()}
    write_atomic(path, json.dumps(record, indent=2).encode())
    if progress:
        print(f"  {path.stem.rsplit('-', 1)[0]}: accuracy {acc:.4f} ({seconds:.0f} s)", flush=True)
    return record


def _probe_seconds(bundle: ModelBundle, method: str, params: dict[str, Any], images: torch.Tensor,
                   n: int = 8) -> float:
    """Seconds per image of ``method``'s maps, timed on the first ``n`` images (for the cost estimate)."""
    t0 = time.perf_counter()
    method_heatmaps(bundle, method, params, images[:n], n)
    return (time.perf_counter() - t0) / min(n, len(images))


def _cost_line(model: str, bundle: ModelBundle, recipe: Recipe, n_methods: int, n_fractions: int, repeats: int,
               todo: int, total: int, probe: dict[str, float]) -> str:
    """The cost estimate printed before the work starts."""
    per = float(bundle.info.get("train_seconds", float("nan")))
    n = recipe.n_train + recipe.n_val
    maps = ", ".join(f"{m} ~{s * n:.0f} s" for m, s in probe.items()) or "all cached"
    return (f"ROAR on {model}: {total} retrainings ((1 + {n_methods} methods incl. random x {n_fractions} fractions) "
            f"x {repeats} repeat(s)), {todo} to do, x ~{per:.0f} s each (the base model's training time) = "
            f"~{todo * per / 60:.1f} min; maps of {recipe.n_train} + {recipe.n_val} images per method: {maps}")


def _table(model: str, bundle: ModelBundle, recipe: Recipe, names: list[str], grid: list[float], repeats: int,
           results: dict[tuple[str, float, int], dict[str, Any]], params: dict[str, dict[str, Any]],
           explain_seconds: dict[str, float], fill: torch.Tensor, seed: int) -> pd.DataFrame:
    versions = json.dumps(package_versions(), sort_keys=True)
    rows = []
    for m in names:
        for f in [0.0, *grid]:
            recs = [results[(BASELINE if f == 0.0 else m, f, r)] for r in range(repeats)]
            accs = [float(r["accuracy"]) for r in recs]
            rows.append({
                "model": model, "method": m, "fraction": f, "removed_pixels": int(recs[0]["removed_pixels"]),
                "accuracy": sum(accs) / len(accs),
                "accuracy_std": float(pd.Series(accs).std(ddof=1)) if repeats > 1 else float("nan"),
                "accuracies": json.dumps(accs), "repeats": repeats, "n_train": recipe.n_train, "n_val": recipe.n_val,
                "train_seconds": sum(r["train_seconds"] for r in recs) / len(recs),
                "explain_seconds": explain_seconds[m], "base_accuracy": bundle.info.get("val_accuracy"),
                "chance": 1.0 / len(bundle.classes), "seed": seed, "params": json.dumps(params[m], default=str),
                "recipe": json.dumps(dataclasses.asdict(recipe), default=str), "recipe_key": recipe.key(),
                "fill": json.dumps([round(v, 6) for v in fill.tolist()]), "versions": versions,
            })
    return pd.DataFrame(rows)
