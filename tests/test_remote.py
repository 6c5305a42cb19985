"""Runs whose output is an fsspec URL (here ``file://``, the same code path as s3:// or gs://):
the shared copy holds every file, a second machine (another local copy) opens, scores and
resumes the run from the URL alone, and bad URLs get clear errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from saliencybench.benchmark.cli import main
from saliencybench.benchmark.config import config_from_dict
from saliencybench.benchmark.remote import Remote, RemoteStorageError, mirror_dir, remote_for
from saliencybench.benchmark.runner import open_run, run
from saliencybench.errors import SaliencyBenchError

KEY = ("model", "method", "metric", "image_id", "metric_params", "stage")


def config(output: str, checkpoint: Path, **kw):
    base = dict(models=["resnet10t"], methods=["saliency", "gradcam"], metrics=["deletion", "pointing_game"],
                dataset_params={"size": 64}, image_size=64, n_images=4, batch_size=2, device="cpu", inspect=[],
                checkpoints={"resnet10t": str(checkpoint)}, metric_params={"deletion": {"n_steps": 4}})
    return config_from_dict({**base, **kw, "output": output})


def machine(monkeypatch, tmp_path: Path, name: str) -> Path:
    """Act as another machine: its own cache, so its own copy of every run URL."""
    root = tmp_path / name
    monkeypatch.setenv("SALIENCYBENCH_CACHE", str(root))
    return root


def same_rows(a, b, rtol: float = 1e-5) -> None:
    from conftest import assert_same_rows

    assert_same_rows(a, b, KEY, rtol=rtol)


def test_a_url_run_shares_every_file_and_opens_elsewhere(tmp_path, checkpoint, monkeypatch, capsys):
    here = run(config(str(tmp_path / "local"), checkpoint), run_id="r", progress=False).results
    url = f"file://{tmp_path}/shared"
    first = machine(monkeypatch, tmp_path, "first")
    r = run(config(url, checkpoint), run_id="r", progress=False, report=True)
    assert r.path == mirror_dir(f"{url}/r") and r.path.is_relative_to(first)
    same_rows(here, r.results)
    shared = tmp_path / "shared" / "r"
    for name in ("config.json", "models.json", "leaderboard.csv", "ranking.csv", "report.html",
                 "plots/bar_deletion.png"):
        assert (shared / name).is_file(), name
    local_rows = {p.name for p in (r.path / "rows").glob("*.parquet")}
    assert {p.name for p in (shared / "rows").glob("*.parquet")} == local_rows and len(local_rows) == 12
    assert len(list((shared / "heatmaps").glob("*.safetensors"))) == 4  # 2 shards x 2 methods
    assert not list(shared.rglob(".*.tmp"))  # every upload renamed into place

    machine(monkeypatch, tmp_path, "second")
    there = open_run(f"{url}/r")
    assert there.path != r.path and not (there.path / "heatmaps").exists()  # rows only, not the heatmaps
    same_rows(here, there.results)
    ids, maps = there.heatmaps("resnet10t", "gradcam")
    ids0, maps0 = r.heatmaps("resnet10t", "gradcam")
    assert ids == ids0 and torch.equal(maps, maps0)
    assert len(list((there.path / "heatmaps").glob("*.safetensors"))) == 2  # only gradcam's, found by header
    assert main(["leaderboard", f"{url}/r"]) == 0
    assert "gradcam" in capsys.readouterr().out
    # scoring more metrics from this machine: maps fetched from the URL, new rows and the record uploaded
    assert main(["score", f"{url}/r", "--metrics", "sparseness", "--no-report", "--quiet"]) == 0
    assert len(list((shared / "rows").glob("*.parquet"))) == 12 + 4
    assert "sparseness" in (shared / "config.json").read_text()
    machine(monkeypatch, tmp_path, "third")
    third = open_run(f"{url}/r")
    assert set(third.results.metric) >= {"sparseness", "deletion"}
    # a report from a machine without the heatmaps: its gallery fetches the first shard of each method only,
    # and the run's config on the URL (changed meanwhile by another machine) is not overwritten
    (shared / "config.json").write_text((shared / "config.json").read_text().replace('"scored"', '"scored_x"', 1))
    newer = (shared / "config.json").read_bytes()
    third.config.gallery_images = 2
    page = third.report().read_text()
    assert "id='gallery'" in page and (shared / "plots" / "gallery_resnet10t.png").is_file()
    assert len(list((third.path / "heatmaps").glob("*.safetensors"))) == 2  # 1 shard x 2 methods
    assert (shared / "config.json").read_bytes() == newer


def test_a_url_run_resumes_on_another_machine(tmp_path, checkpoint, monkeypatch):
    cfg_local = config(str(tmp_path / "local"), checkpoint, metrics=["deletion", "pointing_game", "model_contrast"],
                       models=["resnet10t", "resnet14t"], pairs=[["resnet10t", "resnet14t"]],
                       checkpoints={"resnet10t": str(checkpoint), "resnet14t": str(tmp_path / "b.safetensors")})
    torch.manual_seed(1)
    save_file(timm.create_model("resnet14t", num_classes=6).state_dict(), str(tmp_path / "b.safetensors"))
    full = run(cfg_local, run_id="full", progress=False).results
    url = f"file://{tmp_path}/shared"
    cfg = config_from_dict({**cfg_local.to_dict(), "output": url})
    machine(monkeypatch, tmp_path, "first")
    part = run(cfg, run_id="p", progress=False, stop_after=5)
    done_first = {p.name for p in (tmp_path / "shared" / "p" / "rows").glob("*.parquet")}
    assert 5 <= len(done_first) < 24
    machine(monkeypatch, tmp_path, "second")  # the first machine's copy is never read again
    shutil.rmtree(part.path)
    from saliencybench.benchmark.executors import ProcessExecutor

    resumed = run(cfg, resume=f"{url}/p", progress=False, executor=ProcessExecutor(workers=2))  # they upload too
    same_rows(full, resumed.results, rtol=1e-4)  # worker processes run one torch thread
    assert len(resumed.results[resumed.results.metric == "model_contrast"]) == 2 * 4
    # the tasks the first machine finished were not redone: their row files are the same files
    assert {p.name for p in (tmp_path / "shared" / "p" / "rows").glob("*.parquet")} >= done_first
    with pytest.raises(Exception, match="already exists"):
        run(cfg, run_id="p", progress=False)


def test_bad_urls_are_named(tmp_path, checkpoint, capsys):
    with pytest.raises(RemoteStorageError, match="nosuchfs"):
        Remote("nosuchfs://bucket/run")
    assert main(["run", "--output", "nosuchfs://bucket/x", "--models", "resnet10t", "--n-images", "2",
                 "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "nosuchfs" in err and "Traceback" not in err
    with pytest.raises(Exception, match="not a saliencybench run"):
        open_run(f"file://{tmp_path}/nothing-here")
    remote = remote_for(f"file://{tmp_path}/shared/x")
    (tmp_path / "shared" / "x" / "rows").mkdir(parents=True)
    (tmp_path / "shared" / "x" / "rows" / ".a.parquet.123.tmp").write_bytes(b"partial")
    assert remote.names("rows") == set()  # an upload in progress is not a finished task


def test_a_run_on_an_object_store_file_system(tmp_path, checkpoint, monkeypatch):
    """fsspec's in-memory file system: no directories, no POSIX rename; the same files and rows."""
    here = run(config(str(tmp_path / "local"), checkpoint), run_id="m", progress=False).results
    url = "memory://saliencybench-test/out"
    machine(monkeypatch, tmp_path, "first")
    run(config(url, checkpoint), run_id="m", progress=False)
    remote = remote_for(f"{url}/m")
    assert len(remote.names("rows")) == 12 and len(remote.names("heatmaps")) == 4
    machine(monkeypatch, tmp_path, "second")
    same_rows(here, open_run(f"{url}/m").results)
    remote.fs.rm(remote.root, recursive=True)


