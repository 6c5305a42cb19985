"""Scale-out on Ray and the run plan.

Ray: rows equal an in-process run's (all values, none missing, none twice); a worker killed
mid-task loses only that task (its explain task is not redone) and the rows stay the same;
plug-in methods and metrics run on the Ray workers; a stopped driver resumes; without Ray a
clear error names the extra. One local Ray cluster (2 CPUs, no dashboard) serves the module.

Plan: the declared passes of every built-in method, and of deletion/insertion and the
method-calling metrics, equal the passes counted by hooks on the model while they run (the
explain call, and the runner's score path); the printed plan fits 100 columns; the heatmap
store estimate matches a written store.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from saliencybench.benchmark.cli import main
from saliencybench.benchmark.config import config_from_dict
from saliencybench.benchmark.runner import run
from saliencybench.errors import SaliencyBenchError

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
KEY = ["model", "method", "metric", "image_id", "metric_params", "stage"]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield
    ray.shutdown()


def tiny_config(tmp: Path, checkpoint: Path, **kw):
    base = dict(models=["resnet10t"], methods=["saliency", "gradcam", "occlusion"],
                metrics=["deletion", "pointing_game"],
                dataset_params={"size": 64}, image_size=64, n_images=4, batch_size=2,
                checkpoints={"resnet10t": str(checkpoint)}, output=str(tmp), device="cpu", inspect=[],
                method_params={"occlusion": {"window": 16, "stride": 16}}, metric_params={"deletion": {"n_steps": 4}})
    base.update(kw)
    return config_from_dict(base)


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """All values equal (timings and run ids aside), no row twice, none missing."""
    from conftest import assert_same_rows

    assert_same_rows(a, b, tuple(KEY))


def gone(pids: set[int], wait_s: float = 20.0) -> bool:
    """Whether all these processes have exited (polled up to ``wait_s``)."""
    import time

    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        alive = set()
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.add(pid)
            except OSError:
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_ray_rows_equal_in_process_rows(tmp_path, checkpoint, ray_cluster):
    """Two models and their pair: the pair units (run after all others) go to the same actors, which
    the run stops at its end."""
    from saliencybench.benchmark.ray_executor import RayExecutor

    torch.manual_seed(1)
    other = tmp_path / "resnet14t.safetensors"
    save_file(timm.create_model("resnet14t", num_classes=6).state_dict(), str(other))
    cfg = tiny_config(tmp_path, checkpoint, models=["resnet10t", "resnet14t"], pairs=[["resnet10t", "resnet14t"]],
                      metrics=["deletion", "pointing_game", "model_contrast"],
                      checkpoints={"resnet10t": str(checkpoint), "resnet14t": str(other)})
    here = run(cfg, run_id="here", progress=False).results
    executor = RayExecutor(workers=2)
    there = run(cfg, run_id="there", progress=False, executor=executor).results
    same_rows(here, there)
    pids = {w["pid"] for w in executor.worker_info}
    assert len(pids) == 2  # two actors, each with its own process
    assert executor.actors_started == 2  # started once for the units and the pair units
    assert set(there.method) == {"saliency", "gradcam", "occlusion"}
    assert len(there[there.metric == "model_contrast"]) == 3 * 4  # 3 methods x 4 images, on resnet10t
    assert len(list((tmp_path / "there" / "heatmaps").glob("*.safetensors"))) == 12  # 2 models x 2 shards x 3 methods
    assert gone(pids)  # the run stopped its actors
    import ray

    assert ray.is_initialized()  # the session this process started is left running


def test_a_held_executor_serves_runs_without_restarting(tmp_path, checkpoint, ray_cluster):
    """Inside ``with``, the actors outlive each run: the next run (another config, another run
    directory) rebuilds their context without a new process, and adds an actor when it has work
    for one more (1 unit, then 2); the block's end stops them."""
    from saliencybench.benchmark.ray_executor import RayExecutor

    first = tiny_config(tmp_path, checkpoint, methods=["saliency"], metrics=["deletion"], n_images=2)
    second = tiny_config(tmp_path, checkpoint, methods=["gradcam"], metrics=["pointing_game"], n_images=4)
    with RayExecutor(workers=2) as executor:
        a = run(first, run_id="a", progress=False, executor=executor).results
        first_pids = {w["pid"] for w in executor.worker_info}
        b = run(second, run_id="b", progress=False, executor=executor).results
        pids = {w["pid"] for w in executor.worker_info}
        assert len(first_pids) == 1 and len(pids) == 2 and first_pids < pids
        assert (executor.actors_started, executor.reuses) == (2, 1)
    assert gone(pids)
    same_rows(run(first, run_id="a-here", progress=False).results, a)
    same_rows(run(second, run_id="b-here", progress=False).results, b)
    assert set(b.method) == {"gradcam"} and len(b[b.metric == "pointing_game"]) == 4

    # An actor that Ray restarts gets its first constructor arguments (run a's); the call names run b.
    from conftest import torch_threads_kept

    from saliencybench.benchmark.ray_executor import UnitWorker
    from saliencybench.benchmark.runner import open_run
    from saliencybench.benchmark.tasks import plan_units

    run_a, run_b = open_run(tmp_path / "a"), open_run(tmp_path / "b")
    unit = plan_units(run_b.config, 4)[0]
    for t in unit.tasks():
        (run_b.path / "rows" / f"{t.key}.parquet").unlink()
    with torch_threads_kept():
        worker = UnitWorker((run_a.config.to_dict(), "a", str(run_a.path)), 1, 0.0)
        reports = worker.run(unit, [], (run_b.config.to_dict(), "b", str(run_b.path)))
    assert {r.key for r in reports} == {t.key for t in unit.tasks()}
    same_rows(open_run(run_b.path).results, b)


