"""The baseline the benchmark trains beside InfiniteVL: a Qwen2.5-3B-shaped transformers LM (sdpa) as a Lightning
module, sharded, checkpointed, optimised and given the same losses as the stages."""

from __future__ import annotations

import re

import lightning as L
import torch
import torch.nn as nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from ivl.bench.random_models import random_init_, teacher_config
from ivl.model.training.cheap_recompute import cheap, recompute_cheap_activations
from ivl.model.training.losses import head_losses
from ivl.stages import distributed, host_batch, lora
from ivl.stages.base import adamw


class CausalLMLosses(nn.Module):
    """transformers' causal LM returning ``ivl.model.training.losses.head_losses`` (the chunked losses InfiniteVL trains
    with) from its forward, so that under FSDP2 the tied head is read while gathered."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids, labels=None, teacher_hidden=None, teacher_head=None, temperature=1.0, label_positions=None, **_
    ):
        hidden = self.lm.model(input_ids=input_ids).last_hidden_state
        return head_losses(
            hidden,
            self.lm.lm_head.weight,
            labels,
            None,
            None,
            teacher_hidden,
            teacher_head,
            temperature,
            label_positions=label_positions,
        )


class TransformerStage(L.LightningModule):
    """The baseline: a Qwen2.5-3B-shaped transformers LM (sdpa), sharded, checkpointed and optimised as the stages
    do. ``case`` picks what trains and the loss (the same as InfiniteVL's for that case)."""

    def __init__(
        self,
        case: str,
        shapes: str,
        checkpointing,
        lora_r: int,
        teacher: nn.Module | None = None,
        lr: float = 2e-4,
        keep_gathered: bool = False,
        adamw_fused: bool | None = None,
        lora_dropout: float = 0.0,
        recompute_cheap: bool = True,
    ):
        super().__init__()
        self.lora_dropout, self.recompute_cheap = lora_dropout, recompute_cheap
        self.keep_gathered, self.adamw_fused = keep_gathered, adamw_fused
        self.case, self.shapes, self.checkpointing, self.lora_r, self.lr = case, shapes, checkpointing, lora_r, lr
        self.__dict__["teacher"] = teacher
        self.model = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        text = teacher_config(self.shapes).text_config.to_dict()
        config = Qwen2Config(
            **{
                k: text[k]
                for k in (
                    "vocab_size",
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "rms_norm_eps",
                    "tie_word_embeddings",
                )
            },
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
        with torch.device("meta"):
            self.model = CausalLMLosses(Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa"))
        layers = self.model.lm.model.layers
        if self.case == "stage3":
            lora.inject(self.model.lm, lora.lora_config(self.lora_r, 2 * self.lora_r, self.lora_dropout))
            patterns = lora.TRAINABLE
        elif self.case == "stage1-kl":  # the attention of the layers InfiniteVL turns into linear mixers
            linear = [str(i) for i in range(len(layers)) if i % 4]
            patterns = [rf"lm\.model\.layers\.({'|'.join(linear)})\.self_attn\..*"]
        else:
            patterns = [r"lm\..*"]
        for name, p in self.model.named_parameters():
            p.requires_grad_(any(re.fullmatch(r, name) for r in patterns))
        chosen = distributed.checkpointed_blocks(len(layers), self.checkpointing)
        for i in chosen:
            distributed.checkpoint(layers[i].self_attn if self.checkpointing == "mixers" else layers[i])
        if self.recompute_cheap and chosen:
            for i, layer in enumerate(layers):
                if i not in chosen or self.checkpointing == "mixers":
                    recompute_cheap_in_decoder_layer(layer)
        policy = distributed.MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if self.shapes == "4b" else torch.float32, reduce_dtype=torch.float32
        )
        distributed.store_frozen_in(self.model, policy.param_dtype)
        mesh = self.trainer.strategy.device_mesh["data_parallel"]
        for layer in layers:
            distributed.fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=not self.keep_gathered)
        distributed.fully_shard(self.model, mesh=mesh, mp_policy=policy)
        self.model.to_empty(device=self.trainer.strategy.root_device)
        random_init_(self.model)
        rotary = self.model.lm.model.rotary_emb
        for name, buffer in type(rotary)(rotary.config).named_buffers():
            getattr(rotary, name).copy_(buffer)

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        """As the stages do: what the step would read back from the GPU is computed on the host (``host_batch``)."""
        return host_batch.prepare(batch, pin=self.device.type == "cuda")

    def training_step(self, batch, batch_idx):
        if self.case == "stage1-kl":
            with torch.no_grad():
                teacher_hidden = self.teacher.model(input_ids=batch["input_ids"]).last_hidden_state
            return self.model(
                batch["input_ids"],
                teacher_hidden=teacher_hidden,
                teacher_head=self.teacher.lm_head.weight,
                temperature=2.0,
            ).kl
        return self.model(batch["input_ids"], labels=batch["labels"], label_positions=batch["label_positions"]).ce

    def configure_optimizers(self):
        return adamw(
            [p for p in self.model.parameters() if p.requires_grad],
            fused=self.adamw_fused,
            lr=self.lr,
            betas=(0.9, 0.95),
        )


def recompute_cheap_in_decoder_layer(layer: nn.Module) -> None:
    """InfiniteVL's kept blocks' cheap-activation recomputation (``ivl.model.training.cheap_recompute``) for a
    transformers decoder layer: its two norms' outputs and the SwiGLU product, each computed by transformers' own
    eager code."""
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        norm.forward = cheap(norm.forward)
    mlp = layer.mlp
    mlp.forward = lambda x: mlp.down_proj(_activated_product(mlp.act_fn, mlp.gate_proj(x), mlp.up_proj(x)))
    recompute_cheap_activations(layer)


@cheap
def _activated_product(act_fn, gate, up):
    return act_fn(gate) * up  # transformers' Qwen2MLP