def test_a_failed_upload_is_retried_on_resume(tmp_path, checkpoint, monkeypatch):
    """The third upload fails: the run stops with a clear error, the file stays in the local copy, and
    the resumed run uploads it before anything else (no task recomputed, none missing on the URL)."""
    url = f"file://{tmp_path}/shared"
    machine(monkeypatch, tmp_path, "first")
    cfg = config(url, checkpoint)
    calls, put = [], Remote.put

    def flaky(self, local, rel):
        calls.append(rel)
        if len(calls) == 3:
            raise RemoteStorageError(f"simulated network failure uploading {rel}")
        return put(self, local, rel)

    monkeypatch.setattr(Remote, "put", flaky)
    with pytest.raises(RemoteStorageError, match="simulated"):
        run(cfg, run_id="f", progress=False)
    lost = calls[2]
    shared = tmp_path / "shared" / "f"
    assert not (shared / lost).exists() and (mirror_dir(f"{url}/f") / lost).is_file()
    monkeypatch.setattr(Remote, "put", put)
    resumed = run(cfg, resume=f"{url}/f", progress=False)
    assert (shared / lost).is_file()
    assert {p.name for p in (shared / "rows").glob("*.parquet")} == {p.name for p in (resumed.path / "rows").glob(
        "*.parquet")} and len(list((shared / "rows").glob("*.parquet"))) == 12
    same_rows(run(config(str(tmp_path / "local"), checkpoint), run_id="f", progress=False).results,
              open_run(f"{url}/f").results)