def test_ray_workers_write_a_url_run_from_their_own_copies(tmp_path, checkpoint, ray_cluster, monkeypatch):
    """Output on a URL: each worker writes into its own node's copy and uploads; the driver (with another
    copy, as on another machine) gets the rows from the URL, never the heatmaps."""
    import shutil

    from saliencybench.benchmark.ray_executor import RayExecutor
    from saliencybench.benchmark.remote import mirror_dir

    url = f"file://{tmp_path}/shared"
    workers_copy = mirror_dir(f"{url}/u")  # the workers' cache: the environment the cluster started with
    monkeypatch.setenv("SALIENCYBENCH_CACHE", str(tmp_path / "driver"))
    cfg = tiny_config(tmp_path, checkpoint, methods=["saliency", "gradcam"], output=url)
    try:
        there = run(cfg, run_id="u", progress=False, executor=RayExecutor(workers=2))
        here = run(tiny_config(tmp_path, checkpoint, methods=["saliency", "gradcam"]), run_id="here",
                   progress=False).results
        same_rows(here, there.results)
        assert there.path == mirror_dir(f"{url}/u") != workers_copy
        assert len(list((there.path / "rows").glob("*.parquet"))) == 4 * 3  # 2 shards x 2 methods x 3 tasks
        assert not (there.path / "heatmaps").exists()
        assert len(list((tmp_path / "shared" / "u" / "heatmaps").glob("*.safetensors"))) == 4
        assert len(list((workers_copy / "heatmaps").glob("*.safetensors"))) == 4
    finally:
        shutil.rmtree(workers_copy, ignore_errors=True)


PLUGIN = '''
import os, signal
from pathlib import Path
import torch
import saliencybench as sb

HERE = Path(__file__).parent


def _log(name, text):
    with open(HERE / name, "a") as f:
        f.write(text + "\\n")


@sb.register_method("plug_abs_mean", paper="test plug-in", family="baseline", needs_grad=False)
def plug_abs_mean(model, images, targets, *, power: float = 1.0):
    """Mean |x| over channels, to a power."""
    _log("method.log", f"{os.getpid()}")
    return images.abs().mean(1) ** power


@sb.register_metric("plug_drop", paper="test plug-in", higher_is_better=True, inputs="model")
def plug_drop(model, images, targets, heatmaps):
    """Target probability lost when the pixels below each map's median are zeroed. The first call
    in a process other than the one named in the file 'armed' kills its own process, once."""
    armed = HERE / "armed"
    if armed.exists() and armed.read_text() != str(os.getpid()) and not (HERE / "fired").exists():
        (HERE / "fired").write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    _log("metric.log", f"{os.getpid()}")
    with torch.no_grad():
        p = model(images).softmax(1).gather(1, targets[:, None])[:, 0]
        keep = heatmaps >= heatmaps.flatten(1).median(1).values[:, None, None]
        q = model(images * keep[:, None]).softmax(1).gather(1, targets[:, None])[:, 0]
    return p - q
'''


