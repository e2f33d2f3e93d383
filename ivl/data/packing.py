"""Batching encoded samples: packing into fixed token budgets (varlen, cu_seqlens) or right padding."""

from __future__ import annotations

import torch

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def plan_packs(lengths: list[int], order: list[int], budget: int) -> list[list[int]]:
    """Group sample indices, in the given order, into packs of at most ``budget`` tokens (greedy, next-fit).

    Order is kept so that the plan is a deterministic function of the shuffled order (resumable).
    """
    packs, current, used = [], [], 0
    for i in order:
        n = lengths[i]
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens, more than the pack budget {budget}")
        if used + n > budget and current:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


def _vision(items: list[dict]) -> dict:
    out = {}
    for key in VISION_KEYS:
        parts = [item[key] for item in items if key in item]
        if parts:
            out[key] = torch.cat(parts)
    return out


def collate_packed(items: list[dict]) -> dict:
    """One row [1, sum T] with cu_seqlens: no attention, state or loss crosses a sample boundary."""
    lengths = [len(item["input_ids"]) for item in items]
    cu = torch.zeros(len(items) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return {
        "input_ids": torch.cat([item["input_ids"] for item in items])[None],
        "labels": torch.cat([item["labels"] for item in items])[None],
        "cu_seqlens": cu,
        **_vision(items),
        "sources": [item["source"] for item in items],
        "tasks": [item.get("task") for item in items],
    }


def collate_padded(items: list[dict], pad_token_id: int) -> dict:
    """[B, max T] right-padded (causality hides right padding; the mask and -100 labels say where it is)."""
    T = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    mask = torch.zeros(len(items), T, dtype=torch.long)
    for b, item in enumerate(items):
        n = len(item["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = item["input_ids"], item["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, **_vision(items),
            "sources": [item["source"] for item in items], "tasks": [item.get("task") for item in items]}
