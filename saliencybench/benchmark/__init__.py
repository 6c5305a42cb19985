"""The benchmark: data sets with ground truth, models, the runner, leaderboards, plots, report, CLI."""

from __future__ import annotations

import importlib


def load_all() -> None:
    """Import every module that registers data sets and models (optional ones if installed)."""
    for mod in ("datasets", "real_datasets", "coco", "photos", "models", "lite0", "cue", "cue_models"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if not e.name or not e.name.startswith(__name__):
                raise
