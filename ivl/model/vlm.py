"""InfiniteVL: the Qwen2.5-VL vision tower in front of the hybrid language model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ivl.model import checkpoint
from ivl.model.cache import HybridCache
from ivl.model.config import InfiniteVLConfig
from ivl.model.lm import HybridLM
from ivl.model.rope_index import multimodal_position_ids
from ivl.model.training.losses import HeadLosses, head_losses, next_token_targets
from ivl.model.vision import build_vision_tower, reset_vision_buffers, vision_features


@dataclass
class InfiniteVLOutput:
    logits: torch.Tensor
    """[B, T, vocab]."""
    loss: torch.Tensor | None = None
    """Mean next-token cross-entropy over labels != -100 (when labels were given)."""


class InfiniteVL(nn.Module):
    def __init__(self, config: InfiniteVLConfig):
        super().__init__()
        self.config = config
        self.processor_source: Path | None = None
        """A folder with the tokenizer and processor files this model goes with (the checkpoint it was loaded from,
        or its teacher's); ``save_pretrained`` copies them. None: the bundled Qwen2.5 tokenizer."""
        self.visual = build_vision_tower(config.vision)
        self.lm = HybridLM(config.text)

    # ---- inputs -> embeddings and positions -------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, hidden] with image/video features scattered into their placeholder tokens."""
        embeds = self.lm.embed_tokens(input_ids)
        for name, pixels, grid, token in (
            ("image", pixel_values, image_grid_thw, self.config.image_token_id),
            ("video", pixel_values_videos, video_grid_thw, self.config.video_token_id),
        ):
            slots = input_ids == token
            if pixels is None:
                # Counting placeholders would wait for the GPU in every text-only training step; placeholders
                # without a grid are refused where their positions are computed (``multimodal_position_ids``).
                if grid is not None and grid.numel():
                    raise ValueError(
                        f"input_ids hold {int(slots.sum())} {name} placeholder tokens but no {name} "
                        f"pixels were given ({name}_grid_thw was)"
                    )
                continue
            n_slots = int(slots.sum())
            if grid is None:
                raise ValueError(f"{name} pixels need {name}_grid_thw")
            features = vision_features(self.visual, pixels, grid)
            if features.shape[0] != n_slots:
                raise ValueError(
                    f"input_ids hold {n_slots} {name} placeholder tokens but the {name}s give "
                    f"{features.shape[0]} features (grids {grid.tolist()})"
                )
            embeds = embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))
        return embeds

    def position_ids(
        self,
        input_ids,
        image_grid_thw=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        attention_mask=None,
        cu_seqlens=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Multimodal RoPE positions [3, B, T] and each row's next position (see ``multimodal_position_ids``)."""
        return multimodal_position_ids(
            input_ids,
            image_token_id=self.config.image_token_id,
            video_token_id=self.config.video_token_id,
            spatial_merge_size=self.config.spatial_merge_size,
            tokens_per_second=self.config.tokens_per_second,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
        )

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> InfiniteVLOutput:
        """Takes the inputs of transformers' Qwen2_5_VLForConditionalGeneration (``mm_token_type_ids`` is
        accepted and ignored: token types follow from the placeholder ids), plus ``cu_seqlens`` for packed
        batches (B == 1, nothing crosses a sample) and a ``cache`` to continue a stream."""
        hidden = self.hidden_states(
            input_ids,
            attention_mask,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            second_per_grid_ts,
            position_ids,
            cu_seqlens,
            cache,
        )
        logits = self.lm.lm_head(hidden)
        loss = next_token_loss(logits, labels, cu_seqlens) if labels is not None else None
        return InfiniteVLOutput(logits=logits, loss=loss)

    def hidden_states(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        position_ids=None,
        cu_seqlens=None,
        cache=None,
    ) -> torch.Tensor:
        """Final-normed LM hidden states [B, T, hidden] (``forward`` without the head)."""
        embeds = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if position_ids is None:
            if cache is not None and cache.seen_tokens:
                raise ValueError("continuing a cache needs explicit position_ids (generate() computes them)")
            position_ids, _ = self.position_ids(
                input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, cu_seqlens
            )
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing to hide: keep the fast kernels
        return self.lm.hidden_states(
            inputs_embeds=embeds,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            cache=cache,
            attention_mask=attention_mask,
        )

    def head_losses(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_hidden: torch.Tensor | None = None,
        teacher_head: torch.Tensor | None = None,
        temperature: float = 1.0,
        compare_teacher: bool = False,
        label_positions: tuple[torch.Tensor, torch.Tensor] | None = None,
        **inputs,
    ) -> HeadLosses:
        """The training forward: hidden states once, then the LM head's losses in chunks
        (``ivl.model.training.losses``), so that no [tokens, vocab] float32 logits are ever kept.

        Args:
            input_ids, **inputs: what ``forward`` takes (attention_mask, pixels, grids, cu_seqlens, ...).
            labels: [B, T] with -100 outside answers: cross-entropy and exact match of the labelled next tokens.
            teacher_hidden, teacher_head: the teacher's final hidden states [B, T, D'] and LM head [vocab, D']:
                KL to the teacher at ``temperature`` over positions where attention_mask is 1 (all without one).
            compare_teacher: also the teacher's cross-entropy and the top-1 agreement on the labels (evaluation).
            label_positions: ``ivl.model.training.losses.label_positions(labels, cu_seqlens)`` if the host has them (the
                stages compute them with the batch): then the step never waits for the GPU to find them.

        Under FSDP2 this method is registered as a forward (``register_fsdp_forward_method``), so the head
        weight (tied to the embeddings) is read while gathered.
        """
        hidden = self.hidden_states(input_ids, **inputs)
        return head_losses(
            hidden,
            self.lm.lm_head.weight,
            labels,
            inputs.get("cu_seqlens"),
            inputs.get("attention_mask"),
            teacher_hidden,
            teacher_head,
            temperature,
            compare_teacher,
            label_positions,
        )

    def block_outputs(
        self, layer_inputs: dict[int, torch.Tensor], attention_mask: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """Each given LM block applied alone to the given input hidden states (Stage I's layer-wise distillation;
        blocks whose mixer takes no positions, i.e. Gated DeltaNet). A forward under FSDP2, like ``head_losses``."""
        return {i: self.lm.layers[i](x, rope=None, attention_mask=attention_mask) for i, x in layer_inputs.items()}

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the buffers that no checkpoint carries (rotary frequencies and axes): after building on the
        meta device and materialising with ``to_empty`` they hold garbage."""
        self.lm.rotary.reset_parameters()
        reset_vision_buffers(self.visual)

    def new_cache(self) -> HybridCache:
        return self.lm.new_cache()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_token_ids: list[int] | None = None,
        prefill_chunk: int | None = 8192,
        generator: torch.Generator | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        return_scores: bool = False,
        decoder: str | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """New tokens [B, n <= max_new_tokens]; rows that stopped early are filled with ``pad_token_id``.
        With ``return_scores``, also the logits [B, n, vocab] each token was chosen from.

        Prompts in a batch are left-padded (attention_mask 0 on the left). Each row runs through the decode engine
        (``ivl.model.decoding.generation``, the server's): prefilled through the constant-memory cache in chunks of
        ``prefill_chunk`` tokens, then one token per step, greedy or sampled (temperature, nucleus top_p).
        ``decoder``: "static" (eager fixed-shape steps) or "cuda_graph" (captured steps; the default on CUDA).
        """
        from ivl.model.decoding.generation import generate  # the decode engine (caches, CUDA graphs, GEMV) loads on use

        embeds = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        position_ids, next_position = self.position_ids(
            input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask
        )
        return generate(
            self,
            embeds,
            position_ids,
            next_position,
            attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=self.config.eos_token_ids if stop_token_ids is None else stop_token_ids,
            pad_token_id=self.config.pad_token_id,
            prefill_chunk=prefill_chunk,
            generator=generator,
            return_scores=return_scores,
            decoder=decoder,
        )

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, max_shard_size: str | int = "5GB") -> None:
        """config.json + model.safetensors (sharded with an index above ``max_shard_size``), dtype kept, and the
        processor files (tokenizer, chat template, image settings) of ``processor_source``, so that the folder is
        all ``InfiniteVL.from_pretrained`` and ``Processor.from_pretrained`` need."""
        checkpoint.save(self, self.config.to_dict(), directory, max_shard_size)
        checkpoint.save_processor(directory, self.processor_source)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> InfiniteVL:
        """Load a folder written by ``save_pretrained`` (no teacher needed); dtype defaults to the saved one."""
        config_dict, saved_dtype = checkpoint.read_config(directory)
        config = InfiniteVLConfig.from_dict(config_dict)
        with torch.device(device):
            model = cls(config)
        model.to(dtype or saved_dtype)
        checkpoint.load_into(model, directory)
        if checkpoint.has_tokenizer(directory):
            model.processor_source = Path(directory)
        return model.eval()

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: vision tower, language model (tied weights counted once) and total."""
        vision = sum(p.numel() for p in self.visual.parameters())
        lm = sum(p.numel() for p in self.lm.parameters())
        return {"vision": vision, "language_model": lm, "total": vision + lm}


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
    """Cross-entropy of token t + 1 given tokens <= t, over labels != -100; never across a packed boundary."""
    targets = next_token_targets(labels, cu_seqlens)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
