"""Shared helpers of the speed benchmarks: devices, models, targets, plain-forward
limits, side-by-side timing, forward counting and a per-stage/per-op profile.

Every figure of the suite is a ratio measured in one process, side by side, on
the same model, images and settings. Each round runs every side once
(interleaved, so a burst of load from another job hits all sides alike); a
side's figure is its fastest round.

Limits for a work of ``forwards`` forward passes of one image each:

- naive limit: ``forwards`` plain ``model(x)`` in NCHW under
  ``torch.inference_mode()``, in batches of 64 (the last one smaller);
- best plain limit: the fastest plain way to run the same passes: NCHW or
  channels_last eager, or ``torch.compile`` (channels_last) where its compile
  time pays off on this work (compiled steady state + compile time < eager).
  The compiled steady state (compile time excluded) and the compile time are
  reported separately as well.

Environment: ``SB_BENCH_DEVICE`` (``cpu`` default, ``cuda``, or ``auto`` =
cuda when ``torch.cuda.is_available()``); ``SB_BENCH_COMPILE=0`` skips
torch.compile; ``SB_BENCH_PROFILE=0`` skips the profile of missed targets;
``SB_BENCH_UNTRAINED=1`` uses random-init copies of the default synthetic
models instead of training them on first use (for development).
"""

from __future__ import annotations

import copy
import functools
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

# ---- environment ------------------------------------------------------------------------


def resolve_device() -> str:
    """The benchmark device from ``SB_BENCH_DEVICE`` (cpu | cuda | auto); default cpu."""
    want = os.environ.get("SB_BENCH_DEVICE", "cpu").strip().lower() or "cpu"
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SB_BENCH_DEVICE=cuda but torch.cuda.is_available() is False")
    if want not in ("cpu", "cuda"):
        raise RuntimeError(f"SB_BENCH_DEVICE must be cpu, cuda or auto, got {want!r}")
    return want


DEVICE = resolve_device()
COMPILE = os.environ.get("SB_BENCH_COMPILE", "1") != "0"
PROFILE = os.environ.get("SB_BENCH_PROFILE", "1") != "0"
UNTRAINED = os.environ.get("SB_BENCH_UNTRAINED", "0") == "1"
PLAIN_BATCH = 64


