"""``saliencybench`` command line: run, score, leaderboard, report, list, train, inspect.

Every expected failure (unknown names, bad values, missing or corrupt files,
permissions, a resume against another config) prints one message naming the
problem and the fix and exits with status 2; an unexpected error prints a
one-line summary and the path of a file with its traceback and exits with 1.
No command ever shows a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from ..errors import SaliencyBenchError, UnknownNameError

EXAMPLES = """examples:
  saliencybench run                                   # the embedded default benchmark, offline
  saliencybench run --models resnet50 --checkpoint resnet50=w.safetensors --dataset imagenet-val \\
      --data-root /data/val --config imagenet.yaml --device cuda
  saliencybench run --resume results/<run-id>         # continue an interrupted run
  saliencybench score results/<run-id> --metrics max_box_acc
  saliencybench leaderboard results/<run-id>
  saliencybench report results/<run-id>
  saliencybench list
  saliencybench plan benchmarks/imagenet_resnet50_plan.yaml   # passes, time on 1/8/64 GPUs, store size
  saliencybench run --config big.yaml --ray-address head:6379 --output /shared/results
"""


def _csv(text: str) -> list[str]:
    return [t for part in text.split(",") for t in [part.strip()] if t]


def _names(values: list[str] | None) -> list[str] | None:
    """Names from ``--x a b`` or ``--x a,b`` (or both)."""
    return None if values is None else [n for v in values for n in _csv(v)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saliencybench", description="Score explanation methods for image classifiers "
                                "against ground truth, end to end.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    r = sub.add_parser("run", help="run a benchmark (no arguments: the embedded default, offline)", formatter_class=fmt,
                       epilog="Flags override the config file; method and metric parameters merge key by key.")
    r.add_argument("--config", metavar="FILE", help="YAML or TOML run config (keys: the fields of RunConfig)")
    r.add_argument("--models", nargs="+", metavar="NAME", help="saliencybench or timm model names (default: the three "
                   "synthetic models)")
    r.add_argument("--methods", nargs="+", metavar="NAME", help="method names (default: every built-in method)")
    r.add_argument("--metrics", nargs="+", metavar="NAME", help="metric names (default: the default run's metrics)")
    r.add_argument("--dataset", metavar="NAME", help="data set name (default: synthetic)")
    r.add_argument("--data-root", metavar="DIR", help="root directory of a real data set (sets dataset_params.root)")
    r.add_argument("--n-images", type=int, metavar="N", help="number of images (default 48)")
    r.add_argument("--image-size", type=int, metavar="PX", help="resize every image to PX (default 0: each model's own)")
    from .preprocess import PREPROCESSING

    r.add_argument("--preprocess", metavar="MODE",
                   help=f"one of {', '.join(PREPROCESSING)}: squash (RISE), shorter_side (TorchRay: scored at the "
                   "original resolution) or center_crop (timm's eval transform) (default squash)")
    r.add_argument("--batch-size", type=int, metavar="N", help="images per task and batch (default 16)")
    r.add_argument("--seed", type=int, help="seed of every random draw (default 0)")
    r.add_argument("--device", metavar="DEV", help="auto, cpu, cuda or cuda:N (default auto: CUDA when available)")
    r.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=FILE",
                   help="load MODEL's weights from FILE (safetensors or torch state dict); repeatable")
    r.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="Python file registering methods/metrics, imported first; repeatable")
    r.add_argument("--output", metavar="DIR", help="parent directory of run directories (default results), or a "
                   "URL (s3://bucket/results; any fsspec scheme)")
    r.add_argument("--run-id", metavar="ID", help="name of the run directory (default: time stamp and config hash)")
    r.add_argument("--resume", metavar="RUN", help="continue an interrupted run: its directory, or its id inside "
                   "--output; flags that change its config are an error")
    r.add_argument("--no-report", action="store_true", help="skip the plots and the HTML report")
    r.add_argument("--workers", type=int, metavar="N",
                   help="run tasks in N worker processes, one torch thread each; 1: in this process, with "
                   "progress bars inside long tasks (default: on CPU one process per core, at most 4, with "
                   "cores / N threads each; on a GPU 1; with --executor ray: as many as the cluster's CPUs/GPUs hold)")
    r.add_argument("--executor", choices=("process", "ray"),
                   help="process: --workers N processes on this machine; ray: Ray actors on a cluster "
                   "(--ray-address) or on a local Ray cluster (default: process)")
    r.add_argument("--ray-address", metavar="ADDR", help="a running Ray cluster (auto, host:6379 or "
                   "ray://host:10001; implies --executor ray); --output must be on storage every node sees")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    s = sub.add_parser("score", help="add metrics to a finished run from its stored heatmaps, or score heatmaps "
                       "made elsewhere (--heatmaps)", formatter_class=fmt)
    s.add_argument("run", nargs="?", help="run directory (not with --heatmaps)")
    s.add_argument("--metrics", help="comma-separated metric names (required for a run; with --heatmaps default "
                   "the default run's metrics that need no method call)")
    s.add_argument("--heatmaps", metavar="FILE", help="a .npz (image_ids, heatmaps[N,H,W]) or .safetensors file of "
                   "heatmaps computed with any tool: scored as a new run")
    s.add_argument("--dataset", help="with --heatmaps: the data set the maps belong to")
    s.add_argument("--data-root", metavar="DIR", help="with --heatmaps: the data set's root directory")
    s.add_argument("--model", help="with --heatmaps: the model the maps explain (saliencybench or timm name)")
    s.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=FILE", help="weights of --model")
    s.add_argument("--method-name", help="with --heatmaps: the name the maps are ranked under")
    s.add_argument("--n-images", type=int, metavar="N", help="with --heatmaps: images scored (default 32)")
    s.add_argument("--output", metavar="DIR", help="with --heatmaps: parent directory of the new run")
    s.add_argument("--run-id", metavar="ID", help="with --heatmaps: name of the new run directory")
    s.add_argument("--methods", help="only these methods (comma-separated; default all of the run's)")
    s.add_argument("--models", help="only these models (comma-separated; default all of the run's)")
    s.add_argument("--plugin", action="append", default=[], metavar="FILE", help="plug-in file; repeatable")
    s.add_argument("--no-report", action="store_true", help="do not refresh the leaderboard files and the report")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    lb = sub.add_parser("leaderboard", help="print and save the leaderboard of a run", formatter_class=fmt)
    lb.add_argument("run", help="run directory (or run id inside results/)")
    lb.add_argument("--model", nargs="+", metavar="NAME", help="only these models")
    lb.add_argument("--metric", nargs="+", metavar="NAME", help="only these metrics")
    lb.add_argument("--criterion", nargs="+", metavar="NAME", help="only these criteria (faithfulness, localisation, "
                    "robustness, complexity, randomisation, model_use)")
    lb.add_argument("--format", default="text", choices=("text", "md", "csv", "html", "json"), help="output format")
    lb.add_argument("--width", type=int, metavar="COLS", help="text width (default: the terminal's, at least 100)")
    rp = sub.add_parser("report", help="write the HTML report of a run", formatter_class=fmt)
    rp.add_argument("run", help="run directory (or run id inside results/)")
    ls = sub.add_parser("list", help="list methods, metrics, data sets and models", formatter_class=fmt)
    ls.add_argument("--models", nargs="*", metavar="NAME", help="print which method applies to which model (default "
                    "the default run's models); timm names are built with random weights")
    tr = sub.add_parser("train", help="(re)train the embedded default models into the cache", formatter_class=fmt)
    tr.add_argument("--models", nargs="+", help="default, cue or contrast model names (default: the default models)")
    from ..inspect.cli import add_parser as add_inspect_parser

    add_inspect_parser(sub)
    from .plan import add_parser as add_plan_parser

    add_plan_parser(sub)
    from .roar_cli import add_parser as add_roar_parser

    add_roar_parser(sub)
    return p


def _config(args: argparse.Namespace):  # -> RunConfig
    from .config import RunConfig, config_from_dict, load_config
    from .runner import open_run, resolve_run_path

    if args.resume:
        base = open_run(resolve_run_path(args.resume, args.output or "results")).config
        if args.config:
            base = load_config(args.config)
    else:
        base = load_config(args.config) if args.config else RunConfig()
    keys = ("dataset", "n_images", "image_size", "preprocess", "batch_size", "seed", "output", "device")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    for k in ("models", "methods", "metrics"):
        if getattr(args, k) is not None:
            overrides[k] = _names(getattr(args, k))
    if args.plugin:
        overrides["plugins"] = [*base.plugins, *[p for p in args.plugin if p not in base.plugins]]
    if args.data_root:
        overrides["dataset_params"] = {**base.dataset_params, "root": args.data_root}
    if args.checkpoint:
        bad = [c for c in args.checkpoint if "=" not in c or not c.split("=", 1)[0] or not c.split("=", 1)[1]]
        if bad:
            raise SaliencyBenchError(f"--checkpoint takes MODEL=FILE, got {bad[0]!r}; e.g. --checkpoint "
                                     "resnet50=weights.safetensors")
        overrides["checkpoints"] = {**base.checkpoints, **dict(c.split("=", 1) for c in args.checkpoint)}
    return config_from_dict(overrides, base)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except SaliencyBenchError as e:
        print(f"saliencybench: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        print(f"saliencybench: error: permission denied: {e.filename or e}; choose a writable location "
              "(e.g. --output)", file=sys.stderr)
        return 2
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"saliencybench: error: {e.strerror or e}{where}; check the path, free disk space and permissions",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saliencybench: interrupted; rows already computed are kept: continue with "
              "`saliencybench run --resume <run directory>`", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - never a traceback on the terminal
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(tempfile.gettempdir()) / f"saliencybench-error-{stamp}.txt"
        try:
            path.write_text(traceback.format_exc())
            where = f"; the traceback is in {path}"
        except OSError:
            where = ""
        print(f"saliencybench: unexpected error: {type(e).__name__}: {str(e)[:300]}{where}. Rows already computed are "
              "kept (resume with --resume); please report this.", file=sys.stderr)
        return 1


def _list(models: list[str] | None = None) -> int:
    import shutil

    from ..methods.base import METHODS
    from ..metrics.base import METRICS
    from .datasets import DATASETS
    from .models import MODELS

    sections = [
        ("methods", METHODS, lambda s: f"{s.family:12s} {s.paper}"),
        ("metrics", METRICS, lambda s: f"{s.criterion:13s} {s.direction():17s} {s.paper}"),
        ("data sets", DATASETS, lambda s: s.summary),
        ("models (and any timm model name)", MODELS, lambda s: s.summary),
    ]
    width = max(100, shutil.get_terminal_size((100, 24)).columns)
    if models is not None:
        return _applicability(models or None, width)
    for title, registry, describe in sections:
        print(f"{title}:")
        for n, spec in sorted(registry.entries.items()):
            if ":" in n:
                continue  # the peers' wrapped classes are listed by family below
            line = f"  {n:24s} {describe(spec)}"
            print(line if len(line) <= width else line[: width - 1] + "…")
    from ..methods.peers import PREFIXES, available_classes

    print("peer methods by name (method_params: init, attribute, layer, ...):")
    for prefix, (_, extra) in PREFIXES.items():
        names = available_classes(prefix)
        text = f"{len(names)} classes, e.g. {', '.join(names[:4])}" if names else \
            f"not installed: pip install 'saliencybench[{extra}]'"
        print(f"  {prefix + ':<Class>':24s} {text}")
    return 0


def _applicability(names: list[str] | None, width: int) -> int:
    """The method x model applicability matrix of ``names`` (default: the default run's models)."""
    from ..methods.applicability import applicability_matrix
    from .config import DEFAULT_MODELS
    from .models import MODELS, load_model

    models = {}
    for name in names or DEFAULT_MODELS:
        from .validate import check_model_name

        check_model_name(name)
        models[name] = (load_model(name) if name in MODELS else load_model(name, pretrained=False)).model
    table = applicability_matrix(models)
    short = table.map(lambda v: "ok" if v == "ok" else "no")
    print("which method applies to which model (no: the reason is below)")
    print(short.to_string())
    for method, row in table.iterrows():
        for model, v in row.items():
            if v != "ok":
                line = f"  {method} on {model}: {v}"
                print(line if len(line) <= width else line[: width - 1] + "…")
    return 0


def _open(name: str):  # -> Run
    from .remote import is_url
    from .runner import open_run

    if is_url(name):
        return open_run(name)
    path = Path(name)
    return open_run(path if path.exists() else Path("results") / name)


def _score_imported(args: argparse.Namespace, write_leaderboard, write_report, render) -> int:  # noqa: ANN001
    """``score --heatmaps FILE --dataset D --model M --method-name NAME``: a new run of imported heatmaps."""
    from .config import RunConfig, config_from_dict
    from .scoring import score_heatmaps

    missing = [f"--{k.replace('_', '-')}" for k in ("dataset", "model", "method_name") if not getattr(args, k)]
    if missing:
        raise SaliencyBenchError(f"score --heatmaps also needs {', '.join(missing)}")
    over: dict = {}
    if args.data_root:
        over["dataset_params"] = {"root": args.data_root}
    if args.n_images is not None:
        over["n_images"] = args.n_images
    if args.output:
        over["output"] = args.output
    if args.checkpoint:
        over["checkpoints"] = dict(c.split("=", 1) for c in args.checkpoint if "=" in c)
    cfg = config_from_dict({**over, "models": [args.model]}, RunConfig())
    run_obj = score_heatmaps(args.heatmaps, dataset=args.dataset, model=args.model, method_name=args.method_name,
                             metrics=_csv(args.metrics) if args.metrics else None,
                             methods=_csv(args.methods) if args.methods else None, config=cfg, run_id=args.run_id,
                             progress=not args.quiet)
    board, _ = write_leaderboard(run_obj, push=args.no_report)  # else uploaded with the report
    print(render(board, "text", _width(None)))
    print(f"results: {run_obj.path}")
    if not args.no_report:
        print(f"report: {write_report(run_obj, board)}")
    return 0


def _width(asked: int | None) -> int:
    """The text width: ``asked``, else the terminal's when wider than 100, else 100."""
    import shutil

    if asked is not None:
        if asked < 60:
            raise SaliencyBenchError(f"--width must be at least 60 columns, got {asked}")
        return asked
    return max(100, shutil.get_terminal_size((100, 24)).columns)


def _executor(args: argparse.Namespace, process_executor: type, cfg: Any = None):  # -> Executor | None
    """The executor ``--executor``, ``--workers`` and ``--ray-address`` ask for (None: in this process)."""
    if args.workers is not None and args.workers < 1:
        raise SaliencyBenchError(f"--workers must be >= 1, got {args.workers}")
    kind = args.executor or ("ray" if args.ray_address else "process")
    if kind == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(address=args.ray_address, workers=args.workers)
    if args.ray_address:
        raise SaliencyBenchError("--ray-address needs --executor ray (or no --executor)")
    if args.workers is None:
        from .executors import auto_executor, explanations

        return None if cfg is None else auto_executor(cfg.device, work=explanations(cfg))
    return process_executor(args.workers) if args.workers > 1 else None


def _dispatch(args: argparse.Namespace) -> int:
    from . import load_all

    load_all()
    if args.command == "inspect":
        from ..inspect.cli import run as run_inspect

        return run_inspect(args)
    if args.command == "list":
        return _list(args.models)
    if args.command == "plan":
        from .plan import command as plan_command

        return plan_command(args)
    if args.command == "roar":
        from .roar_cli import command as roar_command

        return roar_command(args)
    if args.command == "train":
        from .cue_models import CUE_RECIPES, cue_model
        from .models import DEFAULT_ARCHS, default_model
        from .pretrain import train_missing

        names = [*DEFAULT_ARCHS, *CUE_RECIPES]
        chosen = list(dict.fromkeys(_names(args.models) or list(DEFAULT_ARCHS)))
        for name in chosen:
            if name not in names:
                raise UnknownNameError("trainable model", name, names)
        side = {r["name"] for r in train_missing(chosen, retrain=True)}  # side by side where cores allow
        for name in chosen:
            retrain = name not in side
            b = cue_model(name, retrain=retrain) if name in CUE_RECIPES else default_model(name, retrain=retrain)
            check = b.info.get("verification", {})
            extra = f", verification: {check.get('reason')}" if check else ""
            print(f"{name}: val accuracy {b.info['val_accuracy']:.4f}, {b.info['train_seconds']:.0f} s, "
                  f"{b.info['weights']}{extra}")
        return 0
    from .report import write_leaderboard, write_report
    from .textboard import render

    if args.command == "run":
        from .runner import ProcessExecutor, run

        cfg = _config(args)
        executor = _executor(args, ProcessExecutor, cfg)
        result = run(cfg, run_id=args.run_id, resume=args.resume, executor=executor, progress=not args.quiet)
        board, csv = write_leaderboard(result, push=args.no_report)  # else uploaded with the report
        print(render(board, "text", _width(None)))
        if result.remote is not None:
            print(f"run: {result.remote.url} (this machine's copy below)")
        print(f"results: {result.path}\nleaderboard: {csv}\n             {result.path / 'ranking.csv'}\n"
              f"             {result.path / 'leaderboard.md'}")
        if not args.no_report:
            print(f"report: {write_report(result, board)}")
        return 0
    if args.command == "score":
        from .plugins import load_plugins

        load_plugins(args.plugin)
        if args.heatmaps:
            return _score_imported(args, write_leaderboard, write_report, render)
        if not args.run or not args.metrics:
            raise SaliencyBenchError("score needs a run directory and --metrics A,B (or --heatmaps FILE --dataset D "
                                     "--model M --method-name NAME to score heatmaps made elsewhere)")
        run_obj = _open(args.run)
        run_obj.score(_csv(args.metrics), methods=_csv(args.methods) if args.methods else None,
                      models=_csv(args.models) if args.models else None, progress=not args.quiet)
        board, csv = write_leaderboard(run_obj, push=args.no_report)  # else uploaded with the report
        print(render(board, "text", _width(None)))
        if not args.no_report:
            print(f"report: {write_report(run_obj, board)}")
        return 0
    run_obj = _open(args.run)
    if args.command == "leaderboard":
        board, csv = write_leaderboard(run_obj)
        for flag, chosen, valid in (("--model", args.model, board.models),
                                    ("--metric", args.metric, sorted(set(board.metrics.metric))),
                                    ("--criterion", args.criterion, board.criteria())):
            for name in chosen or []:
                if name not in valid:
                    raise UnknownNameError(f"{flag[2:]} of this run", name, valid)
        text = render(board, args.format, _width(args.width), args.model, args.metric, args.criterion)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        if args.format == "text":
            print(f"saved: {csv}\n       {run_obj.path / 'ranking.csv'}\n       {run_obj.path / 'leaderboard.md'}")
        return 0
    if args.command == "report":
        print(f"report: {write_report(run_obj)}")
        return 0
    raise SaliencyBenchError(f"unknown command {args.command!r}")
