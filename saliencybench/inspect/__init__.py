"""Model inspection: the older ways of looking inside a CNN, next to the explanation methods.

- first-layer filters: :func:`first_conv`, :func:`filter_grid`;
- activations: :func:`layer_activations`, :func:`activation_maps`, and the
  maximally activating data-set images with the receptive-field patch of their
  maximum, :func:`top_activating` (receptive fields: :func:`receptive_field`);
- class visualisation by regularised gradient ascent: :func:`class_visualisation`
  (Simonyan et al. 2014; Yosinski et al. 2015);
- feature spaces: :func:`penultimate_features`, :func:`nearest_neighbours`,
  :func:`class_agreement`, :func:`tsne_embedding` with its trustworthiness;
- figures: ``write_*`` save PNGs and return their paths.

The functions take and return tensors; the command line is ``saliencybench inspect``
(:mod:`saliencybench.inspect.cli`).
"""

from typing import Any

from .classvis import ClassVisualisation, class_visualisation, gaussian_blur
from .embedding import (class_agreement, nearest_neighbours, pairwise_distances, pixel_features,
                        tsne_embedding)
from .features import (TopActivation, activation_maps, check_channel, dataset_tensors, filter_grid, first_conv,
                       layer_activations, penultimate_features, top_activating)
from .receptive import ReceptiveField, default_input_size, receptive_field

_FIGURES = ("write_activation_maps", "write_class_visualisation", "write_filters", "write_neighbours",
            "write_top_activating", "write_tsne")


def __getattr__(name: str) -> Any:
    """The figure writers, imported on first use (so importing the package does not load matplotlib)."""
    if name in _FIGURES:
        from . import figures

        return getattr(figures, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ClassVisualisation", "class_visualisation", "gaussian_blur", "class_agreement", "nearest_neighbours",
    "pairwise_distances", "pixel_features", "tsne_embedding", "TopActivation", "activation_maps", "check_channel",
    "dataset_tensors", "filter_grid", "first_conv", "layer_activations", "penultimate_features", "top_activating",
    "write_activation_maps", "write_class_visualisation", "write_filters", "write_neighbours",
    "write_top_activating", "write_tsne", "ReceptiveField", "default_input_size", "receptive_field",
]
