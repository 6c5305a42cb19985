"""Models trained on the cue and contrast sets, and the checks that they use what the set says.

The default architectures (``DEFAULT_ARCHS``) are trained with their default recipes on
``synthetic-cue`` (``cue-resnet``, ``cue-mobilenetv2``, ``cue-vgg``) and on the same
``synthetic-contrast`` images with the object's or the background's label
(``contrast-object-<arch>`` = BAM's object model, ``contrast-background-<arch>`` = its
scene model; :data:`CONTRAST_PAIRS`). They load with ``load_model(name)`` like the other default models (cached,
keyed by recipe and architecture) and carry ``info["verification"]``: the record of
:func:`verify_cue_model` / :func:`verify_contrast_model` on held-out images, computed
once after training and kept in the cache's metadata. A model whose record says
``valid: False`` must not be used as ground truth for its data set.

Verification (the interventions of FunnyBirds, Hesse et al. ICCV 2023, on our renders):
accuracy on clean images >= ``min_accuracy``; with the used part removed (the cue; the
object for the object model, the texture for the background model) within
``chance_tolerance`` of 1 / n_classes; with the unused part removed (the shape; the
texture for the object model, the object for the background model) within
``keep_tolerance`` of clean. The classes are independent of everything but the used part
(exactly balanced and independent in blocks, :func:`~saliencybench.benchmark.cue.classes_of`),
so nothing else in an image carries the label: high clean accuracy is what shows that the
model reads the used part, and the removal of the other part that it does not need it. With
the used part removed any model scores chance up to sampling, so that check guards the
data (a leak of the label) rather than the model. A model whose classes are not the data
set's fails outright.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError
from .cue import CONTRAST_TEXTURES, CUE_TEXTURES, ContrastDataset, CueDataset, synthetic_contrast, synthetic_cue
from .datasets import SHAPES
from .models import DEFAULT_RECIPES, MODELS, ModelBundle, ModelSpec, Recipe, default_model, evaluate_accuracy

TRAIN_IMAGES = {"cue": 1500, "object": 2000, "background": 1500}
_ARCH_SUFFIX = {"synthetic-resnet": "resnet", "synthetic-mobilenetv2": "mobilenetv2", "synthetic-vgg": "vgg"}
CUE_RECIPES: dict[str, Recipe] = {}
ROLES: dict[str, str] = {}  # the check each model answers: its role in its data set
CONTRAST_PAIRS: dict[str, str] = {}  # object model -> background model (BAM's pair on the same images)
for _arch, _suffix in _ARCH_SUFFIX.items():
    _base = DEFAULT_RECIPES[_arch]  # the default recipe, on the other data
    # fewer training images than the shapes' recipe: the cue and background textures are learnt from 1500 (the
    # object from 2000) to the same >= 98.8% held-out accuracy (measured on the MobileNetV2), in half the time
    CUE_RECIPES[f"cue-{_suffix}"] = dataclasses.replace(_base, dataset="synthetic-cue", n_train=TRAIN_IMAGES["cue"])
    ROLES[f"cue-{_suffix}"] = "cue"
    for _role in ("object", "background"):
        CUE_RECIPES[f"contrast-{_role}-{_suffix}"] = dataclasses.replace(
            _base, dataset="synthetic-contrast", dataset_params=(("label", _role),), n_train=TRAIN_IMAGES[_role])
        ROLES[f"contrast-{_role}-{_suffix}"] = _role
    CONTRAST_PAIRS[f"contrast-object-{_suffix}"] = f"contrast-background-{_suffix}"
VERIFY_IMAGES = 600  # held-out images per check: chance +- 5 points is 2.8 (4 classes) to 3.3 (6) standard errors
THRESHOLDS = {"min_accuracy": 0.95, "chance_tolerance": 0.05, "keep_tolerance": 0.02}


def judge(clean: float, used_removed: float, unused_removed: float, n_classes: int, *, min_accuracy: float = 0.95,
          chance_tolerance: float = 0.05, keep_tolerance: float = 0.02, used: str = "cue",
          unused: str = "shape") -> dict[str, Any]:
    """The verdict on three accuracies: ``{"passed", "reasons", "thresholds", "chance"}``.

    Passes when ``clean >= min_accuracy``, ``|used_removed - 1/n_classes| <= chance_tolerance``
    and ``|unused_removed - clean| <= keep_tolerance``; each failed check adds a reason that
    names the accuracies (``used`` / ``unused`` name the parts in it).
    """
    chance = 1.0 / n_classes
    reasons = []
    if clean < min_accuracy:
        reasons.append(f"clean accuracy {clean:.3f} < {min_accuracy:.2f}: the model does not read the {used}")
    if abs(used_removed - chance) > chance_tolerance:
        reasons.append(f"accuracy with the {used} removed {used_removed:.3f} is not within {chance_tolerance:.2f} of "
                       f"chance {chance:.3f}: the label is predictable without it (a leak in the data, or too "
                       "few images for the tolerance)")
    if abs(unused_removed - clean) > keep_tolerance:
        reasons.append(f"accuracy with the {unused} removed {unused_removed:.3f} is not within {keep_tolerance:.2f} "
                       f"of clean {clean:.3f}: the model depends on the {unused}")
    return {"passed": not reasons, "reasons": reasons, "chance": chance,
            "thresholds": {"clean_min": min_accuracy, f"{used}_removed": [chance - chance_tolerance,
                                                                           chance + chance_tolerance],
                           f"{unused}_removed": [clean - keep_tolerance, clean + keep_tolerance]}}


def _variants(ds: CueDataset | ContrastDataset, flags: dict[str, dict[str, bool]]) -> dict[str, torch.Tensor]:
    """Images Tensor[N,3,S,S] of each variant (name -> render flags), and ``labels`` LongTensor[N]."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: one thread is faster on a loaded machine
    try:
        out = {name: ds.images(**f) for name, f in flags.items()}
    finally:
        torch.set_num_threads(threads)
    return {**out, "labels": ds.labels()}


