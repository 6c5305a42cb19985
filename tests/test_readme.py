"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


def test_python_api_example_runs(tmp_path, monkeypatch):
    code = _blocks("## Python API")[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    run = namespace["run"]
    assert Path(namespace["run"].report()).is_file()
    assert namespace["heat"].shape == (4, 64, 64) and namespace["auc"].shape == (4,)
    assert set(run.results.metric) >= {"deletion", "pointing_game", "max_box_acc", "energy_pointing_game"}
    assert len(namespace["ids"]) == 8 and namespace["maps"].shape == (8, 64, 64)
    assert {"model", "method", "criterion", "rank", "group"} <= set(namespace["board"].ranking.columns)
    assert (tmp_path / "results").is_dir()


def test_plugin_examples_register_and_work():
    import torch

    import saliencybench as sb

    method, metric = _blocks("## The open core")
    for code in (method, metric):
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102
    heat = sb.explain(torch.nn.Conv2d(3, 2, 1).eval(), torch.rand(2, 3, 8, 8), [0, 1], "brightness", gain=2.0)
    assert heat.shape == (2, 8, 8)
    spec = sb.get_metric("centre_mass")
    assert spec.higher_is_better is False and spec.criterion == "complexity"
    ones = torch.ones(1, 8, 8)
    assert torch.allclose(spec.fn(ones), torch.tensor([0.25]))