def sync(device: str = DEVICE) -> None:
    """Wait for queued device work (timings on CUDA are taken after a synchronize)."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str = DEVICE) -> tuple[float, Any]:
    """(seconds, result) of one call, device work included."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def synced(fn: Callable[..., Any], device: str = DEVICE) -> Callable[..., Any]:
    """``fn`` followed by a device synchronize (pytest-benchmark's timer does not sync)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        sync(device)
        return out

    return call


# ---- targets ------------------------------------------------------------------------------

# key -> device -> (kind, op, value). kind "time": ratio = ours / reference, smaller is
# better; kind "speedup": ratio = reference / ours, larger is better.
TARGETS: dict[str, dict[str, tuple[str, str, float]]] = {
    "vs_naive": {"cpu": ("time", "<=", 0.85), "cuda": ("time", "<=", 0.85)},
    "vs_best_plain": {"cpu": ("time", "<=", 1.10), "cuda": ("time", "<=", 1.10)},
    "vs_quantus": {"cpu": ("speedup", ">=", 1.2), "cuda": ("speedup", ">=", 10.0)},
    "vs_captum_occlusion": {"cpu": ("speedup", ">=", 3.0), "cuda": ("speedup", ">=", 5.0)},
    "vs_pytorch_grad_cam": {"cpu": ("speedup", ">=", 2.0), "cuda": ("speedup", ">=", 2.0)},
    "robustness_vs_plain": {"cpu": ("time", "<=", 1.2), "cuda": ("time", "<=", 1.2)},
    "road_vs_quantus": {"cpu": ("speedup", ">=", 5.0), "cuda": ("speedup", ">=", 5.0)},
    "ray_overhead": {"cpu": ("time", "<=", 1.10), "cuda": ("time", "<=", 1.10)},
    "ray_speedup": {"cpu": ("speedup", ">=", 1.7), "cuda": ("speedup", ">=", 1.7)},
    "vit_gradcam": {"cpu": ("time", "<=", 1.2), "cuda": ("time", "<=", 1.2)},
    "rollout_vs_capture": {"cpu": ("time", "<=", 1.2), "cuda": ("time", "<=", 1.2)},
    "import_vs_torch_timm": {"cpu": ("time", "<=", 1.5), "cuda": ("time", "<=", 1.5)},
    "store_default_run": {"cpu": ("megabytes", "<=", 25.0), "cuda": ("megabytes", "<=", 25.0)},
    "shared_vs_separate": {"cpu": ("time", "<", 1.0), "cuda": ("time", "<", 1.0)},
    "default_run_s": {"cpu": ("seconds", "<=", 300.0), "cuda": ("seconds", "<=", 300.0)},
    "scaling_time": {"cpu": ("time", "<=", 1.10), "cuda": ("time", "<=", 1.10)},
    "scaling_memory": {"cpu": ("time", "<=", 1.10), "cuda": ("time", "<=", 1.10)},
}


def target_text(key: str | None, device: str = DEVICE) -> str:
    if key is None:
        return "-"
    kind, op, value = TARGETS[key][device]
    if kind == "speedup":
        return f"{op} {value:g}x faster"
    if kind == "seconds":
        return f"{op} {value:g} s"
    if kind == "megabytes":
        return f"{op} {value:g} MB"
    return f"{op} {value:.2f}x"


def target_met(key: str | None, ratio: float | None, device: str = DEVICE) -> bool | None:
    if key is None or ratio is None:
        return None
    _, op, value = TARGETS[key][device]
    return {"<=": ratio <= value, "<": ratio < value, ">=": ratio >= value, ">": ratio > value}[op]


def row(measure: str, target_id: int, ours_s: float, ref: str, ref_s: float | None, target: str | None,
        note: str = "", *, ours_label: str = "ours", unit: str = "s", device: str = DEVICE) -> dict[str, Any]:
    """One line of BENCHMARKS.md: our time, the reference's, the ratio and its target.

    The ratio is ours/ref for ``time`` targets (and for rows without a target) and
    ref/ours (a speed-up) for ``speedup`` targets; ``seconds`` targets compare
    ``ours_s`` itself. ``unit``: of ``ours_s``/``ref_s`` (seconds unless a row compares
    memory, "MB").
    """
    kind = TARGETS[target][device][0] if target else "time"
    if kind in ("seconds", "megabytes"):  # the value itself against the bound
        ratio = ours_s
    elif ref_s is None or ref_s <= 0 or ours_s <= 0:
        ratio = None
    else:
        ratio = ref_s / ours_s if kind == "speedup" else ours_s / ref_s
    return {
        "measure": measure, "target_id": target_id, "device": device, "ours": ours_label, "ours_s": ours_s,
        "ref": ref, "ref_s": ref_s, "ratio": ratio, "ratio_kind": {"speedup": "ref/ours", "seconds": "s", "megabytes": "MB"}.get(
            kind, "ours/ref"),
        "target_key": target, "target": target_text(target, device), "met": target_met(target, ratio, device),
        "note": note, "unit": unit,
    }


def fmt_value(v: float | None, unit: str = "s") -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.3f} s" if v < 100 else f"{v:.0f} s"
    return f"{v:.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"


def fmt_ratio(r: dict[str, Any]) -> str:
    if r["ratio"] is None:
        return "-"
    if r["ratio_kind"] == "ref/ours":
        return f"{r['ratio']:.2f}x faster"
    if r["ratio_kind"] == "MB":
        return f"{r['ratio']:.3g} MB"
    if r["ratio_kind"] == "s":
        return f"{r['ratio']:.0f} s"
    return f"{r['ratio']:.2f}x"


def record(benchmark: Any, rows: list[dict[str, Any]], profile: Callable[[], str] | None = None,
           **extra: Any) -> None:
    """Store ``rows`` (and extras) in ``benchmark.extra_info``; print one line per row.

    ``profile``: called (only when a row with a target missed it and
    ``SB_BENCH_PROFILE`` is on) to explain where the time goes.
    """
    benchmark.extra_info["rows"] = rows
    benchmark.extra_info["device"] = DEVICE
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
    benchmark.extra_info["settings"] = {k: v for k, v in os.environ.items()
                                        if k.startswith("SB_BENCH_") or k == "SALIENCYBENCH_CACHE"}
    benchmark.extra_info.update(extra)
    for r in rows:
        met = {True: "met", False: "NOT MET", None: "info"}[r["met"]]
        print(f"\n[{r['target_id']}] {r['measure']}: {r['ours']} {fmt_value(r['ours_s'], r['unit'])} | {r['ref']} "
              f"{fmt_value(r['ref_s'], r['unit'])} | "
              f"{fmt_ratio(r)} | target {r['target']} {met}" + (f" | {r['note']}" if r["note"] else ""),
              end="")
    print()
    if profile is not None and PROFILE and any(r["met"] is False for r in rows):
        text = profile()
        benchmark.extra_info["profile"] = text
        print(text)


# ---- models and inputs ---------------------------------------------------------------------

INPUT_SIZE = {"resnet18": 224, "mobilenetv3_large_100": 224, "efficientnet_b0": 224,
              "synthetic-resnet": 64, "synthetic-mobilenetv2": 64, "synthetic-vgg": 64}


@functools.cache
def bench_model(name: str, device: str = DEVICE) -> nn.Module:
    """A benchmark model in eval mode, float32, on ``device``.

    timm names: random init with ``torch.manual_seed(0)`` (1000 classes); the
    ``synthetic-*`` default models: trained and cached by saliencybench (trained
    on first use, about 2 min each), or random init with ``SB_BENCH_UNTRAINED=1``.
    """
    if name.startswith("synthetic-"):
        if UNTRAINED:
            from saliencybench.benchmark.datasets import SHAPES
            from saliencybench.benchmark.models import DEFAULT_ARCHS

            torch.manual_seed(0)
            model = DEFAULT_ARCHS[name](len(SHAPES))
        else:
            from saliencybench.benchmark.models import load_model

            model = load_model(name, progress=False).model
    else:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
    return model.eval().float().to(device)


def bench_inputs(name: str, b: int, seed: int = 0, size: int | None = None, device: str = DEVICE):
    """(images Tensor[b,3,H,W], targets LongTensor[b], heatmaps Tensor[b,H,W]) seeded; heatmaps tie-free."""
    size = size or INPUT_SIZE[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, size, size, generator=g)
    n_cls = bench_model(name, device).num_classes
    t = torch.randint(0, n_cls, (b,), generator=g)
    heat = torch.rand(b, size, size, generator=g)
    return x.to(device), t.to(device), heat.to(device)


def first_conv(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


@contextmanager
def count_forwards(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Count the images entering the model's first convolution: ``{"images", "calls", "batches"}``."""
    stats: dict[str, Any] = {"images": 0, "calls": 0, "batches": defaultdict(int)}
    conv = first_conv(model)

    def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        n = int(inp[0].shape[0])
        stats["images"] += n
        stats["calls"] += 1
        stats["batches"][n] += 1

    handle = conv.register_forward_pre_hook(hook) if conv is not None else None
    try:
        yield stats
    finally:
        if handle is not None:
            handle.remove()


