"""Attention-based explanations for Vision Transformers: raw attention, attention rollout and
Chefer et al.'s gradient-weighted attention relevance.

All three read the attention probabilities A_l = softmax(Q_l K_l^T / sqrt(d)) Tensor[B,heads,N,N]
of every block l = 1..L of a ViT-style model (``model.blocks[l].attn``: ViT, DeiT, ViTs with
registers), N = prefix tokens + patch tokens. timm computes attention with
``F.scaled_dot_product_attention`` when an attention module's ``fused_attn`` is True, which
never materialises A. :func:`attention_capture` sets ``fused_attn=False`` on the blocks'
attention modules for the duration of the call only, so timm's explicit path runs (the same
values: ``softmax(q k^T * scale)`` then ``attn_drop``, the identity in eval mode), hooks the
output of ``attn_drop`` (the tensor that multiplies V), and restores every flag and removes
every hook on exit, also after an exception.

The explained token is row ``t`` of the token mixing: ``token="cls"`` the class token
(row 0, where timm always puts it), ``"dist"`` DeiT's distillation token (row 1). Register
and distillation tokens are prefix tokens: they mix like every token, but the map keeps only
the patch-token columns ``num_prefix_tokens:``, reshaped to the patch grid of the actual input
(:func:`~saliencybench.methods.tokens.patch_grid`) and upsampled bilinearly. DeiT's head
averages the class and distillation heads; rollout and relevance of the class token (the
default) follow Abnar & Zuidema and Chefer et al., who read the class token.

Models without such blocks (CNNs; Swin, whose attention is windowed and has no class token)
raise :class:`NotApplicableError` with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import NotApplicableError
from ..modelutil import SCORES, target_score
from .base import Applicability, add_note, batch_slices, register_method, upsample
from .tokens import patch_grid, prefix_tokens

TOKENS = ("cls", "dist")
HEAD_FUSIONS = ("mean", "max", "min")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each block's self-attention (``model.blocks[i].attn``), in forward order.

    Raises :class:`NotApplicableError` naming why the model has none usable.
    """
    name = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks) \
            or not any(isinstance(getattr(blk, "attn", None), nn.Module) for blk in blocks):
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if hasattr(m, "fused_attn") or type(m).__name__.endswith(("Attention", "Attn"))})
        if kinds:
            how = ("windowed: each attention matrix covers one local window" if any("Window" in k for k in kinds)
                   else "inside the stages of a hierarchical model")
            raise NotApplicableError(
                f"{name}'s attention ({', '.join(kinds)}) is {how}, and there is no class token, while attention "
                "rollout and relevance propagation need global self-attention over all tokens with a class token "
                "(ViT, DeiT). Use gradcam instead"
            )
        raise NotApplicableError(
            f"{name} has no attention: attention methods need a ViT-style model with self-attention blocks "
            "(model.blocks[i].attn: ViT, DeiT, ViT with registers). Use gradcam instead"
        )
    found = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, nn.Module) or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
            raise NotApplicableError(
                f"{name}'s block {i} ({type(blk).__name__}) has no attention module with an attn_drop layer, so its "
                "attention probabilities cannot be captured"
            )
        found.append((f"blocks.{i}.attn", attn))
    return found


def token_index(model: nn.Module, token: str) -> int:
    """Row of the explained token: 0 for the class token, 1 for DeiT's distillation token (after
    checking that the model has attention blocks, :func:`attention_modules`)."""
    attention_modules(model)
    if token not in TOKENS:
        raise NotApplicableError(f"unknown token {token!r}; use one of {TOKENS}")
    if getattr(model, "cls_token", None) is None:
        raise NotApplicableError(
            f"{type(model).__name__} has no class token (class_token=False, global average pooling): attention "
            "rollout and relevance read the class token's row. Use gradcam instead"
        )
    if token == "dist":
        if getattr(model, "dist_token", None) is None:
            raise NotApplicableError(f"{type(model).__name__} has no distillation token; use token='cls'")
        return 1
    return 0


def attention_applicability(model: nn.Module) -> Applicability:
    """Attention methods apply to ViT-style models with global self-attention blocks and a class token."""
    try:
        token_index(model, "cls")
    except NotApplicableError as e:
        return Applicability(False, str(e))
    return Applicability(True)


