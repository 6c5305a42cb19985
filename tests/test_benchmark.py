"""The benchmark end to end: config, runner with resume, leaderboard, report, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from saliencybench.benchmark.cli import main
from saliencybench.benchmark.config import ConfigError, RunConfig, config_from_dict, load_config
from saliencybench.benchmark.leaderboard import bootstrap_ci, leaderboard, localisation_error, summary
from saliencybench.benchmark.report import write_report
from saliencybench.benchmark.runner import run


def tiny_config(tmp: Path, checkpoint: Path, **kw) -> RunConfig:
    base = dict(models=["resnet10t"], methods=["saliency", "gradcam", "cam", "random", "occlusion"],
                metrics=["deletion", "insertion", "pointing_game", "energy_pointing_game", "box_iou",
                         "sanity_randomization"],
                dataset_params={"size": 64}, image_size=64, n_images=6, batch_size=3, checkpoints={"resnet10t": str(checkpoint)},
                output=str(tmp), method_params={"occlusion": {"window": 16, "stride": 16}},
                metric_params={"deletion": {"n_steps": 4}, "insertion": {"n_steps": 4},
                               "sanity_randomization": {"methods": ["saliency"], "n_images": 2}}, inspect=[])
    base.update(kw)
    return config_from_dict(base)


def test_run_resume_identical_rows(tmp_path, checkpoint):
    cfg = tiny_config(tmp_path, checkpoint)
    full = run(cfg, run_id="full", progress=False).results
    part = run(cfg, run_id="part", progress=False, stop_after=3)
    n_files = len(list((part.path / "rows").glob("*.parquet")))
    total = len(list((tmp_path / "full" / "rows").glob("*.parquet")))
    assert 3 <= n_files < total  # stopped after the unit (explain task + its score tasks) in flight
    resumed = run(cfg, resume=part.path, progress=False).results
    key = ["model", "method", "metric", "image_id", "metric_params", "stage"]
    a = full.drop(columns=["run_id", "seconds"]).sort_values(key).reset_index(drop=True)
    b = resumed.drop(columns=["run_id", "seconds"]).sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) and not b.duplicated(key).any()
    pd.testing.assert_frame_equal(a, b)
    for method in ("saliency", "gradcam", "occlusion"):
        ids_a, maps_a = run(cfg, resume=tmp_path / "full", progress=False).heatmaps("resnet10t", method)
        ids_b, maps_b = run(cfg, resume=part.path, progress=False).heatmaps("resnet10t", method)
        assert ids_a == ids_b and torch.equal(maps_a, maps_b)
    # every row records what produced it
    for col in ("model", "method", "metric", "method_params", "metric_params", "seed", "versions", "dataset"):
        assert col in a and a[col].notna().all()
    assert "torch" in json.loads(a.versions.iloc[0])
    assert {"label", "metric_config", "task", "seconds"} <= set(full.columns)
    cam = a[(a.method == "cam") & (a.metric == "deletion")]
    assert cam.value.notna().all()  # resnet10t is GAP + linear: CAM applies
    occ = a[(a.method == "occlusion") & (a.metric == "top1_correct")]  # the path occlusion took, on its explain rows
    assert len(occ) and occ.note.str.startswith("full forward passes: incremental occlusion is tried from").all()
    with pytest.raises(Exception, match="different config.*seed"):
        run(tiny_config(tmp_path, checkpoint, seed=1), resume=part.path, progress=False)


def test_leaderboard_direction_and_ci_on_hand_made_frame():
    rng = np.random.default_rng(0)
    rows = []
    for method, dele, ins in [("good", 0.1, 0.9), ("bad", 0.6, 0.3), ("random", 0.4, 0.5)]:
        for i in range(30):
            rows += [{"model": "m", "method": method, "metric": "deletion", "value": dele + rng.normal(0, 0.02),
                      "image_id": str(i), "note": ""},
                     {"model": "m", "method": method, "metric": "insertion", "value": ins + rng.normal(0, 0.02),
                      "image_id": str(i), "note": ""}]
    rows += [{"model": "m", "method": "cam", "metric": "deletion", "value": np.nan, "image_id": "0",
              "note": "n/a: CAM needs GAP+FC"}]
    df = pd.DataFrame(rows)
    s = summary(df).set_index(["method", "metric"])
    s["mean"] = s.score
    assert s.loc[("good", "deletion"), "rank"] == 1 and s.loc[("bad", "deletion"), "rank"] == 3
    assert s.loc[("good", "insertion"), "rank"] == 1 and s.loc[("bad", "insertion"), "rank"] == 3
    lo, hi = s.loc[("good", "deletion"), ["ci_low", "ci_high"]]
    assert lo < 0.1 < hi and hi - lo < 0.03
    board = leaderboard(df)
    assert board.index[0] == "good" and board.loc["cam", ("m", "deletion")] == "n/a"
    lo, hi = bootstrap_ci(np.array([1.0, 2.0, 3.0, 4.0]))
    assert 1.0 <= lo < 2.5 < hi <= 4.0


def test_localisation_error_table():
    df = pd.DataFrame({"model": "m", "method": "g", "metric": "box_iou", "value": [0.7, 0.7, 0.2, 0.9],
                       "top1_correct": [True, False, True, False], "top5_correct": [True, True, True, False],
                       "note": ""})
    t = localisation_error(df).iloc[0]
    assert t.top1_loc_error == pytest.approx(0.75) and t.top5_loc_error == pytest.approx(0.5)


def test_report_escapes_and_embeds(tmp_path, checkpoint):
    cfg = tiny_config(tmp_path, checkpoint, methods=["gradcam", "center"],
                      metric_params={"sanity_randomization": {"methods": ["gradcam"], "n_images": 2}},
                      inspect=["filters", "activations", "class-visualisation", "neighbours", "tsne"], n_images=12)
    r = run(cfg, run_id="rep", progress=False)
    # a malicious class name reaching the report must be escaped
    evil = "<script>alert(1)</script>"
    rows_file = next((r.path / "rows").glob("*.parquet"))
    df = pd.read_parquet(rows_file)
    df["class"] = evil
    df["method"] = evil
    df.to_parquet(rows_file, index=False)
    html_text = write_report(r).read_text()
    assert "<script>" not in html_text and "&lt;script&gt;" in html_text
    assert html_text.count("data:image/png;base64,") >= 4
    from html.parser import HTMLParser

    HTMLParser().feed(html_text)
    assert (r.path / "leaderboard.csv").exists() and (r.path / "leaderboard.md").exists()
    assert "Model inspection" in html_text and "trustworthiness" in html_text
    assert len(list((r.path / "plots" / "inspect" / "resnet10t").rglob("*.png"))) >= 3 + 6
    assert "receptive field of layer4" in html_text and "class visualisation score gain" in html_text
    assert list((r.path / "plots").glob("*.svg"))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="metricz"):
        config_from_dict({"metricz": ["deletion"]})
    with pytest.raises(ConfigError, match="n_images"):
        config_from_dict({"n_images": "many"})
    f = tmp_path / "c.yaml"
    f.write_text("models: [resnet10t]\nn_images: 4\n")
    assert load_config(f).n_images == 4
    t = tmp_path / "c.toml"
    t.write_text('methods = ["gradcam"]\n[method_params.rise]\nn_masks = 10\n')
    params = load_config(t).method_params
    assert params["rise"] == {"n_masks": 10} and params["smoothgrad"] == {"n_samples": 16}  # merged key by key


@pytest.mark.parametrize("argv,msg", [
    (["run", "--methods", "gradcamm"], "Did you mean 'gradcam'"),
    (["run", "--metrics", "nope"], "unknown metric"),
    (["run", "--dataset", "imagenet"], "unknown dataset"),
    (["run", "--models", "not-a-model"], "unknown model"),
    (["run", "--dataset", "voc07", "--data-root", "/nonexistent"], "/nonexistent"),
    (["leaderboard", "/nonexistent-run"], "is not a directory"),
])
def test_cli_bad_input_clear_message_no_traceback(argv, msg, capsys, tmp_path):
    code = main([*argv[:1], *(["--output", str(tmp_path)] if argv[0] == "run" else []), *argv[1:]])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and "Traceback" not in err


def test_cli_end_to_end_subprocess(tmp_path, checkpoint):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"models: [resnet10t]\nmethods: [gradcam, edge]\nmetrics: [deletion, insertion, pointing_game, box_iou]\n"
        f"dataset_params: {{size: 64}}\nimage_size: 64\nn_images: 4\nbatch_size: 2\ncheckpoints: {{resnet10t: '{checkpoint}'}}\n"
        f"metric_params: {{deletion: {{n_steps: 4}}, insertion: {{n_steps: 4}}}}\n"
    )
    out = subprocess.run([sys.executable, "-m", "saliencybench", "run", "--config", str(cfg), "--output",
                          str(tmp_path / "res"), "--run-id", "cli"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "report:" in out.stdout and (tmp_path / "res" / "cli" / "report.html").exists()
    again = subprocess.run([sys.executable, "-m", "saliencybench", "leaderboard", str(tmp_path / "res" / "cli")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "gradcam" in again.stdout


def test_corrupt_image_is_skipped_and_recorded(tmp_path, checkpoint):
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    xml = ("<annotation><size><width>64</width><height>64</height><depth>3</depth></size><object><name>{c}</name>"
           "<difficult>0</difficult><bndbox><xmin>11</xmin><ymin>11</ymin><xmax>40</xmax><ymax>40</ymax></bndbox>"
           "</object></annotation>")
    for i, c in enumerate(["circle", "square", "ring"]):
        (root / f"im{i}.xml").write_text(xml.format(c=c))
        if i == 1:
            (root / f"im{i}.jpg").write_bytes(b"not a jpeg at all")
        else:
            Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype("uint8")).save(root / f"im{i}.jpg")
    cfg = tiny_config(tmp_path, checkpoint, dataset="folder",
                      dataset_params={"root": str(root), "classes": ["circle", "square", "ring"]},
                      methods=["gradcam"], metrics=["deletion", "pointing_game"], n_images=3)
    rows = run(cfg, run_id="corrupt", progress=False).results
    skipped = rows[rows.metric == "skipped_image"]
    assert len(skipped) == 1 and "im1.jpg" in skipped.note.iloc[0]
    assert set(rows[rows.metric == "deletion"].image_id) == {"im0-circle", "im2-ring"}


def test_process_executor_gives_the_same_rows(tmp_path, checkpoint):
    from saliencybench.benchmark.runner import ProcessExecutor

    torch.manual_seed(1)
    other = tmp_path / "resnet14t.safetensors"
    save_file(timm.create_model("resnet14t", num_classes=6).state_dict(), str(other))
    cfg = tiny_config(tmp_path, checkpoint, methods=["saliency", "gradcam", "occlusion"],
                      metrics=["deletion", "pointing_game", "model_contrast"], n_images=4, batch_size=2,
                      models=["resnet10t", "resnet14t"], pairs=[["resnet10t", "resnet14t"]],
                      checkpoints={"resnet10t": str(checkpoint), "resnet14t": str(other)})
    here = run(cfg, run_id="here", progress=False).results
    executor = ProcessExecutor(workers=2)
    there = run(cfg, run_id="there", progress=False, executor=executor).results
    key = ["model", "method", "metric", "image_id", "partner"]
    from conftest import assert_same_rows

    assert_same_rows(here, there, tuple(key), rtol=1e-4)
    assert len(there[there.metric == "model_contrast"]) == 3 * 4
    # one pool for the units and the pair units that follow them, stopped at the end of the run
    assert executor.pools_started == 1 and executor._pool is None
