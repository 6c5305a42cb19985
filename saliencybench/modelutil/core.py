"""The model guard and the small helpers every method and metric uses: scores, classes, modules,
batch sizes, precision and out-of-memory splitting, activation types.

:func:`model_guard` puts the model in eval mode and freezes its parameters for the duration of a
call, and restores training flags, ``requires_grad`` and ``inplace`` flags and removes every hook on
exit, also when an exception is raised midway.
"""

from __future__ import annotations

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InvalidInputError, UnknownNameError
from ..notes import add_note

SCORES = ("logit", "probability", "log_probability")


@dataclass
class GuardState:
    """Handles and attribute changes registered during a guarded call, undone on exit."""

    handles: list = field(default_factory=list)
    restore: list[Callable[[], None]] = field(default_factory=list)


@contextmanager
def model_guard(model: nn.Module, *, freeze: bool = True) -> Iterator[GuardState]:
    """Run a block with ``model`` in eval mode (and frozen parameters); restore it after.

    Yields a :class:`GuardState` whose ``handles`` (hook handles) are removed and
    whose ``restore`` callables are run when the block exits, whatever happens.
    """
    training = [(m, m.training) for m in model.modules()]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    state = GuardState()
    try:
        model.eval()
        if freeze:
            for p, _ in requires:
                p.requires_grad_(False)
        yield state
    finally:
        for h in state.handles:
            h.remove()
        for undo in reversed(state.restore):
            undo()
        for m, flag in training:
            m.training = flag
        for p, flag in requires:
            p.requires_grad_(flag)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA or CPU allocator)."""
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def safe_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` for a batch Tensor[N,...]; on an out-of-memory error the batch is split
    in halves (recursively, down to one input) and the outputs concatenated."""
    try:
        return model(x)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if not is_out_of_memory(e) or x.shape[0] == 1:
            raise
    if x.is_cuda:
        torch.cuda.empty_cache()
    half = x.shape[0] // 2
    return torch.cat([safe_forward(model, x[:half]), safe_forward(model, x[half:])])


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30


def auto_batch_size(model: nn.Module, image: torch.Tensor, fraction: float = 0.25, limit: int = 256) -> int:
    """A batch size for inference of inputs like ``image`` Tensor[3,H,W] that uses at most
    ``fraction`` of the free memory: the sum of all module outputs' sizes of one
    probe forward bounds the memory per input (inference keeps fewer alive at once)."""
    sizes: list[int] = []

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(image[None])
    finally:
        for h in handles:
            h.remove()
    per_input = max(sum(sizes), image.numel() * image.element_size())
    return int(max(1, min(limit, fraction * free_memory_bytes(image.device) // per_input)))


def resolve_batch_size(batch_size: int | str, model: nn.Module, images: torch.Tensor) -> int:
    """``batch_size`` itself, or :func:`auto_batch_size` for ``"auto"``."""
    if batch_size == "auto":
        return auto_batch_size(model, images[0])
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return batch_size


PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(images: torch.Tensor, precision: str = "float32"):
    """A context running the forward passes in ``precision`` (torch.autocast), or a no-op for float32."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {precision!r}; use one of {sorted(PRECISIONS)}")
    if PRECISIONS[precision] is None:
        return nullcontext()
    return torch.autocast(images.device.type, dtype=PRECISIONS[precision])


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (of autocast) as float32; others unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def fast_layout(images: torch.Tensor) -> bool:
    """Whether many forward passes on ``images`` should run channels_last: float32/16 only
    (oneDNN has no float64 kernels, so float64 references keep the plain layout)."""
    return images.dtype in (torch.float32, torch.float16, torch.bfloat16)


def iter_tensors(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) tensor, list, tuple or dict, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from iter_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_tensors(o)


def int_pair(v: object, default: object = None) -> tuple[int, int]:
    """A module's (h, w) setting as two ints: a scalar, a pair, or the last two of a longer tuple."""
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, (list, tuple)):
        return (int(v[-2]), int(v[-1])) if len(v) >= 2 else (int(v[0]), int(v[0]))
    return (int(v), int(v))


def target_score(logits: torch.Tensor, targets: torch.Tensor, score: str = "logit") -> torch.Tensor:
    """Select the target class score from ``logits[B,C]``: Tensor[B].

    ``score`` is ``"logit"`` (pre-softmax, the default of every method),
    ``"probability"`` (softmax) or ``"log_probability"`` (log-softmax).
    """
    if score == "logit":
        vals = logits
    elif score == "probability":
        vals = logits.softmax(-1)
    elif score == "log_probability":
        vals = logits.log_softmax(-1)
    else:
        raise InvalidInputError(f"unknown score {score!r}; use one of {SCORES}")
    if logits.ndim != 2:
        raise InvalidInputError(f"the model returned outputs of shape {tuple(logits.shape)}; a classifier's "
                                "logits [B, classes] are needed")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise InvalidInputError(f"targets {sorted(set(targets.tolist()))} out of range for the model's "
                                f"{logits.shape[1]} classes")
    return vals.gather(1, targets.view(-1, 1)).squeeze(1)


def num_classes(model: nn.Module) -> int | None:
    """Number of output classes of a timm-style model, or ``None`` if it cannot be told."""
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name``; an unknown name lists the candidates."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        raise UnknownNameError("layer", name, [n for n in modules if n])
    return modules[name]


def has_feature_head_split(model: nn.Module) -> bool:
    """Whether the model exposes timm's ``forward_features`` / ``forward_head`` split."""
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
RELU_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All activation modules of the model (torch's and timm's), with their names."""
    found = []
    for name, m in model.named_modules():
        cls = type(m).__name__
        if isinstance(m, ACTIVATION_TYPES) or cls in {"Swish", "HardSwish", "HardSigmoid", "GELUTanh", "QuickGELU"}:
            found.append((name, m))
    return found


def non_relu_activations(model: nn.Module) -> list[str]:
    """Class names of the model's activation modules that are not ReLU or ReLU6."""
    return sorted({type(m).__name__ for _, m in activation_modules(model) if not isinstance(m, RELU_TYPES)})


def _note(text: str) -> None:
    """Leave a note for the enclosing :func:`~saliencybench.notes.collect_notes`."""
    add_note(text)


def describe_error(error: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 200 characters), for notes."""
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:200]}"
