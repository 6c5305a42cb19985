"""Where a run computes: ``--device auto|cpu|cuda|cuda:N``.

Models, batches, perturbations and methods run on the device; heatmaps and rows
come back to the CPU. ``auto`` picks CUDA when it is available.
"""

from __future__ import annotations

import os
import re

import torch

from ..errors import SaliencyBenchError


class DeviceError(SaliencyBenchError):
    """A device that does not exist on this machine."""


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a clear error when it is absent."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise DeviceError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} was asked for but CUDA is not available on this machine "
                              "(no GPU or a CPU-only torch); use --device cpu or --device auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    return torch.device(name)


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
