"""What produced a result: package versions (recorded in every row and in config.json)."""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that produce a result row."""
    out = {"python": platform.python_version()}
    for pkg in ("saliencybench", "torch", "timm", "numpy", "scipy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out
