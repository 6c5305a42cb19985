"""Run directories on an fsspec URL (``s3://``, ``gs://``, ``az://``, ``hdfs://``, ``file://`` ...).

A run whose ``output`` is a URL has its shared copy at ``<output>/<run id>`` and, on every
machine that works on it, a local copy of the same layout (the *mirror*:
``$SALIENCYBENCH_CACHE/mirror/<scheme>-<hash of the output URL>/<run id>``). The code that
computes and reads a run works on the local copy as on any run directory; this module
moves files between the two:

- every task writes its rows and heatmaps into the mirror (atomically) and uploads them
  (:meth:`Remote.put`: to a temporary name, then renamed, so readers of the URL see a whole
  file or none), the heatmaps before the rows, so a task whose rows are on the URL has its
  heatmaps there too; on a Ray cluster each worker does this on its own node;
- the driver downloads the rows of finished tasks (never the heatmaps) into its mirror
  for the leaderboard; a task that needs stored heatmaps (a resumed run's maps, the pair
  metrics' partner maps) downloads them on first use, and ``run.heatmaps(model, method)``
  reads only the safetensors headers of the others (a range read) to find its files;
- the run's other files (config, models, leaderboard, report, plots) are uploaded when
  written; resuming or opening a URL first downloads config, models and rows.

fsspec is the file-system layer of pandas, pyarrow and Dask; the file system's own
package (``s3fs``, ``gcsfs``, ``adlfs``) must be installed for its scheme (a clear
:class:`RemoteStorageError` says which). Credentials come from that package's usual
sources (environment, config files, instance roles).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import SaliencyBenchError

URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
SHARED_SUBDIRS = ("rows", "heatmaps")  # task outputs: uploaded by the tasks themselves


class RemoteStorageError(SaliencyBenchError):
    """A run URL cannot be used (unknown scheme, missing file-system package, unreachable)."""


def is_url(where: Any) -> bool:
    """Whether ``where`` (an output or run location) is a URL rather than a local path."""
    return isinstance(where, str) and URL_RE.match(where) is not None


def run_url(output: str, run_id: str) -> str:
    """The URL of run ``run_id`` inside the output URL ``output``."""
    return f"{output.rstrip('/')}/{run_id}"


def split_run_url(url: str) -> tuple[str, str]:
    """(output URL, run id) of a run URL."""
    output, _, run_id = url.rstrip("/").rpartition("/")
    return output, run_id


def mirror_dir(url: str) -> Path:
    """The local copy of the run at ``url`` on this machine (the same path for every process here)."""
    output, run_id = split_run_url(url)
    scheme = output.split("://", 1)[0].lower()
    digest = hashlib.sha256(output.rstrip("/").encode()).hexdigest()[:16]
    root = os.environ.get("SALIENCYBENCH_CACHE") or Path.home() / ".cache" / "saliencybench"
    return Path(root) / "mirror" / f"{scheme}-{digest}" / run_id


class Remote:
    """The shared copy of one run, at ``url``, through fsspec."""

    def __init__(self, url: str) -> None:
        try:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(url)
        except ImportError as e:
            raise RemoteStorageError(
                f"cannot open {url!r}: {e}. Install fsspec and the package of that file system (s3fs for s3://, "
                "gcsfs for gs://, adlfs for az://), or give --output a local or mounted directory") from None
        except (ValueError, TypeError) as e:
            raise RemoteStorageError(f"cannot open {url!r} ({e}); give --output a local directory or a URL fsspec "
                                     "knows (s3://, gs://, az://, file://)") from None
        self.url = url.rstrip("/")
        self.root = self.root.rstrip("/")

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def put(self, local: Path, rel: str) -> None:
        """Upload ``local`` as ``rel``: to a temporary name beside it, then renamed."""
        target = self.path(rel)
        parent = target.rpartition("/")[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{target.rpartition('/')[2]}.{uuid.uuid4().hex}.tmp"
        try:
            self.fs.put_file(str(local), tmp)
            self.fs.mv(tmp, target)
        except Exception as e:  # noqa: BLE001 - any file system's error
            try:
                self.fs.rm(tmp)
            except Exception:  # noqa: BLE001, S110 - the temporary file may not exist
                pass
            raise RemoteStorageError(f"cannot upload {local} to {self.url}/{rel} ({type(e).__name__}: {e}); the "
                                     "file is kept in the local copy, resume the run to retry") from None

    def get(self, rel: str, local: Path) -> bool:
        """Download ``rel`` to ``local`` (atomically); False when the URL has no such file."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            self.fs.get_file(self.path(rel), str(tmp))
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, local)
        return True

    def names(self, sub: str) -> set[str]:
        """File names directly inside ``sub`` (temporary uploads excluded)."""
        try:
            entries = self.fs.ls(self.path(sub), detail=False)
        except FileNotFoundError:
            return set()
        names = {str(e).rstrip("/").rpartition("/")[2] for e in entries}
        return {n for n in names if not n.startswith(".")}

    def header(self, rel: str) -> dict[str, str]:
        """The metadata of a safetensors file on the URL, from its first bytes only (two range reads)."""
        path = self.path(rel)
        n = struct.unpack("<Q", self.fs.cat_file(path, start=0, end=8))[0]
        return json.loads(self.fs.cat_file(path, start=8, end=8 + n)).get("__metadata__", {}) or {}

    # ---- whole-run moves ---------------------------------------------------------------------

    def pull(self, local: Path, rows: bool = True) -> None:
        """Download the run's top-level files (config, models) and, with ``rows``, the rows missing in ``local``."""
        for name in self.names(""):
            if name.endswith((".json", ".csv", ".md", ".html")):
                self.get(name, local / name)
        if rows:
            have = {p.name for p in (local / "rows").glob("*.parquet")} if (local / "rows").is_dir() else set()
            for name in sorted(self.names("rows") - have):
                if name.endswith(".parquet"):
                    self.get(f"rows/{name}", local / "rows" / name)

    def push_missing(self, local: Path) -> int:
        """Upload the task files of the local copy that the URL lacks (left by an upload that failed
        before the run stopped), heatmaps first; returns how many."""
        n = 0
        for sub, suffix in (("heatmaps", ".safetensors"), ("rows", ".parquet")):
            if (local / sub).is_dir():
                have = self.names(sub)
                for p in sorted((local / sub).glob(f"*{suffix}")):
                    if p.name not in have:
                        self.put(p, f"{sub}/{p.name}")
                        n += 1
        return n

    def push_outputs(self, local: Path) -> None:
        """Upload every file of the local copy outside ``rows/`` and ``heatmaps/`` (config, models,
        leaderboard, report, plots)."""
        for p in sorted(local.rglob("*")):
            rel = p.relative_to(local).as_posix()
            if p.is_file() and rel.split("/", 1)[0] not in SHARED_SUBDIRS and not p.name.startswith("."):
                self.put(p, rel)


    def fetch_heatmaps(self, store: Any, model: str, method: str) -> int:
        """Download into ``store`` (a :class:`~.store.HeatmapStore`) the heatmap files of ``model`` and
        ``method`` it lacks, found by their headers; returns how many."""
        n = 0
        have = set(store.keys())
        for name in sorted(self.names("heatmaps")):
            key = name.removesuffix(".safetensors")
            if key == name or key in have:
                continue
            meta = self.header(f"heatmaps/{name}")
            if meta.get("model") == model and meta.get("method") == method:
                n += self.get(f"heatmaps/{name}", store.path(key))
        return n


@lru_cache(maxsize=64)
def remote_for(url: str) -> Remote:
    """One :class:`Remote` per run URL in this process."""
    return Remote(url)


def remote_of(output: str, run_id: str) -> Remote | None:
    """The shared copy of run ``run_id`` when ``output`` is a URL, else None."""
    return remote_for(run_url(output, run_id)) if is_url(output) and run_id else None


def task_uploaded(remote: Remote, key: str) -> bool:
    """Whether the URL has the rows of task ``key`` (the mark of a finished task)."""
    return remote.exists(f"rows/{key}.parquet")
