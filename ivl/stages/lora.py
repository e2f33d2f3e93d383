"""LoRA for any stage: peft adapters injected into the student's language model, merged into plain weights on
export. One path for ``LongContextModule`` and the ``LoRAInjection`` callback.

Merging works on a full state dict rather than on modules (peft's ``merge_and_unload``), so that it is the same
code whether the model was sharded with FSDP2 (the state dict is gathered to rank 0) or not.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from safetensors.torch import save_file

ADAPTER = "default"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
DEFAULT_TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "g_proj",
    "in_proj",
    "out_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]
"""Every projection of attention, the linear mixers (Gated DeltaNet, GLA, linear attention; Mamba2's in/out) and
the MLPs."""
TRAINABLE = [r".*\.lora_[AB]\..*"]
"""``trainable`` patterns that train the adapters only."""


def lora_config(
    r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules: list[str] | str | None = None
) -> LoraConfig:
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules or DEFAULT_TARGETS)
    config._register_custom_module({nn.Linear: LoraLinear})
    return config


class LoraLinear(PeftLoraLinear):
    """peft's LoRA linear layer (same parameters, names, merging and saving) whose forward and backward fold the
    adapter into the base layer's products.

    peft computes ``base(x) + B(A(x)) * scaling`` through autograd: two more passes over the [tokens, out] output
    in the forward (the scaling and the sum), one in the backward (the scaling), and a sum of the base's and the
    adapter's input gradients over [tokens, in], per adapted projection (eight in a Gated DeltaNet block). At 32K
    tokens those passes are a visible share of a Stage III step. Here ``LoraProduct`` folds the adapter's scaled product
    into the base layer's products, accumulated with them in float32. Dropout draws as peft's does (after the base
    product, same shape). Anything else (several or disabled adapters, merged weights, DoRA, autocast, mixed
    dtypes) runs peft's forward.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
        base = self.base_layer
        if (
            args
            or kwargs
            or name not in self.lora_A
            or name in self.lora_variant
            or self.disable_adapters
            or self.merged
            or type(base) is not nn.Linear
            or torch.is_autocast_enabled(x.device.type)
            or len({x.dtype, base.weight.dtype, self.lora_A[name].weight.dtype, self.lora_B[name].weight.dtype}) > 1
        ):
            return super().forward(x, *args, **kwargs)
        rows = x.reshape(-1, x.shape[-1])
        dropped = self.lora_dropout[name](rows)
        out = LoraProduct.apply(
            rows,
            None if dropped is rows else dropped,
            base.weight,
            base.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
        )
        return out.view(*x.shape[:-1], out.shape[-1])


class LoraProduct(torch.autograd.Function):
    """``x W^T + bias + scaling * (d A^T) B^T`` over rows x [N, in], with d the dropped-out x (None: x itself).

    Where both products read the same x (no dropout), the adapter's term joins the base product along its inner
    dimension, on whichever side is cheaper: a widening projection (out > in, such as gate and up) computes
    ``[x, scaling * x A^T] [W, B]^T`` in one product, copying the narrow [N, in + r] input rather than reading and
    writing the wide [N, out] output once more in an ``addmm_``; a narrowing one (down, o) gets its input gradient
    as ``[g, scaling * g B] [W; A]`` likewise. Otherwise the adapter's term is added with ``addmm_``. The adapter's
    gradients are scaled on its [N, r] product, not on the [N, out] gradient.
    """

    @staticmethod
    def forward(ctx, x, dropped, weight, bias, lora_a, lora_b, scaling):
        adapter_in = x if dropped is None else dropped
        low_rank = F.linear(adapter_in, lora_a)
        if dropped is None and weight.shape[0] > weight.shape[1]:
            out = F.linear(torch.cat([x, low_rank * scaling], dim=1), torch.cat([weight, lora_b], dim=1), bias)
        else:
            out = F.linear(x, weight, bias)
            out.addmm_(low_rank, lora_b.T, alpha=scaling)
        ctx.scaling, ctx.dropped = scaling, dropped is not None
        ctx.save_for_backward(
            x if weight.requires_grad else None,
            adapter_in if lora_a.requires_grad else None,
            weight,
            lora_a,
            lora_b,
            low_rank if lora_b.requires_grad else None,
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        x, adapter_in, weight, lora_a, lora_b, low_rank = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad = grad.reshape(-1, grad.shape[-1])
        low_grad = (grad @ lora_b).mul_(ctx.scaling)  # reaching the adapter's [N, r] product
        dx = d_dropped = None
        if needs[0]:
            if ctx.dropped:
                dx = grad @ weight
            elif weight.shape[1] > weight.shape[0]:
                dx = torch.cat([grad, low_grad], dim=1) @ torch.cat([weight, lora_a], dim=0)
            else:
                dx = (grad @ weight).addmm_(low_grad, lora_a)
        if needs[1]:
            d_dropped = low_grad @ lora_a
        return (
            dx,
            d_dropped,
            grad.T @ x if needs[2] else None,
            grad.sum(0) if needs[3] else None,
            low_grad.T @ adapter_in if needs[4] else None,
            (grad.T @ low_rank).mul_(ctx.scaling) if needs[5] else None,
            None,
        )


def inject(lm: nn.Module, config: LoraConfig) -> None:
    """Adapters into ``lm`` in place (names gain ``.base_layer`` / ``.lora_A.default`` / ``.lora_B.default``)."""
    inject_adapter_in_model(config, lm, adapter_name=ADAPTER)


def scalings(model: nn.Module) -> dict[str, float]:
    """{adapted module name: alpha / r} of every LoRA layer in ``model``."""
    return {name: m.scaling[ADAPTER] for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def base_layer_names(state: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """A plain state dict renamed for a model with adapters injected: ``x.weight`` -> ``x.base_layer.weight`` where
    only the latter is among the model's ``names``."""
    renamed = {}
    for name, tensor in state.items():
        module, _, kind = name.rpartition(".")
        adapted = f"{module}.base_layer.{kind}"
        renamed[adapted if name not in names and adapted in names else name] = tensor
    return renamed


def split_and_merge(
    state: dict[str, torch.Tensor], scale: dict[str, float], prefix: str = "lm."
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(plain state with W + scale * B @ A in place of each adapted weight, the adapters in peft's saved layout
    relative to ``prefix``). The plain state loads into a model built without LoRA."""
    merged, adapters = {}, {}
    for name, tensor in state.items():
        if ".lora_" in name:
            adapters[name.removeprefix(prefix).replace(f".{ADAPTER}.", ".")] = tensor
            continue
        if ".base_layer." not in name:
            merged[name] = tensor
            continue
        module, kind = name.split(".base_layer.")
        if kind == "weight":
            a, b = state[f"{module}.lora_A.{ADAPTER}.weight"], state[f"{module}.lora_B.{ADAPTER}.weight"]
            tensor = (tensor.float() + scale[module] * (b.float() @ a.float())).to(tensor.dtype)
        merged[f"{module}.{kind}"] = tensor
    return merged, adapters


def save_adapter(adapters: dict[str, torch.Tensor], config: LoraConfig, directory: Path) -> None:
    """peft's adapter files (``adapter_model.safetensors`` + ``adapter_config.json``)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapters.items()}, directory / ADAPTER_WEIGHTS)
    fields = config.to_dict()
    if isinstance(fields.get("target_modules"), set):
        fields["target_modules"] = sorted(fields["target_modules"])
    (directory / ADAPTER_CONFIG).write_text(json.dumps(fields, indent=2, default=str))
