"""``saliencybench plan CONFIG``: the model passes a run needs, its projected time and store size.

Counts. Every (model, method) explain task and every (model, method, metric) score task
costs, per image, a number of forward passes and of backward passes of one image through
the model, from the method's and metric's resolved parameters at the run's input size:
the declared costs of :mod:`saliencybench.costs` (occlusion: windows + 1 forwards; RISE:
``n_masks``; Integrated Gradients: ``n_steps`` forward+backward; Score-CAM: 1 + the
layer's channels; deletion/insertion: curve points + 1; the sanity check: (1 + stages)
x the method's cost; ...), or, for a plug-in method or metric with no declared cost, the
passes counted (by hooks) while it runs once on one image. Metrics that read only heatmaps
and ground truth cost nothing. The run's predictions add one forward pass per image and
model. Methods that share passes in a run (saliency, Grad-CAM, CAM, ...) are counted
separately, so the counts bound a run's passes from above by a few per image; one-time probes
(folding norms into convolutions: two one-image passes per model, input shape and process) are
not counted.

Time. Each model's forward throughput (inference, channels_last with folded norms, as the
perturbation methods run) and forward+backward throughput (input gradients) are measured
on the run's device at its input size for a few batches; a task of ``f`` forwards and
``b`` backwards per image costs ``b * t_fb + (f - b) * t_f`` per image. Units (an explain
task and its score tasks on one shard) are independent, so the time on ``n`` devices is
the time on one divided by ``n`` (bounded below by the longest unit).

Store. Heatmaps take ``H * W * bytes`` (float16: 2) plus a few bytes (scale, index, image
id) per map and about a KiB of header per explain task (:mod:`.store`).

The data set need not be on disk: when it cannot be opened, ``--n-images`` (or the
config's ``n_images``) images of the run's ``image_size`` (or the model's input size) are
planned for, with a note.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import textwrap
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import SaliencyBenchError
from .config import RunConfig, load_config

if TYPE_CHECKING:  # torch and the registries load on first use: the CLI's parser stays light
    import torch
    from torch import nn

Passes = tuple[float, float]

DEVICE_COUNTS = (1, 8, 64)
BYTES_PER_PIXEL = {"float32": 4, "float16": 2, "uint8": 1}
EXTRA_PER_MAP = {"float32": 0, "float16": 4, "uint8": 8}  # scale (and offset) per map
ID_BYTES = 32  # int64 index + the image id in the header's JSON (about 24 characters)
HEADER_BYTES = 1024  # safetensors header and metadata of one explain task's file
WIDTH = 100


@dataclass
class Throughput:
    """Seconds per image of one forward pass (inference) and of one forward+backward pass."""

    forward_s: float
    fwd_bwd_s: float

    def seconds(self, p: Passes) -> float:
        f, b = p
        return b * self.fwd_bwd_s + max(0.0, f - b) * self.forward_s


@dataclass
class PlanRow:
    """One task kind of one (model, method): ``task`` is ``explain`` or a metric name; per image
    ``forwards``/``backwards``; ``images`` it runs on; ``seconds`` in all on one device."""

    model: str
    method: str
    task: str
    images: int
    forwards: float
    backwards: float
    seconds: float
    how: str


@dataclass
class Plan:
    """What a run needs: rows, per-model throughput and input size, units, store bytes, notes."""

    config: RunConfig
    n_images: int
    device: str
    rows: list[PlanRow] = field(default_factory=list)
    throughput: dict[str, Throughput] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    units: int = 0
    longest_unit_s: float = 0.0
    store_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    bench: str = ""

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.rows)

    def seconds_on(self, n: int) -> float:
        """Projected wall time on ``n`` devices (units spread evenly; at least the longest unit)."""
        return max(self.seconds / n, self.longest_unit_s)

    def passes(self) -> tuple[float, float]:
        return (sum(r.forwards * r.images for r in self.rows), sum(r.backwards * r.images for r in self.rows))


def measure_throughput(model: nn.Module, size: int, device: torch.device, batch: int = 8,
                       batches: int = 3) -> Throughput:
    """Seconds per image of ``model`` on ``device`` at ``size`` x ``size`` px: inference forwards
    (channels_last, folded norms) and forward+backward passes to the input, ``batches`` timed
    batches of ``batch`` random images after one warm-up batch each."""
    import torch

    from ..modelutil import fast_inference, model_guard

    x = torch.randn(batch, 3, size, size, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn: Any) -> float:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(batches):
            fn()
        sync()
        return (time.perf_counter() - t0) / (batches * batch)

    with model_guard(model):
        with torch.inference_mode(), fast_inference(model, x) as fmt:
            xf = fmt(x)
            fwd = timed(lambda: model(xf))

        def fwd_bwd() -> None:
            xi = x.clone().requires_grad_(True)
            torch.autograd.grad(model(xi)[:, 0].sum(), xi)

        fb = timed(fwd_bwd)
    return Throughput(fwd, fb)


def store_bytes(n_maps: int, height: int, width: int, dtype: str, n_files: int) -> int:
    """Bytes of a heatmap store of ``n_maps`` maps of ``height`` x ``width`` in ``n_files`` files."""
    per_map = height * width * BYTES_PER_PIXEL[dtype] + EXTRA_PER_MAP[dtype] + ID_BYTES
    return n_maps * per_map + n_files * HEADER_BYTES


def _count_images(cfg: RunConfig, n_images: int | None, notes: list[str]) -> int:
    from .datasets import get_dataset

    params = dict(cfg.dataset_params)
    if cfg.dataset == "synthetic":
        params.setdefault("n_images", n_images or cfg.n_images)
        params.setdefault("seed", cfg.seed)
    try:
        available = len(get_dataset(cfg.dataset, **params))
    except Exception as e:  # noqa: BLE001 - the data set need not be on this machine
        n = n_images or cfg.n_images
        notes.append(f"data set {cfg.dataset!r} cannot be opened here ({str(e)[:120]}); planned for {n:,} images")
        return n
    return min(available, n_images or cfg.n_images) if cfg.dataset != "synthetic" else available


def _load(name: str, cfg: RunConfig, notes: list[str]):  # -> ModelBundle
    """The run's model: its checkpoint or a saliencybench model; a timm name without a checkpoint
    gets random weights (never downloaded: the weights do not change the speed), with a note."""
    from .models import MODELS, load_model, timm_model

    if name in MODELS or name in cfg.checkpoints:
        return load_model(name, checkpoint=cfg.checkpoints.get(name))
    notes.append(f"{name}: timed with random weights (no checkpoint given; the weights do not change the speed)")
    return timm_model(name, pretrained=False)


def make_plan(cfg: RunConfig, *, n_images: int | None = None, device: str | None = None,
              bench_batch: int | None = None, bench_batches: int = 3) -> Plan:
    """The plan of run ``cfg`` (see the module docstring): passes, measured throughput, time, store."""
    import torch

    from ..methods.base import get_method
    from ..metrics.base import get_metric
    from .devices import resolve_device
    from ..costs import method_passes, metric_passes
    from .tasks import metric_groups
    from .validate import validate

    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
    cfg = validate(cfg)
    dev = resolve_device(cfg.device)
    plan = Plan(cfg, 0, str(dev))
    plan.n_images = n = _count_images(cfg, n_images, plan.notes)
    batch = bench_batch or (64 if dev.type == "cuda" else 8)
    plan.bench = f"{bench_batches} batches of {batch} images, {torch.get_num_threads()} torch threads"
    shards = math.ceil(n / cfg.batch_size)
    for name in cfg.models:
        bundle = _load(name, cfg, plan.notes)
        model = bundle.model.to(dev).eval()
        size = cfg.image_size or bundle.input_size
        plan.sizes[name] = size
        tp = plan.throughput[name] = measure_throughput(model, size, dev, batch, bench_batches)
        plan.rows.append(PlanRow(name, "", "predictions", n, 1, 0, n * tp.forward_s, "declared"))
        for method in cfg.methods:
            mp = get_method(method).resolve_params(cfg.method_params_for(method), (size, size))
            p, how = method_passes(method, mp, (size, size), model)
            unit_s = tp.seconds(p) * min(n, cfg.batch_size)
            plan.rows.append(PlanRow(name, method, "explain", n, *p, n * tp.seconds(p), how))
            for group in metric_groups(cfg.metrics):
                members = {m: cfg.metric_params.get(m, {}) for m in group}
                for metric, params in members.items():
                    spec = get_metric(metric)
                    _, sched = spec.split_params({k: v for k, v in params.items() if v is not None})
                    if sched.get("methods") is not None and method not in sched["methods"]:
                        continue
                    images = min(n, sched.get("n_images") or n)
                    resolved = {m: get_metric(m).resolve_params(
                        {k: v for k, v in q.items() if v is not None}, (size, size)) for m, q in members.items()}
                    q, how = metric_passes(metric, resolved, (size, size), model, method, cfg)
                    seconds = images * tp.seconds(q)
                    unit_s += tp.seconds(q) * min(images, cfg.batch_size)
                    plan.rows.append(PlanRow(name, method, metric, images, *q, seconds, how))
            plan.longest_unit_s = max(plan.longest_unit_s, unit_s)
            plan.store_bytes += store_bytes(n, size, size, cfg.heatmap_dtype, shards) if cfg.store_heatmaps else 0
        plan.units += shards * len(cfg.methods)
        if "occlusion" in cfg.methods and size * size >= 128 * 128:
            plan.notes.append(f"occlusion on {name}: counted as full forward passes; at {size} px the incremental "
                              "path, where it applies, needs about half of that convolution work")
        del model, bundle
    if cfg.preprocess == "shorter_side":
        plan.notes.append("preprocess shorter_side keeps each image's aspect: sizes vary; planned at the square size")
    return plan


# ---- printing ----------------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{round(x):,}" if abs(x - round(x)) < 1e-9 or x >= 100 else f"{x:,.1f}"


def _big(x: float) -> str:
    return f"{x:,.0f}" if x < 1e7 else f"{x:.2e}"


def duration(s: float) -> str:
    """Seconds as a short human duration: 45 s, 12.5 min, 5.2 h, 12.3 d."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def size_text(b: float) -> str:
    for unit, k in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= k:
            return f"{b / k:.1f} {unit}"
    return f"{b:.0f} B"


