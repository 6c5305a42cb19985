"""ROAD's noisy linear imputation (Rong et al. ICML 2022; the authors' ``NoisyLinearImputer``), the
protocol and its cost in :mod:`saliencybench.metrics.road`: every removed pixel the weighted mean of its
in-image 8-neighbours (1/6 direct, 1/12 diagonal), all removed pixels of an image one sparse symmetric
positive definite system (nested-dissection order, SuperLU without pivoting, the channels as one
multi-right-hand-side solve), then seeded Gaussian noise."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

from ..errors import InvalidInputError

# (row offset, column offset, weight): the authors' neighbour weights
NEIGHBOURS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12),
              (0, -1, 1 / 6), (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6))
WEIGHTS = np.array([wt for _, _, wt in NEIGHBOURS])
WEIGHTS_EXT = np.concatenate([WEIGHTS, np.zeros(8)])  # indexed by a key's slot (0-7 neighbours, 8 diagonal)


def _nested_dissection(h: int, w: int, leaf: int = 32) -> np.ndarray:
    """Pixel indices of an H x W grid in geometric nested-dissection order: Int array[H*W].

    A block is split by its middle row (or column, whichever side is longer); the
    two halves come first, the one-pixel separator last (8-neighbours differ by at
    most one row, so a row separates). Blocks of at most ``leaf`` pixels stay raster.
    """
    parts: list[np.ndarray] = []

    def rec(r0: int, r1: int, c0: int, c1: int) -> None:
        if r1 <= r0 or c1 <= c0:
            return
        if (r1 - r0) * (c1 - c0) <= leaf:
            parts.append((np.arange(r0, r1)[:, None] * w + np.arange(c0, c1)).ravel())
        elif r1 - r0 >= c1 - c0:
            m = (r0 + r1) // 2
            rec(r0, m, c0, c1)
            rec(m + 1, r1, c0, c1)
            parts.append(m * w + np.arange(c0, c1))
        else:
            m = (c0 + c1) // 2
            rec(r0, r1, c0, m)
            rec(r0, r1, m + 1, c1)
            parts.append(np.arange(r0, r1) * w + m)

    rec(0, h, 0, w)
    return np.concatenate(parts)


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(neighbours Int[H*W,8] (-1 outside the image), in-image weight sums Float64[H*W],
    nested-dissection order Int[H*W]) of an H x W image."""
    ys, xs = np.divmod(np.arange(h * w), w)
    nbr = np.full((h * w, len(NEIGHBOURS)), -1, dtype=np.int64)
    for k, (dy, dx, _) in enumerate(NEIGHBOURS):
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        nbr[ok, k] = ny[ok] * w + nx[ok]
    return nbr, (nbr >= 0) @ WEIGHTS, _nested_dissection(h, w)


