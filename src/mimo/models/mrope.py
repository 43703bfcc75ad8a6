"""M-RoPE positions: each token's (temporal, height, width) position, as transformers' `get_rope_index` computes
them for Qwen2.5-VL and Qwen3-VL (images; the two agree there).

A text token's three positions are equal and count up by one. An image of (t, h, w) patches, merged
`spatial_merge_size`² to a token, takes t·(h/m)·(w/m) tokens laid out row-major; starting at the next text
position p, its token (i, j, k) gets (p + i, p + j, p + k), and the text after it continues at
p + max(h, w) / m. A padded position (attention mask 0) gets 0 everywhere. Rows, and in a packed row each
document, count from 0 on their own, so a packed row's positions equal each sample's unpacked ones.
Images are consumed from `image_grid_thw` in row-major order of their tokens; consecutive images with no
text between are told apart by their token counts (transformers' grouping would merge them).
Host-side work on the data path (a loop per image, as transformers' is).
"""

from __future__ import annotations

import torch


def get_rope_index(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, spatial_merge_size: int, image_token_id: int,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [3, B, S] and rope deltas [B, 1] (a row's largest position + 1 − its unmasked tokens: what
    generation adds to a new token's index), equal to transformers' `get_rope_index` for images."""
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    grids = _Grids(image_grid_thw, spatial_merge_size)
    deltas = []
    for row in range(input_ids.shape[0]):
        ids = input_ids[row][keep[row]].cpu()
        row_positions = _sample_positions(ids == image_token_id, grids)
        positions[:, row, keep[row].cpu()] = row_positions
        deltas.append(int(row_positions.max()) + 1 - ids.numel() if ids.numel() else 0)
    grids.check_all_used()
    return positions.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def packed_rope_index(
    input_ids: torch.Tensor, document_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
    spatial_merge_size: int, image_token_id: int,
) -> torch.Tensor:
    """Positions [3, R, T] of packed rows: each document (a run of equal `document_ids`) counted from 0 as the
    sample it is, so every document's positions equal `get_rope_index` of that sample alone."""
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    grids = _Grids(image_grid_thw, spatial_merge_size)
    for row in range(input_ids.shape[0]):
        ids, docs = input_ids[row].cpu(), document_ids[row].cpu()
        starts = [0, *(torch.nonzero(docs[1:] != docs[:-1]).flatten() + 1).tolist(), ids.numel()]
        for start, end in zip(starts[:-1], starts[1:], strict=True):
            positions[:, row, start:end] = _sample_positions(ids[start:end] == image_token_id, grids)
    grids.check_all_used()
    return positions.to(input_ids.device)


class _Grids:
    """The images' (t, h, w) patch grids in order, handed out one image at a time as token grids."""

    def __init__(self, image_grid_thw: torch.Tensor | None, merge: int) -> None:
        """Hold the grids on the host; `merge` is the spatial merge size (2: 2×2 patches make one token)."""
        self.grids = [] if image_grid_thw is None else image_grid_thw.tolist()
        self.merge = merge
        self.used = 0

    def next(self) -> tuple[int, int, int]:
        """The next image's token grid (t, h / merge, w / merge)."""
        if self.used == len(self.grids):
            raise ValueError(f"the input ids hold more image tokens than the {len(self.grids)} image(s) of "
                             f"image_grid_thw make")
        t, h, w = self.grids[self.used]
        self.used += 1
        return t, h // self.merge, w // self.merge

    def check_all_used(self) -> None:
        """Every image of image_grid_thw found its tokens."""
        if self.used != len(self.grids):
            raise ValueError(f"image_grid_thw has {len(self.grids)} image(s) but the input ids hold the tokens of "
                             f"only {self.used}")


def _sample_positions(is_image: torch.Tensor, grids: _Grids) -> torch.Tensor:
    """Positions [3, n] of one sample's n tokens, counted from 0; its images take grids in order."""
    pieces, next_position, i, n = [], 0, 0, is_image.numel()
    flags = is_image.tolist()
    while i < n:
        if not flags[i]:
            end = _next_image(flags, i)
            pieces.append(torch.arange(next_position, next_position + end - i).expand(3, -1))
            next_position += end - i
            i = end
            continue
        t, h, w = grids.next()
        if i + t * h * w > n or not all(flags[i:i + t * h * w]):
            raise ValueError(f"an image of {t}x{h}x{w} tokens (image_grid_thw over spatial_merge_size "
                             f"{grids.merge}) does not fit the run of image tokens at position {i}")
        pieces.append(_image_positions(t, h, w, next_position))
        next_position += max(h, w)
        i += t * h * w
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def _next_image(flags: list[bool], start: int) -> int:
    """Index of the first image token at or after `start`, or len(flags) if none."""
    try:
        return flags.index(True, start)
    except ValueError:
        return len(flags)


def _image_positions(t: int, h: int, w: int, start: int) -> torch.Tensor:
    """(start + i, start + j, start + k) of an image's t·h·w tokens in row-major order: [3, t·h·w]."""
    grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(grid).reshape(3, -1) + start
