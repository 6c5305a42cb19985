"""Feature spaces: nearest-neighbour retrieval, class agreement and t-SNE.

The classic figure (Krizhevsky, Sutskever, Hinton 2012, fig. 4): images whose
penultimate features are close share their class, while images close in raw pixels
share pose and colour. :func:`class_agreement` turns it into a number, and
:func:`tsne_embedding` (van der Maaten & Hinton 2008, scikit-learn) reports the
trustworthiness of its 2-D map (Venna & Kaski 2001): 1 when every point's 2-D
neighbours are also its neighbours in feature space.
"""

from __future__ import annotations

import torch

from ..errors import InvalidInputError

METRICS = ("cosine", "euclidean")


def _check_features(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidInputError(f"{name} must be a float Tensor[N,D], got {shape}")
    if len(x) == 0:
        raise InvalidInputError(f"{name} is empty: there is nothing to compare")


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """Raw pixels of images Tensor[N,C,H,W] as vectors Tensor[N,C*H*W]."""
    return images.flatten(1)


def pairwise_distances(query: torch.Tensor, bank: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Distances Tensor[Q,N] between rows of query[Q,D] and bank[N,D].

    ``cosine``: 1 - cosine similarity (a zero vector has similarity 0 to all);
    ``euclidean``: the L2 distance.
    """
    if metric == "cosine":
        q = torch.nn.functional.normalize(query.double(), dim=1)
        b = torch.nn.functional.normalize(bank.double(), dim=1)
        return 1 - q @ b.T
    if metric == "euclidean":
        return torch.cdist(query.double(), bank.double())
    raise InvalidInputError(f"unknown metric {metric!r}; use one of {METRICS}")


def nearest_neighbours(query: torch.Tensor, bank: torch.Tensor, k: int, metric: str = "cosine",
                       exclude: torch.Tensor | None = None, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest bank rows of each query row: (indices LongTensor[Q,k], distances Tensor[Q,k]).

    query Tensor[Q,D], bank Tensor[N,D]; nearest first, ties by bank index.
    ``exclude`` LongTensor[Q] (or -1 entries) names one bank index per query to
    leave out: pass ``torch.arange(N)`` for leave-one-out retrieval within one set.
    """
    _check_features("query features", query)
    _check_features("bank features", bank)
    if query.shape[1] != bank.shape[1]:
        raise InvalidInputError(f"query and bank features differ in dimension: {query.shape[1]} vs {bank.shape[1]}")
    available = len(bank) - (1 if exclude is not None else 0)
    if not 1 <= k <= available:
        raise InvalidInputError(f"k must be in 1..{available} (the bank has {len(bank)} items), got {k}")
    if exclude is not None and exclude.shape != (len(query),):
        raise InvalidInputError(f"exclude must be a LongTensor[{len(query)}], got {tuple(exclude.shape)}")
    idx, dist = [], []
    for start in range(0, len(query), chunk):
        d = pairwise_distances(query[start : start + chunk], bank, metric)
        if exclude is not None:
            ex = exclude[start : start + chunk].to(d.device)
            rows = torch.arange(len(d), device=d.device)[ex >= 0]
            d[rows, ex[ex >= 0]] = float("inf")
        sorted_d, order = torch.sort(d, dim=1, stable=True)
        idx.append(order[:, :k])
        dist.append(sorted_d[:, :k])
    return torch.cat(idx), torch.cat(dist)


def class_agreement(neighbours: torch.Tensor, query_labels: torch.Tensor, bank_labels: torch.Tensor) -> float:
    """Share in [0,1] of the neighbours LongTensor[Q,k] whose bank label equals their query's label.

    query_labels LongTensor[Q], bank_labels LongTensor[N].
    """
    if neighbours.ndim != 2 or len(neighbours) != len(query_labels):
        raise InvalidInputError(f"neighbours must be LongTensor[Q,k] with Q = {len(query_labels)} queries, "
                                f"got {tuple(neighbours.shape)}")
    return float((bank_labels[neighbours] == query_labels.view(-1, 1)).double().mean())


def tsne_embedding(features: torch.Tensor, seed: int = 0, perplexity: float = 30.0, n_neighbors: int = 5
                   ) -> tuple[torch.Tensor, float]:
    """t-SNE of features Tensor[N,D] (Euclidean): (embedding Tensor[N,2], trustworthiness in [0,1]).

    scikit-learn's ``TSNE`` (Barnes-Hut, PCA initialisation, ``random_state=seed``,
    so deterministic for a seed) with ``perplexity`` capped at (N - 1) / 3 for small
    sets, and ``sklearn.manifold.trustworthiness`` of the embedding with
    ``n_neighbors`` (capped below N / 2). Needs at least 6 points.
    """
    from sklearn.manifold import TSNE, trustworthiness

    _check_features("features", features)
    n = len(features)
    if n < 6:
        raise InvalidInputError(f"t-SNE needs at least 6 points, got {n}")
    x = features.detach().double().cpu().numpy()
    perp = float(min(perplexity, (n - 1) / 3))
    emb = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(x)
    nn_ = max(1, min(n_neighbors, (n - 1) // 2 - 1))
    trust = float(trustworthiness(x, emb, n_neighbors=nn_))
    return torch.from_numpy(emb).float(), trust
