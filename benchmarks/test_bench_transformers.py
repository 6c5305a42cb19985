"""Issue 15: the cost of explaining a Vision Transformer.

Run: ``pytest benchmarks/test_bench_transformers.py --benchmark-only -s``.

- Grad-CAM on a ViT (default layer ``blocks[-1].norm1``, token-to-map reshape, upsampling)
  against one forward plus one backward pass of the same batch to the input (the plain
  cost of any gradient method): target <= 1.2x.
- Attention rollout (attention capture on timm's explicit attention path, head fusion and the
  rollout product) against one forward pass with the same capture: target <= 1.2x. The
  capture's own cost (explicit attention instead of ``scaled_dot_product_attention``) is
  reported against a plain fused forward, for information.
- Chefer et al.'s relevance (``transformer_attribution``) against one forward and one
  backward pass with the capture, for information.

Each side is timed once per round, interleaved; a side's figure is its fastest round.
limits.TARGETS has no key for these targets yet: each row's note says whether it is met, and
a missed target prints NOT MET without failing the benchmark, as the other benchmarks do.
"""

from __future__ import annotations

import pytest
import torch
from limits import DEVICE, SideBySide, bench_inputs, bench_model, record, rounds_for, row, synced, timed

import saliencybench as sb
from saliencybench.methods.transformer import attention_rollout, capture_attention
from saliencybench.modelutil import model_guard, target_score

CASES = [("vit_small_patch16_224", 224, 4), ("synthetic-vit", 64, 32)]
TARGET = 1.2


def verdict(ratio: float) -> str:
    return f"target <= {TARGET}x {'met' if ratio <= TARGET else 'NOT MET'}"


def forward_backward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One forward and one backward pass of the target logits to the input (parameters frozen)."""
    with model_guard(model), torch.enable_grad():
        xi = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(target_score(model(xi), t).sum(), xi)
    return g


def captured_forward(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with model_guard(model), torch.inference_mode():
        return capture_attention(model, x)[0]


def captured_forward_backward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with model_guard(model), torch.enable_grad():
        xi = x.detach().clone().requires_grad_(True)
        attns, logits = capture_attention(model, xi)
        return torch.autograd.grad(target_score(logits, t).sum(), attns)


def rollout_alone(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The method function itself, without explain()'s input and output checks."""
    with model_guard(model), torch.inference_mode():
        return attention_rollout(model, x, t)


def plain_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("name,size,b", CASES, ids=[c[0] for c in CASES])
def test_gradcam_on_vit_vs_forward_backward(benchmark, name, size, b):
    model = bench_model(name)
    x, t, _ = bench_inputs(name, b, size=size)

    def ours():
        return sb.explain(model, x, t, "gradcam")

    warm, heat = timed(ours)
    assert heat.shape == (b, size, size) and torch.isfinite(heat).all()
    side = SideBySide().add("fwd+bwd", lambda: forward_backward(model, x, t))
    benchmark.pedantic(synced(ours), setup=side.round, rounds=rounds_for(warm), iterations=1)
    ours_s, ref_s = benchmark.stats.stats.min, side.best("fwd+bwd")
    measure = f"gradcam on {name} {size}px, batch {b}"
    rows = [row(measure, 15, ours_s, "one forward + one backward pass to the input", ref_s, "vit_gradcam",
                note=f"{verdict(ours_s / ref_s)}; default layer blocks[-1].norm1, the backward stops there")]
    record(benchmark, rows, model=name, device=DEVICE)


@pytest.mark.parametrize("name,size,b", CASES, ids=[c[0] for c in CASES])
def test_rollout_vs_forward_with_capture(benchmark, name, size, b):
    model = bench_model(name)
    x, t, _ = bench_inputs(name, b, size=size)

    def ours():
        return sb.explain(model, x, t, "attention_rollout")

    warm, heat = timed(ours)
    assert heat.shape == (b, size, size) and torch.isfinite(heat).all()
    side = (SideBySide().add("capture", lambda: captured_forward(model, x))
            .add("plain", lambda: plain_forward(model, x))
            .add("alone", lambda: rollout_alone(model, x, t))
            .add("chefer", lambda: sb.explain(model, x, t, "transformer_attribution"))
            .add("capture+bwd", lambda: captured_forward_backward(model, x, t)))
    benchmark.pedantic(synced(ours), setup=side.round, rounds=rounds_for(warm), iterations=1)
    ours_s = benchmark.stats.stats.min
    cap, plain, alone = side.best("capture"), side.best("plain"), side.best("alone")
    chefer, cap_bwd = side.best("chefer"), side.best("capture+bwd")
    measure = f"attention_rollout on {name} {size}px, batch {b}"
    rows = [
        row(measure, 15, ours_s, "one forward pass with the attention capture", cap, "rollout_vs_capture",
            note=f"{verdict(ours_s / cap)}; explain()'s input and output checks included"),
        row(f"attention_rollout without explain() on {name} {size}px, batch {b}", 15, alone,
            "one forward pass with the attention capture", cap, None, note=verdict(alone / cap)),
        row(f"attention capture on {name} {size}px, batch {b}", 15, cap, "plain forward (fused attention)", plain,
            None, note="explicit softmax attention instead of scaled_dot_product_attention"),
        row(f"transformer_attribution on {name} {size}px, batch {b}", 15, chefer,
            "one forward + backward to the attentions, with the capture", cap_bwd, None),
    ]
    record(benchmark, rows, model=name, device=DEVICE)