def _table(header: list[str], rows: list[list[str]], left: int) -> list[str]:
    """Columns right-aligned except the first ``left``; widths from the contents."""
    cols = [header, *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    out = []
    for r in cols:
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip()[:WIDTH])
    return out


def format_plan(plan: Plan, detail: bool = False) -> str:
    """The plan as text of at most 100 columns: per (model, method), per (model, metric), totals and
    the projection on 1, 8 and 64 devices; ``detail``: one row per (model, method, task) as well."""
    cfg = plan.config
    unit = "GPU" if plan.device.startswith("cuda") else "node"
    sizes = sorted(set(plan.sizes.values()))
    lines = [(f"saliencybench plan: {len(cfg.models)} model(s) x {len(cfg.methods)} methods x {len(cfg.metrics)} "
              f"metrics on {plan.n_images:,} images of {'/'.join(map(str, sizes))} px"),
             f"device {plan.device}; throughput measured on {plan.bench}"]
    lines += [ln for n in plan.notes for ln in textwrap.wrap(f"note: {n}", WIDTH, subsequent_indent="  ")]
    lines.append("")
    lines += _table(["model", "px", "forward img/s", "fwd+bwd img/s"],
                    [[m[:24], str(plan.sizes[m]), f"{1 / t.forward_s:,.1f}", f"{1 / t.fwd_bwd_s:,.1f}"]
                     for m, t in plan.throughput.items()], 1)
    lines += ["", f"per image: explain passes, then all its metrics' passes (per image of the run); time on 1 {unit}"]
    by_method = []
    for m in cfg.models:
        for meth in cfg.methods:
            rows = [r for r in plan.rows if r.model == m and r.method == meth]
            ex = next(r for r in rows if r.task == "explain")
            sc = [r for r in rows if r.task != "explain"]
            f = sum(r.forwards * r.images for r in sc) / plan.n_images
            b = sum(r.backwards * r.images for r in sc) / plan.n_images
            by_method.append([m[:24], meth[:22], _num(ex.forwards), _num(ex.backwards), _num(f), _num(b),
                              duration(sum(r.seconds for r in rows))])
    lines += _table(["model", "method", "fwd", "bwd", "metric fwd", "metric bwd", "time"], by_method, 2)
    lines += ["", f"per metric: passes per scored image summed over the methods it scores; time on 1 {unit}"]
    by_metric, free = [], []
    for m in cfg.models:
        for metric in cfg.metrics:
            rows = [r for r in plan.rows if r.model == m and r.task == metric]
            if not rows or all(r.how == "none" for r in rows):
                free.append(metric)
                continue
            how = "measured" if any(r.how == "measured" for r in rows) else ""
            by_metric.append([m[:24], metric[:22], _num(sum(r.forwards for r in rows)),
                              _num(sum(r.backwards for r in rows)), f"{max(r.images for r in rows):,}",
                              str(len(rows)), duration(sum(r.seconds for r in rows)), how])
    lines += _table(["model", "metric", "fwd", "bwd", "images", "methods", "time", ""], by_metric, 2)
    if free:
        lines += textwrap.wrap(f"no model passes (heatmaps and ground truth only): {', '.join(dict.fromkeys(free))}",
                               WIDTH, subsequent_indent="  ")
    if detail:
        lines += ["", "every task: passes per image"]
        lines += _table(["model", "method", "task", "fwd", "bwd", "images", "time", "how"],
                        [[r.model[:16], r.method[:20], r.task[:22], _num(r.forwards), _num(r.backwards),
                          f"{r.images:,}", duration(r.seconds), r.how] for r in plan.rows if r.how != "none"], 3)
    f, b = plan.passes()
    heads = [f"1 {unit}"] + [f"{k} {unit}s" for k in DEVICE_COUNTS[1:]]
    lines += ["", (f"total: {_big(f)} forward and {_big(b)} backward image passes in {plan.units:,} units of "
                   f"<= {cfg.batch_size} images")]
    lines += _table(["projected time", *heads], [["run", *[duration(plan.seconds_on(k)) for k in DEVICE_COUNTS]]], 1)
    dtype = cfg.heatmap_dtype
    lines.append(f"heatmap store: {size_text(plan.store_bytes)} ({dtype}, {BYTES_PER_PIXEL[dtype]} bytes per pixel)"
                 if cfg.store_heatmaps else "heatmap store: none (store_heatmaps: false)")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """The ``plan`` subcommand."""
    p = sub.add_parser("plan", help="count a run's model passes and project its time and heatmap-store size",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", metavar="CONFIG", nargs="?",
                   help="YAML or TOML run config (none: the embedded default run)")
    p.add_argument("--n-images", type=int, metavar="N", help="plan for N images (default: the config's n_images, "
                   "capped by the data set when it can be opened)")
    p.add_argument("--device", metavar="DEV", help="measure on this device (default: the config's)")
    p.add_argument("--bench-batch", type=int, metavar="N", help="images per timed batch (default 64 on CUDA, 8 else)")
    p.add_argument("--bench-batches", type=int, default=3, metavar="N", help="timed batches per measurement")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE", help="plug-in file; repeatable")
    p.add_argument("--detail", action="store_true", help="also print one row per (model, method, task)")
    p.add_argument("--json", metavar="FILE", help="also write the plan's rows and totals as JSON")


def command(args: argparse.Namespace) -> int:
    """Run ``saliencybench plan``: print the plan (and write ``--json``)."""
    for name in ("n_images", "bench_batch", "bench_batches"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SaliencyBenchError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    cfg = load_config(args.config) if args.config else RunConfig()
    if args.plugin:
        cfg = dataclasses.replace(cfg, plugins=[*cfg.plugins, *[p for p in args.plugin if p not in cfg.plugins]])
    plan = make_plan(cfg, n_images=args.n_images, device=args.device, bench_batch=args.bench_batch,
                     bench_batches=args.bench_batches)
    print(format_plan(plan, detail=args.detail))
    if args.json:
        f, b = plan.passes()
        data = {"n_images": plan.n_images, "device": plan.device, "seconds_1": plan.seconds, "forwards": f,
                "backwards": b, "units": plan.units, "store_bytes": plan.store_bytes, "notes": plan.notes,
                "projection_s": {k: plan.seconds_on(k) for k in DEVICE_COUNTS},
                "throughput": {m: dataclasses.asdict(t) for m, t in plan.throughput.items()},
                "rows": [dataclasses.asdict(r) for r in plan.rows]}
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=2)
    return 0
