"""Independent references the kernels are tested against: the formulas written as plainly as possible."""

import torch


def naive_gated_delta(q, k, v, g, beta, scale=None, initial_state=None, dtype=torch.float64):
    """Per-token loop of S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T (scale q_t).

    Shapes as fla: q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; state [B, H, K, V]. Computed in ``dtype``
    (float64 by default) on the inputs' device; differentiable.
    """
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    eye = torch.eye(K, dtype=dtype, device=q.device)
    outs = []
    for t in range(T):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t][..., None, None]
        transition = eye - bt * kt[..., :, None] * kt[..., None, :]  # [B, H, K, K]
        S = g[:, t].exp()[..., None, None] * (transition @ S) + bt * kt[..., :, None] * vt[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    return torch.stack(outs, dim=1), S


def naive_gated_delta_varlen(q, k, v, g, beta, cu_seqlens, scale=None, initial_state=None, dtype=torch.float64):
    """``naive_gated_delta`` per packed sequence (B == 1): (o [1, T, H, V], final states [N, H, K, V])."""
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        o, s = naive_gated_delta(*(t[:, a:b] for t in (q, k, v, g, beta)), scale, h0, dtype)
        outs.append(o)
        states.append(s)
    return torch.cat(outs, dim=1), torch.cat(states)


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


def relative_error(x, ref) -> float:
    """||x - ref|| / ||ref||, in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def assert_as_accurate(got, trusted, exact, factor: float = 4.0) -> None:
    """Two float32 paths of one function (``got``, under test, and ``trusted``) sum in different orders, and each
    CPU's kernels round their own way, so they are not compared with each other: each is compared with the float64
    result ``exact``, and ``got`` may be at most ``factor`` times as far from it as ``trusted`` (or a few float32
    epsilons). Rounding stays within that on any machine; a wrong result does not."""
    floor = 16 * torch.finfo(torch.float32).eps
    error, reference_error = relative_error(got, exact), relative_error(trusted, exact)
    assert error <= factor * max(reference_error, floor), (
        f"error {error:.2e} against float64, the trusted path's {reference_error:.2e}"
    )


def float64(module):
    """A float64 copy of a model: the exact result its float32 paths are held to."""
    import copy

    return copy.deepcopy(module).double()


def doubled(inputs: dict) -> dict:
    """Model inputs with floating-point tensors (pixels) in float64."""
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
