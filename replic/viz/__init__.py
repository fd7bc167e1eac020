"""Seeing the mechanism: decoder cross-attention figures and head-extremity statistics.

* ``attention``: run a detector with ``return_attention=True`` and keep, for the
  top-scoring queries, the per-head cross-attention maps (and Conditional DETR's
  spatial-only maps) on the feature grid.
* ``geometry``: map feature cells back to original-image pixels (resize and padding).
* ``plots``: per-head overlays, spatial-only vs full, DETR vs Conditional DETR.
* ``extremity``: the fraction of each head's attention on each box edge.
* ``loading``: ``load_model_for_viz`` for replic runs and converted official checkpoints.
* ``ks_attention``: KS-DETR's student and teacher attention in the last encoder layer.
* ``receptive_tokens``: MasKD's receptive-token masks of a token run, and their statistics.

Heavy modules (matplotlib, pandas, the model library) are imported by the submodules,
not here, so ``import replic.viz`` stays cheap.
"""

from __future__ import annotations

__all__ = ["attention", "extremity", "geometry", "ks_attention", "loading", "plots", "receptive_tokens"]
