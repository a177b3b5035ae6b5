"""The fast CPU backend of Partial FC (``partialfc.backend: cpu_fused``), behind the plain
core's interface: ``FusedPartialFC`` is a ``PartialFC`` whose steps fuse the memory-bound
sweeps into C++ kernels (``cpu_kernels``, built on first use), reuse their buffers across
steps and overlap the matrix products with the collectives (``fused``, ``collectives``).

Modules: ``cpu_kernels`` (building and loading ``csrc/cpu_kernels.cpp``), ``fused`` (the
fused cosine matrix), ``softmax`` (its distributed softmax cross-entropy), ``rows`` (row
normalisation, gather and projection), ``buffers`` (the workspace and the deferred shard
gradient), ``collectives`` (the batch gather with the labels riding along), ``partial_fc``
(the module).
"""

from partialfc.fast.partial_fc import FusedPartialFC

__all__ = ["FusedPartialFC"]
