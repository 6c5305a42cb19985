"""``saliencybench roar``: the command line of :mod:`saliencybench.benchmark.roar`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SaliencyBenchError


def _csv(text: str) -> list[str]:
    return [t for part in text.split(",") for t in [part.strip()] if t]


def _names(values: list[str] | None) -> list[str] | None:
    """Names from ``--x a b`` or ``--x a,b`` (or both)."""
    return None if values is None else [n for v in values for n in _csv(v)]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``roar`` subcommand (:mod:`saliencybench.benchmark.roar`)."""
    ro = sub.add_parser("roar", help="ROAR: remove the top pixels by each method's maps, retrain, test (Hooker et al. "
                        "2019)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ro.add_argument("--models", nargs="+", default=["synthetic-mobilenetv2"], metavar="NAME", help="default models "
                    "(each retrained from its recipe, one ROAR table per model): synthetic-resnet, "
                    "synthetic-mobilenetv2, synthetic-vgg, synthetic-vit")
    ro.add_argument("--methods", nargs="+", metavar="NAME", help="method names (default: smoothgrad_sq vargrad "
                    "saliency gradcam); the control random is always added")
    ro.add_argument("--fractions", default="0.1,0.3,0.5,0.7,0.9", metavar="F,F", help="fractions of pixels removed, "
                    "each in (0, 1); 0 (the unmodified retraining) is added")
    ro.add_argument("--n-train", type=int, metavar="N", help="training images (default: the model's recipe)")
    ro.add_argument("--n-val", type=int, metavar="N", help="held-out images (default: the model's recipe)")
    ro.add_argument("--epochs", type=int, metavar="E", help="training epochs (default: the model's recipe)")
    ro.add_argument("--repeats", type=int, default=1, metavar="R", help="retrainings per cell (Hooker et al.: 5)")
    ro.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                    help="a method parameter, e.g. smoothgrad_sq.n_samples=10; repeatable")
    ro.add_argument("--output", default="results", metavar="DIR", help="parent of the roar-<id> directory and of "
                    "the heatmap cache roar-heatmaps/")
    ro.add_argument("--run-id", metavar="ID", help="name of the run (default: model, recipe and seed; the same id "
                    "resumes: finished cells are not retrained)")
    ro.add_argument("--seed", type=int, default=0, help="seed of the tie-breaks and of the random control")
    ro.add_argument("--quiet", action="store_true", help="no cost estimate, progress bars or per-cell lines")


def command(args: argparse.Namespace) -> int:
    """Run ``saliencybench roar`` and print its table and files."""
    import json

    from .roar import DEFAULT_METHODS, roar

    params: dict[str, dict] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        method, dot, name = key.rpartition(".")
        if not sep or not dot or not method or not name:
            raise SaliencyBenchError(f"--param takes METHOD.NAME=VALUE, got {item!r}; e.g. smoothgrad_sq.n_samples=10")
        try:
            params.setdefault(method, {})[name] = json.loads(value)
        except json.JSONDecodeError:
            params.setdefault(method, {})[name] = value
    try:
        fractions = [float(f) for f in _csv(args.fractions)]
    except ValueError:
        raise SaliencyBenchError(f"--fractions takes numbers separated by commas, got {args.fractions!r}; e.g. "
                                 "--fractions 0.1,0.5,0.9") from None
    models = list(dict.fromkeys(_names(args.models)))
    if args.run_id and len(models) > 1:
        raise SaliencyBenchError("--run-id names one ROAR run: give one model with it, or leave it out (each model "
                                 "then gets its own id)")
    from .roar import roar_recipe

    for model in models:  # every model's name is checked before any training
        roar_recipe(model)
    for model in models:
        table = roar(model, _names(args.methods) or list(DEFAULT_METHODS), fractions, n_train=args.n_train,
                     n_val=args.n_val, epochs=args.epochs, repeats=args.repeats, seed=args.seed, output=args.output,
                     run_id=args.run_id, progress=not args.quiet, method_params=params)
        out = Path(table.attrs["run_dir"])
        print((out / "roar.md").read_text())
        print("\n".join(f"saved: {out / n}" for n in ("roar.csv", "roar.md", "roar.png", "roar.svg")))
    return 0
