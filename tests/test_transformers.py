"""Transformers: token-to-map geometry, the CAM family on ViT/DeiT/Swin/ConvNeXt/MaxViT against
pytorch-grad-cam, and the attention methods against slow references written from the papers.

Tiny random-init timm models in float64; non-square inputs wherever the model allows, so that a
transposed grid cannot pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_same_state, make_images, make_model, snapshot
from pytorch_grad_cam import GradCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

import saliencybench as sb
from saliencybench.errors import InvalidInputError, NotApplicableError
from saliencybench.methods import cam as cam_mod
from saliencybench.methods import cam_variants, shared, tokens, transformer
from saliencybench.methods.applicability import applicability_matrix
from saliencybench.methods.base import collect_notes
from saliencybench.methods.cam import layer_activations
from saliencybench.modelutil import FEATURES


def close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    ours, ref = ours.detach(), ref.detach().to(ours)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
    assert err < rtol, f"max relative error {err:.3g}"


def tiny(name: str, **kw) -> nn.Module:
    return make_model(name, **kw)


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    """ViT with a class token, 3x4 patch grid at 48x64."""
    return tiny("vit_tiny_patch16_224", img_size=(48, 64), depth=3)


@pytest.fixture(scope="module")
def deit() -> nn.Module:
    """DeiT with class and distillation tokens, 3x4 grid at 48x64."""
    return tiny("deit_tiny_distilled_patch16_224", img_size=(48, 64), depth=3)


@pytest.fixture(scope="module")
def vit_reg() -> nn.Module:
    """ViT with a class token and 4 registers, 3x4 grid at 48x64."""
    return tiny("vit_tiny_patch16_224", img_size=(48, 64), depth=2, reg_tokens=4)


@pytest.fixture(scope="module")
def swin() -> nn.Module:
    """Swin at 64x96: stage grids 16x24, 8x12, 4x6, 2x3 (NHWC)."""
    return tiny("swin_tiny_patch4_window7_224", img_size=(64, 96), embed_dim=48, depths=(1, 1, 2, 1))


def x_for(model: nn.Module, b: int = 2, seed: int = 1) -> torch.Tensor:
    h, w = tokens.probe_size(model)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g, dtype=torch.float64)


T2 = torch.tensor([3, 7])


def vit_reshape(model: nn.Module, h: int, w: int):
    """pytorch-grad-cam's vit_reshape_transform, with the model's prefix-token count instead of 1."""
    p = model.num_prefix_tokens
    return lambda t: t[:, p:, :].reshape(t.size(0), h, w, t.size(2)).permute(0, 3, 1, 2)


def nhwc_reshape(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def pgc_layer_map(cls, model, x, targets, layer, reshape=None) -> torch.Tensor:
    """pytorch-grad-cam's map at the layer's resolution, ReLU(cam image) [B,h,w]."""
    tg = [ClassifierOutputTarget(int(t)) for t in targets]
    with cls(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        cam(input_tensor=x, targets=tg)
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        grads = cam.activations_and_grads.gradients[0].cpu().numpy()
        out = np.maximum(cam.get_cam_image(x, layer, tg, acts, grads, False), 0)
    model.zero_grad(set_to_none=True)
    return torch.from_numpy(np.asarray(out)).double()


# ---- geometry ---------------------------------------------------------------------------------------


def test_token_layouts_from_shapes_and_modules():
    # tokens without a patch embedding: the one stride grid with that many tokens (here stride 8)
    lay = tokens.token_layout(nn.Module(), "x", None, (2, 6 * 8, 32), (48, 64))
    assert (lay.kind, lay.grid, lay.prefix, lay.token_axis) == ("tokens", (6, 8), 0, 1)
    # NHWC vs NCHW told by which reading is a stride grid of the input, non-square
    assert tokens.token_layout(nn.Module(), "x", None, (2, 12, 16, 40), (48, 64)).kind == "nhwc"
    assert tokens.token_layout(nn.Module(), "x", None, (2, 40, 12, 16), (48, 64)).kind == "nchw"
    # the module's type decides when both readings fit
    assert tokens.token_layout(nn.Module(), "x", nn.LayerNorm(16), (2, 16, 16, 16), (64, 64)).kind == "nhwc"
    assert tokens.token_layout(nn.Module(), "x", nn.Conv2d(3, 16, 1), (2, 16, 16, 16), (64, 64)).kind == "nchw"
    # else the model's output_fmt, else NCHW
    fmt = nn.Module()
    fmt.output_fmt = "NHWC"
    assert tokens.token_layout(fmt, "x", None, (2, 16, 16, 16), (64, 64)).kind == "nhwc"
    assert tokens.token_layout(nn.Module(), "x", None, (2, 16, 16, 16), (64, 64)).kind == "nchw"
    # flattened tokens without prefix: the one stride grid with that count
    assert tokens.grid_for_tokens(4 * 6, (64, 96)) == (4, 6)
    assert tokens.grid_for_tokens(7, (64, 96)) is None
    with pytest.raises(NotApplicableError, match="2-D tensor"):
        tokens.token_layout(nn.Module(), "head", None, (2, 10), (64, 64))
    with pytest.raises(NotApplicableError, match="fits no grid"):
        tokens.token_layout(nn.Module(), "blocks.0", None, (2, 7, 15), (64, 64))


def test_vit_maps_follow_the_patch_embedding_at_any_size():
    """Patch grid from patch_embed for the actual input: img_size=, dynamic_img_size, dynamic_img_pad."""
    model = tiny("vit_tiny_patch16_224", img_size=64, depth=2, dynamic_img_size=True, dynamic_img_pad=True)
    for h, w, grid in [(64, 64, (4, 4)), (48, 80, (3, 5)), (50, 70, (4, 5))]:
        x = torch.randn(1, 3, h, w, dtype=torch.float64)
        a, g, _ = layer_activations(model, x, torch.tensor([1]), None)
        assert a.shape == (1, 192, *grid) and g.shape == a.shape
        assert sb.explain(model, x, 1, "gradcam").shape == (1, h, w)
    # the map's tokens are the patch tokens in row-major order
    x = torch.randn(1, 3, 48, 80, dtype=torch.float64)
    a, _, _ = layer_activations(model, x, torch.tensor([1]), "blocks.1.norm1", with_grads=False)
    seen = {}
    h = model.blocks[1].norm1.register_forward_hook(lambda m, i, o: seen.setdefault("t", o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    assert torch.equal(a[0, :, 1, 3], seen["t"][0, 1 + 1 * 5 + 3])


def test_default_layers_and_why_not_the_last_block(vit, deit):
    assert tokens.default_layer(vit) == "blocks.2.norm1" and tokens.default_layer(deit) == "blocks.2.norm1"
    assert tokens.default_layer(make_model("resnet10t")) is None
    x = x_for(vit)
    # With a class-token head, the patch tokens of the last block's output get exactly zero gradient ...
    _, g_last, _ = layer_activations(vit, x, T2, FEATURES)
    _, g_blk, _ = layer_activations(vit, x, T2, "blocks.2")
    assert torch.count_nonzero(g_last) == 0 and torch.count_nonzero(g_blk) == 0
    assert float(sb.explain(vit, x, T2, "gradcam", layer="blocks.2").abs().max()) == 0.0
    # ... while at blocks[-1].norm1 (the default) and at blocks[-2]'s output (norm1's input) they do not.
    _, g_norm1, _ = layer_activations(vit, x, T2, None)
    _, g_in, _ = layer_activations(vit, x, T2, "blocks.1")
    assert torch.count_nonzero(g_norm1) == g_norm1.numel() and torch.count_nonzero(g_in) > 0
    # The same holds with DeiT's two token heads; a global-average-pool ViT's last output does get gradients.
    _, g_d, _ = layer_activations(deit, x_for(deit), T2, FEATURES)
    assert torch.count_nonzero(g_d) == 0
    gap = tiny("vit_tiny_patch16_224", img_size=(48, 64), depth=2, class_token=False, global_pool="avg",
               fc_norm=False)
    _, g_gap, _ = layer_activations(gap, x, T2, FEATURES)
    assert torch.count_nonzero(g_gap) == g_gap.numel()
    # ... and there CAM applies exactly: logits = Linear(mean of the patch tokens)
    assert sb.get_method("cam").check(gap).applicable
    close(cam_mod.cam_maps(gap, x, T2).clamp(min=0) / 12, cam_mod.gradcam_maps(gap, x, T2, layer=FEATURES), 1e-9)


def test_cnn_default_layer_is_forward_features_unchanged(resnet, images, targets):
    ours = sb.explain(resnet, images, targets, "gradcam")
    assert torch.equal(ours, sb.explain(resnet, images, targets, "gradcam", layer=FEATURES))
    with collect_notes() as notes:
        sb.explain(resnet, images, targets, "gradcam", layer="layer3")
    assert notes == []  # NCHW maps are read as before: no note


# ---- the CAM family against pytorch-grad-cam -------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit", "deit", "vit_reg"])
def test_gradcam_on_vit_deit_registers_equals_pytorch_grad_cam(name, request):
    model = request.getfixturevalue(name)
    x = x_for(model)
    ref = pgc_layer_map(GradCAM, model, x, T2, model.blocks[-1].norm1, vit_reshape(model, 3, 4))
    with collect_notes() as notes:
        ours = cam_mod.gradcam_maps(model, x, T2)
    close(ours, ref)
    assert ours.shape == (2, 3, 4) and ours.max() > 0
    p = model.num_prefix_tokens
    assert any(f"{p} prefix token" in n and f"tokens [B,{p + 12},192] read as map [B,192,3,4]" in n for n in notes), notes
    assert sb.explain(model, x, T2, "gradcam").shape == (2, 48, 64)


def test_gradcam_on_swin_equals_pytorch_grad_cam(swin):
    x = x_for(swin)
    # default: forward_features, the final norm's NHWC output
    close(cam_mod.gradcam_maps(swin, x, T2), pgc_layer_map(GradCAM, swin, x, T2, swin.norm, nhwc_reshape))
    # a stage output (NHWC) and, inside a block, norm2's flattened tokens [B, 4*6, C]
    close(cam_mod.gradcam_maps(swin, x, T2, layer="layers.2"),
          pgc_layer_map(GradCAM, swin, x, T2, swin.layers[2], nhwc_reshape))
    flat = lambda t: t.reshape(t.size(0), 4, 6, t.size(2)).permute(0, 3, 1, 2)  # swinT_reshape_transform  # noqa: E731
    ours = cam_mod.gradcam_maps(swin, x, T2, layer="layers.2.blocks.1.norm2")
    assert ours.shape == (2, 4, 6)
    close(ours, pgc_layer_map(GradCAM, swin, x, T2, swin.layers[2].blocks[1].norm2, flat))


@pytest.mark.parametrize("cls,fn", [(XGradCAM, cam_variants.xgradcam_maps), (LayerCAM, cam_variants.layercam_maps)],
                         ids=["xgradcam", "layercam"])
def test_xgradcam_and_layercam_equal_pytorch_grad_cam(cls, fn, vit, resnet):
    x = x_for(vit)
    ours = fn(vit, x, T2)
    close(ours, pgc_layer_map(cls, vit, x, T2, vit.blocks[-1].norm1, vit_reshape(vit, 3, 4)))
    assert ours.max() > 0
    xc = make_images(2, 64, seed=4)
    close(fn(resnet, xc, T2), pgc_layer_map(cls, resnet, xc, T2, resnet.layer4))
    close(fn(resnet, xc, T2, layer="layer3"), pgc_layer_map(cls, resnet, xc, T2, resnet.layer3))


def test_xgradcam_and_layercam_from_their_definitions(resnet):
    x = make_images(2, 64, seed=5)
    a, g, _ = layer_activations(resnet, x, T2, None)
    w = torch.stack([torch.stack([(g[b, k] * a[b, k] / (a[b, k].sum() + 1e-7)).sum() for k in range(a.shape[1])])
                     for b in range(2)])
    close(cam_variants.xgradcam_maps(resnet, x, T2), torch.relu(torch.einsum("bk,bkhw->bhw", w, a)), 1e-10)
    close(cam_variants.layercam_maps(resnet, x, T2), torch.relu((torch.relu(g) * a).sum(1)), 1e-10)


def test_cam_family_runs_on_convnext_maxvit_coatnet():
    convnext = tiny("convnext_atto", conv_mlp=False)  # blocks normalise and run their MLP in NHWC
    x = make_images(2, 64)
    # ConvNeXt's blocks normalise in NHWC: that layer is read NHWC (its LayerNorm says so)
    layer = "stages.3.blocks.0.norm"
    close(cam_mod.gradcam_maps(convnext, x, T2, layer=layer),
          pgc_layer_map(GradCAM, convnext, x, T2, convnext.stages[3].blocks[0].norm, nhwc_reshape))
    close(cam_mod.gradcam_maps(convnext, x, T2), pgc_layer_map(GradCAM, convnext, x, T2, convnext.stages[3]))
    with pytest.raises(NotApplicableError, match="LayerNorm.*after|normalises the pooled"):
        sb.explain(convnext, x, T2, "cam")
    for name in ("maxvit_rmlp_pico_rw_256", "coatnet_nano_rw_224"):
        model = tiny(name, img_size=64)
        for method in ("gradcam", "gradcam_pp", "xgradcam", "layercam"):
            assert sb.explain(model, x, T2, method).shape == (2, 64, 64)
        # the rw variants normalise before pooling: CAM applies exactly, Grad-CAM = ReLU(CAM)/(hw)
        c = cam_mod.cam_maps(model, x, T2)
        close(cam_mod.gradcam_maps(model, x, T2), c.clamp(min=0) / c[0].numel(), 1e-8)


def test_cam_on_swin_is_exact(swin):
    x = x_for(swin)
    c = cam_mod.cam_maps(swin, x, T2)
    assert c.shape == (2, 2, 3) and (c < 0).any()
    with torch.no_grad():
        logits = swin(x)
    b = swin.get_classifier().bias[T2]
    close(c.mean((1, 2)) + b, logits[torch.arange(2), T2], 1e-10)  # logit = mean of the CAM + bias


def test_sign_option(resnet, vit):
    for model in (resnet, vit):
        x = x_for(model) if model is vit else make_images(2, 64)
        signed = cam_mod.gradcam_maps(model, x, T2, sign="signed")
        assert (signed < 0).any()
        close(cam_mod.gradcam_maps(model, x, T2), signed.clamp(min=0), 1e-12)
        close(cam_mod.gradcam_maps(model, x, T2, sign="abs"), signed.abs(), 1e-12)
        close(cam_variants.layercam_maps(model, x, T2, sign="signed").clamp(min=0),
              cam_variants.layercam_maps(model, x, T2), 1e-12)
    assert (sb.explain(resnet, make_images(2, 64), T2, "cam") < 0).any()  # CAM: signed by default, as before
    with pytest.raises(InvalidInputError, match="sign"):
        sb.explain(resnet, make_images(1, 32), 0, "gradcam", sign="negative")


def test_shared_pass_serves_the_cam_family_on_a_vit_and_a_cnn(vit, resnet, monkeypatch):
    calls = []
    real = shared.gradient_pass
    monkeypatch.setattr(shared, "gradient_pass", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    names = ["gradcam", "gradcam_pp", "xgradcam", "layercam", "saliency"]
    for model, x in ((vit, x_for(vit)), (resnet, make_images(2, 64))):
        calls.clear()
        many = sb.explain_many(model, x, T2, names + (["cam"] if model is resnet else []))
        assert len(calls) == 1
        for name in many:
            close(many[name], sb.explain(model, x, T2, name), 1e-10)
    # every method that derives from the one pass repeats the note of how the layer was read
    x = x_for(vit)
    sp = shared.SharedPasses(vit, x, T2, shared.pass_requests({n: {} for n in names[:4]}))
    for name in names[:4]:
        with collect_notes() as notes:
            sb.explain(vit, x, T2, name, shared=sp)
        assert notes == ["layer blocks.2.norm1: tokens [B,13,192] read as map [B,192,3,4] (patch grid 3x4 of "
                         "patch_embed at 48x64, 1 prefix token dropped)"], (name, notes)
    assert sp.passes_computed == 1
    with pytest.raises(NotApplicableError, match="class token"):
        sb.explain_many(vit, x, T2, ["gradcam", "cam"])


# ---- attention methods against the papers' equations ----------------------------------------------------


def manual_forward(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """timm's ViT forward written out, with every block's attention softmax(q k^T * scale) explicit:
    (attentions [B,heads,N,N] that retain their grad, logits)."""
    h = model._pos_embed(model.patch_embed(x))
    h = model.norm_pre(h)
    attns = []
    for blk in model.blocks:
        at = blk.attn
        y = blk.norm1(h)
        b, n, c = y.shape
        qkv = at.qkv(y).reshape(b, n, 3, at.num_heads, at.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = ((q * at.scale) @ k.transpose(-2, -1)).softmax(-1)
        a.retain_grad()
        attns.append(a)
        h = h + blk.ls1(at.proj((a @ v).transpose(1, 2).reshape(b, n, c)))
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return attns, model.forward_head(model.norm(h))


def ref_rollout(attns, t, p, fusion="mean", discard=0.0) -> torch.Tensor:
    """Abnar & Zuidema: per layer A' = 0.5 A + 0.5 I (rows renormalised), A~ = A'_L ... A'_1; row t, patches."""
    out = []
    for b in range(attns[0].shape[0]):
        n = attns[0].shape[-1]
        rollout = torch.eye(n, dtype=torch.float64)
        for a in attns:
            heads = [a[b, i].detach() for i in range(a.shape[1])]
            fused = torch.zeros(n, n, dtype=torch.float64)
            for i in range(n):
                for j in range(n):
                    vals = [hd[i, j] for hd in heads]
                    fused[i, j] = {"mean": sum(vals) / len(vals), "max": max(vals), "min": min(vals)}[fusion]
            if discard:
                order = sorted(range(n * n), key=lambda f: float(fused.flatten()[f]))[: int(n * n * discard)]
                for f in order:
                    if f != t * n + t:
                        fused[f // n, f % n] = 0.0
            step = 0.5 * fused + 0.5 * torch.eye(n, dtype=torch.float64)
            step = step / step.sum(1, keepdim=True)
            rollout = step @ rollout
        out.append(rollout[t, p:])
    return torch.stack(out)


def ref_relevance(attns, t, p) -> torch.Tensor:
    """Chefer et al. ICCV 2021, eqs. 5-6: Abar = E_h[(grad A * A)^+], R = I, R <- R + Abar R; row t, patches."""
    out = []
    for b in range(attns[0].shape[0]):
        n = attns[0].shape[-1]
        rel = torch.eye(n, dtype=torch.float64)
        for a in attns:
            nh = a.shape[1]
            abar = sum((a.grad[b, i] * a[b, i].detach()).clamp(min=0) for i in range(nh)) / nh
            rel = rel + abar @ rel
        out.append(rel[t, p:])
    return torch.stack(out)


def ref_maps(model, rows) -> torch.Tensor:
    return torch.nn.functional.interpolate(rows.reshape(-1, 1, 3, 4), size=(48, 64), mode="bilinear",
                                           align_corners=False)[:, 0]


@pytest.mark.parametrize("name", ["vit", "deit", "vit_reg"])
def test_attention_methods_equal_the_papers_equations(name, request):
    model = request.getfixturevalue(name)
    x = x_for(model)
    p = model.num_prefix_tokens
    with torch.enable_grad():
        attns, logits = manual_forward(model, x.clone().requires_grad_(True))
        with torch.no_grad():
            assert torch.allclose(logits, model(x), rtol=1e-10, atol=1e-12)  # the written-out forward is timm's
        logits[torch.arange(2), T2].sum().backward()
    tokens_to_try = ["cls", "dist"] if name == "deit" else ["cls"]
    for token in tokens_to_try:
        t = 0 if token == "cls" else 1
        close(sb.explain(model, x, T2, "attention_rollout", token=token), ref_maps(model, ref_rollout(attns, t, p)),
              1e-9)
        close(sb.explain(model, x, T2, "transformer_attribution", token=token),
              ref_maps(model, ref_relevance(attns, t, p)), 1e-9)
        raw = torch.stack([attns[-1][b, :, t, p:].detach().mean(0) for b in range(2)])
        close(sb.explain(model, x, T2, "raw_attention", token=token), ref_maps(model, raw), 1e-9)
    for fusion, discard in [("max", 0.0), ("min", 0.0), ("mean", 0.5), ("max", 0.9)]:
        close(sb.explain(model, x, T2, "attention_rollout", head_fusion=fusion, discard_ratio=discard),
              ref_maps(model, ref_rollout(attns, 0, p, fusion, discard)), 1e-9)


def test_attention_capture_keeps_the_models_logits():
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        model = tiny("deit_tiny_distilled_patch16_224", img_size=(48, 64), depth=2, dtype=dtype)
        mods = transformer.attention_modules(model)
        assert all(m.fused_attn for _, m in mods)  # the fused path is what the model normally runs
        x = x_for(model).to(dtype)
        with torch.no_grad():
            plain = model(x)
            attns, logits = transformer.capture_attention(model, x)
        assert torch.allclose(logits, plain, rtol=tol, atol=tol * float(plain.abs().max()))
        assert len(attns) == 2 and attns[0].shape == (2, 3, 14, 14)
        assert torch.allclose(attns[0].sum(-1), torch.ones((), dtype=dtype), atol=1e-5)
        assert all(m.fused_attn for _, m in mods)


def test_attention_methods_not_applicable_without_global_attention(resnet, swin):
    x = make_images(1, 64)
    for method in ("attention_rollout", "transformer_attribution", "raw_attention"):
        with pytest.raises(NotApplicableError, match="has no attention"):
            sb.explain(resnet, x, 0, method)
        with pytest.raises(NotApplicableError, match="windowed"):
            sb.explain(swin, x_for(swin, 1), 0, method)
        assert not sb.get_method(method).check(resnet).applicable
    gap = tiny("vit_tiny_patch16_224", img_size=64, depth=1, class_token=False, global_pool="avg")
    with pytest.raises(NotApplicableError, match="no class token"):
        sb.explain(gap, x, 0, "attention_rollout")
    vit = tiny("vit_tiny_patch16_224", img_size=64, depth=1)
    with pytest.raises(NotApplicableError, match="no distillation token"):
        sb.explain(vit, x, 0, "attention_rollout", token="dist")
    with pytest.raises(InvalidInputError, match="head_fusion"):
        sb.explain(vit, x, 0, "attention_rollout", head_fusion="median")
    with pytest.raises(InvalidInputError, match="discard_ratio"):
        sb.explain(vit, x, 0, "attention_rollout", discard_ratio=1.0)


# ---- the model is left as it was found --------------------------------------------------------------------

METHODS = ["gradcam", "gradcam_pp", "xgradcam", "layercam", "scorecam", "guided_gradcam", "cam", "saliency",
           "attention_rollout", "transformer_attribution", "raw_attention"]


def state(model: nn.Module) -> tuple[dict, list]:
    return snapshot(model), [(type(m).__name__, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]


def check_state(model: nn.Module, before: tuple[dict, list]) -> None:
    after = state(model)
    assert_same_state(before[0], after[0])
    assert before[1] == after[1]


class Injected(RuntimeError):
    pass


@pytest.mark.filterwarnings("ignore::saliencybench.errors.NotGuidedRuleWarning")  # guided rule on GELU: flagged
def test_every_method_leaves_the_model_as_found_also_after_an_exception():
    model = tiny("vit_tiny_patch16_224", img_size=(48, 64), depth=2, embed_dim=48, num_heads=3)
    model.blocks[1].attn.fused_attn = False  # a mixed setting must come back exactly
    model.train()  # and a training model comes back training
    x = x_for(model, 1)
    for method in METHODS:
        before = state(model)
        try:
            sb.explain(model, x, 3, method)
        except NotApplicableError:
            assert method == "cam"
        check_state(model, before)
        for where in (model.blocks[1], model.head):  # inside the attention capture, and after it
            def boom(*_a):
                raise Injected(method)
            handle = where.register_forward_hook(boom)
            before = state(model)
            with pytest.raises(Injected):
                sb.explain(model, x, 3, method)
            check_state(model, before)
            handle.remove()
    assert model.training and model.blocks[1].attn.fused_attn is False and model.blocks[0].attn.fused_attn


# ---- applicability --------------------------------------------------------------------------------------


def test_applicability_matrix_per_family(resnet, vit, deit, swin):
    convnext = tiny("convnext_atto")
    models = {"resnet": resnet, "vit": vit, "deit": deit, "swin": swin, "convnext": convnext}
    before = {k: state(m) for k, m in models.items()}
    table = applicability_matrix(models)
    for k, m in models.items():
        check_state(m, before[k])
    assert list(table.columns) == list(models) and set(table.index) == set(sb.list_methods())
    ok = table == "ok"
    assert ok.loc["cam", "resnet"] and ok.loc["cam", "swin"]
    assert "class token" in table.loc["cam", "vit"] and "distillation" in table.loc["cam", "deit"]
    assert "LayerNorm" in table.loc["cam", "convnext"]
    for method in ("gradcam", "gradcam_pp", "xgradcam", "layercam", "scorecam", "saliency", "occlusion"):
        assert ok.loc[method].all(), table.loc[method]
    for method in ("attention_rollout", "transformer_attribution", "raw_attention"):
        assert list(ok.loc[method]) == [False, True, True, False, False]
        assert "windowed" in table.loc[method, "swin"] and "no attention" in table.loc[method, "resnet"]
    assert "GELU" in table.loc["guided_backprop", "vit"] and ok.loc["guided_backprop", "resnet"]
    small = applicability_matrix({"vit": vit}, ["cam", "gradcam"])
    assert small.shape == (2, 1) and small.loc["gradcam", "vit"] == "ok"
    with pytest.raises(sb.UnknownNameError, match="gradcam"):
        applicability_matrix({"vit": vit}, ["gradcamm"])
