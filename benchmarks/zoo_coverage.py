"""Coverage of the timm zoo: does every method and the deletion/insertion metrics run on each
architecture, and does the fast path give the plain path's numbers?

Usage (from the repository root; not collected by pytest)::

    python benchmarks/zoo_coverage.py [--quick] [--out docs/coverage.md] [--timeout 1500]
                                      [--archs resnet18,vit_tiny_patch16_224] [--threads 1]

For each architecture (random init, batch norms calibrated on random images, the smallest
variant of its family, one seeded image at a small size, float32) and each registered
method (``sb.list_methods()``, so methods added later are covered), plus occlusion with
``incremental=True`` and the ``deletion`` and ``insertion`` metrics, the call runs
twice: as shipped (the fast paths of :func:`saliencybench.modelutil.fast_inference`:
channels_last, folded batch norms, probes and fallbacks) and with
``saliencybench.modelutil.fast_paths(False)`` (the plain path). A cell is

- ``ok``: finite heatmaps (curves for the metrics) on the fast path equal to the plain
  path's to ``max |fast - plain| <= TOLERANCE * max |plain| + 1e-6``;
- ``n/a``: the method raised :class:`~saliencybench.errors.NotApplicableError` (footnoted reason);
- ``error``: anything else, with the exception's type and message (footnoted), including a
  fast path that differs from the plain one.

Each architecture runs in its own process with a time limit; the parameters are cut down
for speed (:data:`LIGHT`), since the question is whether a method runs and agrees, not how
good its maps are. The fast-path notes (a speed-up that declined, and why) are listed per
architecture. Writes a Markdown table with the date, the versions and the totals.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's package, not an installed one
    sys.path.insert(0, str(ROOT))

TOLERANCE = 1e-3
FLOOR = 1e-6  # absolute: below max |plain| = FLOOR / TOLERANCE it decides alone
SIZE = 64
# Cut-down parameters (full defaults: rise 4000 masks, integrated gradients 50 steps, smoothgrad 50
# samples, occlusion window round(min(H, W) / 14) with stride window // 2).
LIGHT: dict[str, dict] = {
    "rise": {"n_masks": 64},
    "integrated_gradients": {"n_steps": 8},
    "smoothgrad": {"n_samples": 4},
}
INCREMENTAL = "occlusion (incremental=True)"
PATH_NOTES = ("full forward passes", "incremental:")  # occlusion's note on the path it took
METRICS = ("deletion", "insertion")


@dataclass(frozen=True)
class Arch:
    """One architecture: the timm name, its family, keyword arguments to ``timm.create_model``
    and the image size (some need a size of their own)."""

    name: str
    family: str
    kwargs: dict = field(default_factory=dict)
    size: int = SIZE


ARCHS = [
    Arch("resnet18", "ResNet"), Arch("resnet10t", "ResNet-T (deep stem)"), Arch("resnext26ts", "ResNeXt"),
    Arch("legacy_seresnet18", "SENet"), Arch("resnest14d", "ResNeSt (split attention)"),
    Arch("res2net50_14w_8s", "Res2Net"), Arch("skresnet18", "SKNet (selective kernel)"),
    Arch("regnetx_002", "RegNetX"), Arch("regnety_002", "RegNetY (SE)"), Arch("densenet121", "DenseNet"),
    Arch("efficientnet_b0", "EfficientNet"), Arch("efficientnet_lite0", "EfficientNet-Lite"),
    Arch("mobilenetv2_050", "MobileNetV2"), Arch("mobilenetv3_small_050", "MobileNetV3"),
    Arch("mnasnet_050", "MnasNet"), Arch("fbnetc_100", "FBNet"), Arch("mixnet_s", "MixNet"),
    Arch("tinynet_e", "TinyNet"), Arch("lcnet_050", "LCNet"), Arch("ghostnet_050", "GhostNet"),
    Arch("repghostnet_050", "RepGhostNet"), Arch("rexnet_100", "ReXNet"), Arch("vgg11_bn", "VGG"),
    Arch("repvgg_a0", "RepVGG"), Arch("mobileone_s0", "MobileOne"), Arch("convnext_atto", "ConvNeXt"),
    Arch("convnextv2_atto", "ConvNeXt-V2 (GRN)"), Arch("cspresnet50", "CSPNet"), Arch("darknet17", "DarkNet"),
    Arch("dla46_c", "DLA"), Arch("dpn48b", "DPN"), Arch("hrnet_w18_small", "HRNet"),
    Arch("inception_v3", "Inception", size=96), Arch("legacy_xception", "Xception"),
    Arch("nf_resnet26", "NF-ResNet"), Arch("nfnet_l0", "NFNet"), Arch("selecsls42b", "SelecSLS"),
    Arch("ese_vovnet19b_dw", "VoVNet"), Arch("gernet_s", "GENet (ByobNet)"), Arch("hgnetv2_b0", "HGNetV2"),
    Arch("tresnet_m", "TResNet"), Arch("eca_resnet33ts", "ECA-ResNet (ByobNet)"),
    Arch("gcresnet33ts", "GCNet (global context)"),
    Arch("lambda_resnet26t", "LambdaNet", {"img_size": SIZE}),
    Arch("botnet26t_256", "BoTNet (bottleneck attention)", {"img_size": SIZE}),
    Arch("halo2botnet50ts_256", "HaloNet", {"img_size": 128}, size=128),
    Arch("fastvit_t8", "FastViT"), Arch("efficientvit_b0", "EfficientViT (MIT)"),
    Arch("poolformer_s12", "PoolFormer (MetaFormer)"), Arch("mobilevit_xxs", "MobileViT"),
    Arch("vit_tiny_patch16_224", "ViT", {"img_size": SIZE}), Arch("deit_tiny_patch16_224", "DeiT", {"img_size": SIZE}),
    Arch("swin_tiny_patch4_window7_224", "Swin", {"img_size": SIZE, "window_size": 4}),
    Arch("maxvit_rmlp_pico_rw_256", "MaxViT", {"img_size": SIZE}),
    Arch("coatnet_nano_rw_224", "CoAtNet", {"img_size": SIZE}), Arch("levit_128s", "LeViT", {"img_size": SIZE}),
]
QUICK = ["resnet18", "mobilenetv3_small_050", "convnext_atto", "densenet121", "lambda_resnet26t",
         "vit_tiny_patch16_224"]


# ---- one architecture (a child process) ------------------------------------------------------

def build(arch: Arch):
    """The random-init float32 model in eval mode. Batch norms get random affine parameters
    (weight in [0.5, 1.5], bias in [-0.1, 0.1]), then running statistics calibrated on
    random images (the batch statistics of 8 seeded images): folding them changes the
    arithmetic, and every model's output depends on its input at a sensible scale
    however the random weights are drawn."""
    import timm
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = timm.create_model(arch.name, pretrained=False, num_classes=10, **arch.kwargs).float()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if norms:
        with torch.no_grad():
            for m in norms:
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.1, 0.1)
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: the calibration batch's statistics
            model.train()
            model(torch.randn(8, 3, arch.size, arch.size, generator=torch.Generator().manual_seed(2)))
    return model.eval()


def compare(fast, plain) -> tuple[bool, float, float]:
    """(within tolerance, max |fast - plain| / max |plain|, max |plain|) for two tensors of one shape."""
    import torch

    if fast.shape != plain.shape:
        return False, float("inf"), 0.0
    if not (torch.isfinite(fast).all() and torch.isfinite(plain).all()):
        return False, float("nan"), 0.0
    diff = float((fast.double() - plain.double()).abs().max())
    scale = float(plain.double().abs().max())
    return diff <= TOLERANCE * scale + FLOOR, diff / max(scale, 1e-12), scale


def _call(kind: str, model, x, t, heat):
    """One cell's computation: a method's heatmaps, or a metric's curves."""
    import saliencybench as sb

    if kind in METRICS:
        return getattr(sb.metrics, kind)(model, x, t, heat, n_steps=8, return_curves=True)[1]
    size = x.shape[-1]
    if kind == INCREMENTAL:
        return sb.explain(model, x, t, "occlusion", window=size // 4, stride=size // 8, incremental=True)
    params = dict(LIGHT.get(kind, {}))
    if kind == "occlusion":
        params.update(window=size // 4, stride=size // 8)  # 7 x 7 windows at any size
    return sb.explain(model, x, t, kind, **params)


def run_one(arch: Arch) -> dict:
    """Every cell of one architecture: ``{"cells": {kind: [status, text, rel_diff, scale, seconds]},
    "notes": [...]}`` (``scale``: max |plain|)."""
    import torch

    import saliencybench as sb
    from saliencybench.errors import NotApplicableError
    from saliencybench.methods.base import collect_notes
    from saliencybench.modelutil import describe_error, fast_paths

    model = build(arch)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, arch.size, arch.size, generator=g)
    t = torch.tensor([3])
    heat = torch.rand(1, arch.size, arch.size, generator=g)
    cells: dict[str, list] = {}
    notes: list[str] = []
    for kind in [*sb.list_methods(), INCREMENTAL, *METRICS]:
        start = time.perf_counter()
        try:
            with collect_notes() as seen:
                fast = _call(kind, model, x, t, heat)
            notes += [n for n in seen if n not in notes and not n.startswith(PATH_NOTES)]
            path = [n for n in seen if n.startswith(PATH_NOTES)]
            with fast_paths(False):
                plain = _call(kind, model, x, t, heat)
            ok, rel, scale = compare(fast, plain)
            cells[kind] = ["ok", path[0] if kind == INCREMENTAL and path else "", rel, scale] if ok else [
                "error", f"fast path differs from the plain path: max |fast - plain| = {rel:.2g} of max |plain|",
                rel, scale]
        except NotApplicableError as err:
            cells[kind] = ["n/a", str(err).strip().splitlines()[0], None, None]
        except Exception as err:  # noqa: BLE001 - every failure is a finding
            cells[kind] = ["error", describe_error(err), None, None]
        cells[kind].append(round(time.perf_counter() - start, 2))
    return {"cells": cells, "notes": notes}


# ---- the table -------------------------------------------------------------------------------

def versions() -> str:
    import timm
    import torch

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (f"Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
            f"saliencybench at {commit}, {platform.machine()} CPU ({os.cpu_count()} cores)")


def max_rel(results: dict[str, dict], kind: str) -> str:
    """The largest relative fast/plain difference among the ok cells of one column whose values are
    large enough for the relative tolerance to decide, and its architecture."""
    found = [(c[2], name) for name, r in results.items() for k, c in r.get("cells", {}).items()
             if k == kind and c[0] == "ok" and c[3] >= FLOOR / TOLERANCE]
    rel, name = max(found, default=(0.0, ""))
    return f"{rel:.1g} (`{name}`)" if rel else "0"


def _path(note: str) -> str:
    """Occlusion's note on its path, shortened to what it did and how much work it saved."""
    parts = note.split("; ")
    work = [p for p in parts if p.startswith("convolution work")]
    return "; ".join(parts[:1] + work) if note.startswith("incremental:") else note


def write_markdown(archs: list[Arch], results: dict[str, dict], kinds: list[str], path: Path, seconds: float) -> None:
    """The coverage table (architecture x method) with footnoted reasons, the notes and the totals."""
    reasons: dict[str, int] = {}

    def foot(text: str) -> str:
        reasons.setdefault(text, len(reasons) + 1)
        return f"[^{reasons[text]}]"

    counts = {"ok": 0, "n/a": 0, "error": 0}
    worst, tiny = 0.0, 0
    rows = []
    for arch in archs:
        res = results[arch.name]
        if "failed" in res:
            rows.append(f"| `{arch.name}` | {arch.family} | " + " | ".join(
                [f"**error**{foot(res['failed'])}"] * len(kinds)) + " |")
            counts["error"] += len(kinds)
            continue
        cells = []
        for kind in kinds:
            status, text, rel, scale, _ = res["cells"].get(kind, ["error", "not run", None, None, 0])
            counts[status] += 1
            if status == "ok":
                if scale >= FLOOR / TOLERANCE:
                    worst = max(worst, rel)
                else:
                    tiny += 1
                cells.append("ok")
            else:
                cells.append(("n/a" if status == "n/a" else "**error**") + foot(f"{status}: {text}"))
        rows.append(f"| `{arch.name}` | {arch.family} | " + " | ".join(cells) + " |")
    total = sum(counts.values())
    head = [h.replace("occlusion (incremental=True)", "occlusion incr.") for h in kinds]
    lines = [
        "# Coverage of the timm zoo",
        "",
        f"Generated by `python benchmarks/zoo_coverage.py` on {dt.date.today().isoformat()} "
        f"({seconds / 60:.0f} min); {versions()}.",
        "",
        f"**{len(archs)} architectures x {len(kinds)} methods and metrics = {total} cells: "
        f"{counts['ok']} ok, {counts['n/a']} n/a, {counts['error']} error.**",
        "",
        "Each architecture: random init (batch norms with random affine parameters, their statistics calibrated "
        "on random images), the smallest variant of its family, "
        f"one seeded image of {SIZE} x {SIZE} px (Inception 96 px, HaloNet 128 px: their minimum), float32, CPU. "
        "Every registered method (`sb.list_methods()`), occlusion with `incremental=True`, and the deletion and "
        "insertion metrics (8 steps, a seeded random heatmap) run twice: as shipped (fast paths: channels_last, "
        "folded batch norms, each with its probe and fallback) and under `saliencybench.modelutil.fast_paths(False)` "
        "(the plain path).",
        "",
        f"- **ok**: finite heatmaps (curves) whose fast-path values equal the plain path's to "
        f"max |fast - plain| <= {TOLERANCE:g} x max |plain| + {FLOOR:g} (largest difference seen in an ok cell: "
        f"{worst:.1g} of the maximum; {tiny} ok cells have max |plain| < {FLOOR / TOLERANCE:g}, where the absolute "
        "term decides);",
        "- **n/a**: `NotApplicableError`, the method's own refusal, with its reason;",
        "- **error**: any other exception (type and message), or a fast path that differs from the plain one.",
        "",
        "Parameters are cut down for speed (the question is whether each method runs and agrees): "
        + ", ".join(f"{k} {', '.join(f'{p}={v}' for p, v in d.items())}" for k, d in LIGHT.items())
        + ", occlusion window H/4 with stride H/8 (7 x 7 windows); everything else at its defaults.",
        "",
        "| architecture | family | " + " | ".join(head) + " |",
        "|---|---|" + "---|" * len(kinds),
        *rows,
        "",
        "## Fast-path notes",
        "",
        "Where a speed-up declined on an architecture (its probe failed or a precondition did not hold), the note "
        "it left; the results above are then the plain path's. Architectures not listed ran every speed-up.",
        "",
    ]
    noted = [(a, results[a.name].get("notes", [])) for a in archs if results[a.name].get("notes")]
    lines += [f"- `{a.name}`: " + "; ".join(n) for a, n in noted] or ["- none"]
    lines += ["", "## Incremental occlusion", "",
              "With `incremental=True` occlusion plans crops per stage where the model splits into local stages "
              "(else `NotApplicableError`), and falls back to full forward passes where the incremental "
              "computation fails. The path each architecture took:", ""]
    for arch in archs:
        cell = results[arch.name].get("cells", {}).get(INCREMENTAL)
        if cell:
            lines.append(f"- `{arch.name}`: {cell[0]}" + (f", {_path(cell[1])}" if cell[1] else ""))
    lines += ["", "## Largest fast-path difference per column", "",
              f"Among the ok cells with max |plain| >= {FLOOR / TOLERANCE:g}: max |fast - plain| / max |plain|, "
              "and where.", "", "| column | largest difference |", "|---|---|",
              *(f"| {h} | {max_rel(results, kind)} |" for h, kind in zip(head, kinds))]
    lines += ["", "## Reasons", ""]
    lines += [f"[^{k}]: {text.replace('|', '/')}" for text, k in reasons.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md")
    parser.add_argument("--archs", default="", help="comma-separated timm names (default: all)")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds per architecture")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per architecture")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    by_name = {a.name: a for a in ARCHS}
    if args.one:  # the child: one architecture, its cells as JSON
        import torch

        torch.set_num_threads(args.threads)
        args.json.write_text(json.dumps(run_one(by_name[args.one])))
        return 0
    names = [n for n in args.archs.split(",") if n] or (QUICK if args.quick else [a.name for a in ARCHS])
    unknown = [n for n in names if n not in by_name]
    if unknown:
        parser.error(f"unknown architectures {unknown}; known: {sorted(by_name)}")
    archs = [by_name[n] for n in names]
    import saliencybench as sb

    kinds = [*sb.list_methods(), INCREMENTAL, *METRICS]
    results: dict[str, dict] = {}
    start = time.perf_counter()
    for arch in archs:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cells.json"
            cmd = [sys.executable, __file__, "--one", arch.name, "--json", str(out), "--threads", str(args.threads)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                      env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
                if out.exists():
                    results[arch.name] = json.loads(out.read_text())
                else:
                    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    results[arch.name] = {"failed": f"the process ended with code {proc.returncode}: {tail[:200]}"}
            except subprocess.TimeoutExpired:
                results[arch.name] = {"failed": f"timed out after {args.timeout:.0f} s"}
        res = results[arch.name]
        summary = res.get("failed") or ", ".join(
            f"{k} {sum(c[0] == k for c in res['cells'].values())}" for k in ("ok", "n/a", "error"))
        print(f"{arch.name:32} {time.perf_counter() - t0:7.1f} s  {summary}", flush=True)
    write_markdown(archs, results, kinds, args.out, time.perf_counter() - start)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