def test_killed_worker_loses_only_its_task_and_plugins_run_on_workers(tmp_path, checkpoint, ray_cluster):
    from saliencybench.benchmark.ray_executor import RayExecutor

    plug = tmp_path / "plug" / "plug.py"
    plug.parent.mkdir()
    plug.write_text(PLUGIN)
    cfg = tiny_config(tmp_path, checkpoint, methods=["plug_abs_mean"], metrics=["plug_drop", "pointing_game"],
                      plugins=[str(plug)], method_params={"plug_abs_mean": {"power": 2.0}})
    here = run(cfg, run_id="here", progress=False).results
    for log in ("method.log", "metric.log"):
        (plug.parent / log).unlink()
    (plug.parent / "armed").write_text(str(os.getpid()))  # workers (not this process) kill themselves once
    there = run(cfg, run_id="there", progress=False, executor=RayExecutor(workers=2, max_retries=2)).results
    killed = (plug.parent / "fired").read_text()
    assert killed != str(os.getpid())
    same_rows(here, there)
    drop = there[there.metric == "plug_drop"]
    assert len(drop) == 4 and drop.value.notna().all()  # 4 images scored by the plug-in metric
    assert json.loads(there[there.method == "plug_abs_mean"].method_params.iloc[0])["power"] == 2.0
    method_pids = (plug.parent / "method.log").read_text().split()
    metric_pids = (plug.parent / "metric.log").read_text().split()
    # 2 units (shards), one per worker. The killed worker had explained its shard (rows and heatmaps
    # written), then died in plug_drop: its restarted successor scored the shard without explaining again.
    assert len(method_pids) == 2 and killed in method_pids
    assert len(metric_pids) == 2 and killed not in metric_pids


def test_stopped_driver_resumes_on_ray(tmp_path, checkpoint, ray_cluster):
    from saliencybench.benchmark.ray_executor import RayExecutor

    cfg = tiny_config(tmp_path, checkpoint, methods=["saliency", "gradcam"])
    full = run(cfg, run_id="full", progress=False).results
    part = run(cfg, run_id="part", progress=False, stop_after=2, executor=RayExecutor(workers=1))
    written = len(list((part.path / "rows").glob("*.parquet")))
    assert 3 <= written < 12  # stopped after the first unit (explain + 2 metrics) of 2 shards x 2 methods
    resumed = run(cfg, resume=part.path, progress=False, executor=RayExecutor(workers=1)).results
    same_rows(full, resumed)


FAILING_PLUGIN = '''
import saliencybench as sb
from saliencybench.errors import InvalidInputError


@sb.register_method("plug_refuses", paper="test plug-in", family="baseline", needs_grad=False)
def plug_refuses(model, images, targets):
    """Always refuses."""
    raise InvalidInputError("plug-in refuses these images")
'''


def test_error_in_a_worker_is_raised_as_itself(tmp_path, checkpoint, ray_cluster):
    from saliencybench.benchmark.ray_executor import RayExecutor
    from saliencybench.errors import InvalidInputError

    plug = tmp_path / "refuses.py"
    plug.write_text(FAILING_PLUGIN)
    cfg = tiny_config(tmp_path, checkpoint, methods=["plug_refuses"], metrics=["pointing_game"], plugins=[str(plug)],
                      n_images=2)
    with pytest.raises(InvalidInputError, match="plug-in refuses these images"):
        run(cfg, run_id="fails", progress=False, executor=RayExecutor(workers=1))


