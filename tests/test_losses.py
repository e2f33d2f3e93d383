"""The chunked head losses against the plain ones (full logits, F.cross_entropy / F.kl_div), gradients included."""

import pytest
import torch
import torch.nn.functional as F
from references import assert_as_accurate

from ivl.model.training.losses import linear_cross_entropy, linear_kl_divergence


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_linear_cross_entropy_equals_plain_cross_entropy(chunk_rows):
    hidden, weight = leaves(torch.randn(50, 16), torch.randn(300, 16))
    targets = torch.randint(0, 300, (50,))
    loss, hits = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    (loss * 3.0).backward()  # an upstream gradient other than 1

    def plain(dtype):
        ref_hidden, ref_weight = leaves(hidden.to(dtype), weight.to(dtype))
        logits = ref_hidden @ ref_weight.T
        ref = F.cross_entropy(logits, targets)
        (ref * 3.0).backward()
        return ref, ref_hidden.grad, ref_weight.grad, logits

    ref, ref_hidden_grad, ref_weight_grad, logits = plain(torch.float32)
    exact = plain(torch.float64)
    for got, trusted, truth in zip((loss, hidden.grad, weight.grad), (ref, ref_hidden_grad, ref_weight_grad), exact):
        assert_as_accurate(got.detach(), trusted.detach(), truth.detach())
    assert torch.equal(hits, logits.argmax(-1) == targets)


def test_linear_cross_entropy_counts_hits():
    weight = torch.eye(4)
    hidden = torch.eye(4)[[0, 1, 2, 3]] * 5
    _, hits = linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 3, 3]))
    assert hits.tolist() == [True, True, False, True]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_linear_kl_equals_plain_kl_at_temperature(temperature):
    hidden, weight = leaves(torch.randn(40, 16), torch.randn(200, 16))
    teacher_hidden, teacher_weight = torch.randn(40, 8), torch.randn(200, 8)
    loss = linear_kl_divergence(hidden, weight, teacher_hidden, teacher_weight, temperature, chunk_rows=9)
    loss.backward()

    def plain(dtype):
        ref_hidden, ref_weight = leaves(hidden.to(dtype), weight.to(dtype))
        T = temperature
        student = F.log_softmax(ref_hidden @ ref_weight.T / T, dim=-1)
        teacher = F.log_softmax(teacher_hidden.to(dtype) @ teacher_weight.to(dtype).T / T, dim=-1)
        ref = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * T * T
        ref.backward()
        return ref, ref_hidden.grad, ref_weight.grad

    trusted, exact = plain(torch.float32), plain(torch.float64)
    for got, ref, truth in zip((loss, hidden.grad, weight.grad), trusted, exact):
        assert_as_accurate(got.detach(), ref.detach(), truth.detach())


def test_kl_is_zero_for_the_teacher_itself():
    hidden, weight = torch.randn(10, 8), torch.randn(50, 8)
    assert float(linear_kl_divergence(hidden, weight, hidden, weight, 2.0)) == pytest.approx(0.0, abs=1e-5)


def test_bf16_weight_gets_a_bf16_gradient_close_to_the_float32_one():
    """Under FSDP2 the head is a bf16 parameter: its gradient comes back in bf16, accumulated in float32."""
    hidden = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(500, 32, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 500, (64,))
    linear_cross_entropy(hidden, weight, targets, chunk_rows=16)[0].backward()
    assert weight.grad.dtype == torch.bfloat16 and hidden.grad.dtype == torch.bfloat16
    ref_weight = weight.detach().float().requires_grad_()
    F.cross_entropy(hidden.detach().float() @ ref_weight.T, targets).backward()
    assert ((weight.grad.float() - ref_weight.grad).norm() / ref_weight.grad.norm()) < 2e-2


def test_no_gradient_work_without_grad_mode():
    hidden, weight = leaves(torch.randn(5, 4), torch.randn(9, 4))
    with torch.no_grad():
        loss, hits = linear_cross_entropy(hidden, weight, torch.randint(0, 9, (5,)))
    assert not loss.requires_grad and hits.shape == (5,)


def test_empty_selection_gives_a_zero_loss_that_backpropagates():
    hidden, weight = leaves(torch.randn(0, 4), torch.randn(9, 4))
    loss, hits = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and hits.numel() == 0 and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chunk_losses_on_the_gpu_equal_the_plain_ones(dtype):
    """On CUDA each chunk's softmax, loss, argmax and gradient run compiled (``@fused``), over a vocabulary wide
    enough for looped reductions and several chunks, the last one short."""
    n, vocab, width, T = 1500, 40_000, 64, 2.0
    hidden, weight = leaves(
        torch.randn(n, width, device="cuda", dtype=dtype), torch.randn(vocab, width, device="cuda", dtype=dtype) / 4
    )
    teacher_hidden = torch.randn(n, width, device="cuda", dtype=dtype)
    targets = torch.randint(0, vocab, (n,), device="cuda")
    ce, hits = linear_cross_entropy(hidden, weight, targets, chunk_rows=512)
    kl = linear_kl_divergence(hidden, weight, teacher_hidden, weight.detach(), T, chunk_rows=512)
    (ce + kl).backward()

    ref_hidden, ref_weight = leaves(hidden.double(), weight.double())
    logits = ref_hidden @ ref_weight.T
    ref_ce = F.cross_entropy(logits, targets)
    teacher = F.log_softmax(teacher_hidden.double() @ weight.detach().double().T / T, dim=-1)
    ref_kl = F.kl_div(F.log_softmax(logits / T, dim=-1), teacher, log_target=True, reduction="batchmean") * T * T
    (ref_ce + ref_kl).backward()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the logits and gradients are rounded to 8 bits
    for got, want in ((ce, ref_ce), (kl, ref_kl), (hidden.grad, ref_hidden.grad), (weight.grad, ref_weight.grad)):
        assert got.dtype == (torch.float32 if got.dim() == 0 else dtype)
        assert ((got.double() - want).norm() / want.norm()).item() < tolerance
    assert (hits == (logits.argmax(-1) == targets)).float().mean() > 0.99  # rounding may flip a near tie
