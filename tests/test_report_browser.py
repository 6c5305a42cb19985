"""The HTML report rendered in a real browser (headless Chromium, installed by .ci/run)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from saliencybench.benchmark.config import config_from_dict
from saliencybench.benchmark.report import write_report
from saliencybench.benchmark.runner import run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--allow-file-access-from-files", "--virtual-time-budget=5000"]

PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const vw = document.documentElement.clientWidth, vh = window.innerHeight;
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const shown = imgs.filter(i => { const r = i.getBoundingClientRect();
    return r.width > 50 && r.height > 30 && r.left >= 0 && r.right <= vw + 1; }).length;
  const rows = document.querySelectorAll('table tr').length;
  const top = id => Math.round(document.getElementById(id).getBoundingClientRect().top / vh * 100);
  const table = document.querySelector('#ranking table').getBoundingClientRect();
  const wide = [...document.querySelectorAll('table')].filter(t => t.closest('.box') &&
    t.closest('.box').getBoundingClientRect().right > vw + 1).length;
  document.title = `rendered imgs=${ok}/${imgs.length} shown=${shown} rows=${rows} summary=${top('summary')} ` +
    `ranking=${Math.round(table.top / vh * 100)} overflow=${wide}`;
});</script></body>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    ckpt = tmp / "m.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=6).state_dict(), str(ckpt))
    ckpt2 = tmp / "m2.safetensors"
    save_file(timm.create_model("resnet14t", num_classes=6).state_dict(), str(ckpt2))
    cfg = config_from_dict(dict(
        models=["resnet10t", "resnet14t"], methods=["gradcam", "saliency", "center", "random", "edge"],
        metrics=["deletion", "insertion", "pointing_game", "box_iou"], dataset_params={"size": 64}, image_size=64, n_images=4,
        batch_size=4, checkpoints={"resnet10t": str(ckpt), "resnet14t": str(ckpt2)}, output=str(tmp), inspect=[],
        metric_params={"deletion": {"n_steps": 4}, "insertion": {"n_steps": 4}}))
    return write_report(run(cfg, run_id="browser", progress=False))


def test_report_renders_in_chromium(report, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs the Debian packages chromium and chromium-driver")
        pytest.skip("chromium not installed here (CI installs it)")
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("</body>", PROBE))
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--window-size=1200,1600", "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"rendered imgs=(\d+)/(\d+) shown=(\d+) rows=(\d+) summary=(\d+) ranking=(\d+) overflow=(\d+)", dom)
    assert m, dom[:500]
    ok, total, shown, rows, summary, ranking, overflow = map(int, m.groups())
    assert total >= 4 and ok == total, "every embedded figure decoded in the browser"
    assert shown == total, "every figure is displayed at a readable size, inside the page's width"
    assert rows >= 5, "the leaderboard and tables rendered rows"
    assert summary < 50, "the summary is in the top half of the first screen"
    assert ranking < 100, "the ranking table starts on the first screen"
    assert overflow == 0, "no table box reaches past the page: wide tables scroll inside their box"
    page = report.read_text()
    assert "ranks first overall" in page or "the best method is" in page
    shot = tmp_path / "shot.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot shows content, not a blank page"
