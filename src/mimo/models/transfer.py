"""Host tensors onto the GPU without blocking the host: a copy from pageable memory waits for the GPU's queue to
drain first, so every index or length built on the host (batches, packed texts, routes, a vision call's geometry)
crosses from pinned memory instead, and the host keeps launching while it travels."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`: from the host to a GPU, copied from pinned memory (pinned here unless it is) without
    blocking the host; itself where it is there already; a plain `.to` otherwise."""
    device = torch.device(device)
    if t.device == device or device.type == "cpu":
        return t if t.device == device else t.to(device)
    if t.device.type != "cpu" or device.type != "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
