"""Train the embedded models a run needs before it starts: the missing ones side by side.

The default, cue and contrast models train from their recipes (:mod:`.models`,
:mod:`.cue_models`) on ``recipe.threads`` CPU threads (one: the weights are then the same on
every machine). One single-threaded training leaves the other cores idle, so when two or
more models are missing and the machine has two or more cores, :func:`train_missing` trains
them in that many spawned processes at once, the longest first; each process trains and caches
its model exactly as the run would (the same loop, seed and thread count: the same weights),
and the run then loads them from the cache. On two cores this trains the default run's six
models in about 0.6 of the time of one after the other. A process that fails leaves its model
to be trained in the run itself, with a note.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from .cue_models import CUE_RECIPES, ROLES, verification_is_current
from .devices import available_cores
from .models import DEFAULT_ARCHS, DEFAULT_RECIPES, Recipe, cache_files


class PretrainWarning(UserWarning):
    """Training a model in a side process failed; the run trains it itself."""


def recipe_of(name: str) -> Recipe | None:
    """The training recipe of embedded model ``name`` (None: not trained by saliencybench)."""
    if name in CUE_RECIPES:
        return CUE_RECIPES[name]
    if name in DEFAULT_ARCHS:
        return DEFAULT_RECIPES[name]
    return None


def is_cached(name: str) -> bool:
    """Whether embedded model ``name`` loads from the cache without training (cue and contrast models:
    with their verification record)."""
    recipe = recipe_of(name)
    if recipe is None:
        return True
    weights, meta = cache_files(name, recipe)
    if not (weights.is_file() and meta.is_file()):
        return False
    if name not in CUE_RECIPES:
        return True
    try:
        record = json.loads(meta.read_text()).get("verification")
    except (OSError, ValueError):
        return False
    return verification_is_current(record, ROLES[name])


def missing_models(names: Iterable[str]) -> list[str]:
    """The embedded models among ``names`` (each once) that would be trained on loading, longest first
    (by epochs x training images, the ViT's per-image cost counted three times)."""
    return longest_first([n for n in dict.fromkeys(names) if recipe_of(n) is not None and not is_cached(n)])


def longest_first(names: list[str]) -> list[str]:
    """Embedded model names sorted by training work, descending."""
    def work(n: str) -> float:
        r = recipe_of(n)
        assert r is not None
        return r.epochs * r.n_train * (3.0 if "vit" in r.arch else 1.0)

    return sorted(names, key=work, reverse=True)


def _train_one(name: str, recipe: Recipe, retrain: bool = False) -> dict[str, Any]:
    """In a side process: train and cache model ``name`` from ``recipe`` as loading it in the run would
    (cue and contrast models with their verification record); its accuracy and seconds."""
    from .cue_models import _cached_verification
    from .models import default_model

    t0 = time.perf_counter()
    bundle = default_model(name, recipe=recipe, retrain=retrain, progress=False)
    check = _cached_verification(bundle, ROLES[name]) if name in CUE_RECIPES else {}
    return {"name": name, "val_accuracy": bundle.info.get("val_accuracy"), "seconds": time.perf_counter() - t0,
            "train_seconds": bundle.info.get("train_seconds"), "weights": bundle.info.get("weights"),
            "verification": check.get("reason")}


def train_missing(names: Iterable[str], *, progress: bool = True, processes: int | None = None,
                  retrain: bool = False) -> list[dict[str, Any]]:
    """Train and cache the missing embedded models among ``names`` side by side, in up to ``processes``
    spawned processes (default: the free cores); nothing when fewer than two are missing or one core is
    free (the run then trains them one by one). Returns one record per model trained here
    (``name, val_accuracy, seconds``); a model whose process failed is left to the run, with a
    :class:`PretrainWarning`. ``retrain``: train all embedded models among ``names``, cached or not."""
    todo = longest_first([n for n in dict.fromkeys(names) if recipe_of(n) is not None]) if retrain \
        else missing_models(names)
    k = min(len(todo), processes or available_cores())
    if len(todo) < 2 or k < 2:
        return []
    if progress:
        print(f"training {len(todo)} models, {k} at a time: {', '.join(todo)}", flush=True)
    done: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        with ProcessPoolExecutor(k, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_one, n, recipe_of(n), retrain): n for n in todo}
            for f in as_completed(futures):
                try:
                    rec = f.result()
                except Exception as e:  # noqa: BLE001 - the run trains it itself
                    warnings.warn(f"training {futures[f]!r} in a side process failed ({type(e).__name__}: {e}); "
                                  "the run trains it itself", PretrainWarning, stacklevel=2)
                    continue
                done.append(rec)
                if progress:
                    print(f"  {rec['name']}: val accuracy {rec['val_accuracy']:.4f}, {rec['seconds']:.0f} s",
                          flush=True)
    except (OSError, RuntimeError) as e:  # no processes on this system: the run trains them one by one
        warnings.warn(f"cannot start training processes ({type(e).__name__}: {e}); the run trains the models one "
                      "by one", PretrainWarning, stacklevel=2)
    if progress and done:
        print(f"trained {len(done)} models in {time.perf_counter() - t0:.0f} s", flush=True)
    return done
