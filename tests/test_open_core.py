"""The open core: registry-driven runner, heatmap store, `score`, plug-ins, the peers' methods by name."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

import saliencybench as sb
from saliencybench.benchmark.config import config_from_dict
from saliencybench.benchmark.runner import open_run, run
from saliencybench.benchmark.store import HeatmapStore, quantise

from conftest import make_images, make_model

PLUGIN_METHOD = '''
import torch
import saliencybench as sb
from pathlib import Path

CALLS = Path(__file__).with_suffix(".calls")

@sb.register_method("brightness", paper="Plug-in test: the image's brightness", family="plugin", needs_grad=False)
def brightness(model, images, targets, *, gain: float = 1.0):
    """Mean over channels of the input, times gain."""
    with CALLS.open("a") as f:
        f.write("x")
    return images.mean(1) * gain
'''

PLUGIN_METRIC = '''
import torch
import saliencybench as sb

@sb.register_metric("centre_mass", paper="Plug-in test: share of |map| in the central quarter", inputs="heatmaps",
                    higher_is_better=False, criterion="complexity", heatmap="abs")
def centre_mass(heatmaps, *, margin: float = 0.25):
    """Share of the map's absolute mass in the central box (lower is better here, to test the direction)."""
    h, w = heatmaps.shape[-2:]
    t, l = int(h * margin), int(w * margin)
    inner = heatmaps[:, t:h - t, l:w - l].sum((1, 2))
    return inner / heatmaps.sum((1, 2)).clamp(min=1e-12)
