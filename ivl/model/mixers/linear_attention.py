"""Linear attention without a forget gate: the paper's negative control among the linear mixers.

    S_t = S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t / sqrt(K)

The GLA layer (``ivl.model.mixers.gla``) with its forget gate removed and nothing else changed (projections, gated
output norm, sizes), so that an ablation against GLA or Gated DeltaNet isolates forgetting. The state only ever
grows: InfiniteVL reports that this mixer does not converge.
"""

from __future__ import annotations

from ivl.model.mixers.gla import GatedLinearAttention


class LinearAttention(GatedLinearAttention):
    label = "linear attention"
    forgets = False