def _accuracies(bundle: ModelBundle, images: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, float]:
    device = next(bundle.model.parameters(), torch.zeros(())).device
    labels = images["labels"].to(device)
    return {n: evaluate_accuracy(bundle.model, bundle.normalise(images[n].to(device)), labels) for n in names}


def _check(bundle: ModelBundle, n_classes: int, thresholds: dict[str, float]) -> None:
    bad = {k: v for k, v in thresholds.items() if not 0 <= v <= 1}
    if bad:
        raise InvalidInputError(f"verification thresholds must be fractions in [0, 1], got {bad}")
    if not isinstance(bundle, ModelBundle):
        raise InvalidInputError(f"verification takes a ModelBundle (load_model(name)), got {type(bundle).__name__}")


def verify_cue_model(bundle: ModelBundle, *, n_images: int = 600, seed: int = 0, split: str = "test",
                     min_accuracy: float = 0.95, chance_tolerance: float = 0.05, keep_tolerance: float = 0.02,
                     **dataset_params: Any) -> dict[str, Any]:
    """Check that ``bundle`` classifies ``synthetic-cue`` by its cue: the verification record.

    Accuracy (top-1 of the model's logits against the cue labels) on ``n_images``
    held-out images (``split``, ``seed``, ``dataset_params`` of the data set; the size
    defaults to the model's input size): clean, with the cue removed
    (:func:`~saliencybench.benchmark.cue.cue_removed`) and with the shape removed
    (:func:`~saliencybench.benchmark.cue.shape_removed`); judged by :func:`judge`.
    Record: ``dataset``, ``model``, ``n_images``, ``seed``, ``split``, ``accuracy``
    {clean, cue_removed, shape_removed}, ``thresholds``, ``chance``, ``passed`` (= ``valid``),
    ``reasons`` and ``reason`` (one line), ``model_classes`` / ``dataset_classes``.
    """
    thresholds = {"min_accuracy": min_accuracy, "chance_tolerance": chance_tolerance, "keep_tolerance": keep_tolerance}
    _check(bundle, len(CUE_TEXTURES), thresholds)
    params = {"size": bundle.input_size, **dataset_params}
    ds = synthetic_cue(n_images=n_images, seed=seed, split=split, **params)
    images = _variants(ds, {"clean": {}, "cue_removed": {"cue": False}, "shape_removed": {"shape": False}})
    acc = _accuracies(bundle, images, ("clean", "cue_removed", "shape_removed"))
    verdict = judge(acc["clean"], acc["cue_removed"], acc["shape_removed"], len(CUE_TEXTURES), used="cue",
                    unused="shape", **thresholds)
    return _record("synthetic-cue", "cue", bundle, ds, acc, verdict, params)


def verify_contrast_model(bundle: ModelBundle, role: str, *, n_images: int = 600, seed: int = 0, split: str = "test",
                          min_accuracy: float = 0.95, chance_tolerance: float = 0.05, keep_tolerance: float = 0.02,
                          **dataset_params: Any) -> dict[str, Any]:
    """Check one ``synthetic-contrast`` model: ``role="object"`` (BAM's object model) or ``"background"``.

    Accuracy against the role's labels on clean images, without the object
    (:func:`~saliencybench.benchmark.cue.object_removed`) and without the background
    texture (:func:`~saliencybench.benchmark.cue.background_removed`). The object model
    must fall to chance without the object and keep its accuracy without the texture; the
    background model the other way round. Record as :func:`verify_cue_model`, with
    ``accuracy`` {clean, object_removed, background_removed} and ``role``.
    """
    if role not in ("object", "background"):
        raise InvalidInputError(f"role must be 'object' or 'background', got {role!r}")
    n = len(SHAPES) if role == "object" else len(CONTRAST_TEXTURES)
    thresholds = {"min_accuracy": min_accuracy, "chance_tolerance": chance_tolerance, "keep_tolerance": keep_tolerance}
    _check(bundle, n, thresholds)
    params = {"size": bundle.input_size, **dataset_params}
    ds = synthetic_contrast(n_images=n_images, seed=seed, split=split, label=role, **params)
    images = _variants(ds, {"clean": {}, "object_removed": {"obj": False},
                            "background_removed": {"background": False}})
    acc = _accuracies(bundle, images, ("clean", "object_removed", "background_removed"))
    other = "background" if role == "object" else "object"
    verdict = judge(acc["clean"], acc[f"{role}_removed"], acc[f"{other}_removed"], n, used=role, unused=other,
                    **thresholds)
    return {**_record("synthetic-contrast", role, bundle, ds, acc, verdict, params), "role": role}


