"""Model plumbing shared by methods and metrics: state guard, scores, layers, heads, fast paths.

Modules: :mod:`.core` (the guard, scores, batch sizes, precision), :mod:`.folding` (batch norms
folded into convolutions), :mod:`.fastpath` (the probed fast inference path), :mod:`.layers`
(layer outputs as feature maps, the GAP + linear head check).

Nothing here keeps state on the model: :func:`model_guard` puts the model in eval
mode and freezes its parameters for the duration of a call, and restores training
flags, ``requires_grad`` and ``inplace`` flags and removes every hook on exit, also
when an exception is raised midway.

The fast inference paths (:func:`fast_inference`: channels_last weights and inputs,
batch norms folded into convolutions) may only change the speed: each is probed
against the plain model once per model structure and input, declines with a note
where it raises or differs, and can be switched off (:func:`fast_paths`).
"""

from __future__ import annotations

from .core import (
    ACTIVATION_TYPES, PRECISIONS, RELU_TYPES, SCORES, GuardState, activation_modules, auto_batch_size, autocast,
    describe_error, fast_layout, free_memory_bytes, get_module, has_feature_head_split, int_pair,
    is_out_of_memory, iter_tensors, model_guard, non_relu_activations, num_classes, resolve_batch_size,
    safe_forward, target_score, upcast,
)
from .fastpath import (
    channels_last, fast_inference, fast_paths, fast_paths_enabled, runs_channels_last, to_channels_last,
)
from .folding import (
    METADATA_QUERIES, conv_batchnorm_pairs, folded_batchnorm,
)
from .layers import (
    FEATURES, LayerMap, LayerMaps, forward_with_layer, gap_linear_head, resolve_layer, use_layer_maps,
)

__all__ = [
    'ACTIVATION_TYPES', 'PRECISIONS', 'RELU_TYPES', 'SCORES', 'GuardState', 'activation_modules',
    'auto_batch_size', 'autocast', 'describe_error', 'fast_layout', 'free_memory_bytes', 'get_module',
    'has_feature_head_split', 'int_pair', 'is_out_of_memory', 'iter_tensors', 'model_guard',
    'non_relu_activations', 'num_classes', 'resolve_batch_size', 'safe_forward', 'target_score', 'upcast',
    'channels_last', 'fast_inference', 'fast_paths', 'fast_paths_enabled', 'runs_channels_last',
    'to_channels_last', 'METADATA_QUERIES', 'conv_batchnorm_pairs', 'folded_batchnorm', 'FEATURES', 'LayerMap',
    'LayerMaps', 'forward_with_layer', 'gap_linear_head', 'resolve_layer', 'use_layer_maps',
]