def test_a_copy_of_an_earlier_run_of_that_name_is_not_trusted(tmp_path, checkpoint, monkeypatch):
    """Machine A keeps a copy of run x; x is deleted from the URL and started anew (other weights) on
    machine B; A resuming x works on the new run: its old rows and maps are dropped, not uploaded."""
    url = f"file://{tmp_path}/shared"
    machine(monkeypatch, tmp_path, "a")
    run(config(url, checkpoint), run_id="x", progress=False)
    shutil.rmtree(tmp_path / "shared" / "x")
    torch.manual_seed(7)
    other = tmp_path / "other.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=6).state_dict(), str(other))
    machine(monkeypatch, tmp_path, "b")
    run(config(url, other), run_id="x", progress=False, stop_after=3)
    machine(monkeypatch, tmp_path, "a")
    resumed = run(config(url, other), resume=f"{url}/x", progress=False)
    same_rows(run(config(str(tmp_path / "local"), other), run_id="x", progress=False).results, resumed.results)
    same_rows(resumed.results, open_run(f"{url}/x").results)


def test_a_moved_run_resumes_where_it_is_now(tmp_path, checkpoint, monkeypatch):
    """A run copied to another URL (or a local run copied into a bucket) and resumed there writes there."""
    machine(monkeypatch, tmp_path, "a")
    local = run(config(str(tmp_path / "local"), checkpoint), run_id="y", progress=False, stop_after=3)
    shutil.copytree(local.path, tmp_path / "bucket" / "y")
    shutil.copytree(local.path, tmp_path / "moved" / "y")
    for where in ("bucket", "moved"):
        url = f"file://{tmp_path}/{where}/y"
        assert open_run(url).remote.url == url
        if where == "bucket":
            resumed = run(config(url.rpartition("/")[0], checkpoint), resume=url, progress=False).results
        else:  # from the command line
            assert main(["run", "--resume", url, "--quiet", "--no-report"]) == 0
            resumed = open_run(mirror_dir(url)).results
        assert len(list((tmp_path / where / "y" / "rows").glob("*.parquet"))) == 12
        same_rows(resumed, open_run(url).results)
    assert len(list((local.path / "rows").glob("*.parquet"))) < 12  # the original was left alone


