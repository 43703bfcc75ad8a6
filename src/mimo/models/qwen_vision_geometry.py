"""Where each packed patch of a Qwen-VL vision call sits: the index tensors a tower needs, from `grid_thw` alone.

A call's patches arrive packed: image after image (a video's frames one after another), each frame's patches in
the processor's merge order (2×2 blocks of neighbours consecutive, blocks row by row). From `grid_thw` [n, 3]
(frames, patch rows, patch columns per item) this computes, as transformers' `vision_utils` does:
- each patch's (row, column) in its frame (the 2-D rotary positions; Qwen3-VL's position-table lookup too);
- the frame lengths (full attention is block-diagonal per frame);
- Qwen2.5-VL's window order: merged tokens regrouped window by window (windows of `window_size` pixels, the
  last row and column of windows partial where the grid does not divide), the window lengths, and its inverse.
These use Python loops and `.tolist()` (data-dependent shapes), so they run before the tower's blocks, once per
call, never inside a compiled graph; a data loader may build them ahead (`forward(..., geometry=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from mimo.models.transfer import to_device


@dataclass(frozen=True)
class VisionGeometry:
    """Index tensors of one packed call: positions [N, 2], frame lengths, and Qwen2.5's window order (or None)."""

    positions: torch.Tensor  # [N, 2] long: (row, column) of each patch in its frame
    sizes: torch.Tensor  # [N, 2] long: (rows, columns) of each patch's frame
    frame_lengths: tuple[int, ...]  # patches per frame, in packed order (full attention's blocks)
    window_order: torch.Tensor | None = None  # [N] long: patch i of the windowed sequence is patch order[i]
    window_lengths: tuple[int, ...] = ()  # patches per window, in windowed order (window attention's blocks)
    merged_inverse: torch.Tensor | None = None  # [N / merge²] long: undoes the window order on merged tokens

    @property
    def num_patches(self) -> int:
        """Patches in the call."""
        return int(self.positions.shape[0])

    def to(self, device: torch.device | str) -> VisionGeometry:
        """The same geometry with its index tensors on `device` (itself when they are there already)."""
        device = torch.device(device)
        if self.positions.device == device:
            return self
        return replace(self, **{f.name: to_device(getattr(self, f.name), device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def check_grid(grid_thw: torch.Tensor, merge: int, num_patches: int) -> list[tuple[int, int, int]]:
    """grid_thw as a list of (t, h, w), refused with one line unless it is [n, 3], positive, merge-divisible and
    accounts for exactly `num_patches` patches."""
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"grid_thw must be [n_images, 3] (t, h, w), got shape {tuple(grid_thw.shape)}")
    grid = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
    for t, h, w in grid:
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise ValueError(f"grid_thw row {(t, h, w)}: t, h, w must be positive and h, w multiples of the "
                             f"spatial merge size {merge}")
    total = sum(t * h * w for t, h, w in grid)
    if total != num_patches:
        raise ValueError(f"grid_thw accounts for {total} patches but pixel_values holds {num_patches}")
    return grid


def _frame_positions(h: int, w: int, merge: int) -> torch.Tensor:
    """(row, column) of a frame's h×w patches in merge order: [h·w, 2]."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    return torch.stack([rows.reshape(shape).transpose(1, 2).flatten(), cols.reshape(shape).transpose(1, 2).flatten()],
                       dim=-1)


def _window_order(t: int, h: int, w: int, merge: int, side: int) -> tuple[torch.Tensor, list[int]]:
    """One item's merged tokens regrouped by windows of `side`×`side` merged tokens (frame by frame), and the
    merged-token count of each non-empty window (transformers' `get_vision_window_index`, per item)."""
    mh, mw = h // merge, w // merge
    index = torch.arange(t * mh * mw).reshape(t, mh, mw)
    pad_h, pad_w = -mh % side, -mw % side
    padded = torch.nn.functional.pad(index, (0, pad_w, 0, pad_h), value=-1)
    nh, nw = (mh + pad_h) // side, (mw + pad_w) // side
    windows = padded.reshape(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, side * side)
    counts = (windows >= 0).sum(-1)
    flat = windows.flatten()
    return flat[flat >= 0], [int(c) for c in counts.tolist() if c]


def window_sizes(t: int, h: int, w: int, merge: int, side: int) -> list[int]:
    """Patches per window of one item (t frames of h×w patches, windows of side×side merged tokens), in window
    order, without building the order itself (what a FLOP count needs)."""
    def spans(n: int) -> list[int]:
        return [side] * (n // side) + ([n % side] if n % side else [])

    rows, cols = spans(h // merge), spans(w // merge)
    return [r * c * merge * merge for _ in range(t) for r in rows for c in cols]


def vision_geometry(grid_thw: torch.Tensor, merge: int, num_patches: int,
                    window_tokens: int | None = None) -> VisionGeometry:
    """The geometry of a call; `window_tokens`: Qwen2.5's window side in merged tokens (None: no windows)."""
    grid = check_grid(grid_thw, merge, num_patches)
    positions, sizes, frames = [], [], []
    for t, h, w in grid:
        positions.append(_frame_positions(h, w, merge).repeat(t, 1))
        sizes.append(torch.tensor([h, w]).expand(t * h * w, 2))
        frames += [h * w] * t
    geometry = dict(positions=torch.cat(positions), sizes=torch.cat(sizes), frame_lengths=tuple(frames))
    if window_tokens is not None:
        geometry.update(_windows(grid, merge, window_tokens))
    device = grid_thw.device
    return VisionGeometry(**{k: to_device(v, device) if isinstance(v, torch.Tensor) else v
                             for k, v in geometry.items()})


def _windows(grid: list[tuple[int, int, int]], merge: int, side: int) -> dict[str, object]:
    """Window order (patch level), window lengths (patches) and the merged-token inverse of a whole call."""
    unit = merge * merge
    orders, lengths, offset = [], [], 0
    for t, h, w in grid:
        order, counts = _window_order(t, h, w, merge, side)
        orders.append(order + offset)
        lengths += [c * unit for c in counts]
        offset += t * (h // merge) * (w // merge)
    merged = torch.cat(orders)
    patch_order = (merged[:, None] * unit + torch.arange(unit)).flatten()
    return dict(window_order=patch_order, window_lengths=tuple(lengths), merged_inverse=torch.argsort(merged))
