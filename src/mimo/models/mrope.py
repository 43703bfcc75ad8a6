"""M-RoPE positions: each token's (temporal, height, width) position, as transformers' `get_rope_index` computes
them for Qwen2.5-VL and Qwen3-VL.

A text token's three positions are equal and count up by one. An image of (t, h, w) patches, merged
`spatial_merge_size`² to a token, takes t·(h/m)·(w/m) tokens laid out row-major; starting at the next text
position p, its token (i, j, k) gets (p + i·step, p + j, p + k) (step 1 for images), and the text after it
continues at p + max(h, w) / m. A video is the same with its own token id and grids: Qwen2.5-VL's temporal step
is tokens_per_second · seconds per grid (`VideoGrids.steps`), Qwen3-VL's frames are separate grids of t = 1
(`frame_grids`) with timestamp text between them. A padded position (attention mask 0) gets 0 everywhere.
Rows, and in a packed row each document, count from 0 on their own, so a packed row's positions equal each
sample's unpacked ones. Images (videos) are consumed from their grids in row-major order of their tokens;
consecutive ones with no text between are told apart by their token counts (transformers' grouping would merge
them). Host-side work on the data path (a loop per image, as transformers' is).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimo.models.attention import document_bounds

TEXT, IMAGE, VIDEO = 0, 1, 2  # token kinds (transformers' `mm_token_type_ids`)


@dataclass(frozen=True)
class VideoGrids:
    """A batch's videos: their token id, (t, h, w) patch grids [n, 3] and, for Qwen2.5-VL, each video's temporal
    position step (tokens_per_second · second_per_grid_ts; None: 1)."""

    token_id: int
    grid_thw: torch.Tensor
    steps: torch.Tensor | None = None


def frame_grids(video_grid_thw: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's video grids: each of a video's t frames its own grid of t = 1 (timestamps separate them)."""
    frames = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
    frames[:, 0] = 1
    return frames


def get_rope_index(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, spatial_merge_size: int, image_token_id: int,
    attention_mask: torch.Tensor | None = None, video: VideoGrids | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [3, B, S] and rope deltas [B, 1] (a row's largest position + 1 − its unmasked tokens: what
    generation adds to a new token's index), equal to transformers' `get_rope_index`."""
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    grids = _Grids(image_grid_thw, spatial_merge_size, video)
    kinds = _kinds(input_ids, image_token_id, video).cpu()
    deltas = []
    for row in range(input_ids.shape[0]):
        row_kinds = kinds[row][keep[row].cpu()]
        row_positions = _sample_positions(row_kinds, grids)
        positions[:, row, keep[row].cpu()] = row_positions
        deltas.append(int(row_positions.max()) + 1 - row_kinds.numel() if row_kinds.numel() else 0)
    grids.check_all_used()
    return positions.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def packed_rope_index(
    input_ids: torch.Tensor, document_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
    spatial_merge_size: int, image_token_id: int, video: VideoGrids | None = None,
) -> torch.Tensor:
    """Positions [3, R, T] of packed rows: each document (a run of equal `document_ids`) counted from 0 as the
    sample it is, so every document's positions equal `get_rope_index` of that sample alone."""
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    grids = _Grids(image_grid_thw, spatial_merge_size, video)
    kinds = _kinds(input_ids, image_token_id, video).cpu()
    for row in range(input_ids.shape[0]):
        docs = document_ids[row].cpu()
        starts = document_bounds(docs[None]).tolist()
        for start, end in zip(starts[:-1], starts[1:], strict=True):
            positions[:, row, start:end] = _sample_positions(kinds[row, start:end], grids)
    grids.check_all_used()
    return positions.to(input_ids.device)


def _kinds(input_ids: torch.Tensor, image_token_id: int, video: VideoGrids | None) -> torch.Tensor:
    """Each token's kind: TEXT, IMAGE or VIDEO."""
    kinds = (input_ids == image_token_id).long() * IMAGE
    if video is not None:
        kinds = kinds + (input_ids == video.token_id).long() * VIDEO
    return kinds


class _Grids:
    """The images' and videos' (t, h, w) patch grids in order, handed out one at a time as token grids."""

    def __init__(self, image_grid_thw: torch.Tensor | None, merge: int, video: VideoGrids | None) -> None:
        """Hold the grids on the host; `merge` is the spatial merge size (2: 2×2 patches make one token)."""
        videos = [] if video is None else video.grid_thw.tolist()
        steps = [1.0] * len(videos) if video is None or video.steps is None else video.steps.tolist()
        self.grids = {IMAGE: [(*g, 1.0) for g in ([] if image_grid_thw is None else image_grid_thw.tolist())],
                      VIDEO: [(*g, s) for g, s in zip(videos, steps, strict=True)]}
        self.merge = merge
        self.used = {IMAGE: 0, VIDEO: 0}

    def next(self, kind: int) -> tuple[int, int, int, float]:
        """The next image's (video's) token grid (t, h / merge, w / merge) and temporal step."""
        name = "image" if kind == IMAGE else "video"
        if self.used[kind] == len(self.grids[kind]):
            raise ValueError(f"the input ids hold more {name} tokens than the {len(self.grids[kind])} {name}(s) of "
                             f"{name}_grid_thw make")
        t, h, w, step = self.grids[kind][self.used[kind]]
        self.used[kind] += 1
        return t, h // self.merge, w // self.merge, step

    def check_all_used(self) -> None:
        """Every image and video of the grids found its tokens."""
        for kind, name in ((IMAGE, "image"), (VIDEO, "video")):
            if self.used[kind] != len(self.grids[kind]):
                raise ValueError(f"{name}_grid_thw has {len(self.grids[kind])} {name}(s) but the input ids hold the "
                                 f"tokens of only {self.used[kind]}")


def _sample_positions(kinds: torch.Tensor, grids: _Grids) -> torch.Tensor:
    """Positions [3, n] of one sample's n tokens of these kinds, counted from 0; its images and videos take
    grids in order."""
    pieces, next_position, i, n = [], 0, 0, kinds.numel()
    flags = kinds.tolist()
    while i < n:
        if flags[i] == TEXT:
            end = _run_end(flags, i)
            pieces.append(torch.arange(next_position, next_position + end - i).expand(3, -1))
            next_position += end - i
            i = end
            continue
        t, h, w, step = grids.next(flags[i])
        count = t * h * w
        if i + count > n or any(kind != flags[i] for kind in flags[i:i + count]):
            raise ValueError(f"a grid of {t}x{h}x{w} tokens (grid_thw over spatial_merge_size {grids.merge}) does "
                             f"not fit the run of its tokens at position {i}")
        pieces.append(_vision_positions(t, h, w, next_position, step))
        next_position += max(h, w)
        i += count
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def _run_end(flags: list[int], start: int) -> int:
    """End of the run of text tokens starting at `start`."""
    end = start
    while end < len(flags) and flags[end] == TEXT:
        end += 1
    return end


def _vision_positions(t: int, h: int, w: int, start: int, step: float) -> torch.Tensor:
    """(start + ⌊i·step⌋, start + j, start + k) of a grid's t·h·w tokens in row-major order: [3, t·h·w]."""
    temporal = (torch.arange(t) * step).long()
    grid = torch.meshgrid(temporal, torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(grid).reshape(3, -1) + start
