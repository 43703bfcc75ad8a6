"""Writing tensors as Hugging Face safetensors: one `model.safetensors`, or shards with the index transformers reads.

Tensors stream in and each shard is written as soon as the next tensor would overflow it, so only one shard is
ever held (a 7B model is never whole in memory). The shard count is known only at the end: shards are written
under provisional names and renamed to `model-0000i-of-0000n.safetensors` (the names `save_pretrained` writes).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ExportError(ValueError):
    """A model or an output directory export cannot write."""


def check_new_directory(out: Path) -> None:
    """`out` can become an export: absent, or an empty directory (a file there, or a directory with files, is an
    ExportError: an export never mixes with or replaces what is there)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; give a new directory")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; give a new directory")


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int) -> list[Path]:
    """Write (name, contiguous CPU tensor) pairs in their order into shards of at most `max_shard_bytes` (a larger
    tensor gets a shard of its own); one shard is `model.safetensors`, more get `model.safetensors.index.json`.
    Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = []  # the names in each shard written so far
    shard: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    size = total = 0
    for name, tensor in tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} is given twice; each name must be written once")
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            shards.append(_save_part(shard, out, len(shards)))
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
        total += nbytes
    if shard or not shards:
        shards.append(_save_part(shard, out, len(shards)))
    return _name_shards(shards, out, total)


def _part(out: Path, i: int) -> Path:
    """Shard i's provisional file, until the shard count is known."""
    return out / f"model-{i + 1:05d}.safetensors.part"


def _save_part(shard: dict[str, torch.Tensor], out: Path, i: int) -> list[str]:
    """Write shard i under its provisional name; the names it holds."""
    save_file(shard, _part(out, i), metadata={"format": "pt"})
    return list(shard)


def _name_shards(shards: list[list[str]], out: Path, total: int) -> list[Path]:
    """Give the shards their final names (and, for several, write the index of every tensor's file)."""
    if len(shards) == 1:
        return [_part(out, 0).replace(out / SINGLE_FILE)]
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        files.append(_part(out, i).replace(out / file))
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*files, out / INDEX_FILE]
