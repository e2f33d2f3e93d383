"""ivl's LoRA layer (the adapter's product added in the base product's epilogue) against peft's own layer."""

import copy

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from ivl.stages import lora
from ivl.stages.models import load_student


def adapted(module: nn.Module, config: LoraConfig) -> nn.Module:
    module = copy.deepcopy(module)
    inject_adapter_in_model(config, module, adapter_name=lora.ADAPTER)
    return module


def peft_config(r=4, alpha=12, dropout=0.0) -> LoraConfig:
    """peft's own layers: the same settings as ``lora.lora_config`` without ivl's layer."""
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora.DEFAULT_TARGETS)


def same_weights(reference: nn.Module, *others: nn.Module) -> None:
    """The adapters' B made non-zero (it starts at zero), then every model given the reference's weights."""
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_()
        for other in others:
            assert [n for n, _ in other.named_parameters()] == [n for n, _ in reference.named_parameters()]
            for p, q in zip(reference.parameters(), other.parameters()):
                q.copy_(p)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7,), (2, 5)])
def test_lora_layer_gives_peft_outputs_and_gradients(bias, shape, dropout):
    holder = nn.Sequential()
    holder.q_proj = nn.Linear(16, 24, bias=bias, dtype=torch.float64)
    ours, theirs = adapted(holder, lora.lora_config(4, 12, dropout)), adapted(holder, peft_config(dropout=dropout))
    assert type(ours.q_proj) is lora.LoraLinear and type(theirs.q_proj) is PeftLoraLinear
    same_weights(theirs, ours)
    x = torch.randn(*shape, 16, dtype=torch.float64)
    outputs, inputs = [], []
    for model in (ours, theirs):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same dropout mask for both
        out = model.q_proj(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outputs.append(out)
        inputs.append(xi.grad)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inputs[0], inputs[1], rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_lora_layer_gives_peft_gradients_when_the_base_layer_trains_too():
    # The stages freeze the base layer; a user's own `trainable` patterns may not, and x may need no gradient.
    holder = nn.Sequential()
    holder.q_proj = nn.Linear(16, 24, dtype=torch.float64)
    ours, theirs = adapted(holder, lora.lora_config(4, 12)), adapted(holder, peft_config())
    same_weights(theirs, ours)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    for model in (ours, theirs):
        model.requires_grad_(True)
        model.q_proj(x).pow(2).sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_student_with_ivl_lora_layers_gives_peft_losses_and_gradients():
    student = load_student(None, "tiny", 0.25, 64).double()
    ours, theirs = adapted(student.lm, lora.lora_config(4, 12)), adapted(student.lm, peft_config())
    same_weights(theirs, ours)
    ids = torch.randint(0, 200, (2, 33))
    for model in (ours, theirs):
        model(ids).pow(2).mean().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("case", ["fused", "dropout", "disabled", "merged", "float32 adapters"])
def test_only_the_plain_case_leaves_peft_forward(case, monkeypatch):
    calls = []
    peft_forward = PeftLoraLinear.forward
    monkeypatch.setattr(PeftLoraLinear, "forward", lambda self, *a, **k: calls.append(1) or peft_forward(self, *a, **k))
    holder = nn.Sequential()
    holder.q_proj = nn.Linear(16, 24, dtype=torch.float64)
    model = adapted(holder, lora.lora_config(4, 12, dropout=0.5 if case == "dropout" else 0.0)).q_proj
    if case == "disabled":
        model.enable_adapters(False)
    elif case == "merged":
        model.merge()
    elif case == "float32 adapters":
        model.lora_A.float()
        model.lora_B.float()
    model(torch.randn(3, 16, dtype=torch.float64))
    assert len(calls) == (0 if case in ("fused", "dropout") else 1)