def _neighbour_sums(image: np.ndarray) -> np.ndarray:
    """Sum over each pixel's in-image neighbours of weight x value: Float64[C,H,W] for Float64[C,H,W]."""
    _, h, w = image.shape
    out = np.zeros_like(image)
    for dy, dx, wt in NEIGHBOURS:
        out[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] += \
            wt * image[:, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out


def solve_imputation(image: np.ndarray, is_removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free linear imputation of one image ``image`` Float64[C,H,W] whose pixels
    ``is_removed`` Bool[H*W] are unknown: (their indices Int[n] in nested-dissection
    order, their values Float64[n,C] in that order).

    Row i of the system: ``s_i y_i - sum_j w_ij y_j = sum_k w_ik v_k`` (j removed and
    k kept in-image neighbours, s_i the sum of in-image weights), the authors'
    ``-A y = -b``. The matrix is assembled straight into sorted compressed columns
    (it is symmetric, so its rows are its columns), the right-hand side from eight
    shifted sums of the image with the removed pixels zeroed.
    """
    import scipy.sparse as sp  # scipy is imported by the metrics that use it, on first use
    from scipy.sparse.linalg import splu

    c, h, w = image.shape
    nbr, wsum, nd = _grid(h, w)
    order = nd[is_removed[nd]]
    n = len(order)
    if n == 0:
        return order, np.zeros((0, c))
    var = np.full(h * w + 1, -1, dtype=np.int64)  # the last entry answers the -1 of outside neighbours
    var[order] = np.arange(n)
    nb_var = var[nbr[order]]  # [n, 8]: the neighbour's unknown's index, -1 for kept or outside
    slots = len(NEIGHBOURS)
    # one sortable key per entry: column * 16 + slot (slot 8: the diagonal); absent entries sort last
    keys = np.where(nb_var >= 0, nb_var * 16 + np.arange(slots), np.iinfo(np.int64).max)
    keys = np.concatenate([keys, (np.arange(n) * 16 + slots)[:, None]], axis=1)
    keys.sort(axis=1)
    present = keys != np.iinfo(np.int64).max
    keys = keys[present]
    slot = keys & 15
    values = np.where(slot == slots, np.repeat(wsum[order], present.sum(1)), -WEIGHTS_EXT[slot])
    indptr = np.concatenate([[0], np.cumsum(present.sum(1))])
    matrix = sp.csc_matrix((values, keys >> 4, indptr), shape=(n, n))
    rhs = _neighbour_sums(np.where(is_removed.reshape(h, w), 0.0, image)).reshape(c, -1)[:, order].T
    # No pivoting: the matrix is symmetric positive definite. relax = panel_size = 10: SuperLU sizes
    # a statistics array by its built-in defaults (max(panel, relax) + 1 entries: 21 in SuperLU 5+,
    # 11 in older ones) and indexes it by the sizes passed here, so values above those defaults
    # corrupt the heap; 10 is within every version and ~10% faster than scipy's defaults here.
    lu = splu(matrix, permc_spec="NATURAL", diag_pivot_thresh=0.0, relax=10, panel_size=10,
              options={"SymmetricMode": True})
    return order, lu.solve(np.ascontiguousarray(rhs))


def _solve(image: np.ndarray, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`solve_imputation` of ``image`` Float64[C,H,W] for the pixels ``removed`` (Int array); None if none."""
    if not len(removed):
        return None
    is_removed = np.zeros(image.shape[1] * image.shape[2], dtype=bool)
    is_removed[removed] = True
    return solve_imputation(image, is_removed)


def _fill(image: np.ndarray, removed: np.ndarray, solution: tuple[np.ndarray, np.ndarray] | None, noise: float,
          rng: np.random.Generator) -> np.ndarray:
    """``image`` Float64[C,H,W] with the solved values of ``removed`` plus N(0, noise^2): a copy. The
    noise is drawn [C, n] in raster order of the removed pixels."""
    c, h, w = image.shape
    flat = image.reshape(c, h * w).copy()
    if solution is not None:
        order, solved = solution
        flat[:, order] = solved.T
        if noise:
            flat[:, np.sort(removed)] += noise * rng.standard_normal((c, len(order)))
    return flat.reshape(c, h, w)


def _impute_into(image: np.ndarray, removed: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` Float64[C,H,W] with pixels ``removed`` (Int array) imputed plus N(0, noise^2): a copy."""
    return _fill(image, removed, _solve(image, removed), noise, rng)


def _solutions(image: np.ndarray, sets: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """:func:`_solve` for each removal set, on ``torch.get_num_threads()`` threads (SuperLU releases
    the GIL while it factors and solves; one thread inside a one-thread worker). Only the speed
    depends on the threads: each system is solved alone, and the noise is drawn afterwards, in order."""
    threads = min(torch.get_num_threads(), len(sets))
    if threads <= 1:
        return [_solve(image, r) for r in sets]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda r: _solve(image, r), sets))


def noisy_linear_impute(images: torch.Tensor, removed: torch.Tensor, *, noise: float = 0.01,
                        seed: int = 0) -> torch.Tensor:
    """The authors' noisy linear imputation of ``removed`` BoolTensor[B,H,W] pixels in
    ``images`` Tensor[B,C,H,W] (all channels): Tensor[B,C,H,W], kept pixels unchanged.

    Solved in float64, returned in the images' dtype; the noise (std ``noise``)
    is drawn in raster order of the removed pixels from numpy's generator
    seeded with ``[seed, image position]``.
    """
    if not isinstance(removed, torch.Tensor) or removed.shape != (images.shape[0], *images.shape[2:]):
        raise InvalidInputError(f"removed must be a BoolTensor[B,H,W] matching the images {tuple(images.shape)}")
    if removed.flatten(1).all(1).any():
        raise InvalidInputError("removed covers a whole image: linear imputation needs at least one kept pixel")
    _check_noise(noise)
    out = [_impute_into(img, np.flatnonzero(rem), noise, np.random.default_rng([seed, i]))
           for i, (img, rem) in enumerate(zip(images.detach().double().cpu().numpy(),
                                              removed.cpu().numpy().reshape(len(images), -1)))]
    return torch.from_numpy(np.stack(out)).to(images.device, images.dtype)


def _check_noise(noise: float) -> None:
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not np.isfinite(noise) or noise < 0:
        raise InvalidInputError(f"noise must be a finite standard deviation >= 0, got {noise!r}")