@contextmanager
def attention_capture(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Yield a list that each forward pass inside the block fills with every block's attention
    probabilities Tensor[B,heads,N,N], in block order (still in the autograd graph).

    ``fused_attn`` is False on the attention modules inside the block; flags and hooks are
    restored on exit, also after an exception.
    """
    modules = attention_modules(model)
    captured: list[torch.Tensor] = []
    flags = [(m, m.fused_attn) for _, m in modules if hasattr(m, "fused_attn")]
    handles = []
    try:
        for m, _ in flags:
            m.fused_attn = False
        for _, m in modules:
            handles.append(m.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out)))
        yield captured
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.fused_attn = flag


def capture_attention(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward pass of ``x`` Tensor[B,3,H,W]: (each block's attention [B,heads,N,N], logits[B,C]).

    Checks that every block produced one square attention over all N tokens.
    """
    n_blocks = len(attention_modules(model))
    with attention_capture(model) as attns:
        logits = model(x)
    if len(attns) != n_blocks:
        raise NotApplicableError(
            f"{type(model).__name__}: {len(attns)} attention matrices were captured from {n_blocks} blocks; its "
            "attention does not run through attn_drop on timm's explicit path"
        )
    for i, a in enumerate(attns):
        if a.ndim != 4 or a.shape[-1] != a.shape[-2] or a.shape[-1] != attns[0].shape[-1]:
            raise NotApplicableError(f"block {i}'s attention has shape {tuple(a.shape)}, not [B,heads,N,N]")
    return list(attns), logits


def _patch_row(model: nn.Module, row: torch.Tensor, size: tuple[int, int], token: str) -> torch.Tensor:
    """Row Tensor[B,N] over all tokens -> its patch-token part as a map Tensor[B,H,W] (upsampled)."""
    p, grid = prefix_tokens(model), patch_grid(model, size)
    if grid is None or row.shape[1] != p + grid[0] * grid[1]:
        raise NotApplicableError(
            f"{type(model).__name__}: {row.shape[1]} tokens are not {p} prefix tokens plus the patch grid {grid} of "
            f"a {size[0]}x{size[1]} input"
        )
    add_note(f"{token} token's row over {row.shape[1]} tokens; {p} prefix token{'s' if p != 1 else ''} dropped, "
             f"patch grid {grid[0]}x{grid[1]} at {size[0]}x{size[1]}")
    return upsample(row[:, p:].reshape(-1, *grid), size)


def head_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over heads of Tensor[B,heads,N,M]: Tensor[B,N,M]. As a batched product with weights
    1/heads: several times faster on CPU than ``x.mean(1)``, a strided reduction (same values to rounding)."""
    b, h, n, m = x.shape
    return torch.bmm(x.new_full((b, 1, h), 1.0 / h), x.reshape(b, h, n * m)).view(b, n, m)


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """Attention [B,heads,N,N] fused over heads by mean, max or min: Tensor[B,N,N]."""
    if head_fusion == "mean":
        return head_mean(attn)
    if head_fusion == "max":
        return attn.amax(1)
    if head_fusion == "min":
        return attn.amin(1)
    raise NotApplicableError(f"unknown head fusion {head_fusion!r}; use one of {HEAD_FUSIONS}")


def discard_lowest(fused: torch.Tensor, ratio: float, keep: int) -> torch.Tensor:
    """Zero the ``int(N*N*ratio)`` smallest entries of each fused attention [B,N,N], except entry
    (keep, keep), as jacobgil/vit-explain does (per image there; for the first image only in its code)."""
    b, n, _ = fused.shape
    k = int(n * n * ratio)
    if k == 0:
        return fused
    flat = fused.reshape(b, n * n)
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.topk(k, 1, largest=False).indices, True)
    drop[:, keep * n + keep] = False
    return flat.masked_fill(drop, 0).view(b, n, n)


def rollout_row(attns: list[torch.Tensor], token: int, head_fusion: str = "mean",
                discard_ratio: float = 0.0) -> torch.Tensor:
    """Row ``token`` of the rollout A~ = A'_L ... A'_1, A'_l = rownorm((fuse(A_l) + I) / 2): Tensor[B,N].

    Computed from the left as e_t^T A'_L ... A'_1 without forming A'_l: with F = fuse(A_l)
    and s_j its row sums, A'_jk = (F_jk + [j == k]) / (s_j + 1), so r A' = (r / (s + 1)) F + r / (s + 1).
    Mean fusion without discarding averages softmax rows, which sum to 1, so there s = 1 and
    r A' = (r F + r) / 2 (two operations a layer instead of five; equal to float rounding).
    """
    b, n = attns[0].shape[0], attns[0].shape[-1]
    row = torch.zeros(b, 1, n, dtype=attns[0].dtype, device=attns[0].device)
    row[:, 0, token] = 1
    stochastic = head_fusion == "mean" and int(n * n * discard_ratio) == 0
    for attn in reversed(attns):
        if stochastic:
            row = torch.baddbmm(row, row, head_mean(attn), beta=0.5, alpha=0.5)
            continue
        fused = discard_lowest(fuse_heads(attn, head_fusion), discard_ratio, token)
        scaled = row / fused.sum(-1).add_(1)[:, None]
        row = torch.baddbmm(scaled, scaled, fused)
    return row[:, 0]


def relevance_row(attns: list[torch.Tensor], grads: list[torch.Tensor], token: int) -> torch.Tensor:
    """Row ``token`` of R = prod_l (I + Abar_l), Abar_l = E_h[(dS/dA_l * A_l)^+], i.e. of the
    update R <- R + Abar_l R from R = I over l = 1..L: Tensor[B,N] (vector-matrix products from the left)."""
    b, n = attns[0].shape[0], attns[0].shape[-1]
    row = torch.zeros(b, 1, n, dtype=attns[0].dtype, device=attns[0].device)
    row[:, 0, token] = 1
    for attn, grad in zip(reversed(attns), reversed(grads)):
        row = torch.baddbmm(row, row, head_mean((grad * attn).clamp_(min=0)))
    return row[:, 0]


_COMMON = {"token": TOKENS, "batch_size": ">=1"}


@register_method(
    "attention_rollout",
    paper="Abnar, Zuidema. Quantifying Attention Flow in Transformers. ACL 2020",
    family="attention",
    needs_grad=False,
    applicability=attention_applicability,
    constraints={**_COMMON, "head_fusion": HEAD_FUSIONS, "discard_ratio": "[0,1)"},
)
def attention_rollout(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, head_fusion: str = "mean",
    discard_ratio: float = 0.0, token: str = "cls", batch_size: int = 64,
) -> torch.Tensor:
    """Attention rollout: how much each patch token flows into the class token through all blocks.

    Per block the head-fused attention (``head_fusion`` mean, max or min over heads)
    plus the identity for the residual connection, A'_l = 0.5 A_l + 0.5 I, rows
    renormalised (the paper's eq. for A'; a no-op unless entries were discarded);
    A~ = A'_L ... A'_1 (rollout, the paper's eq. 1); the map is A~[t, patches]
    reshaped to the patch grid and upsampled. ``discard_ratio``: before adding I,
    the smallest int(N*N*ratio) fused entries of each image are set to 0 except
    (t, t), as jacobgil/vit-explain (whose ``a / a.sum(dim=-1)`` divides column j by
    row j's sum where we divide each row by its own; equal when nothing is discarded).
    Class-agnostic: ``targets`` are not used. Returns Tensor[B,H,W] >= 0.
    """
    t = token_index(model, token)
    out = []
    for sl in batch_slices(images.shape[0], batch_size):
        attns, _ = capture_attention(model, images[sl])
        out.append(_patch_row(model, rollout_row(attns, t, head_fusion, discard_ratio), images.shape[-2:], token))
    return torch.cat(out)


@register_method(
    "transformer_attribution",
    paper="Chefer, Gur, Wolf. Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder "
    "Transformers. ICCV 2021 (the gradient-weighted attention relevance of Chefer, Gur, Wolf, Transformer "
    "Interpretability Beyond Attention Visualization, CVPR 2021, with attention in place of its LRP relevance)",
    family="attention",
    applicability=attention_applicability,
    constraints={**_COMMON, "score": SCORES},
)
def transformer_attribution(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, score: str = "logit", token: str = "cls",
    batch_size: int = 64,
) -> torch.Tensor:
    """Gradient-weighted attention relevance (Chefer et al. ICCV 2021, eqs. 5-6 for self-attention).

    Per block Abar_l = E_h[(dS/dA_l * A_l)^+] (the mean over heads of the positive part
    of gradient times attention, S the target's ``score``); relevance R starts at I and
    is updated R <- R + Abar_l R for l = 1..L; the map is R[t, patches] reshaped to the
    patch grid and upsampled. This is the rule of the authors' ViT notebooks in
    hila-chefer/Transformer-MM-Explainability. Their CVPR 2021 ``transformer_attribution``
    (hila-chefer/Transformer-Explainability) uses the same product of (I + Abar_l) with the
    LRP relevance of A_l in place of A_l, which needs LRP rules for every layer of a
    re-implemented ViT; that version is not implemented here. One forward and one
    backward pass per ``batch_size`` images. Returns Tensor[B,H,W] >= 0.
    """
    t = token_index(model, token)
    out = []
    for sl in batch_slices(images.shape[0], batch_size):
        with torch.inference_mode(False), torch.enable_grad():
            x = images[sl].detach().clone().requires_grad_(True)
            attns, logits = capture_attention(model, x)
            grads = torch.autograd.grad(target_score(logits, targets[sl], score).sum(), attns)
        row = relevance_row([a.detach() for a in attns], [g.detach() for g in grads], t)
        out.append(_patch_row(model, row, images.shape[-2:], token))
    return torch.cat(out)


@register_method(
    "raw_attention",
    paper="Raw attention of the last block, the baseline of Chefer, Gur, Wolf. Transformer Interpretability Beyond "
    "Attention Visualization. CVPR 2021",
    family="attention",
    needs_grad=False,
    applicability=attention_applicability,
    constraints=_COMMON,
)
def raw_attention(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, token: str = "cls", batch_size: int = 64,
) -> torch.Tensor:
    """The last block's attention from token t to the patch tokens, averaged over heads, upsampled.

    map = mean_h A_L[h, t, patches]. Class-agnostic: ``targets`` are not used.
    Returns Tensor[B,H,W] >= 0.
    """
    t = token_index(model, token)
    out = []
    for sl in batch_slices(images.shape[0], batch_size):
        attns, _ = capture_attention(model, images[sl])
        out.append(_patch_row(model, attns[-1][:, :, t].mean(1), images.shape[-2:], token))
    return torch.cat(out)


__all__ = ["attention_capture", "attention_modules", "attention_applicability", "capture_attention",
           "discard_lowest", "fuse_heads", "head_mean", "relevance_row", "rollout_row", "attention_rollout",
           "transformer_attribution", "raw_attention"]