def test_ray_missing_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    from saliencybench.benchmark.ray_executor import RayExecutor, RayNotInstalledError

    with pytest.raises(RayNotInstalledError, match=r"pip install 'saliencybench\[ray\]'"):
        RayExecutor()
    assert issubclass(RayNotInstalledError, SaliencyBenchError)
    assert main(["run", "--executor", "ray", "--output", str(tmp_path), "--quiet"]) == 2
    assert "saliencybench[ray]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # failed before a run directory was made
    assert main(["run", "--ray-address", "head:6379", "--output", str(tmp_path), "--quiet"]) == 2
    assert "saliencybench[ray]" in capsys.readouterr().err


def test_cli_builds_the_executor_asked_for():
    from saliencybench.benchmark.cli import _executor, _parser
    from saliencybench.benchmark.executors import ProcessExecutor
    from saliencybench.benchmark.ray_executor import RayExecutor

    def build(*flags, cfg=None):
        return _executor(_parser().parse_args(["run", *flags]), ProcessExecutor, cfg)

    assert build() is None and build("--workers", "1") is None
    assert isinstance(build("--workers", "3"), ProcessExecutor) and build("--workers", "3").workers == 3
    ray_default = build("--executor", "ray")
    assert isinstance(ray_default, RayExecutor) and ray_default.workers is None and ray_default.address is None
    remote = build("--ray-address", "head:6379", "--workers", "8")
    assert isinstance(remote, RayExecutor) and (remote.address, remote.workers) == ("head:6379", 8)


def test_the_default_executor_splits_the_cores_for_large_cpu_runs():
    from saliencybench.benchmark.cli import _executor, _parser
    from saliencybench.benchmark.config import RunConfig
    from saliencybench.benchmark.executors import ProcessExecutor, auto_executor, explanations
    from saliencybench.benchmark.devices import available_cores

    default = RunConfig()
    assert explanations(default) == 32 * 3 * 14 + 16 * 1 * 14 + 16 * 2 * 14  # the main block, the cue and contrast parts
    assert explanations(RunConfig(n_images=None, parts={})) == 10**6 * 3 * 14
    for cores, shape in ((1, None), (2, (2, 1)), (3, (3, 1)), (8, (4, 2)), (16, (4, 4))):
        ex = auto_executor("cpu", cores=cores)
        assert (ex if ex is None else (ex.workers, ex.threads)) == shape
    assert auto_executor("cpu", cores=8, work=255) is None and auto_executor("cpu", cores=8, work=256) is not None
    ex = _executor(_parser().parse_args(["run"]), ProcessExecutor, RunConfig(device="cpu"))
    assert (ex is None) == (available_cores() == 1)
    tiny = RunConfig(n_images=4, models=["resnet10t"], methods=["gradcam", "saliency"], parts={}, device="cpu")
    assert _executor(_parser().parse_args(["run"]), ProcessExecutor, tiny) is None  # a small run stays here


def test_bad_executor_arguments(tmp_path, capsys):
    from saliencybench.benchmark.ray_executor import RayExecutor

    for kw in ({"workers": 0}, {"num_cpus_per_task": -1}, {"num_gpus_per_task": "one"}, {"max_retries": 1.5}):
        with pytest.raises(SaliencyBenchError):
            RayExecutor(**kw)
    assert main(["run", "--executor", "process", "--ray-address", "x:1", "--output", str(tmp_path)]) == 2
    assert "--ray-address needs --executor ray" in capsys.readouterr().err


# ---- the plan ------------------------------------------------------------------------------------