def test_a_worker_uploads_what_a_failed_upload_left_in_its_copy(tmp_path, checkpoint, monkeypatch):
    """A worker node whose upload failed has the task's rows in its own copy only: on the next call it
    uploads them (maps first) rather than skipping the task for ever or computing it again."""
    from conftest import torch_threads_kept

    from saliencybench.benchmark.ray_executor import UnitWorker
    from saliencybench.benchmark.tasks import plan_units

    url = f"file://{tmp_path}/shared"
    machine(monkeypatch, tmp_path, "node")
    done = run(config(url, checkpoint), run_id="w", progress=False)
    unit = plan_units(done.config, 4)[0]
    shared = tmp_path / "shared" / "w"
    lost = [shared / "heatmaps" / f"{unit.explain.key}.safetensors",
            *(shared / "rows" / f"{t.key}.parquet" for t in unit.tasks())]
    for f in lost:
        f.unlink()  # as if the node's uploads had failed
    with torch_threads_kept():
        worker = UnitWorker((done.config.to_dict(), "w", str(done.path)), 1, 0.0)
        reports = worker.run(unit, [], (done.config.to_dict(), "w", str(done.path)))
    assert {r.key for r in reports} == {t.key for t in unit.tasks()} and all(r.rows == 0 for r in reports)
    assert all(f.is_file() for f in lost)  # uploaded (and reported, for the driver to fetch), not recomputed

    # The run is deleted and started anew under that name: a worker serving it empties its copy first
    # (the setup names the run's instance), and computes the tasks again
    shutil.rmtree(shared)
    from saliencybench.benchmark.remote import run_instance

    machine(monkeypatch, tmp_path, "driver")
    again = run(config(url, checkpoint), run_id="w", progress=False, stop_after=1)
    setup = (again.config.to_dict(), "w", str(again.path), run_instance(again.path / "config.json"))
    for f in lost[1:]:
        f.unlink(missing_ok=True)
    machine(monkeypatch, tmp_path, "node")
    with torch_threads_kept():
        reports = worker.run(unit, [], setup)
    assert {r.key for r in reports} == {t.key for t in unit.tasks()} and all(r.rows > 0 for r in reports)
    stale = (*setup[:3], "an-earlier-instance")  # a driver still working on the run that was replaced
    with torch_threads_kept(), pytest.raises(SaliencyBenchError, match="replaced"):
        UnitWorker(stale, 1, 0.0).run(unit, [], stale)


def test_a_driver_whose_run_was_replaced_stops(tmp_path, checkpoint, monkeypatch):
    """Machine A works on run z from its copy; z is deleted from the URL and started anew on machine
    B: A's resume, report and score stop with a clear error and write nothing into B's run."""
    from saliencybench.benchmark.remote import RunReplacedError

    url = f"file://{tmp_path}/shared"
    machine(monkeypatch, tmp_path, "a")
    mine = run(config(url, checkpoint), run_id="z", progress=False, stop_after=3)
    shutil.rmtree(tmp_path / "shared" / "z")
    machine(monkeypatch, tmp_path, "b")
    run(config(url, checkpoint), run_id="z", progress=False, stop_after=3)
    before = sorted(p.name for p in (tmp_path / "shared" / "z").rglob("*"))
    machine(monkeypatch, tmp_path, "a")
    # another process on machine A opens the URL meanwhile: it makes A's copy one of the new run
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", f"from saliencybench.benchmark.runner import open_run; open_run({url!r} + '/z')"],
                   check=True, env={**os.environ, "SALIENCYBENCH_CACHE": str(tmp_path / "a")})
    for attempt in (lambda: run(config(url, checkpoint), resume=mine.path, progress=False), mine.report,
                    lambda: mine.score(["sparseness"], progress=False),
                    lambda: mine.heatmaps("resnet10t", "gradcam")):
        with pytest.raises(RunReplacedError, match="replaced"):
            attempt()
    assert sorted(p.name for p in (tmp_path / "shared" / "z").rglob("*")) == before
    shutil.rmtree(tmp_path / "shared" / "z")
    with pytest.raises(RunReplacedError, match="deleted"):
        mine.report()