'''


def small(tmp: Path, checkpoint: Path, **kw):
    base = dict(models=["resnet10t"], methods=["saliency", "gradcam", "random"], metrics=["deletion", "pointing_game"],
                dataset_params={"size": 48}, image_size=48, n_images=4, batch_size=2,
                checkpoints={"resnet10t": str(checkpoint)}, output=str(tmp), inspect=[],
                metric_params={"deletion": {"n_steps": 4}})
    base.update(kw)
    return config_from_dict(base)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in df.columns if c not in ("run_id", "seconds", "task")]
    return df[keep].sort_values(["model", "method", "metric", "image_id"]).reset_index(drop=True)


def test_store_round_trip_and_precision(tmp_path):
    store = HeatmapStore(tmp_path)
    maps = torch.randn(3, 8, 8) * 1e-7  # tiny gradients must keep their relative precision
    other = torch.rand(5, 6) + 3.0      # a second shape in the same file
    store.write("k", ["a", "b", "c", "d"], [*maps, other], "float16", {"model": "m", "method": "x"})
    ids, back, meta = store.read("k")
    assert ids == ["a", "b", "c", "d"] and meta["model"] == "m"
    for m, b in zip([*maps, other], back):
        assert b.shape == m.shape
        assert (b - m).abs().max() <= 1e-3 * m.abs().max()
        assert torch.equal(b, quantise(m[None], "float16")[0])
    store.write("u", ["a"], maps[:1], "uint8")
    (u,), = [store.read("u")[1]]
    span = maps[0].max() - maps[0].min()
    assert (u - maps[0]).abs().max() <= span / 255 * 0.51
    store.write("f", ["a"], maps[:1], "float32")
    assert torch.equal(store.read("f")[1][0], maps[0])
    (tmp_path / "heatmaps" / "k.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(sb.SaliencyBenchError, match="cannot be read"):
        store.read("k")


def test_stored_heatmaps_equal_explain_and_score_adds_identical_rows(tmp_path, checkpoint):
    cfg = small(tmp_path, checkpoint)
    full = run(small(tmp_path, checkpoint, metrics=["deletion", "pointing_game", "energy_pointing_game"]),
               run_id="full", progress=False)
    base = run(cfg, run_id="base", progress=False)
    # the stored maps equal sb.explain on the same inputs to float16 precision
    from saliencybench.benchmark.execute import TaskContext

    ctx = TaskContext(cfg, "base", base.path)
    groups, _ = ctx.prepare("resnet10t", (0, 1))
    ids, maps = base.heatmaps("resnet10t", "gradcam")
    direct = sb.explain(ctx.model("resnet10t").model, groups[0].x, groups[0].labels, "gradcam")
    assert ids[:2] == [s.image_id for s in groups[0].samples]
    assert (maps[:2] - direct).abs().max() <= 1e-3 * direct.abs().max()
    # score a new metric from the store: identical rows to computing it in the run, no method called
    base.score(["energy_pointing_game"], progress=False)
    a = _sorted(full.results[full.results.metric == "energy_pointing_game"])
    b = _sorted(base.results[base.results.metric == "energy_pointing_game"])
    pd.testing.assert_frame_equal(a.drop(columns=["method_params"]), b.drop(columns=["method_params"]))
    assert "energy_pointing_game" in set(base.leaderboard().columns.get_level_values(1))
    meta = json.loads((base.path / "config.json").read_text())
    assert meta["scored"][0]["metrics"] == ["energy_pointing_game"]


def test_score_with_new_params_is_a_variant_and_resumes_without_duplicates(tmp_path, checkpoint):
    r = run(small(tmp_path, checkpoint), run_id="v", progress=False)
    r.score(["pointing_game"], metric_params={"pointing_game": {"tolerance": 0.0}}, progress=False, stop_after=1)
    r.score(["pointing_game"], metric_params={"pointing_game": {"tolerance": 0.0}}, progress=False)
    rows = r.results
    pg = rows[rows.metric == "pointing_game"]
    assert len(pg) == 2 * 3 * 4 and not pg.duplicated(["method", "image_id", "metric_config"]).any()
    cols = set(r.leaderboard().columns.get_level_values(1))
    assert "pointing_game" in cols and "pointing_game[tolerance=0.0]" in cols
    meta = json.loads((r.path / "config.json").read_text())
    assert len(meta["scored"]) == 1  # the resumed score is not recorded twice


def test_score_refuses_without_stored_heatmaps(tmp_path, checkpoint):
    r = run(small(tmp_path, checkpoint, store_heatmaps=False), run_id="nostore", progress=False)
    assert not (r.path / "heatmaps").exists()
    with pytest.raises(sb.SaliencyBenchError, match="no stored heatmaps"):
        r.score(["energy_pointing_game"], progress=False)


def test_plugins_end_to_end_through_the_cli(tmp_path, checkpoint):
    meth, metr = tmp_path / "my_method.py", tmp_path / "my_metric.py"
    meth.write_text(PLUGIN_METHOD)
    metr.write_text(PLUGIN_METRIC)
    out = tmp_path / "res"
    args = [sys.executable, "-m", "saliencybench", "run", "--plugin", str(meth), "--plugin", str(metr),
            "--models", "resnet10t", "--checkpoint", f"resnet10t={checkpoint}", "--methods", "brightness", "center",
            "edge", "--metrics", "centre_mass", "pointing_game", "--n-images", "4", "--batch-size", "2",
            "--image-size", "48", "--output", str(out), "--run-id", "plug", "--no-report", "--quiet"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    r = open_run(out / "plug")
    s = pd.read_csv(out / "plug" / "summary.csv")
    cm = s[s.metric == "centre_mass"].set_index("method")
    # lower is better: the centre prior puts the most mass in the centre, so it ranks last
    assert cm.loc["center", "rank"] == cm["rank"].max()
    assert cm.loc["center", "score"] == cm.score.max()
    calls = (tmp_path / "my_method.calls").read_text()
    assert len(calls) == 2  # two shards
    # score on the finished run calls no method
    res = subprocess.run([sys.executable, "-m", "saliencybench", "score", str(out / "plug"), "--metrics",
                          "energy_pointing_game", "--no-report", "--quiet"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "my_method.calls").read_text() == calls
    assert "energy_pointing_game" in set(r.results.metric)
    bad = tmp_path / "broken.py"
    bad.write_text("import nonexistent_module_xyz\n")
    res = subprocess.run([*args[:4], "--plugin", str(bad), *args[8:], "--run-id", "broken"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "broken.py" in res.stderr and "ModuleNotFoundError" in res.stderr
    assert "Traceback" not in res.stderr


def _no_scale(monkeypatch):
    """pytorch-grad-cam's own forward with its [0,1] scaling replaced by a torch bilinear resize."""
    import pytorch_grad_cam.base_cam as bc

    def scale(cam, target_size=None):
        cam = torch.as_tensor(np.asarray(cam, dtype=np.float64))
        if target_size is None:
            return cam.numpy()
        return torch.nn.functional.interpolate(cam[:, None], size=(target_size[1], target_size[0]), mode="bilinear",
                                               align_corners=False)[:, 0].numpy()

    monkeypatch.setattr(bc, "scale_cam_image", scale)


@pytest.mark.parametrize("cls", ["GradCAM", "HiResCAM", "XGradCAM", "LayerCAM", "EigenCAM", "GradCAMPlusPlus"])
def test_gradcam_wrappers_equal_the_peer(cls, monkeypatch):
    import pytorch_grad_cam as pg
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x, t = make_model("resnet10t"), make_images(2, 32), torch.tensor([3, 7])
    ours = sb.explain(model, x, t, f"gradcam:{cls}")
    _no_scale(monkeypatch)
    with getattr(pg, cls)(model=model, target_layers=[model.layer4]) as cam:
        ref = torch.as_tensor(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(i)) for i in t]))
    assert torch.allclose(ours.double(), ref.double().clamp(min=0), rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("cls,params", [
    ("InputXGradient", {}), ("Deconvolution", {}), ("DeepLift", {}), ("IntegratedGradients", {"attribute": {"n_steps": 8}}),
    ("FeatureAblation", {"feature_grid": 8}), ("LayerGradCam", {}),
])
def test_captum_wrappers_equal_the_peer(cls, params):
    import captum.attr as ca

    model, x, t = make_model("resnet10t"), make_images(2, 32), torch.tensor([3, 7])
    ours = sb.explain(model, x, t, f"captum:{cls}", **params)
    klass = getattr(ca, cls)
    if cls == "LayerGradCam":
        ref = klass(model, model.layer4).attribute(x, target=t)
        ref = torch.nn.functional.interpolate(ref, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    else:
        kw = dict(params.get("attribute", {}))
        if cls in ("DeepLift", "IntegratedGradients"):
            kw["baselines"] = torch.zeros_like(x[:1])
        if cls == "FeatureAblation":
            r, c = torch.arange(32) // 8, torch.arange(32) // 8
            kw["feature_mask"] = (r[:, None] * 4 + c[None, :])[None, None]
        ref = klass(model).attribute(x.clone().requires_grad_(True), target=t, **kw).detach().abs().amax(1)
    assert torch.allclose(ours.double(), ref.double(), rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_peer_names_fail_clearly():
    with pytest.raises(sb.UnknownNameError, match="Did you mean 'DeepLift'"):
        sb.get_method("captum:DeepLyft")
    with pytest.raises(sb.InvalidInputError, match=re.escape("'bogus'")):
        sb.get_method("captum:DeepLift").resolve_params({"init": {"bogus": 1}})
    with pytest.raises(sb.UnknownNameError):
        sb.get_method("gradcam:NoSuchCAM")


def test_peer_missing_package_names_the_extra(monkeypatch):
    import saliencybench.methods.peers as peers

    monkeypatch.setitem(sys.modules, "captum", None)
    with pytest.raises(sb.SaliencyBenchError, match=re.escape("saliencybench[captum]")):
        peers._import("captum")


def test_no_benchmark_module_names_a_metric_or_method():
    """The runner, leaderboard, plots and report iterate the registries; only the default config names names."""
    root = Path(sb.__file__).parent / "benchmark"
    names = set(sb.list_methods()) | set(sb.list_metrics())
    names -= {"random", "center", "edge", "complexity"}  # also ordinary words
    for path in root.glob("*.py"):
        if path.name in ("config.py", "plan.py", "roar.py"):  # default configs: the run's, the plan's, ROAR's methods
            continue
        text = path.read_text()
        for name in names:
            assert not re.search(rf"[\"']{re.escape(name)}[\"']", text), f"{path.name} names {name!r}"


def test_parts_and_pair_metrics(tmp_path):
    """A part with another data set and per-model data-set parameters, and the model contrast of a pair;
    parts never enter the main ranking."""
    torch.manual_seed(0)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=6).state_dict(), str(a))
    save_file(timm.create_model("resnet14t", num_classes=4).state_dict(), str(b))
    save_file(timm.create_model("resnet10t", num_classes=6).state_dict(), str(tmp_path / "c.safetensors"))
    cfg = config_from_dict(dict(
        models=["resnet10t"], methods=["edge", "saliency"], metrics=["pointing_game"], n_images=4, batch_size=2,
        image_size=48, dataset_params={"size": 48}, output=str(tmp_path), inspect=[],
        checkpoints={"resnet10t": str(tmp_path / "c.safetensors")},
        parts={"contrast": {"dataset": "synthetic-contrast", "dataset_params": {"size": 48},
                            "models": ["resnet10t", "resnet14t"], "checkpoints": {"resnet10t": str(a), "resnet14t": str(b)},
                            "model_dataset_params": {"resnet14t": {"label": "background"}},
                            "pairs": [["resnet10t", "resnet14t"]], "metrics": ["model_contrast"],
                            "metric_params": {"model_contrast": {"correct_only": False}}}}))
    r = run(cfg, run_id="parts", progress=False)
    rows = r.results
    mc = rows[rows.metric == "model_contrast"]
    assert set(mc.partner) == {"resnet14t"} and len(mc) == 2 * 4
    assert (mc[mc.method == "edge"].value.abs() < 1e-6).all()  # the same map for both models: contrast 0
    assert mc[mc.method == "saliency"].value.notna().all()
    labels = rows[(rows.part == "contrast") & (rows.metric == "top1_correct")].groupby("model").label.max()
    assert labels["resnet14t"] <= 3 and labels["resnet10t"] <= 5  # the background model sees background labels
    board = r.board()
    assert set(board.metrics.model) == {"resnet10t"} and "model_contrast" not in set(board.metrics.metric)
    assert any("model contrast" in k for k in board.model_use)
    bad = dict(cfg.to_dict(), parts={"x": {"metrics": ["model_contrast"], "models": ["resnet10t"]}})
    with pytest.raises(sb.SaliencyBenchError, match="pairs"):
        run(config_from_dict({k: v for k, v in bad.items()}), run_id="bad", progress=False)


def test_score_heatmaps_made_elsewhere(tmp_path, checkpoint):
    """A .npz of heatmaps from any tool, scored on a data set and model beside built-in methods; clear errors."""
    from saliencybench.benchmark.scoring import read_heatmaps_file, score_heatmaps

    cfg = small(tmp_path, checkpoint, n_images=4)
    ref = run(cfg, run_id="ref", progress=False)
    ids, maps = ref.heatmaps("resnet10t", "gradcam")
    f = tmp_path / "mine.npz"
    np.savez(f, image_ids=np.array(ids), heatmaps=maps.numpy())
    out = subprocess.run([sys.executable, "-m", "saliencybench", "score", "--heatmaps", str(f), "--dataset",
                          "synthetic", "--model", "resnet10t", "--checkpoint", f"resnet10t={checkpoint}",
                          "--method-name", "my_gradcam", "--methods", "gradcam", "--metrics", "deletion,pointing_game",
                          "--n-images", "4", "--output", str(tmp_path), "--run-id", "imp", "--no-report", "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr  # 48 px maps on the CLI's 64 px default images: resized, with a note
    cli_rows = open_run(tmp_path / "imp").results
    assert set(cli_rows.method) == {"my_gradcam", "gradcam"}
    assert cli_rows[cli_rows.method == "my_gradcam"].note.str.contains("resized bilinearly").any()
    # with the same settings as the reference run, the imported maps score exactly as the method itself
    imp = score_heatmaps(f, dataset="synthetic", model="resnet10t", method_name="my_gradcam", methods=["gradcam"],
                         metrics=["deletion", "pointing_game"], config=cfg, run_id="imp2", progress=False)
    rows = imp.results
    a = rows[(rows.method == "my_gradcam") & (rows.metric == "pointing_game")].set_index("image_id").value
    b = rows[(rows.method == "gradcam") & (rows.metric == "pointing_game")].set_index("image_id").value
    assert len(a) == 4 and a.sort_index().tolist() == b.sort_index().tolist()  # the same maps, the same scores
    notes = rows[(rows.method == "my_gradcam") & (rows.metric == "top1_correct")].note
    assert notes.str.contains("imported heatmaps").all()
    bad = tmp_path / "bad.npz"
    np.savez(bad, image_ids=np.array(ids[:2]), heatmaps=maps.numpy()[:2])
    with pytest.raises(sb.SaliencyBenchError, match="no maps for image ids"):
        score_heatmaps(bad, dataset="synthetic", model="resnet10t", method_name="my2", metrics=["pointing_game"],
                       config=cfg, run_id="bad", progress=False)
    nan = tmp_path / "nan.npz"
    m = maps.numpy().copy()
    m[1, 0, 0] = np.nan
    np.savez(nan, image_ids=np.array(ids), heatmaps=m)
    with pytest.raises(sb.SaliencyBenchError, match="NaN"):
        read_heatmaps_file(nan)
    shape = tmp_path / "shape.npz"
    np.savez(shape, image_ids=np.array(ids), heatmaps=maps.numpy()[:, 0])
    with pytest.raises(sb.SaliencyBenchError, match=r"\[N,H,W\]"):
        read_heatmaps_file(shape)
    with pytest.raises(sb.SaliencyBenchError, match="registered method"):
        score_heatmaps(f, dataset="synthetic", model="resnet10t", method_name="gradcam", config=cfg, progress=False)
    with pytest.raises(sb.SaliencyBenchError, match="call the method"):
        score_heatmaps(f, dataset="synthetic", model="resnet10t", method_name="my3", metrics=["random_logit"],
                       config=cfg, progress=False)