@contextmanager
def counted(model: nn.Module) -> Iterator[dict[str, int]]:
    """Images into the first convolution, and gradient batches out of the classifier's output."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    fc = model.get_classifier()
    n = {"fwd": 0, "bwd": 0}

    def pre(_m, inp):
        n["fwd"] += inp[0].shape[0]

    def post(_m, _inp, out):
        if out.requires_grad:
            out.register_hook(lambda g: n.__setitem__("bwd", n["bwd"] + g.shape[0]))

    handles = [conv.register_forward_pre_hook(pre), fc.register_forward_hook(post)]
    try:
        yield n
    finally:
        for h in handles:
            h.remove()


PLAN_METHOD_PARAMS = {"occlusion": {"window": 16, "stride": 16}, "rise": {"n_masks": 20},
                      "integrated_gradients": {"n_steps": 4}, "smoothgrad": {"n_samples": 3},
                      "smoothgrad_sq": {"n_samples": 2}, "vargrad": {"n_samples": 2}}


def test_plan_method_counts_equal_counted_passes(checkpoint):
    from saliencybench.benchmark.models import load_model
    from saliencybench.costs import METHOD_COSTS, method_passes
    from saliencybench.methods.base import explain, get_method, list_methods

    model = load_model("resnet10t", checkpoint=checkpoint).model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 4])
    builtin = [m for m in list_methods() if get_method(m).fn.__module__.startswith("saliencybench.") and ":" not in m
               and get_method(m).family != "imported"]
    assert set(builtin) <= set(METHOD_COSTS), "every built-in method declares its cost"
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=6).eval()
    cnn = model
    for name in builtin:
        model = vit if get_method(name).family == "attention" else cnn  # attention methods need a ViT
        params = get_method(name).resolve_params(PLAN_METHOD_PARAMS.get(name, {}), (64, 64))
        explain(model, x, t, name, **params)  # warm-up: one-time probes (norm folding) are not the method's
        with counted(model) as n:
            explain(model, x, t, name, **params)
        (f, b), how = method_passes(name, params, (64, 64), model)
        assert (n["fwd"], n["bwd"]) == (2 * f, 2 * b), name
        assert how == "declared"
    model = cnn
    # hand-computed: a 16 px window with stride 16 has 4 x 4 positions on 64 px, plus the clean pass
    assert method_passes("occlusion", PLAN_METHOD_PARAMS["occlusion"], (64, 64), model)[0] == (17, 0)
    assert method_passes("scorecam", {"layer": None}, (64, 64), model)[0] == (1 + model.num_features, 0)


def test_plan_metric_counts_equal_the_runner_score_path(tmp_path, checkpoint):
    from saliencybench.benchmark.execute import Heat, TaskContext, run_score
    from saliencybench.costs import metric_passes
    from saliencybench.benchmark.tasks import score_tasks
    from saliencybench.methods.base import explain
    from saliencybench.metrics.base import get_metric
    from saliencybench.modelutil import fast_inference

    metrics = ["deletion", "insertion", "sanity_randomization", "max_sensitivity", "avg_sensitivity",
               "local_lipschitz", "random_logit", "pointing_game"]
    params = {"deletion": {"n_steps": 4}, "insertion": {"step": 512, "n_steps": None},
              "max_sensitivity": {"n_samples": 3}, "avg_sensitivity": {"n_samples": 3}, "local_lipschitz": {"n_samples": 2},
              "sanity_randomization": {"methods": None}}
    cfg = tiny_config(tmp_path, checkpoint, metrics=metrics, metric_params=params, n_images=2)
    ctx = TaskContext(cfg, "t", tmp_path)
    (g,), _ = ctx.prepare("resnet10t", (0, 1))
    model = ctx.model("resnet10t").model.eval()
    ctx.logits("resnet10t", g)
    with fast_inference(model, g.x):  # the one-time probe of norm folding (per process) is not the metric's
        pass
    heat = Heat(dict(zip(g.indices, explain(model, g.x, g.labels, "saliency"))), {})
    for task in score_tasks(cfg, "resnet10t", "saliency", (0, 1)):
        resolved = {m: get_metric(m).resolve_params(cfg.metric_params_for(m), (64, 64)) for m in task.metrics}
        expected = [metric_passes(m, resolved, (64, 64), model, "saliency", cfg)[0] for m in task.metrics]
        with counted(model) as n:
            run_score(task, ctx, heat)
        assert (n["fwd"], n["bwd"]) == (2 * sum(f for f, _ in expected), 2 * sum(b for _, b in expected)), task.metrics
    # hand-computed: deletion with 4 steps has 5 curve points, insertion with 512-pixel steps 9
    deletion = get_metric("deletion").resolve_params({"n_steps": 4}, (64, 64))
    insertion = get_metric("insertion").resolve_params({"step": 512}, (64, 64))
    assert metric_passes("deletion", {"deletion": deletion}, (64, 64), model, "saliency", cfg)[0] == (5, 0)
    assert metric_passes("insertion", {"insertion": insertion}, (64, 64), model, "saliency", cfg)[0] == (9, 0)


MEASURED_PLUGIN = '''
import saliencybench as sb
from saliencybench.methods.gradient import input_gradients


@sb.register_method("plug_twice", paper="test plug-in", family="gradient")
def plug_twice(model, images, targets):
    """Two input-gradient passes."""
    g = input_gradients(model, images, targets) + input_gradients(model, images * 0.5, targets)
    return g.abs().amax(1)
'''


def test_plan_prints_under_100_columns_and_measures_plugins(tmp_path, checkpoint, capsys):
    from saliencybench.benchmark.plan import format_plan, make_plan, store_bytes
    from saliencybench.benchmark.store import HeatmapStore

    plug = tmp_path / "plug_twice.py"
    plug.write_text(MEASURED_PLUGIN)
    cfg = tiny_config(tmp_path, checkpoint, methods=["saliency", "plug_twice", "occlusion", "center"],
                      metrics=["deletion", "insertion", "pointing_game"], plugins=[str(plug)], n_images=40)
    plan = make_plan(cfg, bench_batches=1)
    rows = {(r.method, r.task): r for r in plan.rows}
    assert (rows["plug_twice", "explain"].forwards, rows["plug_twice", "explain"].backwards) == (2, 2)
    assert rows["plug_twice", "explain"].how == "measured"
    assert rows["occlusion", "explain"].forwards == 17 and rows["center", "deletion"].forwards == 5
    assert plan.n_images == 40 and plan.units == 20 * 4
    f, b = plan.passes()
    # predictions 1, saliency 1, plug_twice 2, occlusion 17, center 0; 4 methods x (deletion 5 + insertion 17)
    assert f == 40 * (1 + 1 + 2 + 17 + 0 + 4 * (5 + 17)) and b == 40 * (1 + 2)
    text = format_plan(plan, detail=True)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "8 nodes" in text and "64 nodes" in text and "heatmap store" in text
    assert abs(plan.seconds_on(8) - plan.seconds / 8) < 1e-9 or plan.seconds_on(8) == plan.longest_unit_s
    # the store estimate against a written store of 16 float16 maps of 64 x 64
    HeatmapStore(tmp_path / "s").write("k", [f"img{i:05d}" for i in range(16)], torch.rand(16, 64, 64), "float16",
                                       {"model": "resnet10t", "method": "saliency", "indices": list(range(16))})
    real = (tmp_path / "s" / "heatmaps" / "k.safetensors").stat().st_size
    assert abs(store_bytes(16, 64, 64, "float16", 1) - real) / real < 0.05
    # the command: a data set that cannot be opened is planned for --n-images, with a note
    cfg_file = tmp_path / "plan.yaml"
    cfg_file.write_text(textwrap.dedent(f"""
        models: [resnet10t]
        checkpoints: {{resnet10t: {checkpoint}}}
        dataset: imagenet-val
        dataset_params: {{root: {tmp_path / "absent"}}}
        image_size: 64
        methods: [gradcam, rise]
        method_params: {{rise: {{n_masks: 30}}}}
        metrics: [deletion, box_iou]
        device: cpu
        """))
    assert main(["plan", str(cfg_file), "--n-images", "50000", "--bench-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "cannot be opened" in out and "50,000 images" in out and "box_iou" in out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert main(["plan", str(cfg_file), "--n-images", "0"]) == 2


def test_a_worker_imports_no_heavy_module_it_does_not_use():
    """What every worker process (Ray actor, process pool) imports before its first task: the task
    code, without scipy.stats (0.4 s), scipy.sparse or matplotlib, which the metrics and reports that
    use them import on first use."""
    import subprocess

    code = ("import sys, saliencybench.benchmark.ray_executor, saliencybench.benchmark.executors; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'matplotlib'))))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert not {m for m in loaded if m.startswith(("scipy.stats", "scipy.sparse", "scipy.ndimage", "matplotlib"))}
