"""Independent references the kernels are tested against: the formulas written as plainly as possible."""

import torch


def naive_gated_delta(q, k, v, g, beta, scale=None, initial_state=None):
    """Per-token loop of S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T (scale q_t).

    Shapes as fla: q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; state [B, H, K, V]. float64 throughout.
    """
    q, k, v, g, beta = (t.double() for t in (q, k, v, g, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = torch.zeros(B, H, K, V, dtype=torch.float64) if initial_state is None else initial_state.double()
    eye = torch.eye(K, dtype=torch.float64)
    outs = []
    for t in range(T):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t][..., None, None]
        transition = eye - bt * kt[..., :, None] * kt[..., None, :]  # [B, H, K, K]
        S = g[:, t].exp()[..., None, None] * (transition @ S) + bt * kt[..., :, None] * vt[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    return torch.stack(outs, dim=1), S


def dense_window_attention(q, k, v, window, doc_ids=None, scale=None):
    """Softmax attention with an explicit [T, T] band mask and key/value heads repeated per query group."""
    B, T, Hq, D = q.shape
    groups = Hq // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scale = D**-0.5 if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * scale
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            in_window = window is None or i - j < window
            same_doc = doc_ids is None or doc_ids[i] == doc_ids[j]
            allowed[i, j] = j <= i and in_window and same_doc
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v.double())