def verify_contrast_models(a: ModelBundle, b: ModelBundle, **kwargs: Any) -> dict[str, Any]:
    """BAM's model pair on ``synthetic-contrast``: ``a`` the object model, ``b`` the background model.

    ``{"dataset", "object_model": record of a, "background_model": record of b, "passed",
    "valid", "reason"}``: the pair is valid when both records pass (removing the object
    breaks a, not b; removing the texture breaks b, not a). ``kwargs`` as
    :func:`verify_contrast_model`.
    """
    ra, rb = verify_contrast_model(a, "object", **kwargs), verify_contrast_model(b, "background", **kwargs)
    passed = ra["passed"] and rb["passed"]
    reasons = [f"{a.name}: {r}" for r in ra["reasons"]] + [f"{b.name}: {r}" for r in rb["reasons"]]
    return {"dataset": "synthetic-contrast", "object_model": ra, "background_model": rb, "passed": passed,
            "valid": passed, "reason": "; ".join(reasons) or "all checks passed"}


def _record(dataset: str, check: str, bundle: ModelBundle, ds: CueDataset | ContrastDataset, acc: dict[str, float],
            verdict: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    reasons = list(verdict["reasons"])
    if len(bundle.classes) != len(ds.classes):  # then chance for this model is not 1 / n_classes either
        reasons.insert(0, f"the model has {len(bundle.classes)} classes, {dataset} {len(ds.classes)} "
                          f"({', '.join(ds.classes)}): it was not trained on this data set")
    return {"dataset": dataset, "check": check, "model": bundle.name, "n_images": len(ds), "seed": ds.seed,
            "split": ds.split, "dataset_params": params, "accuracy": acc, **verdict, "passed": not reasons,
            "valid": not reasons, "reasons": reasons, "reason": "; ".join(reasons) or "all checks passed",
            "model_classes": len(bundle.classes), "dataset_classes": len(ds.classes)}


def verify(bundle: ModelBundle, role: str, **kwargs: Any) -> dict[str, Any]:
    """The record of the check for ``role`` (``"cue"``, ``"object"`` or ``"background"``)."""
    if role == "cue":
        return verify_cue_model(bundle, **kwargs)
    return verify_contrast_model(bundle, role, **kwargs)


def verification_is_current(record: Any, role: str) -> bool:
    """Whether a cached verification ``record`` is this version's check of ``role`` (else it is recomputed)."""
    return isinstance(record, dict) and record.get("n_images") == VERIFY_IMAGES and record.get("check") == role


def _cached_verification(bundle: ModelBundle, role: str) -> dict[str, Any]:
    """The verification record kept in the model's cache metadata, computed (and written) if missing."""
    meta = Path(bundle.info["weights"]).with_suffix(".json")
    info = json.loads(meta.read_text()) if meta.is_file() else {}
    record = info.get("verification")
    if not verification_is_current(record, role):
        record = verify(bundle, role, n_images=VERIFY_IMAGES)
        info["verification"] = record
        tmp = meta.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(info, indent=2))
            tmp.replace(meta)
        except OSError:  # a read-only cache: the record is recomputed on the next load
            pass
    return record


def cue_model(name: str, *, retrain: bool = False, progress: bool = True, verification: bool = True) -> ModelBundle:
    """Load (or train and cache) cue / contrast model ``name``, with ``info["verification"]`` unless
    ``verification=False`` (computed once per weights, kept in the cache metadata)."""
    if name not in CUE_RECIPES:
        raise InvalidInputError(f"unknown cue model {name!r}; choose from {sorted(CUE_RECIPES)}")
    bundle = default_model(name, recipe=CUE_RECIPES[name], retrain=retrain, progress=progress)
    if verification:
        bundle.info["verification"] = _cached_verification(bundle, ROLES[name])
    return bundle


_SUMMARY = {
    "cue": "{arch} trained on synthetic-cue (class = a small texture patch; the shape is label-independent)",
    "object": "{arch} trained on synthetic-contrast object labels (BAM's object model)",
    "background": "{arch} trained on synthetic-contrast background-texture labels (BAM's scene model)",
}
for _name, _recipe in CUE_RECIPES.items():
    MODELS.add(_name, ModelSpec(_name, lambda _n=_name, **kw: cue_model(_n, **kw),
                                _SUMMARY[ROLES[_name]].format(arch=_recipe.arch)))
