"""Losses on the LM head that never keep a [tokens, vocab] float32 tensor: cross-entropy and distillation KL.

At 8K tokens the head's float32 logits are 8,192 x 151,936 x 4 bytes = 5 GB, and autograd keeps two or three
such tensors for the backward of a plain ``F.cross_entropy(lm_head(h).float(), y)``. Here the head runs over
chunks of rows, and each chunk's gradients (with respect to the hidden states and the head weight) are computed
right away in the forward, as liger-kernel's and cut-cross-entropy's fused linear losses do: one chunk's logits
live at a time and the backward only scales the stored gradients. Written by hand because it must run on the CPU
(the libraries are Triton-only), with a temperature on both sides of the KL, and with the head weight passed in,
so that under FSDP2 it is the gathered weight of the forward that reads it. Matmuls follow autocast when it is on.

What each chunk computes from its logits (the log-sum-exp, the loss, the argmax and the gradient with respect to
the logits) is one ``@fused`` function: on a GPU one compiled pass or two over the bf16 logits, where PyTorch's ops
one by one make about ten over a float32 copy: at the vocabulary's size those passes are a visible share of a
training step's GPU time (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ivl.kernels.fused import fused
from ivl.kernels.precision import at_least_float32

CHUNK_ROWS = 2048
"""Rows of logits per chunk: 2,048 x 151,936 float32 is 1.2 GB."""


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, and whether each row's argmax is its target.

    Args:
        hidden: [N, D] rows to score (select the labelled positions first).
        weight: [vocab, D] the LM head.
        targets: [N] token ids.

    Returns:
        (loss, a scalar float32 tensor; hits, [N] bool, not differentiable)
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0, torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)


def linear_kl_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = CHUNK_ROWS,
) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(teacher logits / T) || softmax(student logits / T)).

    Logits are ``hidden @ weight.T`` (student, [N, D] x [vocab, D]) and ``teacher_hidden @ teacher_weight.T``
    (no gradient flows to the teacher). The T^2 keeps gradient magnitudes comparable across temperatures.
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    return _LinearKLDivergence.apply(
        hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), float(temperature), chunk_rows
    )


def _accumulate(grad_hidden, grad_weight, rows: slice, grad_logits, hidden, weight) -> None:
    """Add one chunk's d(loss)/d(logits) [C, vocab] into the hidden-state rows and the head weight gradients."""
    grad_logits = grad_logits.to(
        hidden.dtype
        if not torch.is_autocast_enabled(hidden.device.type)
        else torch.get_autocast_dtype(hidden.device.type)
    )
    if grad_hidden is not None:
        grad_hidden[rows] = grad_logits @ weight.to(grad_logits.dtype)
    if grad_weight is not None:
        grad_weight += (grad_logits.T @ hidden[rows].to(grad_logits.dtype)).float()


@fused
def _cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, with_grad: bool):
    """(sum of the rows' cross-entropies, whether each row's argmax is its target, and ``with_grad`` the sum's
    gradient with respect to the logits: softmax minus the one-hot target, in the logits' dtype)."""
    x = at_least_float32(logits)
    lse = x.logsumexp(-1)
    loss, hits = (lse - x.gather(1, targets[:, None])[:, 0]).sum(), x.argmax(-1) == targets
    if not with_grad:
        return loss, hits, None
    is_target = torch.arange(x.shape[-1], device=x.device) == targets[:, None]
    return loss, hits, ((x - lse[:, None]).exp() - is_target.to(x.dtype)).to(logits.dtype)


@fused
def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, with_grad: bool):
    """(sum over rows of KL(softmax(teacher / T) || softmax(student / T)), and ``with_grad`` its gradient with
    respect to the student logits times T: softmax(student / T) - softmax(teacher / T), in the student's dtype)."""
    s = at_least_float32(student) / temperature
    t = at_least_float32(teacher) / temperature
    log_s = s - s.logsumexp(-1, keepdim=True)
    log_t = t - t.logsumexp(-1, keepdim=True)
    p_t = log_t.exp()
    kl = (p_t * (log_t - log_s)).sum()
    return kl, (log_s.exp() - p_t).to(student.dtype) if with_grad else None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        n = hidden.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        hits = torch.empty(n, dtype=torch.bool, device=hidden.device)
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            loss, hits[rows], grad_logits = _cross_entropy_rows(
                F.linear(hidden[rows], weight), targets[rows], want_hidden or want_weight
            )
            total += loss
            if grad_logits is not None:
                _accumulate(grad_hidden, grad_weight, rows, grad_logits, hidden, weight)
            del grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.scale = 1.0 / n  # the stored gradients are of the sum; the loss is the mean
        ctx.mark_non_differentiable(hits)
        return total / n, hits

    @staticmethod
    def backward(ctx, grad_loss, grad_hits):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss * ctx.scale  # a float32 scalar: a bf16 gradient is scaled in float32 and rounded once
        return (
            grad_hidden * scale if grad_hidden is not None else None,
            grad_weight * scale if grad_weight is not None else None,
            None,
            None,
        )


class _LinearKLDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, temperature, chunk_rows):
        n, T = hidden.shape[0], temperature
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            kl, grad_logits = _kl_rows(
                F.linear(hidden[rows], weight),
                F.linear(teacher_hidden[rows], teacher_weight),
                T,
                want_hidden or want_weight,
            )
            total += kl
            if grad_logits is not None:
                _accumulate(grad_hidden, grad_weight, rows, grad_logits, hidden, weight)
            del grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        # d(T^2 KL / n)/d(student logits) = T (softmax(student / T) - softmax(teacher / T)) / n
        ctx.scale = T / n
        return total * (T * T / n)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss * ctx.scale
        return (
            grad_hidden * scale if grad_hidden is not None else None,
            grad_weight * scale if grad_weight is not None else None,
            None,
            None,
            None,
            None,
        )