# ---- side-by-side timing ----------------------------------------------------------------------


@dataclass
class SideBySide:
    """Reference sides timed once per round; call :meth:`round` as the benchmark's ``setup``
    so each round of ours is interleaved with one round of every reference."""

    device: str = DEVICE
    sides: dict[str, Callable[[], Any]] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, name: str, fn: Callable[[], Any]) -> SideBySide:
        self.sides[name] = fn
        return self

    def round(self) -> None:
        for name, fn in self.sides.items():
            self.times[name].append(timed(fn, self.device)[0])

    def best(self, name: str) -> float:
        return min(self.times[name])


def rounds_for(seconds: float, cheap: float = 1.0) -> int:
    """Rounds for a call that took ``seconds`` once (warm): 15 under a tenth of ``cheap`` (calls
    of tens of milliseconds vary most with the machine's load), 5 when cheap, 3, or 2 when slow."""
    return 15 if seconds < cheap / 10 else 5 if seconds < cheap else 3 if seconds < 3 * cheap else 2


def batch_sizes(forwards: int, batch: int = PLAIN_BATCH) -> list[int]:
    """``forwards`` passes in batches of ``batch``: [batch, ..., remainder]."""
    return [batch] * (forwards // batch) + ([forwards % batch] if forwards % batch else [])


# compiled channels_last copies, one per model, and the compile time per batch size met
_COMPILED: dict[int, tuple[nn.Module, nn.Module, dict[int, float]]] = {}
_CHANNELS_LAST: dict[int, tuple[nn.Module, nn.Module]] = {}


def channels_last_copy(model: nn.Module) -> nn.Module:
    key = id(model)
    if key not in _CHANNELS_LAST:
        _CHANNELS_LAST[key] = (model, copy.deepcopy(model).to(memory_format=torch.channels_last))
    return _CHANNELS_LAST[key][1]


def compiled_copy(model: nn.Module) -> tuple[nn.Module, dict[int, float]]:
    """torch.compile of the channels_last copy (default mode), cached per model: (module, compile_s by batch)."""
    key = id(model)
    if key not in _COMPILED:
        _COMPILED[key] = (model, torch.compile(channels_last_copy(model)), {})
    return _COMPILED[key][1], _COMPILED[key][2]


class PlainLimits(SideBySide):
    """The naive and best plain limits of ``forwards`` single-image forward passes.

    ``example``: Tensor[3,H,W] or [1,3,H,W] giving the input size (the content does
    not matter to the time). Sides: ``naive`` (NCHW eager), ``channels_last``
    (eager) and, when ``compile``, ``compiled``: torch.compile of the channels_last
    model for the full batches (steady state; the compile time kept apart in
    :attr:`compile_s`), the last partial batch eager channels_last, so that each model
    compiles once (one shape) in the whole suite.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, forwards: int, *, batch: int = PLAIN_BATCH,
                 device: str = DEVICE, compile: bool = COMPILE):
        super().__init__(device)
        self.model, self.forwards, self.batch = model, forwards, batch
        self.sizes = batch_sizes(forwards, batch)
        shape = tuple(example.shape[-3:])
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(batch, *shape, generator=g).to(device, next(model.parameters()).dtype)
        self.x_cl = self.x.contiguous(memory_format=torch.channels_last)
        self.compile_s: float | None = None
        self.compile_error: str | None = None
        self.add("naive", lambda: self._loop(model, self.x))
        cl = channels_last_copy(model)
        self.add("channels_last", lambda: self._loop(cl, self.x_cl))
        if compile:
            try:
                self._compile()
                self.add("compiled", lambda: self._loop(cl, self.x_cl, compiled=self._compiled))
            except Exception as e:  # noqa: BLE001  (a model or platform inductor cannot handle: reported)
                self.compile_error = f"{type(e).__name__}: {str(e)[:200]}"
        with torch.inference_mode():  # one warm-up call per eager side and batch size
            for n in sorted(set(self.sizes)):
                model(self.x[:n])
                cl(self.x_cl[:n])
        sync(device)

    def _loop(self, model: nn.Module, x: torch.Tensor, compiled: nn.Module | None = None) -> None:
        with torch.inference_mode():
            for n in self.sizes:
                (compiled if compiled is not None and n == self.sizes[0] else model)(x[:n])

    def _compile(self) -> None:
        self._compiled, per_batch = compiled_copy(self.model)
        n = self.sizes[0]
        if n not in per_batch:
            with torch.inference_mode():
                first, _ = timed(lambda: self._compiled(self.x_cl[:n]), self.device)
                steady, _ = timed(lambda: self._compiled(self.x_cl[:n]), self.device)
            per_batch[n] = max(0.0, first - steady)
        self.compile_s = per_batch[n]

    def result(self) -> dict[str, Any]:
        """Fastest round of each side, the best plain limit and how it was reached."""
        naive, cl = self.best("naive"), self.best("channels_last")
        eager_best, eager_kind = (cl, "channels_last eager") if cl < naive else (naive, "NCHW eager")
        out: dict[str, Any] = {"forwards": self.forwards, "batches": self.sizes, "naive_s": naive,
                               "channels_last_s": cl, "compiled_s": None, "compile_s": self.compile_s,
                               "compile_error": self.compile_error, "best_s": eager_best, "best_kind": eager_kind,
                               "compile_pays_off": None, "compile_break_even_forwards": None}
        if "compiled" in self.times:
            comp = self.best("compiled")
            out["compiled_s"] = comp
            out["compile_pays_off"] = comp + (self.compile_s or 0.0) < eager_best
            if out["compile_pays_off"]:
                out["best_s"], out["best_kind"] = comp + (self.compile_s or 0.0), "torch.compile incl. compile time"
            if comp < eager_best and self.compile_s:
                out["compile_break_even_forwards"] = int(self.compile_s / ((eager_best - comp) / self.forwards))
        return out

    def rows(self, measure: str, target_id: int, ours_s: float) -> list[dict[str, Any]]:
        """The rows of ours against the naive and best plain limits (and the compiled steady state)."""
        res = self.result()
        n = f"{self.forwards} fwd"
        rows = [row(measure, target_id, ours_s, f"naive limit ({n}, NCHW eager, batch {self.batch})",
                    res["naive_s"], "vs_naive"),
                row(measure, target_id, ours_s, f"best plain limit ({n}, {res['best_kind']})", res["best_s"],
                    "vs_best_plain")]
        if res["compiled_s"] is not None:
            be = res["compile_break_even_forwards"]
            rows.append(row(measure, target_id, ours_s, f"torch.compile steady state ({n}, compile time excluded; "
                            f"a last partial batch eager)",
                            res["compiled_s"], None,
                            note=f"compile {res['compile_s']:.1f} s, "
                                 + (f"pays off above ~{be} forwards" if be else "never faster than eager here")))
        elif res["compile_error"]:
            rows[-1]["note"] = f"torch.compile failed: {res['compile_error']}"
        return rows


# ---- profiles -------------------------------------------------------------------------------------


def stage_profile(fn: Callable[[], Any], model: nn.Module | None = None, *, device: str = DEVICE, top: int = 12,
                  title: str = "") -> str:
    """Where one call's time goes: a per-stage summary and torch.profiler's top ops.

    Stages: time inside the model's top-level child modules (the network's own
    compute, timed with forward hooks; backward passes are not in it, nor inner
    modules a method calls directly, as incremental occlusion does) against the
    rest of the call (input building, masking, backward, bookkeeping); the
    images entering the model's first convolution and the batch sizes they came
    in. Then the ``top`` ops by self time.
    """
    inside = [0.0]
    starts: list[float] = []
    handles = []
    if model is not None:
        for child in model.children():
            handles.append(child.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())))
            handles.append(child.register_forward_hook(
                lambda *_: inside.__setitem__(0, inside[0] + time.perf_counter() - starts.pop())))
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    counter = count_forwards(model) if model is not None else nullcontext(None)
    try:
        with counter as counts, torch.profiler.profile(activities=acts) as prof:
            wall, _ = timed(fn, device)
    finally:
        for h in handles:
            h.remove()
    head = (f"profile{': ' + title if title else ''} (one call under torch.profiler, {device}, "
            f"{torch.get_num_threads()} threads)")
    lines = [head, f"  wall {wall:.3f} s"]
    if model is not None:
        share = inside[0] / wall if wall else 0.0
        lines.append(f"  model forward (top-level modules): {inside[0]:.3f} s = {share:.0%} of the call; "
                     f"outside the model's forward (inputs, masks, backward, bookkeeping): {wall - inside[0]:.3f} s")
        if counts is not None:
            sizes = ", ".join(f"{n} x {b}" for b, n in sorted(counts["batches"].items(), reverse=True))
            lines.append(f"  images through the first conv: {counts['images']} in {counts['calls']} calls "
                         f"(calls x batch: {sizes})")
    sort = "self_cpu_time_total" if device == "cpu" else "self_device_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=48)
    except Exception:  # noqa: BLE001  (older torch: other sort key names)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)
    return "\n".join(lines) + "\n" + table


def counted_call(fn: Callable[[], Any], model: nn.Module, device: str = DEVICE
                 ) -> tuple[Callable[[], Any], dict[str, Any]]:
    """``fn`` wrapped to count (in the returned dict, per call) the images entering ``model``'s
    first convolution, and to synchronise the device before returning."""
    last: dict[str, Any] = {}

    def call() -> Any:
        with count_forwards(model) as c:
            out = fn()
            sync(device)
        last.clear()
        last.update(c)
        return out

    return call, last


def forward_note(expected: int, counted: dict[str, Any]) -> str:
    """A note when the forward passes counted differ from those the limit was built for.

    Ours runs up to two single-image passes more than the work needs: the probes that find
    the batch norms to fold into convolutions and check the folded model
    (:func:`saliencybench.modelutil.folded_batchnorm`); they are named as such.
    """
    got = counted.get("images")
    if got is None or got == expected:
        return ""
    sizes = counted.get("batches", {})
    if 0 < got - expected <= 2 and sizes.get(1, 0) >= got - expected:
        return (f"{got} forwards counted: the {expected} of the work, plus {got - expected} single-image "
                f"probe{'s' if got - expected > 1 else ''} that find and check the batch norms folded into "
                "convolutions (included in ours, not in the limits)")
    return f"forwards counted {got} != {expected} assumed by the limit"
