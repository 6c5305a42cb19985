"""``saliencybench`` command line: run, leaderboard, report, list, train, inspect.

Every expected failure (unknown names, missing files, bad configs, a resume
against another config) prints one clear message and exits with status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import SaliencyBenchError
from .config import RunConfig, config_from_dict, load_config
from .preprocess import PREPROCESSING


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saliencybench", description="Score CNN explanation methods against ground truth.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a benchmark (no arguments: the embedded default, offline)")
    r.add_argument("--config", help="YAML or TOML run config")
    r.add_argument("--models", nargs="+")
    r.add_argument("--methods", nargs="+")
    r.add_argument("--metrics", nargs="+")
    r.add_argument("--dataset")
    r.add_argument("--data-root", help="root directory of a real data set (sets dataset_params.root)")
    r.add_argument("--n-images", type=int)
    r.add_argument("--image-size", type=int, help="resize every image to this size (default: each model's own)")
    r.add_argument("--preprocess", choices=PREPROCESSING,
                   help="squash (RISE), shorter_side (TorchRay: scored at the original resolution) or center_crop")
    r.add_argument("--batch-size", type=int)
    r.add_argument("--seed", type=int)
    r.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=FILE",
                   help="load MODEL's weights from FILE (safetensors or torch state dict)")
    r.add_argument("--output", help="parent directory of run directories (default results/)")
    r.add_argument("--run-id")
    r.add_argument("--resume", metavar="RUN", help="continue an interrupted run (its directory or id)")
    r.add_argument("--no-report", action="store_true", help="skip the plots and HTML report")
    r.add_argument("--workers", type=int, default=1,
                   help="run tasks in this many worker processes, one torch thread each (default: in process)")
    lb = sub.add_parser("leaderboard", help="print and save the leaderboard of a run")
    lb.add_argument("run")
    rp = sub.add_parser("report", help="write the HTML report of a run")
    rp.add_argument("run")
    sub.add_parser("list", help="list methods, metrics, data sets and models")
    tr = sub.add_parser("train", help="(re)train the embedded default models into the cache")
    tr.add_argument("--models", nargs="+")
    from ..inspect.cli import add_parser as add_inspect_parser

    add_inspect_parser(sub)
    return p


def _config(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(args.config) if args.config else RunConfig()
    keys = ("models", "methods", "metrics", "dataset", "n_images", "image_size", "preprocess", "batch_size", "seed",
            "output")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.data_root:
        overrides["dataset_params"] = {**cfg.dataset_params, "root": args.data_root}
    if args.checkpoint:
        pairs = dict(c.split("=", 1) for c in args.checkpoint if "=" in c)
        if len(pairs) != len(args.checkpoint):
            raise SaliencyBenchError("--checkpoint takes MODEL=FILE, e.g. --checkpoint resnet50=weights.safetensors")
        overrides["checkpoints"] = {**cfg.checkpoints, **pairs}
    cfg = config_from_dict(overrides, cfg)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Check every name in the config before any work starts."""
    import timm

    from ..methods.base import get_method
    from ..metrics.base import get_metric
    from .datasets import DATASETS
    from .models import MODELS, ModelLoadError

    for m in cfg.methods + cfg.sanity_methods:
        get_method(m)
    for m in cfg.metrics:
        get_metric(m)
    from .inspection import INSPECTIONS

    bad = sorted(set(cfg.inspect) - set(INSPECTIONS))
    if bad:
        raise SaliencyBenchError(f"unknown inspection(s) {bad} in config key 'inspect'; choose from {list(INSPECTIONS)}")
    DATASETS.get(cfg.dataset)
    for m in cfg.models:
        if m not in MODELS and not timm.is_model(m):
            raise ModelLoadError(
                f"unknown model {m!r}: use a saliencybench model ({', '.join(MODELS.names())}) or a timm model name"
            )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except SaliencyBenchError as e:
        print(f"saliencybench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saliencybench: interrupted; continue with --resume RUN", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from . import load_all
    from .report import write_leaderboard, write_report
    from .runner import ProcessExecutor, open_run, run

    load_all()
    if args.command == "inspect":
        from ..inspect.cli import run as run_inspect

        return run_inspect(args)
    if args.command == "list":
        from ..methods.base import METHODS
        from ..metrics.base import METRICS
        from .datasets import DATASETS
        from .models import MODELS

        sections = [
            ("methods", METHODS, lambda s: f"{s.family:12s} {s.paper}"),
            ("metrics", METRICS, lambda s: f"{'higher' if s.higher_is_better else 'lower'} is better  {s.paper}"),
            ("data sets", DATASETS, lambda s: s.summary),
            ("models (and any timm model name)", MODELS, lambda s: s.summary),
        ]
        for title, registry, describe in sections:
            print(f"{title}:")
            for n, spec in sorted(registry.entries.items()):
                print(f"  {n:22s} {describe(spec)}")
        return 0
    if args.command == "train":
        from .models import DEFAULT_ARCHS, default_model

        for name in args.models or list(DEFAULT_ARCHS):
            if name not in DEFAULT_ARCHS:
                raise SaliencyBenchError(f"unknown default model {name!r}; choose from {sorted(DEFAULT_ARCHS)}")
            b = default_model(name, retrain=True)
            print(f"{name}: val accuracy {b.info['val_accuracy']:.4f}, {b.info['train_seconds']:.0f} s, {b.info['weights']}")
        return 0
    if args.command == "run":
        cfg = _config(args)
        if args.resume:
            path = Path(args.resume) if Path(args.resume).exists() else Path(cfg.output) / args.resume
            if not (args.config or any(getattr(args, k) for k in ("models", "methods", "metrics", "dataset"))):
                cfg = open_run(path).config
        executor = ProcessExecutor(args.workers) if args.workers > 1 else None
        result = run(cfg, run_id=args.run_id, resume=args.resume, executor=executor)
        board, csv = write_leaderboard(result)
        print(board.to_string(max_colwidth=28))
        print(f"\nresults: {result.path}\nleaderboard: {csv} and {result.path / 'leaderboard.md'}")
        if not args.no_report:
            print(f"report: {write_report(result)}")
        return 0
    run_obj = open_run(args.run if Path(args.run).exists() else Path("results") / args.run)
    if args.command == "leaderboard":
        board, csv = write_leaderboard(run_obj)
        print(board.to_string(max_colwidth=28))
        print(f"\nsaved: {csv} and {run_obj.path / 'leaderboard.md'}")
        return 0
    if args.command == "report":
        print(f"report: {write_report(run_obj)}")
        return 0
    raise SaliencyBenchError(f"unknown command {args.command!r}")
