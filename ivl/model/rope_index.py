"""Multimodal RoPE position ids: where every text, image and video token sits on the (time, height, width) axes.

The semantics are those of transformers' Qwen2.5-VL ``get_rope_index`` (5.x), so that a converted model sees the
positions its teacher saw:

- text tokens advance all three axes together by 1 per token;
- the merged patches of an image (or video) starting at position p get time p + round_down(t * interval),
  height p + row and width p + column, where interval is 1 for images and tokens_per_second * seconds per
  temporal patch for videos;
- the text after a vision item continues at p + max(rows, columns).

Differences, all additions: several images may sit in one run of placeholder tokens, packed batches (cu_seqlens)
restart positions at every sample, and mismatched placeholder counts raise an error naming the row.
"""

from __future__ import annotations

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def multimodal_position_ids(
    input_ids: torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: float,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | list[float] | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [3, B, T] and, per row, the position of the next (appended) token.

    Args:
        input_ids: [B, T] with one placeholder token per merged vision patch.
        image_grid_thw, video_grid_thw: [N, 3] patch grids (before the spatial merge), in order of appearance
            over the whole batch.
        second_per_grid_ts: seconds covered by one temporal patch, per video (default 1.0).
        attention_mask: [B, T], 0 at padding (which gets position 0 and is skipped).
        cu_seqlens: int32 [N + 1] boundaries of samples packed in one row (B == 1); each restarts at 0.

    Returns:
        (position_ids [3, B, T] long, next_position [B] long): the s-th token appended to row b takes position
        next_position[b] + s on all three axes: the last token's position + 1, so that generating with a cache
        gives the positions a full forward over the longer sequence gives.
    """
    B, T = input_ids.shape
    device = input_ids.device
    # Computed on the host (the stages call this on the CPU batch, before it reaches the GPU): the loop below is
    # over runs of text and vision tokens, and reading device tensors in it would stall the GPU queue.
    ids = input_ids.cpu()
    kind = torch.full_like(ids, TEXT)
    kind[ids == image_token_id] = IMAGE
    kind[ids == video_token_id] = VIDEO
    grids = {
        IMAGE: [tuple(g) for g in image_grid_thw.tolist()] if image_grid_thw is not None else [],
        VIDEO: [tuple(g) for g in video_grid_thw.tolist()] if video_grid_thw is not None else [],
    }
    if second_per_grid_ts is None:
        seconds = [1.0] * len(grids[VIDEO])
    else:
        seconds = [
            float(s)
            for s in (second_per_grid_ts.tolist() if torch.is_tensor(second_per_grid_ts) else second_per_grid_ts)
        ]
    intervals = {IMAGE: [1.0] * len(grids[IMAGE]), VIDEO: [tokens_per_second * s for s in seconds]}
    used = {IMAGE: 0, VIDEO: 0}
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"with cu_seqlens the batch must be packed along T (B == 1); got B = {B}")
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, T]
    mask = attention_mask.cpu().bool() if attention_mask is not None else None

    position_ids = torch.zeros(3, B, T, dtype=torch.long)
    next_position = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        keep = torch.arange(T) if mask is None else mask[b].nonzero().flatten()
        cuts = torch.searchsorted(keep, torch.tensor(bounds)).tolist()  # each sample's slice of the kept tokens
        for a, z in zip(cuts[:-1], cuts[1:]):
            if a == z:
                continue
            segment = keep[a:z]
            pos = _segment_positions(kind[b, segment], grids, intervals, used, spatial_merge_size, b)
            position_ids[:, b, segment] = pos
            next_position[b] = pos[0, -1] + 1
    for k, name in ((IMAGE, "image"), (VIDEO, "video")):
        if used[k] != len(grids[k]):
            raise ValueError(
                f"{len(grids[k])} {name}(s) given in {name}_grid_thw but input_ids hold placeholder "
                f"tokens for {used[k]}"
            )
    return position_ids.to(device), next_position.to(device)


def _segment_positions(kinds: torch.Tensor, grids, intervals, used, merge, row) -> torch.Tensor:
    """Positions [3, n] of one sample's tokens (kinds [n]: per token TEXT/IMAGE/VIDEO)."""
    run_kinds, run_lengths = torch.unique_consecutive(kinds, return_counts=True)
    pieces, current = [], 0
    for k, n in zip(run_kinds.tolist(), run_lengths.tolist()):
        if k == TEXT:
            pieces.append(torch.arange(current, current + n).expand(3, -1))
            current += n
            continue
        i = 0
        while i < n:  # one or more vision items back to back
            name = "image" if k == IMAGE else "video"
            if used[k] >= len(grids[k]):
                raise ValueError(
                    f"row {row}: more {name} placeholder tokens than {name}s in {name}_grid_thw "
                    f"({len(grids[k])}); each {name} needs its pixels and its {name}_grid_thw row"
                )
            t, h, w = grids[k][used[k]]
            interval = intervals[k][used[k]]
            h, w = h // merge, w // merge
            if n - i < t * h * w:
                raise ValueError(
                    f"row {row}: {name} {used[k]} needs {t * h * w} placeholder tokens (grid "
                    f"{grids[k][used[k]]}) but its run has {n - i}"
                )
            used[k] += 1
            tt = (torch.arange(t) * interval).long() + current
            hh = torch.arange(h) + current
            ww = torch.arange(w) + current
            grid = torch.stack(torch.meshgrid(tt, hh, ww, indexing="ij")).reshape(3, -1)
            pieces.append(grid)
            current += max(h, w)
            i += t * h * w
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
