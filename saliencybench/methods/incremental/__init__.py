"""Exact incremental occlusion: recompute only the part of each feature map a window changes.

Nakandala, Kumar, Papakonstantinou, "Incremental and Approximate Inference for Faster
Occlusion-based Deep CNN Explanations" (SIGMOD 2019, "Krypton"). An occluding window
changes a region of each feature map (its projective field), so each occluded image
needs each stage only on that region:

1. The model is split into stages whose composition is its forward pass
   (:func:`split_stages`): the timm children of ``forward_features`` in order, with
   ``nn.Sequential`` containers opened (a ResNet's ``layer1`` gives its blocks, an
   EfficientNet's ``blocks`` its inverted-residual blocks), stages without convolutions
   (norms, activations, pooling) merged into the one before, then ``forward_head``. The split is checked
   on a random probe: stage by stage must reproduce ``forward_features`` and the head
   the logits. A timm ``BasicBlock`` is then opened into two stages, one per 3x3
   convolution (:func:`open_blocks`; the first passes the shortcut on as extra
   channels), so that each convolution gets a crop of its own changed region rather
   than the first computing the second's halo too.
2. Each stage's geometry is traced op by op (:class:`_LocalityTracer`): along each axis,
   output unit ``o`` reads input positions ``o*stride - padding ... + size - 1``,
   composed over convolutions and pooling, the union over the paths of residual blocks.
   Only operations known to be translation-equivariant and local are accepted
   (convolution, eval-mode batch norm, pointwise activations and arithmetic, pooling,
   channel concatenation and slicing); global pooling (squeeze-excitation, attention),
   padding computed from the input size, position-dependent constants or values read
   into Python make the stage non-local, and it and every later stage run in full.
3. Per stage and axis, every window's changed output region ``[lo, hi)`` follows from
   the previous stage's changed region. Windows near a border change less of the deep
   maps, so the window positions of each axis are bucketed by the work their regions
   imply and each group (rows bucket x columns bucket, :class:`WindowGroup`) is
   planned on its own. A stage runs on a crop of its input of one fixed length for the
   group's windows (so the crops stack into one batch): it starts at a
   multiple of the stage's stride (so crop outputs lie on the full map's grid) and
   is long enough that every output of ``[lo, hi)`` reads no artificial padding; crops
   that would leave the map are shifted inward, keeping the alignment, so that at a
   true border they are zero-padded exactly as the full map is.
4. A crop is assembled in one gather from the stage's clean input (cached from one
   clean pass) and the previous stage's output inside its changed region. Where a crop
   would cost ``CROP_COST_LIMIT`` of the whole map or more, the stage's full input is
   assembled the same way and the stage runs in full (an opened block whose two halves
   both do runs as the block); the changed regions are still tracked, so a later,
   cheaper stage runs on crops again.

:func:`plan_occlusion` builds and checks the plan (it compares a few windows with full
forward passes of the occluded probe) and raises :class:`NotApplicableError` naming
the reason when the incremental computation cannot be established;
:func:`incremental_occlusion` falls back to full forwards with a note instead.

Cost. Each group's windows run :func:`chunk_size` at a time (one window's activations
are far smaller than a full pass's), float32 in channels-last memory like the
full-forward loop. On resnet18 at 224 px with window 16 and stride 8 (3 x 3 groups of 81
windows) the stages up to ``layer3.0.conv1`` run on crops for every window, ``layer3``
and ``layer4.0.conv1`` for the windows off the centre, the rest of ``layer4`` in full (a
window changes nearly all of its 7x7 maps): 0.48 of the convolution work of full
forwards (0.56 with whole blocks, one group and every stage after the first full one in
full; 0.36 if every convolution computed exactly its changed region). Measured on one
thread of a busy 2-core machine, interleaved in one process: 2.5x less time per window
than full forward passes in channels-last memory (2.2x before), 2.25x end to end with
the plan's own single-image passes (1.95x before); the memory-bound work on the stem's
large maps shrinks more than the multiply-adds. :func:`occlusion_profile` breaks this
down per stage.

Modules: :mod:`.tracing` (the stage split and each stage's geometry), :mod:`.planning`
(the crops per stage and window group), :mod:`.executing` (checking and running a plan,
the method's path with its fallbacks, and the profile). Every public name is
re-exported here.
"""

from __future__ import annotations

from ..windows import resolve_window
from .executing import (MIN_JOBS, PLAN_COST_LIMIT, clean_inputs, incremental_occlusion, plan_occlusion,
                        run_occlusion_plan, window_scores)
from .profiling import format_profile, occlusion_profile
from .planning import (CROP_COST_LIMIT, GROUP_COST, MAX_BUCKETS, MAX_CHUNK_FACTOR, OPEN_BLOCKS, AxisPlan, OcclusionPlan,
                       WindowGroup, build_plan, chunk_size, plan_axis, probe_image)
from .tracing import IDENTITY, AxisGeometry, ConvRecord, Geometry, Stage, open_blocks, split_stages, trace_stage

__all__ = [
    "AxisGeometry", "IDENTITY", "Geometry", "ConvRecord", "Stage", "trace_stage", "split_stages", "open_blocks",
    "AxisPlan", "plan_axis", "WindowGroup", "OcclusionPlan", "build_plan", "probe_image", "resolve_window",
    "plan_occlusion", "clean_inputs", "chunk_size", "window_scores", "run_occlusion_plan", "incremental_occlusion",
    "occlusion_profile", "format_profile", "CROP_COST_LIMIT", "PLAN_COST_LIMIT", "MIN_JOBS", "MAX_CHUNK_FACTOR",
    "MAX_BUCKETS", "GROUP_COST", "OPEN_BLOCKS",
]
