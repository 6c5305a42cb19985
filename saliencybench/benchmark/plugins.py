"""Plug-ins: user modules that register methods and metrics before a run.

``--plugin path/to/file.py`` (repeatable; config key ``plugins``) imports the file
as a module in the main process and in every worker process, so the methods and
metrics it registers with ``sb.register_method`` / ``sb.register_metric`` can be
named in ``--methods`` / ``--metrics``. Installed packages register through the
entry-point group ``saliencybench.plugins`` (each entry point is a module or a
callable, imported or called once). Importing the same file twice is a no-op.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from importlib import metadata
from pathlib import Path

from ..errors import SaliencyBenchError

ENTRY_POINT_GROUP = "saliencybench.plugins"
_LOADED: dict[str, str] = {}  # resolved path -> module name
_ENTRY_POINTS_LOADED = False


class PluginError(SaliencyBenchError):
    """A plug-in file that is missing or fails to import."""


def _module_name(path: Path) -> str:
    return f"saliencybench_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def load_plugin(path: str | Path) -> str:
    """Import the plug-in file ``path`` (once); returns its module name."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PluginError(f"plug-in file {str(path)!r} does not exist; give the path of a .py file")
    if p.suffix != ".py":
        raise PluginError(f"plug-in {str(path)!r} is not a .py file")
    key = str(p.resolve())
    if key in _LOADED:
        return _LOADED[key]
    name = _module_name(p.resolve())
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise PluginError(f"plug-in {str(path)!r} cannot be imported as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in user code is reported with its location
        sys.modules.pop(name, None)
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise PluginError(f"plug-in {str(path)!r} failed to import: {type(e).__name__}: {e} "
                          f"(at {frame.filename}:{frame.lineno})") from None
    _LOADED[key] = name
    return name


def load_entry_points() -> list[str]:
    """Import (once) the plug-ins that installed packages declare in the ``saliencybench.plugins`` group."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return []
    _ENTRY_POINTS_LOADED = True
    names = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as e:  # noqa: BLE001
            raise PluginError(f"plug-in entry point {ep.name!r} ({ep.value}) failed to load: "
                              f"{type(e).__name__}: {e}") from None
        names.append(ep.name)
    return names


def load_plugins(paths: list[str]) -> list[str]:
    """Import the installed entry-point plug-ins and the plug-in files ``paths``; returns module names."""
    load_entry_points()
    return [load_plugin(p) for p in paths]
