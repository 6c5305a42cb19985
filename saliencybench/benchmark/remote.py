"""Run directories on an fsspec URL (``s3://``, ``gs://``, ``az://``, ``hdfs://``, ``file://`` ...).

A run whose ``output`` is a URL has its shared copy at ``<output>/<run id>`` and, on every
machine that works on it, a local copy of the same layout (the *mirror*:
``$SALIENCYBENCH_CACHE/mirror/<scheme>-<hash of the output URL>/<run id>``). The code that
computes and reads a run works on the local copy as on any run directory; this module
moves files between the two:

- every task writes its rows and heatmaps into the mirror (atomically) and uploads them
  (:meth:`Remote.put`: one PUT on an object store, which is atomic; elsewhere to a temporary
  name, then renamed, so readers of the URL see a whole file or none), the heatmaps before
  the rows, so a task whose rows are on the URL has its heatmaps there too; on a Ray cluster
  each worker does this on its own node;
- the driver downloads the rows of finished tasks (never the heatmaps) into its mirror
  for the leaderboard; a task that needs stored heatmaps (a resumed run's maps, the pair
  metrics' partner maps) downloads them on first use, and ``run.heatmaps(model, method)``
  reads only the safetensors headers of the others (a range read) to find its files;
- the run's other files (config, models, leaderboard, report, plots) are uploaded when
  written; resuming or opening a URL first downloads config, models and rows.

Each run has an *instance* (a uuid in its ``config.json``): a local copy of an earlier run of
the same name (deleted from the URL and started anew) is emptied when the run is opened,
resumed or served by a worker, and a driver whose run was replaced on the URL while it ran
stops with :class:`RunReplacedError` instead of writing into the new one. Files
deleted from the URL on purpose are uploaded again from a machine's copy that still has them
(delete them there too, or start a new run).

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
import shutil
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import SaliencyBenchError

URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
SHARED_SUBDIRS = ("rows", "heatmaps")  # task outputs: uploaded by the tasks themselves
OWN_UPLOADS = ("config.json", "models.json")  # uploaded where they change, never with the other outputs
# File systems that rename (atomically within one volume): uploads go to a temporary name first. The
# others (object stores: s3, gs, az, ...) make a PUT visible whole or not at all, and have no rename.
RENAME_SCHEMES = ("file", "local", "hdfs", "webhdfs", "sftp", "ssh", "smb", "ftp")


class RemoteStorageError(SaliencyBenchError):
    """A run URL cannot be used (unknown scheme, missing file-system package, unreachable)."""


class RunReplacedError(RemoteStorageError):
    """The run at a URL was deleted and started anew while this machine worked on its old copy."""


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
    from .models import cache_root

    return cache_root() / "mirror" / f"{scheme}-{digest}" / run_id


class Remote:
    """The shared copy of one run, at ``url``, through fsspec."""

    def __init__(self, url: str) -> None:
        if "?" in url or "#" in url:
            raise RemoteStorageError(f"run URL {url!r} has a query or fragment: give the bucket and prefix only, "
                                     "and the file system's options through its usual configuration")
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
        self._headers: dict[str, dict[str, str]] = {}
        self._expected: dict[str, str] = {}  # local copy -> the run instance this process works on there

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _fresh(self, path: str) -> None:
        """Forget the file system's cached listing of ``path`` (s3fs and gcsfs keep one per directory:
        files other machines added since would not be seen)."""
        try:
            self.fs.invalidate_cache(path)
        except Exception:  # noqa: BLE001, S110 - a file system without a cache
            pass

    def _error(self, what: str, rel: str, e: Exception) -> RemoteStorageError:
        return RemoteStorageError(f"cannot {what} {self.url}/{rel} ({type(e).__name__}: {e}); check the URL, the "
                                  "credentials and the network, then resume the run (its files are kept)")

    def exists(self, rel: str) -> bool:
        self._fresh(self.path(rel).rpartition("/")[0])
        try:
            return bool(self.fs.exists(self.path(rel)))
        except Exception as e:  # noqa: BLE001 - any file system's error
            raise self._error("read", rel, e) from None

    def put(self, local: Path, rel: str) -> None:
        """Upload ``local`` as ``rel``, so that readers see the whole file or none: an object store's
        PUT is atomic; on file systems with renames (``file``, HDFS, SFTP...) to a temporary name
        beside it, then renamed."""
        target = self.path(rel)
        parent = target.rpartition("/")[0]
        rename = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        tmp = f"{parent}/.{target.rpartition('/')[2]}.{uuid.uuid4().hex}.tmp" if rename in RENAME_SCHEMES else None
        try:
            if tmp is None:
                self.fs.put_file(str(local), target)
            else:
                self.fs.makedirs(parent, exist_ok=True)
                self.fs.put_file(str(local), tmp)
                if rename not in ("file", "local") and self.fs.exists(target):
                    self.fs.rm(target)  # HDFS, SMB: a rename does not replace (a moment without the file)
                self.fs.mv(tmp, target)
                if rename not in ("file", "local") and not self.fs.exists(target):
                    raise OSError(f"the rename of {tmp} to {target} did not happen")
        except Exception as e:  # noqa: BLE001 - any file system's error
            if tmp is not None:
                try:
                    self.fs.rm(tmp)
                except Exception:  # noqa: BLE001, S110 - the temporary file may not exist
                    pass
            raise self._error("upload to", rel, e) from None

    def get(self, rel: str, local: Path) -> bool:
        """Download ``rel`` to ``local`` (atomically); False when the URL has no such file."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            self.fs.get_file(self.path(rel), str(tmp))
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            return False
        except Exception as e:  # noqa: BLE001 - any file system's error
            tmp.unlink(missing_ok=True)
            raise self._error("download", rel, e) from None
        os.replace(tmp, local)
        return True

    def names(self, sub: str) -> set[str]:
        """File names directly inside ``sub`` (temporary uploads excluded), listed afresh."""
        path = self.path(sub)
        self._fresh(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return set()
        except Exception as e:  # noqa: BLE001 - any file system's error
            raise self._error("list", sub, e) from None
        names = {str(e).rstrip("/").rpartition("/")[2] for e in entries}
        return {n for n in names if not n.startswith(".")}

    def header(self, rel: str) -> dict[str, str]:
        """The metadata of a safetensors file on the URL, from its first bytes only (two range reads;
        remembered: a finished task's file never changes)."""
        if rel not in self._headers:
            path = self.path(rel)
            try:
                n = struct.unpack("<Q", self.fs.cat_file(path, start=0, end=8))[0]
                meta = json.loads(self.fs.cat_file(path, start=8, end=8 + n)).get("__metadata__", {}) or {}
            except Exception as e:  # noqa: BLE001 - any file system's error
                raise self._error("read", rel, e) from None
            self._headers[rel] = meta
        return self._headers[rel]

    # ---- whole-run moves ---------------------------------------------------------------------

    def instance(self) -> str | None:
        """The instance of the run at the URL (see :func:`run_instance`); None when it has no run (asked
        again after a moment first: a file system without replacing renames has no config.json while
        another machine replaces it)."""
        import tempfile
        import time

        for wait in (0.0, 0.5, 2.0):
            time.sleep(wait)
            with _scratch(Path(tempfile.gettempdir())) as tmp:
                if self.get("config.json", tmp):
                    return self._instance_of(tmp)
        return None

    def _instance_of(self, downloaded: Path) -> str:
        """The instance in a ``config.json`` just downloaded from the URL; an unreadable one is an error."""
        found = run_instance(downloaded)
        if found is None:
            raise RemoteStorageError(f"{self.url}/config.json cannot be read as a run's config; fix or remove it")
        return found

    def _replaced(self, theirs: str | None) -> RunReplacedError:
        what = ("was deleted" if theirs is None else "was replaced by another run of that name")
        return RunReplacedError(
            f"the run at {self.url} {what} while this process worked on it; nothing more was written there. "
            f"{'Open or resume it again to work on the new run' if theirs else 'Start it again'}, or use "
            "another --run-id")

    def expect(self, local: Path, instance: str) -> None:
        """Record that this process works on run ``instance`` in the copy ``local``."""
        self._expected[str(Path(local).resolve())] = instance

    def expected(self, local: Path) -> str | None:
        """The run instance this process works on in the copy ``local`` (recorded when it created,
        opened or resumed the run; else read from the copy: another process may change that file)."""
        return self._expected.get(str(Path(local).resolve())) or run_instance(local / "config.json")

    def check_instance(self, local: Path) -> None:
        """Raise :class:`RunReplacedError` when the run at the URL is not the one this process works on
        in ``local`` (:meth:`expected`): it was deleted, or deleted and started anew, meanwhile."""
        mine = self.expected(local)
        if mine is None:
            return
        theirs = self.instance()
        if theirs != mine:
            raise self._replaced(theirs)

    def adopt(self, local: Path, expect: str | None = None) -> bool:
        """Make ``local`` this machine's copy of the run at the URL: its ``config.json`` downloaded,
        and whatever ``local`` held emptied first when it was a copy of another run of that name
        (another instance: the URL's run was deleted and started anew). ``expect``: the instance the
        caller works on; another one at the URL raises :class:`RunReplacedError` (checked under the
        lock). Records the instance (:meth:`expect`). Safe for several processes of one machine at once
        (a lock beside the copy). False when the URL has no run."""
        local.parent.mkdir(parents=True, exist_ok=True)
        with _locked(local.parent / f".{local.name}.lock"), _scratch(local.parent) as tmp:
            if not self.get("config.json", tmp):
                if expect is not None:
                    raise self._replaced(None)
                return False
            theirs = self._instance_of(tmp)
            if expect is not None and theirs != expect:
                raise self._replaced(theirs)
            mine = run_instance(local / "config.json")
            if mine is not None and mine != theirs:
                aside = local.with_name(f".{local.name}.replaced-{uuid.uuid4().hex}")
                os.replace(local, aside)  # atomic: no process sees a half-emptied copy
                shutil.rmtree(aside, ignore_errors=True)
            (local / "rows").mkdir(parents=True, exist_ok=True)
            os.replace(tmp, local / "config.json")
            self.expect(local, theirs)
        return True

    def pull(self, local: Path, rows: bool = True, same: bool = False) -> None:
        """:meth:`adopt` ``local``, then download the run's other top-level files (models, leaderboard)
        and, with ``rows``, the rows missing in ``local``. ``same``: the URL must still hold the run
        this process works on there (:meth:`expected`) rather than a new one."""
        expect = self.expected(local) if same else None
        if not self.adopt(local, expect=expect):
            raise RemoteStorageError(f"{self.url!r} is not a saliencybench run (no config.json there)")
        for name in self.names(""):
            if name.endswith((".json", ".csv", ".md", ".html")) and name != "config.json":
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
        """Upload the local copy's outputs: every file outside ``rows/`` and ``heatmaps/`` except
        ``config.json`` and ``models.json``, which are uploaded where they change (leaderboard,
        report, plots), when the URL's run is still the one ``local`` is a copy of."""
        self.check_instance(local)
        for p in sorted(local.rglob("*")):
            rel = p.relative_to(local).as_posix()
            if (p.is_file() and rel.split("/", 1)[0] not in SHARED_SUBDIRS and not p.name.startswith(".")
                    and rel not in OWN_UPLOADS):
                self.put(p, rel)

    def finished(self, local: Path, explain_key: str, keys: list[str]) -> set[str]:
        """Of one unit's task ``keys``, those finished on the URL (one existence check each). A task
        whose rows are in ``local`` but not on the URL (its upload failed before the run stopped) is
        uploaded first, its explain task's heatmaps before any rows, and then counts as finished."""
        out, left = set(), []
        for k in keys:
            if self.exists(f"rows/{k}.parquet"):
                out.add(k)
            elif (local / "rows" / f"{k}.parquet").is_file():
                left.append(k)
        heat = local / "heatmaps" / f"{explain_key}.safetensors"
        if left and heat.is_file() and not self.exists(f"heatmaps/{heat.name}"):
            self.put(heat, f"heatmaps/{heat.name}")
        for k in left:
            self.put(local / "rows" / f"{k}.parquet", f"rows/{k}.parquet")
        return out | set(left)

    def fetch_heatmap(self, store: Any, key: str) -> bool:
        """Download one explain task's heatmap file into ``store`` unless it is there; False when the URL lacks it."""
        return store.has(key) or self.get(f"heatmaps/{key}.safetensors", store.path(key))

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


@contextmanager
def _scratch(folder: Path) -> Iterator[Path]:
    """A temporary file name in ``folder``, removed afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".saliencybench-{os.getpid()}-{uuid.uuid4().hex}.tmp"
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` among this machine's processes (where ``fcntl`` exists)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock (one process per copy there)
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_instance(config_file: Path) -> str | None:
    """Which instance of a run a ``config.json`` belongs to (a uuid written when the run starts;
    runs from before it: its start time and config key); None when there is no readable file."""
    try:
        meta = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    return meta.get("instance") or f"{meta.get('started')}/{meta.get('config_key')}"
