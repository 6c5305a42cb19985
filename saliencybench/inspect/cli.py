"""``saliencybench inspect``: filters, activations, class-visualisation, neighbours, tsne.

:func:`add_parser` adds the ``inspect`` command to the main parser's subparsers and
:func:`run` executes it: it loads the model (a saliencybench model, or any timm name
with ``--checkpoint`` or pretrained weights, or ``--random-init``) and the data set,
normalises the images with the model's preprocessing, writes PNG figures under
``--output`` (default ``results/inspect/<subcommand>``) and prints their paths and
the numbers each tool reports. Expected failures print one message and return 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError, SaliencyBenchError

SUBCOMMANDS = ("filters", "activations", "class-visualisation", "neighbours", "tsne")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``inspect`` with its sub-subcommands to ``subparsers`` (from ``add_subparsers()``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="synthetic-resnet",
                        help="saliencybench model or timm name (default synthetic-resnet)")
    common.add_argument("--checkpoint", metavar="FILE", help="weights for a timm model (safetensors or state dict)")
    common.add_argument("--random-init", action="store_true",
                        help="a timm model with random weights (no checkpoint, no download)")
    common.add_argument("--output", metavar="DIR", help="where the figures go (default results/inspect/<subcommand>)")
    common.add_argument("--seed", type=int, default=0)
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--dataset", default="synthetic", help="data set name (default synthetic)")
    data.add_argument("--data-root", help="root directory of a real data set (sets its root parameter)")
    data.add_argument("--n-images", type=int, default=200, help="images taken from the data set (default 200)")

    p = subparsers.add_parser("inspect", help="look inside a CNN: filters, activations, class visualisation, "
                                              "nearest neighbours, t-SNE")
    sub = p.add_subparsers(dest="inspect_command", required=True)
    sub.add_parser("filters", parents=[common], help="first convolution's filters as an image grid")
    a = sub.add_parser("activations", parents=[common, data],
                       help="a channel's activation maps and its top-k activating images with receptive-field patches")
    a.add_argument("--layer", required=True, help="module name (a wrong name lists the candidates)")
    a.add_argument("--channel", type=int, default=0)
    a.add_argument("--k", type=int, default=9, help="top-k activating images (default 9)")
    a.add_argument("--n-show", type=int, default=8, help="images whose maps are shown (default 8)")
    c = sub.add_parser("class-visualisation", parents=[common],
                       help="gradient ascent on the input for a class score or a channel's mean activation")
    c.add_argument("--target", help="class index or name (default 0)")
    c.add_argument("--layer", help="with --channel: maximise this layer's channel (default forward_features)")
    c.add_argument("--channel", type=int)
    c.add_argument("--steps", type=int, default=200)
    c.add_argument("--lr", type=float, default=0.1)
    c.add_argument("--l2", type=float, default=1e-3, help="L2 decay per step")
    c.add_argument("--jitter", type=int, default=4, help="random roll in pixels")
    c.add_argument("--blur-every", type=int, default=4, help="blur every N steps (0: never)")
    c.add_argument("--blur-sigma", type=float, default=0.5)
    n = sub.add_parser("neighbours", parents=[common, data],
                       help="nearest neighbours in penultimate-feature space and in pixel space")
    n.add_argument("--k", type=int, default=5)
    n.add_argument("--n-queries", type=int, default=6, help="query rows in the figure (default 6)")
    t = sub.add_parser("tsne", parents=[common, data], help="t-SNE of penultimate features, with trustworthiness")
    t.add_argument("--perplexity", type=float, default=30.0)
    return p


def _bundle(args: argparse.Namespace) -> Any:
    from ..benchmark import load_all
    from ..benchmark.models import MODELS, load_model

    load_all()
    if args.random_init:
        if args.model in MODELS or args.checkpoint:
            raise SaliencyBenchError("--random-init applies to timm model names without --checkpoint")
        return load_model(args.model, pretrained=False)
    return load_model(args.model, checkpoint=args.checkpoint)


def _dataset(args: argparse.Namespace, size: int) -> Any:
    from ..benchmark.datasets import DATASETS, get_dataset

    spec = DATASETS.get(args.dataset)
    params: dict[str, Any] = {}
    if "n_images" in spec.params:
        params["n_images"] = args.n_images
    if "size" in spec.params and 32 <= size <= 256:
        params["size"] = size
    if args.data_root:
        if "root" not in spec.params:
            raise SaliencyBenchError(f"data set {args.dataset!r} takes no root directory; drop --data-root")
        params["root"] = args.data_root
    return get_dataset(args.dataset, **params)


def _target(value: str | None, classes: list[str]) -> int:
    if value is None:
        return 0
    if value in classes:
        return classes.index(value)
    try:
        return int(value)
    except ValueError:
        raise InvalidInputError(f"--target {value!r} is neither a class index nor a class name "
                                f"({', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''})") from None


def run(args: argparse.Namespace) -> int:
    """Run ``saliencybench inspect <subcommand>``; returns the exit status (2 on bad input)."""
    try:
        return _run(args)
    except SaliencyBenchError as e:
        print(f"saliencybench: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from . import (activation_maps, class_agreement, class_visualisation, dataset_tensors, filter_grid, first_conv,
                   nearest_neighbours, penultimate_features, pixel_features, top_activating, tsne_embedding,
                   write_activation_maps, write_class_visualisation, write_filters, write_neighbours,
                   write_top_activating, write_tsne)

    cmd = args.inspect_command
    out = Path(args.output or Path("results") / "inspect" / cmd)
    torch.manual_seed(args.seed)
    bundle = _bundle(args)
    model, size = bundle.model, bundle.input_size
    if cmd == "filters":
        name, conv = first_conv(model)
        path = write_filters(filter_grid(model), out, f"{bundle.name}: {name} ({conv.out_channels} filters "
                                                     f"{conv.kernel_size[0]}x{conv.kernel_size[1]})")
        print(f"first convolution: {name} {tuple(conv.weight.shape)}\nfigure: {path}")
        return 0
    if cmd == "class-visualisation":
        target = None if args.channel is not None else _target(args.target, bundle.classes)
        res = class_visualisation(model, target, steps=args.steps, lr=args.lr, l2=args.l2, jitter=args.jitter,
                                  blur_every=args.blur_every, blur_sigma=args.blur_sigma, seed=args.seed,
                                  size=size, channel=args.channel, layer=args.layer, mean=bundle.mean,
                                  std=bundle.std)
        what = (f"class {target} ({bundle.classes[target]})" if target is not None
                else f"channel {args.channel} of {args.layer or 'forward_features'}")
        path = write_class_visualisation(res, out, f"{bundle.name}: {what}")
        print(f"objective ({what}): {res.initial_score:.4f} -> {res.final_score:.4f} "
              f"(+{res.final_score - res.initial_score:.4f}) in {args.steps} steps\nfigure: {path}")
        return 0

    ds = _dataset(args, size)
    if cmd == "activations":
        images, _, _ = dataset_tensors(ds, size, limit=args.n_show)
        maps = activation_maps(model, bundle.normalise(images), args.layer, args.channel)
        p1 = write_activation_maps(images, maps, out, f"{bundle.name}: {args.layer} channel {args.channel}")
        tops, rf = top_activating(model, ds, args.layer, args.channel, args.k, transform=bundle.normalise, size=size,
                                  limit=args.n_images)
        p2 = write_top_activating(tops, out, f"{bundle.name}: {args.layer} channel {args.channel}, top {len(tops)} "
                                             f"of {args.dataset}, receptive field {rf.size[0]}x{rf.size[1]}",
                                  ds.classes)
        print(f"receptive field of {args.layer}: size {rf.size}, stride {rf.stride}, start {rf.start}")
        for t in tops:
            print(f"  #{t.index} {t.image_id} value {t.value:.4f} at {t.position} box {t.box}")
        print(f"figures: {p1}\n         {p2}")
        return 0
    images, labels, _ = dataset_tensors(ds, size, limit=args.n_images)
    feats = penultimate_features(model, bundle.normalise(images))
    if cmd == "neighbours":
        every = torch.arange(len(images))
        f_nn, _ = nearest_neighbours(feats, feats, args.k, "cosine", exclude=every)
        p_nn, _ = nearest_neighbours(pixel_features(images), pixel_features(images), args.k, "euclidean",
                                     exclude=every)
        fa, pa = class_agreement(f_nn, labels, labels), class_agreement(p_nn, labels, labels)
        q = min(args.n_queries, len(images))
        path = write_neighbours(images[:q], images, f_nn[:q], p_nn[:q], labels[:q], labels, out, ds.classes,
                                f"{bundle.name} on {args.dataset}: {args.k} nearest, features (cosine) | pixels "
                                f"(Euclidean)")
        print(f"class agreement of the {args.k} nearest neighbours over {len(images)} images (leave-one-out):\n"
              f"  penultimate features (cosine): {fa:.4f}\n  pixels (Euclidean):            {pa:.4f}\nfigure: {path}")
        return 0
    if cmd == "tsne":
        emb, trust = tsne_embedding(feats, seed=args.seed, perplexity=args.perplexity)
        paths = write_tsne(emb, labels, out, classes=ds.classes, images=images,
                           title=f"{bundle.name} on {args.dataset}: t-SNE of penultimate features "
                                 f"(trustworthiness {trust:.3f})")
        print(f"t-SNE of {len(images)} images, {feats.shape[1]}-d features: trustworthiness {trust:.4f}")
        print("figures: " + "\n         ".join(str(p) for p in paths))
        return 0
    raise SaliencyBenchError(f"unknown inspect command {cmd!r}; choose from {SUBCOMMANDS}")