@dataclass
class HeadLosses:
    """What ``head_losses`` computed (None where it was not asked for)."""

    ce: torch.Tensor | None = None
    """Mean next-token cross-entropy over labelled positions."""
    correct: torch.Tensor | None = None
    """[samples] 1.0 where every labelled next token of the sample is the head's argmax (what greedy decoding of
    the whole answer gives under teacher forcing), 0.0 where one is not, NaN for a sample with no label."""
    kl: torch.Tensor | None = None
    """T^2 * mean KL(teacher || student) of next-token distributions at temperature T over unmasked positions."""
    teacher_ce: torch.Tensor | None = None
    """The teacher's mean next-token cross-entropy over the same labelled positions (``compare_teacher``)."""
    agreement: torch.Tensor | None = None
    """Fraction of labelled positions where the student's and the teacher's top-1 next tokens agree."""


def head_losses(
    hidden: torch.Tensor,
    head: torch.Tensor,
    labels: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.Tensor | None = None,
    temperature: float = 1.0,
    compare_teacher: bool = False,
    label_positions: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> HeadLosses:
    """The LM head's losses from final hidden states [B, T, D] and the head weight [vocab, D]: next-token
    cross-entropy and exact match over ``labels`` != -100 (never across a packed ``cu_seqlens`` boundary), and with
    the teacher's hidden states and head, the KL to it at ``temperature`` over ``attention_mask`` positions.
    ``compare_teacher`` (with labels and the teacher) adds the teacher's cross-entropy and the top-1 agreement over
    the labelled positions, without gradients (for evaluation). ``label_positions`` (``label_positions(labels,
    cu_seqlens)`` computed on the host with the batch) spares the step from reading them back from the GPU."""
    out = HeadLosses()
    if labels is not None:
        targets = next_token_targets(labels, cu_seqlens)
        positions = label_positions if label_positions is not None else (targets != -100).nonzero(as_tuple=True)
        out.ce, hits = linear_cross_entropy(hidden[:, :-1][positions], head, targets[positions])
        out.correct = _exact_match_per_sample(hits, positions, cu_seqlens, len(targets))
        if compare_teacher and teacher_hidden is not None:
            out.teacher_ce, out.agreement = _compare_with_teacher(
                hidden[:, :-1][positions], head, teacher_hidden[:, :-1][positions], teacher_head, targets[positions]
            )
    if teacher_hidden is not None:
        if attention_mask is None:  # every position: no boolean indexing, which would wait for the GPU
            hidden, teacher_hidden = hidden.flatten(0, 1), teacher_hidden.flatten(0, 1)
        else:
            valid = attention_mask.bool()
            hidden, teacher_hidden = hidden[valid], teacher_hidden[valid]
        out.kl = linear_kl_divergence(hidden, head, teacher_hidden, teacher_head, temperature)
    return out


@torch.no_grad()
def _compare_with_teacher(
    hidden, weight, teacher_hidden, teacher_weight, targets, chunk_rows: int = CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the teacher's mean cross-entropy on ``targets``, the fraction of rows whose argmaxes agree), in chunks."""
    n = hidden.shape[0]
    ce = torch.zeros((), dtype=torch.float32, device=hidden.device)
    agree = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        teacher = F.linear(teacher_hidden[rows], teacher_weight).float()
        ce += (teacher.logsumexp(-1) - teacher.gather(1, targets[rows, None])[:, 0]).sum()
        agree += (F.linear(hidden[rows], weight).argmax(-1) == teacher.argmax(-1)).sum()
    return ce / max(n, 1), agree / max(n, 1)


def label_positions(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the positions whose next token is labelled: where ``head_losses`` scores the answers."""
    return (next_token_targets(labels, cu_seqlens) != -100).nonzero(as_tuple=True)


def next_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T - 1]: the label each position t < T - 1 predicts (t + 1's), -100 where nothing is predicted."""
    targets = labels[:, 1:].clone()
    if cu_seqlens is not None:
        # The last token of a sample must not be asked to predict the first token of the next one.
        # (index_fill_: assigning a number through an index tensor copies it to the GPU, which waits)
        targets.index_fill_(1, cu_seqlens[1:-1].long() - 1, -100)
    return targets


def _exact_match_per_sample(
    hits: torch.Tensor, positions: tuple[torch.Tensor, torch.Tensor], cu_seqlens: torch.Tensor | None, rows: int
) -> torch.Tensor:
    """[samples] 1.0 / 0.0 / NaN from per-labelled-position hits (see ``HeadLosses.correct``)."""
    if cu_seqlens is not None:  # the packed sample each labelled position belongs to
        sample = torch.bucketize(positions[1], cu_seqlens[1:].long(), right=True)
        count = len(cu_seqlens) - 1
    else:
        sample, count = positions[0], rows
    wrong = hits.new_zeros(count, dtype=torch.long).index_add_(0, sample, (~hits).long())
    answered = hits.new_zeros(count, dtype=torch.long).index_add_(0, sample, torch.ones_like(sample))
    return (wrong == 0).float().masked_fill(answered == 0, float("nan"))
